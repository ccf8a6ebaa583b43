"""The router's configuration: a YAML file checked strictly, defaults from utils/constants.py.

    ae_title: BODYPART_ROUTER        # defaults: utils/constants.py, ROUTER_* and THRESHOLD
    port: 11112
    model: runs/demo
    threshold: 0.5
    destinations:                    # one per class of the model, plus "uncertain"
      adult_chest: {ae_title: CHEST_AI, host: 10.0.0.21, port: 104}
      ...
      uncertain: {ae_title: REVIEW, host: 10.0.0.30, port: 104}
      unreadable: {folder: quarantine}   # optional; default: <spool_dir>/quarantine

A destination is a DICOM node (ae_title, host, port) or a folder. Relative paths are taken
relative to the configuration file's folder. Unknown keys, wrong types and out-of-range values
are refused with the key's name; ``check_routes`` refuses a configuration that leaves one of the
model's classes without a destination.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils import constants
from utils.config import ConfigError
from utils.decisions import UNCERTAIN, UNREADABLE

# YAML key -> (type, default). Defaults come from constants.py so both stay one source of truth.
_SETTINGS: dict[str, tuple[type, Any]] = {
    "ae_title": (str, constants.ROUTER_AE_TITLE),
    "host": (str, constants.ROUTER_HOST),
    "port": (int, constants.ROUTER_PORT),
    "model": (str, None),
    "threshold": (float, constants.THRESHOLD),
    "spool_dir": (str, constants.ROUTER_SPOOL_DIR),
    "audit_log": (str, None),  # default: <spool_dir>/audit.jsonl
    "batch_size": (int, constants.ROUTER_BATCH_SIZE),
    "batch_wait_ms": (int, constants.ROUTER_BATCH_WAIT_MS),
    "decode_pool": (str, constants.DECODE_POOL),  # "processes" (isolated, time-limited) or "threads"
    "decode_workers": (int, constants.DECODE_WORKERS),
    "decode_timeout_s": (float, constants.DECODE_TIMEOUT_S),
    "decode_memory_limit_mb": (int, constants.DECODE_MEMORY_LIMIT_MB),
    "max_associations": (int, constants.ROUTER_MAX_ASSOCIATIONS),
    "retry_initial_s": (float, constants.ROUTER_RETRY_INITIAL_S),
    "retry_max_s": (float, constants.ROUTER_RETRY_MAX_S),
    "max_attempts": (int, constants.ROUTER_MAX_ATTEMPTS),
    "max_classify_attempts": (int, constants.ROUTER_MAX_CLASSIFY_ATTEMPTS),
    "allowed_callers": (list, []),  # calling AE titles accepted; empty = any
    "destinations": (dict, None),
}
_DICOM_KEYS = {"ae_title", "host", "port"}
_FOLDER_KEYS = {"folder"}


@dataclass(frozen=True)
class Destination:
    """Where one route goes: a DICOM node, or a folder (quarantine, or a share)."""

    route: str  # a class name, "uncertain" or "unreadable"
    ae_title: str = ""
    host: str = ""
    port: int = 0
    folder: Path | None = None

    @property
    def is_folder(self) -> bool:
        return self.folder is not None

    @property
    def node(self) -> str:
        """One name per target; routes with the same target share a forwarder."""
        return f"folder:{self.folder}" if self.is_folder else f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class RouterConfig:
    ae_title: str
    host: str
    port: int
    model: str
    threshold: float
    spool_dir: Path
    audit_log: Path
    batch_size: int
    batch_wait_ms: int
    decode_workers: int
    max_associations: int
    retry_initial_s: float
    retry_max_s: float
    max_attempts: int
    allowed_callers: tuple[str, ...]
    destinations: dict[str, Destination] = field(default_factory=dict)
    max_classify_attempts: int = constants.ROUTER_MAX_CLASSIFY_ATTEMPTS
    decode_pool: str = constants.DECODE_POOL
    decode_timeout_s: float = constants.DECODE_TIMEOUT_S
    decode_memory_limit_mb: int = constants.DECODE_MEMORY_LIMIT_MB

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["destinations"] = {k: ({"folder": str(d.folder)} if d.is_folder else
                                   {"ae_title": d.ae_title, "host": d.host, "port": d.port})
                               for k, d in self.destinations.items()}
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in out.items()}

    def check_routes(self, class_names: Sequence[str]) -> None:
        """Every class of the model and ``uncertain`` need a destination; no unknown routes."""
        expected = set(class_names) | {UNCERTAIN, UNREADABLE}
        missing = [c for c in list(class_names) + [UNCERTAIN] if c not in self.destinations]
        unknown = sorted(set(self.destinations) - expected)
        problems = []
        if missing:
            problems.append(f"no destination for {missing}")
        if unknown:
            hints = [f"{u} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(u, expected, 1)) else u
                     for u in unknown]
            problems.append(f"destinations for unknown labels {hints}")
        if problems:
            raise ConfigError("router configuration: " + "; ".join(problems)
                              + f". The model's classes are {list(class_names)}, plus '{UNCERTAIN}' and "
                              f"'{UNREADABLE}' (optional, default: a quarantine folder)")


def load_config(path: str | os.PathLike | None, overrides: dict[str, Any] | None = None) -> RouterConfig:
    """Read and check a YAML file (or none: defaults only), then apply non-None ``overrides``."""
    import yaml

    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from error
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of settings")
        base = path.resolve().parent
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_dict(raw, base=base, where=str(path) if path else "router configuration")


def from_dict(raw: dict[str, Any], *, base: Path, where: str = "router configuration") -> RouterConfig:
    _refuse_unknown(raw, _SETTINGS, where)
    values = {}
    for key, (kind, default) in _SETTINGS.items():
        value = raw.get(key, default)
        if value is not None:
            value = _typed(value, kind, f"{where}: {key}")
        values[key] = value
    if not values["model"]:
        raise ConfigError(f"{where}: 'model' is required (a training run directory or a .keras file)")
    if not values["destinations"]:
        raise ConfigError(f"{where}: 'destinations' is required (one per class, plus '{UNCERTAIN}')")
    _check_ranges(values, where)
    spool = _path(values["spool_dir"], base)
    audit = _path(values["audit_log"], base) if values["audit_log"] else spool / "audit.jsonl"
    destinations = {str(route): _destination(str(route), spec, base, where)
                    for route, spec in values["destinations"].items()}
    destinations.setdefault(UNREADABLE, Destination(UNREADABLE, folder=spool / "quarantine"))
    callers = tuple(_ae_title(_typed(a, str, f"{where}: allowed_callers"), f"{where}: allowed_callers")
                    for a in values["allowed_callers"])
    return RouterConfig(
        ae_title=_ae_title(values["ae_title"], f"{where}: ae_title"), host=values["host"], port=values["port"],
        model=str(_path(values["model"], base)), threshold=values["threshold"], spool_dir=spool, audit_log=audit,
        batch_size=values["batch_size"], batch_wait_ms=values["batch_wait_ms"],
        decode_workers=values["decode_workers"], max_associations=values["max_associations"],
        retry_initial_s=values["retry_initial_s"], retry_max_s=values["retry_max_s"],
        max_attempts=values["max_attempts"], allowed_callers=callers, destinations=destinations,
        max_classify_attempts=values["max_classify_attempts"], decode_pool=values["decode_pool"],
        decode_timeout_s=values["decode_timeout_s"], decode_memory_limit_mb=values["decode_memory_limit_mb"])


def _refuse_unknown(raw: dict, known, where: str) -> None:
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {sorted(known)}"
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")


def _typed(value: Any, kind: type, where: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _check_ranges(v: dict[str, Any], where: str) -> None:
    checks = [("port", 1 <= v["port"] <= 65535, "between 1 and 65535"),
              ("threshold", 0.0 <= v["threshold"] <= 1.0, "in [0, 1]"),
              ("batch_size", v["batch_size"] >= 1, ">= 1"), ("batch_wait_ms", v["batch_wait_ms"] >= 0, ">= 0"),
              ("decode_pool", v["decode_pool"] in constants.DECODE_POOL_CHOICES,
               f"one of {constants.DECODE_POOL_CHOICES}"),
              ("decode_workers", v["decode_workers"] >= 0, ">= 0"),
              ("decode_timeout_s", v["decode_timeout_s"] > 0, "> 0"),
              ("decode_memory_limit_mb", v["decode_memory_limit_mb"] >= 0, ">= 0 (0: no cap)"),
              ("max_associations", v["max_associations"] >= 1, ">= 1"),
              ("retry_initial_s", v["retry_initial_s"] > 0, "> 0"),
              ("retry_max_s", v["retry_max_s"] >= v["retry_initial_s"], ">= retry_initial_s"),
              ("max_attempts", v["max_attempts"] >= 1, ">= 1"),
              ("max_classify_attempts", v["max_classify_attempts"] >= 1, ">= 1")]
    for key, ok, rule in checks:
        if not ok:
            raise ConfigError(f"{where}: {key} must be {rule}, got {v[key]!r}")


def _ae_title(value: str, where: str) -> str:
    value = value.strip()
    if not value or len(value) > 16 or "\\" in value or not value.isascii() or not value.isprintable():
        raise ConfigError(f"{where}: an AE title is 1-16 printable ASCII characters without '\\', got {value!r}")
    return value


def _path(value: str, base: Path) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else base / path


def _destination(route: str, spec: Any, base: Path, where: str) -> Destination:
    where = f"{where}: destinations.{route}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping with ae_title/host/port, or folder")
    keys = set(spec)
    if keys & _FOLDER_KEYS:
        _refuse_unknown(spec, _FOLDER_KEYS, where)
        return Destination(route, folder=_path(_typed(spec["folder"], str, f"{where}.folder"), base))
    _refuse_unknown(spec, _DICOM_KEYS, where)
    if keys != _DICOM_KEYS:
        raise ConfigError(f"{where}: a DICOM destination needs ae_title, host and port "
                          f"(missing {sorted(_DICOM_KEYS - keys)}), or give a folder")
    port = _typed(spec["port"], int, f"{where}.port")
    if not 1 <= port <= 65535:
        raise ConfigError(f"{where}.port must be between 1 and 65535, got {port}")
    return Destination(route, ae_title=_ae_title(_typed(spec["ae_title"], str, f"{where}.ae_title"), where),
                       host=_typed(spec["host"], str, f"{where}.host"), port=port)
