import cv2
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from utils.data.dataset import Augmentation, augment_batch, build_dataset, load_split, random_rotate, rotate_uint8
from utils.preprocessing import PreprocessSpec

SIZE = 32


@pytest.fixture
def prepared(tmp_path):
    """A tiny prepared dataset: 3 classes x 4 images, the pixel value encodes the image index."""
    rows = []
    for i in range(12):
        label = ("a", "b", "c")[i % 3]
        path = f"images/{label}/{i}.png"
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / path), np.full((SIZE, SIZE), 10 * i, np.uint8))
        rows.append({"path": path, "label": label, "split": "train" if i < 9 else "test", "group": str(i)})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    return tmp_path


def spec(channels=3):
    return PreprocessSpec(class_names=("a", "b", "c"), image_size=SIZE, channels=channels)


def test_eval_pipeline_keeps_order_values_and_labels(prepared):
    ds, frame = load_split(prepared, "train", spec(), training=False, batch_size=4)
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    images, labels = np.concatenate(images), np.concatenate(labels)
    assert images.shape == (9, SIZE, SIZE, 3) and images.dtype == np.float32
    assert labels.tolist() == frame["y"].tolist()
    # the value written into each PNG comes back unchanged, in the order of labels.csv
    assert images[:, 0, 0, 0].tolist() == [10.0 * int(p.split("/")[-1][:-4]) for p in frame["path"]]


def test_single_channel_and_images_only(prepared):
    ds = build_dataset([str(prepared / "images/a/0.png")], None, spec(channels=1), training=False, batch_size=2)
    (batch,) = list(ds)
    assert batch.shape == (1, SIZE, SIZE, 1)


def test_training_shuffles_and_augments_per_image_and_epoch(prepared):
    aug = Augmentation(rotation_deg=10, brightness=0.1, contrast=0.1, horizontal_flip=False)
    ds, frame = load_split(prepared, "train", spec(), training=True, batch_size=9, augmentation=aug, seed=3)
    first, second = [next(iter(ds)) for _ in range(2)]
    x1, y1 = first[0].numpy(), first[1].numpy()
    assert sorted(y1.tolist()) == sorted(frame["y"].tolist())
    assert 0.0 <= x1.min() and x1.max() <= 255.0
    means = x1.mean(axis=(1, 2, 3))
    originals = np.sort(10.0 * np.arange(9))
    assert not np.allclose(np.sort(means), originals, atol=0.5)  # brightness/contrast were applied
    assert not np.array_equal(first[0].numpy(), second[0].numpy())  # new draws (and order) each epoch


def test_cached_image_of_wrong_size_fails_loudly(prepared):
    bad = prepared / "images/a/bad.png"
    cv2.imwrite(str(bad), np.zeros((SIZE + 1, SIZE), np.uint8))
    ds = build_dataset([str(bad)], [0], spec(), training=False, batch_size=1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected shape"):
        list(ds)


def test_rotation_geometry():
    image = np.zeros((21, 21, 1), np.uint8)
    image[2, 10, 0] = 200  # a dot straight above the centre
    assert np.array_equal(rotate_uint8(image, 0.0), image)
    assert np.argwhere(rotate_uint8(image, 180.0)[..., 0] > 100).tolist() == [[18, 10]]  # about the centre
    assert np.argwhere(rotate_uint8(image, 90.0)[..., 0] > 100).tolist() in ([[10, 2]], [[10, 18]])


def test_random_rotate_draws_an_angle_per_image_within_range_and_is_seeded():
    square = np.pad(np.full((8, 8, 1), 255, np.uint8), ((12, 12), (12, 12), (0, 0)))
    images = tf.constant(np.stack([square] * 6))
    out = random_rotate(images, 10.0, tf.constant([0, 7])).numpy()
    assert out.shape == (6, 32, 32, 1) and out.dtype == np.uint8
    assert len({o.tobytes() for o in out}) == 6  # a different angle for every image
    assert np.array_equal(out, random_rotate(images, 10.0, tf.constant([0, 7])).numpy())
    assert not np.array_equal(out, random_rotate(images, 10.0, tf.constant([1, 7])).numpy())
    # at most 10 degrees: a centred square keeps most of its mass inside its own footprint
    assert all(o[12:20, 12:20].mean() > 0.7 * 255 for o in out)


def test_augment_batch_without_any_transform_is_identity():
    images = tf.random.uniform((2, SIZE, SIZE, 3), 0, 255)
    out = augment_batch(images, Augmentation(0.0, 0.0, 0.0, False), tf.constant([1, 2]))
    assert np.allclose(out.numpy(), images.numpy())


def test_photometric_draws_differ_per_image_and_stay_in_range():
    images = tf.fill((16, SIZE, SIZE, 1), 100.0)
    images = tf.concat([images[:, :16], images[:, 16:] + 50.0], axis=1)
    out = augment_batch(images, Augmentation(0.0, 0.2, 0.2, False), tf.constant([3, 4])).numpy()
    assert len(np.unique(out[:, 0, 0, 0].round(3))) == 16 and 0 <= out.min() and out.max() <= 255


def test_flip_only_when_asked():
    image = tf.reshape(tf.range(SIZE * SIZE, dtype=tf.float32) % 255, (1, SIZE, SIZE, 1))
    images = tf.repeat(image, 40, axis=0)
    out = augment_batch(images, Augmentation(0, 0, 0, True), tf.constant([5, 0])).numpy()
    flipped = [not np.allclose(o, image[0].numpy()) for o in out]
    assert 8 < sum(flipped) < 32
    assert all(np.allclose(o, image[0, :, ::-1].numpy()) for o, f in zip(out, flipped) if f)


def _dot(rows=21, cols=21, at=(14, 10)):
    image = np.zeros((rows, cols, 1), np.uint8)
    image[at[0], at[1], 0] = 255
    return image


def _peak(image):
    return tuple(int(v) for v in np.unravel_index(np.argmax(image[..., 0]), image.shape[:2]))


def test_affine_warp_zooms_shifts_and_shears_about_the_centre():
    from utils.data.dataset import affine_uint8

    image = _dot(at=(14, 10))  # 4 rows below the centre (10, 10)
    assert _peak(affine_uint8(image, scale=2.0)) == (18, 10)  # twice as far from the centre
    assert _peak(affine_uint8(image, shift=(3.0, -2.0))) == (12, 13)  # x right 3, y up 2
    assert _peak(affine_uint8(image, shear_deg=45.0)) == (14, 14)  # x moves by tan(45) * (y - centre)
    for degrees in (0.0, 12.5, -30.0):  # rotation alone is rotate_uint8, bit for bit
        noise = np.random.default_rng(1).integers(0, 256, (33, 27, 1), dtype=np.uint8)
        assert np.array_equal(affine_uint8(noise, degrees), rotate_uint8(noise, degrees))


def test_random_affine_draws_per_image_is_seeded_and_is_the_paper_rotation_when_alone():
    from utils.data.dataset import random_affine

    images = tf.constant(np.repeat(_dot(at=(14, 10))[None], 8, axis=0))
    rotation_only = Augmentation(rotation_deg=10.0, brightness=0.0, contrast=0.0, horizontal_flip=False)
    np.testing.assert_array_equal(random_affine(images, rotation_only, tf.constant([3, 4])).numpy(),
                                  random_rotate(images, 10.0, tf.constant([3, 4])).numpy())
    shifting = Augmentation(0.0, 0.0, 0.0, False, scale=0.2, translate=0.1, shear_deg=5.0)
    assert shifting.geometric and not Augmentation(0.0, 0.1, 0.0, False).geometric
    out = random_affine(images, shifting, tf.constant([3, 4])).numpy()
    peaks = {_peak(o) for o in out}
    assert len(peaks) > 4  # each image got its own draw
    # translation at most 10 % of 21 px (2.1) + zoom 20 % of 4 px + shear: the dot stays near its place
    assert all(abs(r - 14) <= 4 and abs(c - 10) <= 4 for r, c in peaks)
    np.testing.assert_array_equal(out, random_affine(images, shifting, tf.constant([3, 4])).numpy())
    assert not np.array_equal(out, random_affine(images, shifting, tf.constant([5, 4])).numpy())


def test_geometric_augmentation_reaches_the_training_pipeline(tmp_path):
    from utils.preprocessing import PreprocessSpec

    path = tmp_path / "dot.png"
    cv2.imwrite(str(path), _dot(32, 32, at=(20, 16))[..., 0])
    spec = PreprocessSpec(class_names=("a", "b"), image_size=32)
    aug = Augmentation(0.0, 0.0, 0.0, False, translate=0.2)
    batches = [x.numpy() for x, _ in build_dataset([str(path)] * 8, [0] * 8, spec, training=True, batch_size=8,
                                                   augmentation=aug, seed=1).take(1)]
    assert len({_peak(image) for image in batches[0]}) > 3


def test_gaussian_blur_keeps_flat_images_and_spreads_a_dot_with_unit_sum():
    from utils.data.dataset import _gaussian_blur

    flat = tf.fill((2, SIZE, SIZE, 3), 80.0)
    np.testing.assert_allclose(_gaussian_blur(flat).numpy(), 80.0, rtol=1e-5)
    dot = np.zeros((1, SIZE, SIZE, 1), np.float32)
    dot[0, 16, 16, 0] = 255.0
    out = _gaussian_blur(tf.constant(dot)).numpy()
    assert out.shape == dot.shape and abs(out.sum() - 255.0) < 1e-2
    assert out[0, 16, 16, 0] < 0.2 * 255 and out[0, 16, 17, 0] > 0 and out[0, 20, 16, 0] < 1e-3  # sigma 1 px


def test_detector_look_gamma_keeps_black_and_white_and_bends_mid_gray_both_ways():
    from utils.data.dataset import detector_look

    ramp = tf.tile(tf.reshape(tf.linspace(0.0, 255.0, SIZE), (1, 1, SIZE, 1)), (64, SIZE, 1, 1))
    out = detector_look(ramp, Augmentation(0.0, 0.0, 0.0, False, gamma=0.4), tf.constant([1, 2])).numpy()
    assert np.allclose(out[:, :, 0], 0.0) and np.allclose(out[:, :, -1], 255.0, atol=1e-3)
    mid, before = out[:, 0, SIZE // 2, 0], float(ramp[0, 0, SIZE // 2, 0])
    assert (mid > before + 5).any() and (mid < before - 5).any()
    assert (np.diff(out[:, 0, :, 0], axis=1) >= 0).all()  # a curve, never an inversion
    exponents = np.log(out[:, 0, 1:-1, 0] / 255.0) / np.log(ramp[0, 0, 1:-1, 0].numpy() / 255.0)
    assert (exponents > np.exp(-0.4) - 1e-3).all() and (exponents < np.exp(0.4) + 1e-3).all()


def test_detector_look_sharpness_blurs_or_enhances_an_edge_and_leaves_flat_areas():
    from utils.data.dataset import detector_look

    edge = np.full((32, SIZE, SIZE, 1), 60.0, np.float32)
    edge[:, :, SIZE // 2:] = 180.0
    out = detector_look(tf.constant(edge), Augmentation(0.0, 0.0, 0.0, False, sharpness=1.0),
                        tf.constant([7, 8])).numpy()
    left, right = out[:, 5, SIZE // 2 - 1, 0], out[:, 5, SIZE // 2, 0]
    assert (right - left < 120 - 10).any()  # blurred: the step got smaller
    assert (right - left > 120 + 10).any()  # edge-enhanced: overshoot on both sides
    np.testing.assert_allclose(out[:, :, :4], 60.0, atol=1e-3)  # far from the edge nothing moves


def test_detector_look_noise_has_a_per_image_sd_within_the_bound_and_is_seeded():
    from utils.data.dataset import detector_look

    gray = tf.fill((16, SIZE, SIZE, 1), 128.0)
    aug = Augmentation(0.0, 0.0, 0.0, False, noise=0.05)
    out = detector_look(gray, aug, tf.constant([3, 1])).numpy()
    sds = out.reshape(16, -1).std(axis=1)
    assert (sds <= 0.05 * 255 * 1.1).all() and len(np.unique(sds.round(2))) == 16 and sds.max() > 2.0
    np.testing.assert_array_equal(out, detector_look(gray, aug, tf.constant([3, 1])).numpy())
    assert not np.array_equal(out, detector_look(gray, aug, tf.constant([4, 1])).numpy())


def test_detector_look_is_off_by_default_and_leaves_the_other_draws_alone():
    base = Augmentation(0.0, 0.2, 0.2, False)
    assert not base.detector and Augmentation(0.0, 0.0, 0.0, False, noise=0.01).detector
    images = tf.random.stateless_uniform((8, SIZE, SIZE, 1), [1, 1], 0, 255)
    # the contrast / brightness draws are the paper recipe's, with or without the detector look
    plain = augment_batch(images, base, tf.constant([2, 3])).numpy()
    tiny_gamma = Augmentation(0.0, 0.2, 0.2, False, gamma=1e-6)
    np.testing.assert_allclose(augment_batch(images, tiny_gamma, tf.constant([2, 3])).numpy(), plain, atol=0.05)


def test_augmentation_from_settings_reads_a_run_and_takes_missing_fields_as_off():
    old_run = {"augment_rotation_deg": 10.0, "augment_brightness": 0.1, "augment_contrast": 0.1,
               "horizontal_flip": False}
    assert Augmentation.from_settings(old_run) == Augmentation(10.0, 0.1, 0.1, False, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    new_run = {**old_run, "augment_scale": 0.1, "augment_gamma": 0.3, "augment_sharpness": 0.5, "augment_noise": 0.02}
    aug = Augmentation.from_settings(new_run)
    assert (aug.scale, aug.gamma, aug.sharpness, aug.noise) == (0.1, 0.3, 0.5, 0.02) and aug.detector


def test_detector_look_reaches_the_training_pipeline(prepared):
    aug = Augmentation(0.0, 0.0, 0.0, False, noise=0.05)
    ds, _ = load_split(prepared, "train", spec(channels=3), training=True, batch_size=9, augmentation=aug)
    images = next(iter(ds))[0].numpy()
    assert images.reshape(9, -1).std(axis=1).max() > 1.0  # each PNG is flat: only noise gives spread
    np.testing.assert_array_equal(images[..., 0], images[..., 2])  # drawn on gray, then replicated


def test_site_look_draws_borders_inversions_and_equalisation_with_their_probabilities():
    """Another site's rendering (utils/evaluate/shifts.py measured these break the small-data model): each with
    its probability per image, seeded, and nothing at probability 0."""
    from utils.data.dataset import BORDER_MAX, site_look

    ramp = np.tile(np.linspace(40.0, 200.0, SIZE, dtype=np.float32)[None, None, :, None], (200, SIZE, 1, 1))
    images = tf.constant(ramp)
    off = site_look(images, Augmentation(0.0, 0.0, 0.0, False), tf.constant([1, 2])).numpy()
    np.testing.assert_array_equal(off, ramp)

    bordered = site_look(images, Augmentation(0.0, 0.0, 0.0, False, border=0.5), tf.constant([1, 2])).numpy()
    changed = (bordered != ramp).reshape(len(ramp), -1).mean(axis=1)
    assert 0.3 < (changed > 0).mean() < 0.7  # about half the images get bands (some draw no side)
    assert changed.max() <= 1 - (1 - 2 * BORDER_MAX) ** 2 + 0.05  # no band deeper than BORDER_MAX (4 sides)
    assert set(np.unique(bordered[bordered != ramp])) <= {0.0, 255.0}  # black or white
    rows = bordered[changed > 0][:, :, SIZE // 2, 0]
    assert ((rows[:, 0] != ramp[0, 0, SIZE // 2, 0]) | (rows[:, -1] != ramp[0, -1, SIZE // 2, 0])
            | (bordered[changed > 0][:, SIZE // 2, 0, 0] != ramp[0, SIZE // 2, 0, 0])
            | (bordered[changed > 0][:, SIZE // 2, -1, 0] != ramp[0, SIZE // 2, -1, 0])).all()  # bands at the edges

    inverted = site_look(images, Augmentation(0.0, 0.0, 0.0, False, invert=0.3), tf.constant([3, 4])).numpy()
    flipped = np.array([np.allclose(i, 255.0 - ramp[0]) for i in inverted])
    kept = np.array([np.array_equal(i, ramp[0]) for i in inverted])
    assert (flipped | kept).all() and 0.15 < flipped.mean() < 0.45

    equalised = site_look(images, Augmentation(0.0, 0.0, 0.0, False, equalise=1.0), tf.constant([5, 6])).numpy()
    assert equalised.min() == 0.0 and equalised.max() == 255.0  # the range stretched to the full scale
    assert (np.diff(equalised[0, 0, :, 0]) >= 0).all()  # monotone: an equalisation, not an inversion

    again = site_look(images, Augmentation(0.0, 0.0, 0.0, False, border=0.5), tf.constant([1, 2])).numpy()
    np.testing.assert_array_equal(again, bordered)  # seeded
    assert Augmentation(0.0, 0.0, 0.0, False, invert=0.1).active and not Augmentation(0.0, 0.0, 0.0, False).site
    settings = {"augment_rotation_deg": 0.0, "augment_brightness": 0.0, "augment_contrast": 0.0,
                "horizontal_flip": False, "augment_border": 0.3}
    assert Augmentation.from_settings(settings).border == 0.3  # a run's config.json; older ones: off
    assert Augmentation.from_settings({**settings, "augment_border": 0.0}).site is False


def test_site_look_resamples_and_jpeg_encodes_with_their_probabilities():
    """A lower-resolution export (shrunk, enlarged back: fine detail averaged away, a flat image unchanged) and a
    lossy JPEG export, each with its probability per image, seeded, in range, and off at probability 0."""
    from utils.data.dataset import site_look

    rng = np.random.default_rng(0)
    noise = tf.constant(rng.integers(0, 256, (40, SIZE, SIZE, 1)).astype(np.float32))
    resampled = site_look(noise, Augmentation(0.0, 0.0, 0.0, False, resample=0.5), tf.constant([1, 2])).numpy()
    changed = np.array([not np.array_equal(a, b) for a, b in zip(resampled, noise.numpy())])
    assert 0.25 < changed.mean() < 0.75
    assert resampled[changed].std() < 0.8 * noise.numpy().std()  # pixel noise averaged away
    flat = tf.fill((4, SIZE, SIZE, 1), 100.0)
    np.testing.assert_allclose(site_look(flat, Augmentation(0.0, 0.0, 0.0, False, resample=1.0),
                                         tf.constant([1, 2])).numpy(), 100.0, atol=1e-3)

    ramp = tf.constant(np.tile(np.linspace(0.0, 255.0, SIZE, dtype=np.float32)[None, None, :, None],
                               (20, SIZE, 1, 1)))
    encoded = site_look(noise, Augmentation(0.0, 0.0, 0.0, False, jpeg=1.0), tf.constant([3, 4])).numpy()
    assert encoded.min() >= 0 and encoded.max() <= 255 and encoded.shape == noise.shape
    assert all(not np.array_equal(a, b) for a, b in zip(encoded, noise.numpy()))  # lossy on every image
    smooth = site_look(ramp, Augmentation(0.0, 0.0, 0.0, False, jpeg=1.0), tf.constant([3, 4])).numpy()
    assert np.abs(smooth - ramp.numpy()).mean() < 8  # a smooth ramp survives JPEG nearly intact
    again = site_look(noise, Augmentation(0.0, 0.0, 0.0, False, jpeg=1.0), tf.constant([3, 4])).numpy()
    np.testing.assert_array_equal(again, encoded)  # seeded
    off = site_look(noise, Augmentation(0.0, 0.0, 0.0, False), tf.constant([3, 4])).numpy()
    np.testing.assert_array_equal(off, noise.numpy())
    assert Augmentation(0.0, 0.0, 0.0, False, jpeg=0.1).site and Augmentation(0.0, 0.0, 0.0, False, resample=0.1).site
