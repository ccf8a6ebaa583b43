"""The router's configuration: a YAML file checked strictly, defaults from utils/constants.py.

    ae_title: BODYPART_ROUTER        # defaults: utils/constants.py, ROUTER_* and THRESHOLD
    port: 11112
    model: runs/demo
    threshold: 0.5                   # or auto: the threshold recommended by the model's calibration
    destinations:                    # one per class of the model, plus "uncertain"
      adult_chest: {ae_title: CHEST_AI, host: 10.0.0.21, port: 104}
      ...
      uncertain: {ae_title: REVIEW, host: 10.0.0.30, port: 104}
      unreadable: {folder: quarantine}   # optional; default: <spool_dir>/quarantine
      pass_through: {ae_title: PACS, host: 10.0.0.5, port: 104}   # what is not projection radiography
    rules:                           # before the model, first match wins (utils/routing/decision/rules.py)
      - {name: ct-mr, match: {modality: [CT, MR]}, destination: pass_through}
    orthanc_source:                  # optional: pull new instances from an Orthanc (utils/routing/intake/orthanc_source.py)
      url: http://127.0.0.1:8042
    tls: {cert: router.crt, key: router.key, ca: senders-ca.pem}   # optional: DICOM over TLS (utils/routing/tls.py)
    metrics: {host: 127.0.0.1, port: 9108}   # optional: Prometheus /metrics (utils/routing/operations/metrics.py)
    console: {host: 127.0.0.1, port: 8108}   # optional: the web console and review list (utils/routing/operations/console.py)
    mode: shadow                     # optional, default route: a trial that forwards by the site's own rule
    shadow: {destination: pacs}      # or {body_part_map: {CHEST: chest_ai}, default: pacs} (utils/routing/decision/shadow.py)

A destination is a DICOM node (ae_title, host, port, optionally ``tls``) or a folder. Relative paths are taken
relative to the configuration file's folder. Unknown keys, wrong types and out-of-range values
are refused with the key's name; ``check_routes`` refuses a configuration that leaves one of the
model's classes without a destination. ``rules`` are checked here too (utils/routing/decision/rules.py: an
unknown destination, field or operator, a bad regular expression, an empty rule, each named with
the rule and its field); ``RouterConfig.rule_set`` adds the built-in default after them.

``threshold: auto`` is resolved once the model is loaded (``RouterConfig.resolve_threshold``, called
by the node at start, before anything is accepted): the threshold that calibrate.py (or the end of
training) stored with the model; a model without one is refused at start (router.py exits with
status 2) with the command that calibrates it.
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
from utils.config import ConfigError, check_value, constant_types, refuse_unknown_keys
from utils.infer.decisions import AUTO_THRESHOLD, UNCERTAIN, UNREADABLE
from utils.infer.predictor import resolve_threshold
from utils.routing.operations.console import PREFIX as CONSOLE_PREFIX
from utils.routing.operations.console import ConsoleSettings
from utils.routing.operations.console import parse_settings as parse_console
from utils.routing.operations.metrics import PREFIX as METRICS_PREFIX
from utils.routing.operations.metrics import MetricsSettings
from utils.routing.operations.metrics import parse_settings as parse_metrics
from utils.routing.intake.orthanc_source import PREFIX as ORTHANC_PREFIX
from utils.routing.intake.orthanc_source import OrthancSourceSettings, parse_settings
from utils.routing.decision.rules import MODEL, PASS_THROUGH, Rule, RuleSet, parse_rules
from utils.routing.decision.shadow import ShadowRule, parse_shadow
from utils.routing.tls import PREFIX as TLS_PREFIX
from utils.routing.tls import ClientTLS, ServerTLS, parse_client, parse_server

# YAML key -> the constant of utils/constants.py that gives its type, default and bounds
# (NAME_RANGE / NAME_CHOICES, checked by utils.config.check_value): every ROUTER_* constant
# (the key is its name without the prefix), and the settings shared with predict.py. A new
# router setting is a ROUTER_* constant (+ its range) and a RouterConfig field. The ROUTER_ORTHANC_*
# constants are the keys of the ``orthanc_source`` block instead (utils/routing/intake/orthanc_source.py).
_CONSTANTS: dict[str, str] = {
    **{name.removeprefix("ROUTER_").lower(): name for name in constant_types()
       if name.startswith("ROUTER_")
       and not name.startswith((ORTHANC_PREFIX, TLS_PREFIX, METRICS_PREFIX, CONSOLE_PREFIX))
       and not name.endswith(("_RANGE", "_CHOICES"))},
    "threshold": "THRESHOLD",
    "decode_pool": "DECODE_POOL",  # "processes" (isolated, time-limited) or "threads"
    "decode_workers": "DECODE_WORKERS",
    "decode_timeout_s": "DECODE_TIMEOUT_S",
    "decode_memory_limit_mb": "DECODE_MEMORY_LIMIT_MB",
    "decode_threads": "DECODE_THREADS",  # OpenJPEG threads per JPEG 2000 / HTJ2K frame (0: cores / processes)
}
# Settings without a constant: YAML key -> (type, default).
_OTHERS: dict[str, tuple[type, Any]] = {
    "model": (str, None),
    "audit_log": (str, None),  # default: <spool_dir>/audit.jsonl
    "allowed_callers": (list, []),  # calling AE titles accepted; empty = any
    "destinations": (dict, None),
    "rules": (list, []),  # routing rules evaluated before the model (utils/routing/decision/rules.py)
    "orthanc_source": (dict, None),  # pull new instances from an Orthanc (utils/routing/intake/orthanc_source.py)
    "tls": (dict, None),  # TLS on the router's own port (utils/routing/tls.py); None: plain TCP
    "metrics": (dict, None),  # Prometheus /metrics (utils/routing/operations/metrics.py); None: off
    "console": (dict, None),  # the web console (utils/routing/operations/console.py); None: off
    "shadow": (dict, None),  # with mode: shadow, the site's existing rule that forwards (utils/routing/decision/shadow.py)
}


def _settings() -> dict[str, tuple[type, Any]]:
    """Every YAML key -> (type, default); read at each load, so constants.py is the one source."""
    hints = constant_types()
    return {**{key: (hints[name], getattr(constants, name)) for key, name in _CONSTANTS.items()}, **_OTHERS}


_DICOM_KEYS = {"ae_title", "host", "port"}
_DICOM_OPTIONAL = {"tls"}  # TLS towards this destination (utils/routing/tls.py)
_FOLDER_KEYS = {"folder"}


@dataclass(frozen=True)
class Destination:
    """Where one route goes: a DICOM node, or a folder (quarantine, or a share)."""

    route: str  # a class name, "uncertain", "unreadable", "pass_through" or another name rules send to
    ae_title: str = ""
    host: str = ""
    port: int = 0
    folder: Path | None = None
    tls: ClientTLS | None = None  # DICOM over TLS towards it (None: plain TCP)

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
    threshold: float | str  # a number, or AUTO_THRESHOLD ("auto"): see resolve_threshold
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
    decode_threads: int = constants.DECODE_THREADS
    min_free_mb: int = constants.ROUTER_MIN_FREE_MB  # free-space reserve of the spool's filesystem (utils/routing/intake/space.py)
    min_free_percent: float = constants.ROUTER_MIN_FREE_PERCENT
    rules: tuple[Rule, ...] = ()  # the configured routing rules, in order (the built-in default follows them)
    orthanc_source: OrthancSourceSettings | None = None  # pull from this Orthanc's change feed (None: no)
    tls: ServerTLS | None = None  # TLS on the router's own port (None: plain TCP)
    metrics: MetricsSettings | None = None  # Prometheus /metrics (None: off)
    console: ConsoleSettings | None = None  # the web console and review list (None: off)
    mode: str = constants.ROUTER_MODE  # "route", or "shadow": forwarded by ``shadow``, the model only recorded
    shadow: ShadowRule | None = None  # the shadow rule (mode "shadow" only)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["destinations"] = {k: ({"folder": str(d.folder)} if d.is_folder else
                                   {"ae_title": d.ae_title, "host": d.host, "port": d.port,
                                    **({"tls": d.tls.to_dict()} if d.tls else {})})
                               for k, d in self.destinations.items()}
        out["tls"] = self.tls.to_dict() if self.tls else None
        out["rules"] = [rule.to_dict() for rule in self.rules]
        out["orthanc_source"] = self.orthanc_source.to_dict() if self.orthanc_source else None
        out["metrics"] = self.metrics.to_dict() if self.metrics else None
        out["console"] = self.console.to_dict() if self.console else None
        out["shadow"] = self.shadow.to_dict() if self.shadow else None
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in out.items()}

    def rule_set(self) -> RuleSet:
        """The configured rules followed by the built-in default (projection radiography to the model)."""
        return RuleSet(self.rules, self.destinations)

    def resolve_threshold(self, predictor) -> float:
        """The threshold to classify with: the configured number, or for ``auto`` the one the loaded
        model's calibration recommends. ValueError (saying to run calibrate.py) when it has none."""
        return resolve_threshold(self.threshold, predictor, self.model)

    def check_routes(self, class_names: Sequence[str]) -> None:
        """Every class of the model and ``uncertain`` need a destination; no unknown routes (``pass_through`` and
        the destinations rules send to are known)."""
        expected = set(class_names) | {UNCERTAIN, UNREADABLE, PASS_THROUGH} | {r.destination for r in self.rules}
        expected |= self.shadow.routes() if self.shadow else set()
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
                              f"'{UNREADABLE}' (optional, default: a quarantine folder), '{PASS_THROUGH}' (optional: what is not "
                              f"projection radiography) and the destinations of rules")


def load_config(path: str | os.PathLike | None, overrides: dict[str, Any] | None = None) -> RouterConfig:
    """Read and check a YAML file (or none: defaults only), then apply non-None ``overrides``."""
    import yaml

    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such configuration file (--config)") from None
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path}: cannot read the configuration file: "
                              f"{getattr(error, 'strerror', None) or error}") from error
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: {yaml_error_text(error)}") from error
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of settings")
        base = path.resolve().parent
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_dict(raw, base=base, where=str(path) if path else "router configuration")


def yaml_error_text(error: Exception) -> str:
    """A YAML syntax error as ``line L, column C: problem (context at line ...)``, without PyYAML's
    ``in "<unicode string>"`` (the caller names the file)."""
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
    if mark is None or not problem:
        return f"not valid YAML: {error}"
    text = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context:
        text += f" ({context}" + (f" at line {context_mark.line + 1}, column {context_mark.column + 1}"
                                  if context_mark is not None else "") + ")"
    return text


def check_model_exists(config: RouterConfig, setting: str) -> None:
    """ConfigError when the configured model path does not exist, saying which ``setting`` named it (a run
    directory without its best.keras is left to the loader, which says why)."""
    if not Path(config.model).exists():
        shown = os.path.relpath(config.model) if Path(config.model).is_relative_to(Path.cwd()) else config.model
        raise ConfigError(f"model {shown} not found ({setting})")


def from_dict(raw: dict[str, Any], *, base: Path, where: str = "router configuration") -> RouterConfig:
    settings = _settings()
    refuse_unknown_keys(raw, settings, where)
    values = {}
    for key, (kind, default) in settings.items():
        value = raw.get(key, default)
        if key == "threshold" and isinstance(value, str):
            if value.strip().lower() != AUTO_THRESHOLD:
                raise ConfigError(f"{where}: threshold: expected a number or '{AUTO_THRESHOLD}', got {value!r}")
            value = AUTO_THRESHOLD  # resolved once the model is loaded (RouterConfig.resolve_threshold)
        elif value is not None:
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
    if MODEL in destinations:
        raise ConfigError(f"{where}: destinations.{MODEL}: '{MODEL}' is reserved: a rule's destination '{MODEL}' "
                          f"sends the object to the classifier; give this destination another name")
    destinations.setdefault(UNREADABLE, Destination(UNREADABLE, folder=spool / "quarantine"))
    rules = parse_rules(values["rules"], destinations, where)
    callers = tuple(_ae_title(_typed(a, str, f"{where}: allowed_callers"), f"{where}: allowed_callers")
                    for a in values["allowed_callers"])
    plain = {key: values[key] for key in _CONSTANTS if key not in ("ae_title", "spool_dir")}
    source = parse_settings(values["orthanc_source"], where) if values["orthanc_source"] is not None else None
    tls = parse_server(values["tls"], base, where) if values["tls"] is not None else None
    metrics = parse_metrics(values["metrics"], where) if values["metrics"] is not None else None
    console = parse_console(values["console"], base, where) if values["console"] is not None else None
    if console is not None and console.corrections_dir is None:
        console = dataclasses.replace(console, corrections_dir=spool / "corrections")
    shadow = parse_shadow(values["mode"], values["shadow"], destinations, where)
    _same_tls_per_node(destinations, where)
    return RouterConfig(**plain, ae_title=_ae_title(values["ae_title"], f"{where}: ae_title"),
                        model=str(_path(values["model"], base)), spool_dir=spool, audit_log=audit,
                        allowed_callers=callers, destinations=destinations, rules=rules, orthanc_source=source,
                        tls=tls, metrics=metrics, shadow=shadow, console=console)


def _same_tls_per_node(destinations: dict[str, Destination], where: str) -> None:
    """Routes to the same node share one forwarder, so they must agree on TLS."""
    first: dict[str, Destination] = {}
    for route, d in destinations.items():
        other = first.setdefault(d.node, d)
        if other.tls != d.tls:
            raise ConfigError(f"{where}: destinations.{route} and destinations.{other.route} are the same node "
                              f"({d.node}) with different tls settings; give both the same tls block")


def _typed(value: Any, kind: type, where: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _check_ranges(v: dict[str, Any], where: str) -> None:
    """Each setting against its constant's bounds, then the one rule that relates two settings."""
    for key, name in _CONSTANTS.items():
        if key == "threshold" and v[key] == AUTO_THRESHOLD:
            continue
        check_value(name, v[key], f"{where}: {key}")
    if not v["retry_max_s"] >= v["retry_initial_s"]:
        raise ConfigError(f"{where}: retry_max_s must be >= retry_initial_s ({v['retry_initial_s']!r}), "
                          f"got {v['retry_max_s']!r}")


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
        refuse_unknown_keys(spec, _FOLDER_KEYS, where)
        return Destination(route, folder=_path(_typed(spec["folder"], str, f"{where}.folder"), base))
    refuse_unknown_keys(spec, _DICOM_KEYS | _DICOM_OPTIONAL, where)
    if keys - _DICOM_OPTIONAL != _DICOM_KEYS:
        raise ConfigError(f"{where}: a DICOM destination needs ae_title, host and port "
                          f"(missing {sorted(_DICOM_KEYS - keys)}), or give a folder")
    port = _typed(spec["port"], int, f"{where}.port")
    check_value("ROUTER_PORT", port, f"{where}.port")  # a TCP port, like the router's own
    tls = parse_client(spec["tls"], base, where) if spec.get("tls") is not None else None
    return Destination(route, ae_title=_ae_title(_typed(spec["ae_title"], str, f"{where}.ae_title"), where),
                       host=_typed(spec["host"], str, f"{where}.host"), port=port, tls=tls)
