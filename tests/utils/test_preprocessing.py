import json

import cv2
import numpy as np
import pytest

from utils.preprocessing import (
    ImageReadError,
    PreprocessSpec,
    display_to_cache,
    read_raster,
    resize_display,
    resized_shape,
    to_model_input,
    to_uint8,
)


def test_spec_round_trip_and_validation(tmp_path):
    spec = PreprocessSpec(class_names=("a", "b", "c"), image_size=64, channels=1, aspect="letterbox",
                          window_percentiles=(1.0, 99.0))
    path = spec.save(tmp_path)
    assert path.name == "preprocess.json"
    assert PreprocessSpec.load(tmp_path) == spec
    assert spec.input_shape == (64, 64, 1) and spec.num_classes == 3
    data = json.loads(path.read_text())
    with pytest.raises(ValueError, match="unknown"):
        PreprocessSpec.from_dict({**data, "mean": 0.5})
    with pytest.raises(ValueError, match="newer"):
        PreprocessSpec.from_dict({**data, "version": 99})
    with pytest.raises(ValueError):
        PreprocessSpec(aspect="squash")
    with pytest.raises(ValueError):
        PreprocessSpec(channels=2)


def test_stretch_fills_the_square():
    image = np.ones((100, 50), np.float32)
    out = resize_display(image, 32, "stretch")
    assert out.shape == (32, 32) and np.allclose(out, 1.0)


def test_letterbox_keeps_aspect_and_pads_black():
    image = np.ones((100, 50), np.float32)
    out = resize_display(image, 32, "letterbox")
    assert out.shape == (32, 32)
    columns_with_content = np.where(out.max(axis=0) > 0.5)[0]
    assert len(columns_with_content) == 16  # 50/100 of 32
    assert columns_with_content[0] == 8  # centred
    assert out[:, :8].max() == 0.0


@pytest.mark.parametrize("shape", [(100, 50), (50, 100), (97, 61), (40, 40)])
def test_resized_shape_is_the_content_of_resize_display(shape):
    out = resize_display(np.ones(shape, np.float32), 32, "letterbox")
    content = (int((out.max(axis=1) > 0.5).sum()), int((out.max(axis=0) > 0.5).sum()))
    assert resized_shape(*shape, 32, "letterbox") == content
    assert resized_shape(*shape, 32, "stretch") == (32, 32)
    with pytest.raises(ValueError, match="aspect"):
        resized_shape(*shape, 32, "squash")


def test_area_interpolation_when_shrinking_averages():
    checker = np.indices((64, 64)).sum(axis=0) % 2  # 1-pixel checkerboard
    out = resize_display(checker.astype(np.float32), 32, "stretch")
    assert np.allclose(out, 0.5, atol=1e-6)  # area averaging, not sampling


def test_to_uint8_rounds_and_clips():
    assert to_uint8(np.array([-0.1, 0.0, 0.5, 1.0, 1.2], np.float32)).tolist() == [0, 0, 128, 255, 255]


def test_display_to_cache_is_uint8_at_spec_size():
    spec = PreprocessSpec(image_size=40)
    out = display_to_cache(np.random.default_rng(0).random((123, 77), dtype=np.float32), spec)
    assert out.dtype == np.uint8 and out.shape == (40, 40)


def test_read_raster_8_and_16_bit_and_colour(tmp_path):
    gray8 = np.array([[0, 255], [128, 64]], np.uint8)
    cv2.imwrite(str(tmp_path / "g8.png"), gray8)
    assert np.allclose(read_raster(tmp_path / "g8.png"), gray8 / 255.0)
    gray16 = np.array([[0, 65535], [32768, 1000]], np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), gray16)
    assert np.allclose(read_raster(tmp_path / "g16.png"), gray16 / 65535.0)
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[..., 1] = 200  # green, BGR order
    cv2.imwrite(str(tmp_path / "c.png"), colour)
    out = read_raster(tmp_path / "c.png")
    assert out.shape == (4, 4) and 0.4 < out.mean() < 0.5  # luminance of green 200


@pytest.mark.parametrize("content, reason", [(b"", "empty_file"), (b"not an image", "unreadable_image")])
def test_read_raster_errors_carry_a_reason(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ImageReadError) as info:
        read_raster(path)
    assert info.value.reason == reason


def test_model_input_replicates_gray():
    image = np.array([[0, 255]], np.uint8)
    x3 = to_model_input(image, 3)
    assert x3.shape == (1, 2, 3) and x3.dtype == np.float32 and x3[0, 1].tolist() == [255.0] * 3
    assert to_model_input(np.stack([image, image]), 1).shape == (2, 1, 2, 1)


def test_same_pixels_compares_what_the_cache_depends_on():
    spec = PreprocessSpec(image_size=64)
    assert spec.same_pixels(spec.replace(channels=3, class_names=("x", "y")))  # not part of the cached pixels
    assert not spec.same_pixels(spec.replace(image_size=32))
    assert not spec.same_pixels(spec.replace(aspect="letterbox"))
    assert not spec.same_pixels(spec.replace(window_percentiles=(1.0, 99.0)))


@pytest.mark.parametrize("changes, needle", [
    ({"image_size": 16}, "image_size must be between 32 and 4096, got 16"),
    ({"image_size": 5000}, "image_size must be between 32 and 4096, got 5000"),
    ({"channels": 2}, r"channels must be one of \(1, 3\), got 2"),
    ({"aspect": "squash"}, "aspect must be one of"),
    ({"window_percentiles": [-1, 99]}, r"window_percentiles must be between 0 and 100 \(each value\)"),
    ({"window_percentiles": [99, 1]}, "window_percentiles needs 0 <= low < high <= 100"),
])
def test_a_spec_file_is_checked_with_the_bounds_of_the_flags(tmp_path, changes, needle):
    """preprocess.json (saved with data and models) obeys constants.py's *_RANGE/*_CHOICES, as --image-size does."""
    from utils import config

    path = PreprocessSpec().save(tmp_path)
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    with pytest.raises(ValueError, match=f"^preprocessing spec: {needle}"):
        PreprocessSpec.load(tmp_path)
    key, value = next(iter(changes.items()))
    with pytest.raises(config.ConfigError):  # the flag refuses the same value
        config.validate({key: tuple(value) if isinstance(value, list) else value})
    if key == "image_size":
        assert needle.startswith(f"image_size must be {config.value_range('IMAGE_SIZE').rule()}")
        PreprocessSpec(image_size=32)  # the lowest the flag accepts is a valid spec
