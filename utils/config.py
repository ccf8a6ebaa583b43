"""Command-line flags built from utils/constants.py, validation, and the resolved config file.

Each script names the constants it exposes; this module turns ``IMAGE_SIZE: int = 512  # why``
into ``--image-size`` (type int, default 512, help "why"), so the defaults and their
explanations live in exactly one place.

Quiet start-up (``quiet_startup``, called by ``start``, the common start of every entry script).
TensorFlow's native libraries print INFO lines while they load, before absl's logging is set up
and whatever TF_CPP_MIN_LOG_LEVEL says ("WARNING: All log messages before absl::InitializeLog() is
called are written to STDERR", "oneDNN custom operations are on", "Could not find cuda drivers"),
and an ERROR "failed call to cuInit" on a machine that has no GPU driver at all; OpenJPEG's
encoder logs a "tile number 1 / 1" INFO line per JPEG 2000 file (logger ``openjpeg``). By default:

* TF_CPP_MIN_LOG_LEVEL is set to 2 (TensorFlow's C++ INFO and WARNING lines hidden, ERROR and
  FATAL shown), only when the user has not set it;
* the first ``import tensorflow`` of the process (whoever imports it: keras, models, a lazy
  loader) runs with file descriptor 2 passed through a line filter (a small child process, so that
  a crash during the import still gets its last lines out): the pre-initialisation lines below
  that level and absl's banner are dropped, and so is "failed call to cuInit" where TensorFlow
  found no CUDA driver (or no device) at all, i.e. on a CPU-only machine; any other line (an
  ERROR, a FATAL, a Python warning or traceback) passes unchanged. The import also lists the GPUs
  inside the filter, where cuInit is called (it initialises no device: memory growth and
  visible devices can still be set afterwards);
* the ``openjpeg`` loggers are set to WARNING (encoder and decoder errors still show).

To get all of it back, set TF_CPP_MIN_LOG_LEVEL yourself: ``TF_CPP_MIN_LOG_LEVEL=0 python
predict.py ...`` shows every line as TensorFlow and OpenJPEG write them (nothing is filtered); 1
shows TensorFlow's warnings too. The user's value always wins, and the pre-initialisation lines
are filtered at that same level. ``--help`` imports no TensorFlow at all (tests/test_imports.py).
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
import numbers
import os
import platform
import re
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
    """The common start of every entry script: a quiet start-up (``quiet_startup``: TensorFlow's
    and OpenJPEG's INFO noise hidden, errors still shown; see the module docstring), logging, parse
    the flags, check constants.py, validate. Exits with status 2 and a one-line message on a bad value."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    quiet_startup()
    args = parse_args(argv)
    try:
        check_constants()
        return args, resolve(args, names)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


# --- a quiet start-up (module docstring) -------------------------------------------------------

TF_LOG_LEVEL_DEFAULT = 2  # TensorFlow's C++ INFO and WARNING lines hidden, ERROR and FATAL shown
QUIET_LOGGERS = ("openjpeg", "_openjpeg")  # pylibjpeg-openjpeg: a "tile number 1 / 1" INFO line per encoded file


def quiet_startup() -> int:
    """Make an entry script's start quiet (module docstring); returns the TensorFlow C++ log level in
    force (the user's TF_CPP_MIN_LOG_LEVEL, else 2). Imports nothing heavy; call it before TensorFlow
    is imported (once it is, only the loggers and the environment variable are set). Idempotent."""
    own = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    if own is None:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = str(TF_LOG_LEVEL_DEFAULT)
    level = _log_level(os.environ["TF_CPP_MIN_LOG_LEVEL"])
    if level > 0:
        for name in QUIET_LOGGERS:
            if logging.getLogger(name).level == logging.NOTSET:  # one the user configured keeps its level
                logging.getLogger(name).setLevel(logging.WARNING)
        if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
            sys.meta_path.insert(0, _QuietTensorFlowImport(level))
    return level


def _log_level(text: str) -> int:
    try:
        return min(max(int(text), 0), 3)
    except ValueError:
        return 0  # what TensorFlow makes of a value it cannot read: everything shown


class _QuietTensorFlowImport:
    """A one-shot import hook (sys.meta_path): the first ``import tensorflow`` runs with fd 2
    filtered (``_filtered_stderr``), then the hook removes itself."""

    def __init__(self, level: int) -> None:
        self.level = level

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "tensorflow":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(fullname)  # the finders after this one
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _QuietLoader(spec.loader, self.level)
        return spec


class _QuietLoader:
    """Delegates to TensorFlow's own loader, with fd 2 filtered while the package executes."""

    def __init__(self, loader: Any, level: int) -> None:
        self.loader, self.level = loader, level

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        module.__loader__ = self.loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self.loader
        with _filtered_stderr(self.level):
            self.loader.exec_module(module)
            try:  # cuInit is called here, still inside the filter (no device is initialised)
                module.config.list_physical_devices("GPU")
            except Exception:  # noqa: BLE001 - a broken CUDA set-up surfaces again where a GPU is used
                pass


# The child process that filters fd 2 during TensorFlow's import: line by line, unbuffered, so that
# what the parent wrote before a crash still comes out. argv[1]: the level (1 drops INFO, 2 also
# WARNING, 3 also ERROR). glog lines: "I0000 00:00:1796676734.658954   30806 port.cc:153] ..." (absl)
# and "2024-01-11 05:40:05.061907: I tensorflow/...cc:182] ..." (older TensorFlow).
_STDERR_FILTER = r"""
import re, sys
level = int(sys.argv[1])
glog = re.compile(rb"^(?:([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\]"
                  rb"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: ([IWEF]) \S+:\d+\])")
no_gpu = (b"Could not find cuda drivers", b"CUDA_ERROR_NO_DEVICE", b"no CUDA-capable device")
cpu_only, dropped = False, False
out = sys.stdout.buffer
for line in iter(sys.stdin.buffer.readline, b""):
    match = glog.match(line)
    if match:
        severity = "IWEF".index((match.group(1) or match.group(2)).decode())
        cpu_only = cpu_only or any(s in line for s in no_gpu)
        dropped = severity < level or (cpu_only and b"failed call to cuInit" in line and severity < 3)
    elif line.startswith(b"WARNING: All log messages before absl::InitializeLog() is called"):
        dropped = True
    elif not (dropped and line.startswith(b"To enable the following instructions:")):
        dropped = False  # a continuation of a dropped line goes with it; anything else passes
    if not dropped:
        out.write(line)
        out.flush()
"""


class _filtered_stderr:
    """Within the block, fd 2 goes through ``_STDERR_FILTER`` (a child process) to the real stderr.
    Where a child cannot be started, nothing is filtered."""

    def __init__(self, level: int) -> None:
        self.level, self.saved, self.child = level, None, None

    def __enter__(self) -> "_filtered_stderr":
        try:
            self.saved = os.dup(2)
            self.child = subprocess.Popen([sys.executable, "-I", "-S", "-c", _STDERR_FILTER, str(self.level)],
                                          stdin=subprocess.PIPE, stdout=self.saved, stderr=self.saved)
            sys.stderr.flush()
            os.dup2(self.child.stdin.fileno(), 2)
        except (OSError, ValueError, subprocess.SubprocessError):
            self._close()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._close()

    def _close(self) -> None:
        if self.saved is not None:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(self.saved, 2)
            os.close(self.saved)
            self.saved = None
        if self.child is not None:
            self.child.stdin.close()
            try:
                self.child.wait(timeout=10)
            except subprocess.TimeoutExpired:  # someone else still holds the pipe: stop waiting for it
                self.child.kill()
                self.child.wait()
            self.child = None


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
    """Fail loudly when someone edited constants.py with a value of the wrong type, a malformed
    ``*_RANGE``, a ``*_CHOICES``/``*_RANGE`` beside no constant, or a default outside its own
    choices or range."""
    hints = constant_types()
    for name, hint in hints.items():
        value = getattr(constants, name)
        if not _matches(value, hint):
            raise ConfigError(f"utils/constants.py: {name} = {value!r} is not of type {hint}")
    for name in hints:
        for suffix in ("_CHOICES", "_RANGE"):
            if name.endswith(suffix) and name.removesuffix(suffix) not in hints:
                raise ConfigError(f"utils/constants.py: {name} is beside no constant "
                                  f"{name.removesuffix(suffix)}")
        if name.endswith("_RANGE"):
            Interval.parse(getattr(constants, name), name)
            if not _is_numeric(hints[name.removesuffix("_RANGE")]):
                raise ConfigError(f"utils/constants.py: {name}: a range needs a numeric constant "
                                  f"(int, float or a tuple of them)")
    for name in hints:
        if not name.endswith(("_CHOICES", "_RANGE")):
            check_value(name, getattr(constants, name), f"utils/constants.py: {name}")


def _is_numeric(hint: Any) -> bool:
    """int, float, or a tuple of them (bool is not a number here)."""
    if typing.get_origin(hint) is tuple:
        return all(a is Ellipsis or _is_numeric(a) for a in typing.get_args(hint))
    return hint in (int, float)


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


def refuse_unknown_keys(raw: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    """ConfigError for the first key of a configuration mapping that is not in ``known``, with a
    "did you mean" for a near miss, else the list of known keys."""
    known = list(known)
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {sorted(known)}"
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")


def given_flags(argv: Sequence[str] | None) -> set[str]:
    """The ``--flags`` written on the command line (``--x=1`` counts as ``--x``); None = sys.argv."""
    argv = sys.argv[1:] if argv is None else argv
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


def add_flags(parser: argparse.ArgumentParser, names: Iterable[str],
              choices: dict[str, Sequence[Any]] | None = None, *, prefix: str = "", **defaults: Any) -> None:
    """Add one flag per constant name; ``defaults`` overrides a default (by lower-case name),
    ``choices`` the allowed values (by constant name) where they are known only at run time.
    ``prefix``: a common prefix of the names that the flags and their destinations leave out
    (``prefix="BACKFILL_"``: BACKFILL_WORKERS -> ``--workers``, ``args.workers``)."""
    hints, comments = constant_types(), constant_comments()
    choices = choices or {}
    for name in names:
        if name not in hints:
            raise KeyError(f"{name} is not defined in utils/constants.py")
        hint = hints[name]
        short = name.removeprefix(prefix)
        default = defaults.get(dest_name(short), getattr(constants, name))
        kwargs: dict[str, Any] = {"dest": dest_name(short), "default": default,
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
        parser.add_argument(flag_name(short), **kwargs)


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


_INTERVAL = re.compile(r"([\[(])([^,]+),([^,]+)([\])])")


@dataclasses.dataclass(frozen=True)
class Interval:
    """A ``*_RANGE`` constant of utils/constants.py, parsed: ``"[32, 4096]"``, ``"(0, 1)"``,
    ``"[1, inf)"`` (see that module's docstring)."""

    low: float
    high: float
    low_open: bool
    high_open: bool

    @classmethod
    def parse(cls, text: str, name: str = "range") -> Interval:
        match = _INTERVAL.fullmatch(text.replace(" ", "")) if isinstance(text, str) else None
        bounds = [_number(match.group(2)), _number(match.group(3))] if match else [None, None]
        if match is None or None in bounds:
            raise ConfigError(f"utils/constants.py: {name} = {text!r} is not an interval such as "
                              f"'[32, 4096]', '(0, 1]' or '[1, inf)'")
        interval = cls(bounds[0], bounds[1], match.group(1) == "(", match.group(4) == ")")
        if not interval.low < interval.high:
            raise ConfigError(f"utils/constants.py: {name} = {text!r}: the low bound must be below the high one")
        if (math.isinf(interval.low) and not interval.low_open) or (math.isinf(interval.high) and not interval.high_open):
            raise ConfigError(f"utils/constants.py: {name} = {text!r}: an infinite bound is open, "
                              f"'(' or ')' (e.g. '[1, inf)')")
        return interval

    def __contains__(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return bool(above and below)  # NaN is neither

    def __str__(self) -> str:
        return ("(" if self.low_open else "[") + f"{self.low}, {self.high}" + (")" if self.high_open else "]")

    def rule(self) -> str:
        """The interval in words: "between 32 and 4096", ">= 1", "> 0", "in [0, 1)"."""
        if math.isinf(self.high) and not math.isinf(self.low):
            return (">" if self.low_open else ">=") + f" {self.low}"
        if math.isinf(self.low) and not math.isinf(self.high):
            return ("<" if self.high_open else "<=") + f" {self.high}"
        if not (self.low_open or self.high_open):
            return f"between {self.low} and {self.high}"
        return f"in {self}"


def _number(text: str) -> float | None:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return None


def value_range(name: str) -> Interval | None:
    """The parsed ``NAME_RANGE`` of constants.py (``name`` in any case), or None."""
    text = getattr(constants, f"{name.upper()}_RANGE", None)
    return None if text is None else Interval.parse(text, f"{name.upper()}_RANGE")


def check_value(name: str, value: Any, label: str | None = None) -> None:
    """The one check of a setting against constants.py: ``value`` must be among ``NAME_CHOICES``
    and inside ``NAME_RANGE`` (each element, for a tuple) where those exist; None (unset) passes.
    ``name`` is the constant's name in any case (``image_size`` -> IMAGE_SIZE); ``label`` is what
    the message calls the setting (default: its flag, ``--image-size``), e.g. a YAML key.
    Raises ConfigError: "--image-size must be between 32 and 4096, got 8"."""
    name = name.upper()
    label = label or flag_name(name)
    if value is None:
        return
    choices = getattr(constants, f"{name}_CHOICES", None)
    if choices is not None and value not in choices:
        raise ConfigError(f"{label} must be one of {tuple(choices)}, got {value!r}")
    interval = value_range(name)
    if interval is None:
        return
    several = isinstance(value, (tuple, list))
    bad = [v for v in (value if several else [value]) if v not in interval]
    if bad:
        number = any(isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) for v in bad)
        raise ConfigError(f"{label} must be {'a finite number ' if number else ''}{interval.rule()}"
                          f"{' (each value)' if several else ''}, got {tuple(value) if several else value!r}")


def validate(config: Mapping[str, Any], where: str | None = None) -> None:
    """Every key that names a constant is checked against its ``*_CHOICES`` and ``*_RANGE``
    (:func:`check_value`), then the checks that relate values. Keys are lower-case constant
    names; messages name the flag (``--image-size``), or ``where: image_size`` when ``where``
    is given (a spec file, a YAML file)."""

    def label(key: str) -> str:
        return f"{where}: {key}" if where else flag_name(key)

    for key, value in config.items():
        check_value(key, value, label(key))
    if config.get("split_ratios") is not None:
        ratios = config["split_ratios"]
        if len(ratios) != 3 or abs(sum(ratios) - 1.0) > 1e-6:
            raise ConfigError(f"{label('split_ratios')} must be 3 non-negative numbers summing to 1, got {ratios}")
    if config.get("window_percentiles") is not None:
        percentiles = tuple(config["window_percentiles"])
        if len(percentiles) != 2 or not percentiles[0] < percentiles[1]:
            raise ConfigError(f"{label('window_percentiles')} needs 0 <= low < high <= 100, got {percentiles}")
    if config.get("class_names") is not None:
        names = config["class_names"]
        if len(names) < 2 or len(set(names)) != len(names):
            raise ConfigError(f"{label('class_names')} needs at least 2 distinct names, got {names}")
        bad = [n for n in names if not n.replace("_", "").replace("-", "").isalnum()]
        if bad:
            raise ConfigError(f"class names may use letters, digits, '_' and '-' only: {bad}")


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


def device_name() -> str:
    """The accelerator TensorFlow would use, in words (saved beside training runs and timings)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        try:
            details = tf.config.experimental.get_device_details(gpus[0])
            return f"{len(gpus)} x {details.get('device_name', 'GPU')}"
        except (ValueError, RuntimeError):
            return f"{len(gpus)} GPU(s)"
    return f"CPU ({cpu_name()}, {os.cpu_count()} cores)"


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
