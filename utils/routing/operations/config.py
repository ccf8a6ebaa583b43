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
    stow: {host: 127.0.0.1, port: 8104}      # optional: STOW-RS intake, POST /studies (utils/routing/intake/stow.py)
    mode: shadow                     # optional, default route: a trial that forwards by the site's own rule
    shadow: {destination: pacs}      # or {body_part_map: {CHEST: chest_ai}, default: pacs} (utils/routing/decision/shadow.py)

A destination is a DICOM node (ae_title, host, port, optionally ``tls``), a folder, or a DICOMweb service
(``{dicomweb: URL, username, password_env, ...}``, sent by STOW-RS: utils/routing/delivery/dicomweb.py, whose
``settings_from`` checks it and reads its secret). Relative paths are taken
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
from typing import TYPE_CHECKING, Any

from utils import constants
from utils.config import ConfigError, constant_types
from utils.infer.decisions import AUTO_THRESHOLD, UNCERTAIN, UNREADABLE  # noqa: F401 (AUTO_THRESHOLD: callers)
from utils.infer.predictor import resolve_threshold
from utils.routing.decision.rules import MODEL, PASS_THROUGH, Rule, RuleSet, parse_rules
from utils.routing.decision.shadow import ShadowRule, parse_shadow
from utils.routing.intake.orthanc_source import OrthancSourceSettings
from utils.routing.intake.orthanc_source import settings_from as orthanc_settings
from utils.routing.intake.stow import StowSettings
from utils.routing.intake.stow import settings_from as stow_settings
from utils.routing.operations.console import ConsoleSettings
from utils.routing.operations.console import settings_from as console_settings
from utils.routing.operations.metrics import MetricsSettings
from utils.routing.operations.metrics import settings_from as metrics_settings
from utils.routing.operations.schema import DicomwebDestination, FolderDestination, validate_document
from utils.routing.operations.schema import resolve_path as _path
from utils.routing.tls import ClientTLS, ServerTLS, client_from, server_from

if TYPE_CHECKING:
    from utils.routing.delivery.dicomweb import DicomwebSettings

# YAML key -> the constant of utils/constants.py that gives its type, default and bounds (the schema,
# utils/routing/operations/schema.py, checks them against NAME_RANGE / NAME_CHOICES): every ROUTER_* constant
# outside the blocks (the key is its name without the prefix), and the settings shared with predict.py. A new
# router setting is a ROUTER_* constant (+ its range), a RouterFile field and a RouterConfig field.
_CONSTANTS: dict[str, str] = {
    **{name.removeprefix("ROUTER_").lower(): name for name in constant_types()
       if name.startswith("ROUTER_")
       and not name.startswith(("ROUTER_ORTHANC_", "ROUTER_TLS_", "ROUTER_METRICS_", "ROUTER_CONSOLE_", "ROUTER_STOW_",
                                "ROUTER_DICOMWEB_"))
       and not name.endswith(("_RANGE", "_CHOICES"))},
    "threshold": "THRESHOLD",
    "decode_pool": "DECODE_POOL",  # "processes" (isolated, time-limited) or "threads"
    "decode_workers": "DECODE_WORKERS",
    "decode_timeout_s": "DECODE_TIMEOUT_S",
    "decode_memory_limit_mb": "DECODE_MEMORY_LIMIT_MB",
    "decode_threads": "DECODE_THREADS",  # OpenJPEG threads per JPEG 2000 / HTJ2K frame (0: cores / processes)
}


@dataclass(frozen=True)
class Destination:
    """Where one route goes: a DICOM node, a folder (quarantine, or a share), or a DICOMweb service."""

    route: str  # a class name, "uncertain", "unreadable", "pass_through" or another name rules send to
    ae_title: str = ""
    host: str = ""
    port: int = 0
    folder: Path | None = None
    tls: ClientTLS | None = None  # DICOM over TLS towards it (None: plain TCP)
    dicomweb: DicomwebSettings | None = None  # STOW-RS towards a DICOMweb service (utils/routing/delivery/dicomweb.py)

    @property
    def is_folder(self) -> bool:
        return self.folder is not None

    @property
    def node(self) -> str:
        """One name per target; routes with the same target share a forwarder."""
        if self.dicomweb is not None:
            return f"dicomweb:{self.dicomweb.url}"
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
    drift_min_images: int = constants.ROUTER_DRIFT_MIN_IMAGES  # drift windows (utils/routing/operations/drift.py)
    drift_p_value: float = constants.ROUTER_DRIFT_P_VALUE
    rules: tuple[Rule, ...] = ()  # the configured routing rules, in order (the built-in default follows them)
    orthanc_source: OrthancSourceSettings | None = None  # pull from this Orthanc's change feed (None: no)
    tls: ServerTLS | None = None  # TLS on the router's own port (None: plain TCP)
    metrics: MetricsSettings | None = None  # Prometheus /metrics (None: off)
    console: ConsoleSettings | None = None  # the web console and review list (None: off)
    stow: StowSettings | None = None  # STOW-RS intake, POST /studies (None: off)
    mode: str = constants.ROUTER_MODE  # "route", or "shadow": forwarded by ``shadow``, the model only recorded
    shadow: ShadowRule | None = None  # the shadow rule (mode "shadow" only)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["destinations"] = {k: ({"folder": str(d.folder)} if d.is_folder else
                                   d.dicomweb.to_dict() if d.dicomweb is not None else
                                   {"ae_title": d.ae_title, "host": d.host, "port": d.port,
                                    **({"tls": d.tls.to_dict()} if d.tls else {})})
                               for k, d in self.destinations.items()}
        out["tls"] = self.tls.to_dict() if self.tls else None
        out["rules"] = [rule.to_dict() for rule in self.rules]
        out["orthanc_source"] = self.orthanc_source.to_dict() if self.orthanc_source else None
        out["metrics"] = self.metrics.to_dict() if self.metrics else None
        out["console"] = self.console.to_dict() if self.console else None
        out["stow"] = self.stow.to_dict() if self.stow else None
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
    """Check ``raw`` against the schema (utils/routing/operations/schema.py), then what a schema cannot know
    (files, rules, the destinations that rules and shadow name). ConfigError with every problem found, one
    line each, ``where: YAML path: what is wrong``."""
    document, problems = validate_document(raw)
    if problems:
        raise ConfigError("\n".join(f"{where}: {p}" for p in problems))
    problems = []

    def attempt(build, *args, **kwargs):
        try:
            return build(*args, **kwargs)
        except ConfigError as error:
            problems.extend(str(error).splitlines())
            return None

    d = document
    if not d.retry_max_s >= d.retry_initial_s:
        problems.append(f"{where}: retry_max_s must be >= retry_initial_s ({d.retry_initial_s!r}), "
                        f"got {d.retry_max_s!r}")
    spool = _path(d.spool_dir, base)
    audit = _path(d.audit_log, base) if d.audit_log else spool / "audit.jsonl"
    destinations: dict[str, Destination] = {}
    for route, spec in d.destinations.items():
        label = f"{where}: destinations.{route}"
        if isinstance(spec, FolderDestination):
            destinations[route] = Destination(route, folder=_path(spec.folder, base))
        elif isinstance(spec, DicomwebDestination):
            from utils.routing.delivery.dicomweb import settings_from as dicomweb_settings  # it imports this module

            destinations[route] = Destination(route, dicomweb=attempt(dicomweb_settings, spec, base, label))
        else:
            tls = attempt(client_from, spec.tls, base, label) if spec.tls is not None else None
            destinations[route] = Destination(route, ae_title=spec.ae_title, host=spec.host, port=spec.port, tls=tls)
    if MODEL in destinations:
        problems.append(f"{where}: destinations.{MODEL}: '{MODEL}' is reserved: a rule's destination '{MODEL}' "
                        f"sends the object to the classifier; give this destination another name")
    destinations.setdefault(UNREADABLE, Destination(UNREADABLE, folder=spool / "quarantine"))
    rules = attempt(parse_rules, list(d.rules), destinations, where) or ()
    source = attempt(orthanc_settings, d.orthanc_source, base, where) if d.orthanc_source else None
    tls = attempt(server_from, d.tls, base, where) if d.tls is not None else None
    metrics = attempt(metrics_settings, d.metrics, where) if d.metrics is not None else None
    console = attempt(console_settings, d.console, base, where) if d.console is not None else None
    if console is not None and console.corrections_dir is None:
        console = dataclasses.replace(console, corrections_dir=spool / "corrections")
    stow = attempt(stow_settings, d.stow, base, where) if d.stow is not None else None
    shadow = attempt(parse_shadow, d.mode, d.shadow.model_dump() if d.shadow is not None else None,
                     destinations, where)
    attempt(_same_tls_per_node, destinations, where)
    if problems:
        raise ConfigError("\n".join(problems))
    plain = {key: getattr(d, key) for key in _CONSTANTS if key not in ("ae_title", "spool_dir")}
    return RouterConfig(**plain, ae_title=d.ae_title, model=str(_path(d.model, base)), spool_dir=spool,
                        audit_log=audit, allowed_callers=tuple(d.allowed_callers), destinations=destinations,
                        rules=rules, orthanc_source=source, tls=tls, metrics=metrics, shadow=shadow, console=console,
                        stow=stow)


def _same_tls_per_node(destinations: dict[str, Destination], where: str) -> None:
    """Routes to the same node share one forwarder, so they must agree on TLS (and a DICOMweb service's settings)."""
    first: dict[str, Destination] = {}
    for route, d in destinations.items():
        other = first.setdefault(d.node, d)
        if other.dicomweb != d.dicomweb:
            raise ConfigError(f"{where}: destinations.{route} and destinations.{other.route} are the same DICOMweb "
                              f"service ({d.node}) with different settings (credentials, tls, timeout_s, batch); give "
                              f"both the same")
        if other.tls != d.tls:
            raise ConfigError(f"{where}: destinations.{route} and destinations.{other.route} are the same node "
                              f"({d.node}) with different tls settings; give both the same tls block")
