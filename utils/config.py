"""Command-line flags built from utils/constants.py, validation, and the resolved config file.

Each script names the constants it exposes; this module turns ``IMAGE_SIZE: int = 512  # why``
into ``--image-size`` (type int, default 512, help "why"), so the defaults and their
explanations live in exactly one place.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime as _dt
import difflib
import inspect
import json
import logging
import math
import os
import platform
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from utils import constants


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's layout (usage examples) and shows every flag's default."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with no prefix matching, defaults in the help, and a 'did you mean' hint for
    mistyped flags."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        if "unrecognized arguments" in message:
            known = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
            hints = []
            for word in message.split(":", 1)[1].split():
                flag = word.split("=", 1)[0]
                close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
                if close:
                    hints.append(f"{flag} -> did you mean {close[0]}?")
            if hints:
                message += " (" + "; ".join(hints) + ")"
        super().error(message)


def start(parse_args: Callable[[Sequence[str] | None], argparse.Namespace], argv: Sequence[str] | None,
          names: Iterable[str]) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The common start of every entry script: quiet TensorFlow C++ INFO/WARNING lines (errors
    still show), logging, parse the flags, check constants.py, validate. Exits with status 2 and
    a one-line message on a bad value."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    args = parse_args(argv)
    try:
        check_constants()
        return args, resolve(args, names)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def flag_name(constant: str) -> str:
    return "--" + constant.lower().replace("_", "-")


def dest_name(constant: str) -> str:
    return constant.lower()


def constant_comments() -> dict[str, str]:
    """Trailing comments of constants.py, by name: they become the flags' help texts."""
    source = inspect.getsource(constants)
    lines = source.splitlines()
    comments: dict[str, str] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text = "\n".join(lines[node.lineno - 1 : node.end_lineno])
            if "#" in text.splitlines()[-1]:
                comments[node.target.id] = text.splitlines()[-1].split("#", 1)[1].strip()
            else:  # a comment block just above the constant
                above = []
                i = node.lineno - 2
                while i >= 0 and lines[i].lstrip().startswith("#") and "---" not in lines[i]:
                    above.insert(0, lines[i].lstrip()[1:].strip())
                    i -= 1
                comments[node.target.id] = " ".join(above)
    return comments


def constant_types() -> dict[str, Any]:
    return typing.get_type_hints(constants)


def check_constants() -> None:
    """Fail loudly when someone edited constants.py with a value of the wrong type."""
    for name, hint in constant_types().items():
        value = getattr(constants, name)
        if not _matches(value, hint):
            raise ConfigError(f"utils/constants.py: {name} = {value!r} is not of type {hint}")
        choices = getattr(constants, f"{name}_CHOICES", None)
        if choices is not None and value not in choices:
            raise ConfigError(f"utils/constants.py: {name} = {value!r}; choose from {choices}")


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def given_flags(argv: Sequence[str] | None) -> set[str]:
    """The ``--flags`` written on the command line (``--x=1`` counts as ``--x``); None = sys.argv."""
    argv = sys.argv[1:] if argv is None else argv
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


def add_flags(parser: argparse.ArgumentParser, names: Iterable[str],
              choices: dict[str, Sequence[Any]] | None = None, **defaults: Any) -> None:
    """Add one flag per constant name; ``defaults`` overrides a default (by lower-case name),
    ``choices`` the allowed values (by constant name) where they are known only at run time."""
    hints, comments = constant_types(), constant_comments()
    choices = choices or {}
    for name in names:
        if name not in hints:
            raise KeyError(f"{name} is not defined in utils/constants.py")
        hint = hints[name]
        default = defaults.get(dest_name(name), getattr(constants, name))
        kwargs: dict[str, Any] = {"dest": dest_name(name), "default": default,
                                  "help": comments.get(name, "") or " "}
        allowed = choices.get(name, getattr(constants, f"{name}_CHOICES", None))
        if allowed is not None:
            kwargs["choices"] = allowed
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is tuple:
            args = typing.get_args(hint)
            kwargs["type"] = args[0]
            kwargs["nargs"] = "+" if (len(args) == 2 and args[1] is Ellipsis) else len(args)
            kwargs["metavar"] = name.split("_")[-1][:-1] if name.endswith("S") else "V"
        else:
            kwargs["type"] = hint
        parser.add_argument(flag_name(name), **kwargs)


def resolve(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The flags' values as a plain dict (lower-case keys), validated."""
    config = {}
    for name in names:
        value = getattr(args, dest_name(name))
        if isinstance(value, list):
            value = tuple(value)
        config[dest_name(name)] = value
    validate(config)
    return config


_POSITIVE_INTS = ("image_size", "epochs", "batch_size", "bootstrap_resamples", "demo_images_per_class",
                  "demo_image_size", "demo_epochs", "shuffle_buffer")


def validate(config: dict[str, Any]) -> None:
    """Range and consistency checks for whichever keys are present."""
    for key in _POSITIVE_INTS:
        if key in config and config[key] is not None and config[key] < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {config[key]}")
    if "image_size" in config and config["image_size"] is not None and config["image_size"] < 32:
        raise ConfigError(f"--image-size must be at least 32 pixels, got {config['image_size']}")
    if config.get("channels") not in (None, 1, 3):
        raise ConfigError(f"--channels must be 1 or 3, got {config['channels']}")
    if "split_ratios" in config:
        ratios = config["split_ratios"]
        if any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
            raise ConfigError(f"--split-ratios must be 3 non-negative numbers summing to 1, got {ratios}")
    if "window_percentiles" in config:
        low, high = config["window_percentiles"]
        if not 0 <= low < high <= 100:
            raise ConfigError(f"--window-percentiles needs 0 <= low < high <= 100, got {low} {high}")
    if "class_names" in config:
        names = config["class_names"]
        if len(names) < 2 or len(set(names)) != len(names):
            raise ConfigError(f"--class-names needs at least 2 distinct names, got {names}")
        bad = [n for n in names if not n.replace("_", "").replace("-", "").isalnum()]
        if bad:
            raise ConfigError(f"class names may use letters, digits, '_' and '-' only: {bad}")
    for key in ("confidence_level",):
        if key in config and not 0 < config[key] < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be in (0, 1), got {config[key]}")
    for key in ("dropout", "warmup_fraction", "label_smoothing"):
        if key in config and not 0 <= config[key] < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be in [0, 1), got {config[key]}")
    for key in ("max_lr", "weight_decay", "clip_value", "bn_momentum", "augment_rotation_deg",
                "augment_brightness", "augment_contrast", "bn_recalibration_steps", "freeze_epochs"):
        if key in config and config[key] is not None and config[key] < 0:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 0, got {config[key]}")


def environment() -> dict[str, str]:
    """Where and with what a result was produced (saved beside results)."""
    info = {"python": sys.version.split()[0], "platform": platform.platform(),
            "processor": cpu_name(), "cpu_count": str(os.cpu_count()),
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = ""
    return info


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types: dataclasses and mappings to dicts, numpy scalars/arrays to Python, paths to
    strings, NaN and infinities to None; anything else is a TypeError."""
    import numpy as np

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, str):
        return obj
    raise TypeError(f"not JSON-serializable: {type(obj).__name__}")


def save_config(config: dict[str, Any], path: str | os.PathLike, *, command: Sequence[str] | None = None,
                **extra: Any) -> Path:
    """Write the resolved configuration, the command line, the environment and any ``extra``
    top-level entries (e.g. ``spec``) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config": to_jsonable(config),
               "command": list(command if command is not None else sys.argv),
               "environment": environment(), **to_jsonable(extra)}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
