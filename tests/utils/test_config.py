import json
import typing

import pytest

from utils import config, constants


def make_parser(names):
    parser = config.ArgumentParser(prog="prog")
    config.add_flags(parser, names)
    return parser


def test_every_constant_has_a_help_text_and_valid_type():
    config.check_constants()
    comments = config.constant_comments()
    missing = [n for n in config.constant_types() if not n.endswith(("_CHOICES", "_RANGE")) and not comments.get(n)]
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
    {"seed": -1}, {"threshold": 1.5}, {"decode_timeout_s": 0.0}, {"window_percentiles": (1.0, 120.0)},
    {"confidence_level": 1.0}, {"max_skipped_share": 1.5}, {"threshold": float("nan")}, {"max_lr": float("inf")},
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


# Numeric constants that may take any value: none today. Add one only with the reason; every
# other numeric constant needs a NAME_RANGE (or NAME_CHOICES) beside it in utils/constants.py.
UNBOUNDED: dict[str, str] = {}


def _numeric(hint) -> bool:
    if typing.get_origin(hint) is tuple:
        return all(a is Ellipsis or _numeric(a) for a in typing.get_args(hint))
    return hint in (int, float)


def test_every_numeric_setting_has_a_range_or_choices():
    """A new numeric setting (a flag, a router key, a spec field) cannot skip validation."""
    hints = config.constant_types()
    numeric = [n for n, h in hints.items() if _numeric(h) and not n.endswith(("_RANGE", "_CHOICES"))]
    assert {"IMAGE_SIZE", "THRESHOLD", "ROUTER_PORT", "WINDOW_PERCENTILES", "SEED"} <= set(numeric)
    unchecked = [n for n in numeric if f"{n}_RANGE" not in hints and f"{n}_CHOICES" not in hints and n not in UNBOUNDED]
    assert unchecked == [], f"add a NAME_RANGE (see utils/constants.py's docstring) for {unchecked}"
    assert set(UNBOUNDED) <= set(numeric)
    # ...and so every numeric flag of the scripts (they all come from these constants)
    import predict
    import prepare
    import router
    import test as test_script
    import training

    for script in (predict, prepare, router, test_script, training):
        flags = [n for n in script.FLAGS if n in numeric]
        assert all(config.value_range(n) or f"{n}_CHOICES" in hints or n in UNBOUNDED for n in flags), script


@pytest.mark.parametrize("name, value, needle", [
    ("IMAGE_SIZE", 8, "IMAGE_SIZE must be between 32 and 4096, got 8"),
    ("DROPOUT", 1.0, r"DROPOUT must be in \[0, 1\), got 1.0"),
    ("WINDOW_PERCENTILES", (-1.0, 99.0), r"WINDOW_PERCENTILES must be between 0 and 100 \(each value\)"),
    ("ROUTER_PORT", 0, "ROUTER_PORT must be between 1 and 65535"),
    ("IMAGE_SIZE_RANGE", "[32 4096]", "not an interval"),
    ("IMAGE_SIZE_RANGE", "[1, inf]", "an infinite bound is open"),
    ("IMAGE_SIZE_RANGE", "[64, 32]", "low bound must be below"),
])
def test_check_constants_reports_a_default_outside_its_range_or_a_bad_range(monkeypatch, name, value, needle):
    monkeypatch.setattr(constants, name, value)
    with pytest.raises(config.ConfigError, match=needle):
        config.check_constants()


def test_check_constants_refuses_a_range_beside_no_constant(monkeypatch):
    monkeypatch.setitem(constants.__annotations__, "IMAGE_SIZ_RANGE", "str")
    monkeypatch.setattr(constants, "IMAGE_SIZ_RANGE", "[32, 4096]", raising=False)
    with pytest.raises(config.ConfigError, match="IMAGE_SIZ_RANGE is beside no constant"):
        config.check_constants()


@pytest.mark.parametrize("argv, message", [
    (["--image-size", "8"], "--image-size must be between 32 and 4096, got 8"),
    (["--image-size", "8192"], "--image-size must be between 32 and 4096, got 8192"),
    (["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
    (["--confidence-level", "0"], "--confidence-level must be in (0, 1), got 0.0"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--decode-timeout-s", "0"], "--decode-timeout-s must be > 0, got 0.0"),
    (["--max-lr", "inf"], "--max-lr must be a finite number >= 0, got inf"),
    (["--window-percentiles", "1", "120"], "--window-percentiles must be between 0 and 100 (each value), got (1.0, 120.0)"),
    (["--max-skipped-share", "2"], "--max-skipped-share must be between 0 and 1, got 2.0"),
])
def test_a_flag_out_of_range_is_refused_with_the_range(argv, message, capsys):
    names = ["IMAGE_SIZE", "DROPOUT", "CONFIDENCE_LEVEL", "EPOCHS", "DECODE_TIMEOUT_S", "MAX_LR",
             "WINDOW_PERCENTILES", "MAX_SKIPPED_SHARE"]
    with pytest.raises(config.ConfigError) as error:
        config.resolve(make_parser(names).parse_args(argv), names)
    assert str(error.value) == message
    # the scripts' common start: exit status 2 and the same one line
    with pytest.raises(SystemExit) as exit_:
        config.start(lambda a: make_parser(names).parse_args(a), argv, names)
    assert exit_.value.code == 2 and capsys.readouterr().err.strip() == f"error: {message}"


def test_ranges_come_from_constants_only(monkeypatch):
    config.validate({"batch_size": 1000})
    monkeypatch.setattr(constants, "BATCH_SIZE_RANGE", "[1, 512]")
    with pytest.raises(config.ConfigError, match="--batch-size must be between 1 and 512, got 1000"):
        config.validate({"batch_size": 1000})


@pytest.mark.parametrize("text, inside, outside, rule", [
    ("[32, 4096]", [32, 4096, 512], [31, 4097, 31.9], "between 32 and 4096"),
    ("[0, 1)", [0, 0.999], [1, -0.001], "in [0, 1)"),
    ("(0, 1]", [1, 1e-9], [0, 1.1], "in (0, 1]"),
    ("(0, inf)", [1e-9, 1e300], [0, float("inf"), float("nan")], "> 0"),
    ("[1, inf)", [1, 10**12], [0, True, "2", None], ">= 1"),
    ("(-inf, 0]", [-5, 0], [0.5, float("-inf")], "<= 0"),
])
def test_interval_notation(text, inside, outside, rule):
    interval = config.Interval.parse(text)
    assert all(v in interval for v in inside) and not any(v in interval for v in outside)
    assert interval.rule() == rule and str(config.Interval.parse(str(interval))) == str(interval)


def test_check_value_checks_choices_and_names_the_setting_as_asked():
    config.check_value("decode_pool", "threads")
    config.check_value("THRESHOLD", None)  # unset: nothing to check
    with pytest.raises(config.ConfigError, match=r"^router.yaml: decode_pool must be one of \('processes', 'threads'\), got 'auto'$"):
        config.check_value("DECODE_POOL", "auto", "router.yaml: decode_pool")
    with pytest.raises(config.ConfigError, match=r"^spec: image_size must be between 32 and 4096, got 16$"):
        config.validate({"image_size": 16}, where="spec")


# --- quiet start-up (utils.config.quiet_startup; the end-to-end check is in tests/test_scripts.py) ---------


def test_quiet_startup_sets_level_2_unless_the_user_chose_one(monkeypatch):
    import logging
    import sys

    # the hook it adds goes with the test (as does one an earlier config.start in this process left)
    monkeypatch.setattr(sys, "meta_path",
                        [f for f in sys.meta_path if not isinstance(f, config._QuietTensorFlowImport)])
    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    for name in config.QUIET_LOGGERS:
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
    hooks = lambda: [f for f in sys.meta_path if isinstance(f, config._QuietTensorFlowImport)]  # noqa: E731

    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")  # the user's own value wins: everything, as TensorFlow writes it
    assert config.quiet_startup() == 0 and hooks() == []
    assert logging.getLogger("openjpeg").level == logging.NOTSET

    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL")
    assert config.quiet_startup() == 2 and config.quiet_startup() == 2  # idempotent
    assert config.os.environ["TF_CPP_MIN_LOG_LEVEL"] == "2" and len(hooks()) == 1 and hooks()[0].level == 2
    assert not logging.getLogger("openjpeg.encode").isEnabledFor(logging.INFO)  # the per-tile lines
    assert logging.getLogger("openjpeg.encode").isEnabledFor(logging.WARNING)


def test_the_start_up_filter_drops_tensorflow_s_noise_and_keeps_errors_even_through_a_crash(tmp_path):
    """fd 2 through the filter at level 2, as during the first import of TensorFlow; no TensorFlow here."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    script = textwrap.dedent(r"""
        import os, sys
        from utils import config
        with config._filtered_stderr(2):
            for line in (
                b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
                b"I0000 00:00:1796676734.658954   30806 port.cc:153] oneDNN custom operations are on.",
                b"I0000 00:00:1796676734.659530   30806 cudart_stub.cc:31] Could not find cuda drivers on your machine",
                b"2024-01-11 05:40:05.061907: I tensorflow/core/platform/cpu_feature_guard.cc:182] This binary",
                b"To enable the following instructions: AVX512F, in other operations, rebuild TensorFlow",
                b"W0000 00:00:1796676734.8 30806 x.cc:1] a warning below the level",
                b"E0000 00:00:1796676740.332743   30806 cuda_platform.cc:52] failed call to cuInit: ERROR (303)",
                b"E0000 00:00:1796676740.332743   30806 op_kernel.cc:1] a real error",
                b"a line of its own",
            ):
                if not (sys.argv[1] == "driver" and b"cuda drivers" in line):
                    os.write(2, line + b"\n")
            print("python's stderr", file=sys.stderr)
            if sys.argv[1] == "crash":
                os.write(2, b"F0000 00:00:1796676740.4 30806 x.cc:9] Check failed: fatal\n")
                os.abort()
        print("after", file=sys.stderr)
    """)
    root = Path(config.__file__).resolve().parents[1]
    kept = ["E0000 00:00:1796676740.332743   30806 op_kernel.cc:1] a real error", "a line of its own",
            "python's stderr"]
    cuinit = "E0000 00:00:1796676740.332743   30806 cuda_platform.cc:52] failed call to cuInit: ERROR (303)"
    for mode, expected in (("run", kept + ["after"]),
                           ("crash", kept + ["F0000 00:00:1796676740.4 30806 x.cc:9] Check failed: fatal"]),
                           # a CUDA driver is there, and cuInit fails all the same: a real problem, shown
                           ("driver", [cuinit] + kept + ["after"])):
        result = subprocess.run([sys.executable, "-c", script, mode], cwd=root, capture_output=True, text=True,
                                timeout=60, check=False)
        assert result.returncode == (-6 if mode == "crash" else 0), result.stderr
        assert result.stderr.splitlines() == expected, (mode, result.stderr)
