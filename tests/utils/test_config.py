import json

import pytest

from utils import config, constants


def make_parser(names):
    parser = config.ArgumentParser(prog="prog")
    config.add_flags(parser, names)
    return parser


def test_every_constant_has_a_help_text_and_valid_type():
    config.check_constants()
    comments = config.constant_comments()
    missing = [n for n in config.constant_types() if not n.endswith("_CHOICES") and not comments.get(n)]
    assert missing == []


def test_flags_take_defaults_and_types_from_constants():
    names = ["IMAGE_SIZE", "CLASS_NAMES", "SPLIT_RATIOS", "CACHE", "ASPECT", "MAX_LR"]
    args = make_parser(names).parse_args([])
    resolved = config.resolve(args, names)
    assert resolved["image_size"] == constants.IMAGE_SIZE
    assert resolved["class_names"] == constants.CLASS_NAMES
    assert resolved["split_ratios"] == constants.SPLIT_RATIOS
    args = make_parser(names).parse_args(["--image-size", "256", "--no-cache", "--aspect", "letterbox",
                                          "--class-names", "a", "b", "--max-lr", "1e-3"])
    resolved = config.resolve(args, names)
    assert resolved["image_size"] == 256 and isinstance(resolved["image_size"], int)
    assert resolved["cache"] is False
    assert resolved["aspect"] == "letterbox"
    assert resolved["class_names"] == ("a", "b")
    assert resolved["max_lr"] == pytest.approx(1e-3)


@pytest.mark.parametrize("argv, needle", [
    (["--image-size", "big"], "invalid int value"),
    (["--aspect", "squash"], "invalid choice"),
    (["--image-sise", "256"], "did you mean --image-size"),
    (["--image", "256"], "unrecognized arguments"),  # no silent prefix matching
])
def test_bad_flags_are_rejected_with_a_clear_message(argv, needle, capsys):
    with pytest.raises(SystemExit):
        make_parser(["IMAGE_SIZE", "ASPECT"]).parse_args(argv)
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("values", [
    {"image_size": 16}, {"split_ratios": (0.5, 0.5, 0.5)}, {"channels": 2},
    {"window_percentiles": (99.0, 1.0)}, {"class_names": ("a", "a")}, {"class_names": ("a b", "c")},
    {"dropout": 1.5}, {"max_lr": -1.0}, {"epochs": 0},
])
def test_out_of_range_values_raise_config_error(values):
    with pytest.raises(config.ConfigError):
        config.validate(values)


def test_wrongly_typed_constant_is_caught(monkeypatch):
    monkeypatch.setattr(constants, "IMAGE_SIZE", "512")
    with pytest.raises(config.ConfigError, match="IMAGE_SIZE"):
        config.check_constants()


def test_save_config_writes_config_command_and_environment(tmp_path):
    path = config.save_config({"image_size": 256, "class_names": ("a", "b")}, tmp_path / "c.json", command=["x"])
    payload = json.loads(path.read_text())
    assert payload["config"] == {"image_size": 256, "class_names": ["a", "b"]}
    assert payload["command"] == ["x"]
    assert {"python", "processor", "time"} <= set(payload["environment"])


def test_given_flags_and_run_time_choices(capsys):
    assert config.given_flags(["--epochs", "3", "--image-size=256", "x"]) == {"--epochs", "--image-size"}
    parser = config.ArgumentParser(prog="prog")
    config.add_flags(parser, ["BACKBONE"], choices={"BACKBONE": ["a", "b"]})
    assert parser.parse_args(["--backbone", "b"]).backbone == "b"
    with pytest.raises(SystemExit):
        parser.parse_args(["--backbone", "c"])
    assert "invalid choice" in capsys.readouterr().err
