"""The router's YAML configuration as one typed schema (pydantic v2), and its JSON Schema.

    problems = validate_document(raw)        # [] or every problem at once, each with its YAML path
    python -m utils.routing.operations.schema > docs/router.schema.json

What the schema checks, for every block at once: the keys (an unknown key is named with a "did you
mean"), the types, and the bounds and choices of every setting that has a constant in
``utils/constants.py`` (``NAME_RANGE`` / ``NAME_CHOICES``, the same values the command-line flags
are checked against, read at each validation so that constants.py stays the one source). What it
cannot know is checked by :func:`utils.routing.operations.config.from_dict` afterwards, again every
problem at once: files (certificates, tokens, users), rule conditions, which destinations the rules
and the shadow block name, the model's classes.

Secrets never sit in the YAML: the Orthanc password comes from ``password_env`` (an environment
variable, default ``ROUTER_ORTHANC_PASSWORD``) or ``password_file``, the console token from
``token_env`` / ``token_file``, TLS keys from their PEM files. A ``password`` or ``token`` key is
refused with that advice, and no settings object shows a secret in its repr.

Editors validate a router.yaml against ``docs/router.schema.json`` (YAML language servers: a first
line ``# yaml-language-server: $schema=docs/router.schema.json``); tests keep the file in step.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, StrictBool, StrictInt, StrictStr,
                      ValidationError, WithJsonSchema)
from pydantic_core import PydanticCustomError

from utils import constants
from utils.config import ConfigError, check_value, value_range

SECRET_KEYS = {"password": "password_env or password_file", "token": "token_env or token_file"}


def resolve_path(value: str, base: Path) -> Path:
    """A path written in the configuration file: ``~`` expanded, a relative one taken from the file's folder
    ``base``. Every block resolves its paths with it."""
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else base / path


# --- settings bounded by constants.py ----------------------------------------------------------


def _literal(text: str) -> str:
    """``text`` as a PydanticCustomError message template (its braces are not placeholders)."""
    return text.replace("{", "{{").replace("}", "}}")


def _checked(name: str):
    """A validator running utils.config.check_value for constant ``name`` (its range / choices of now)."""
    def check(value):
        try:
            check_value(name, value, "\0")
        except ConfigError as error:
            raise PydanticCustomError("constant_range", _literal(str(error).removeprefix("\0 "))) from None
        return value
    return AfterValidator(check)


def _json_bounds(name: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    interval = value_range(name)
    if interval is not None:
        if math.isfinite(interval.low):
            out["exclusiveMinimum" if interval.low_open else "minimum"] = interval.low
        if math.isfinite(interval.high):
            out["exclusiveMaximum" if interval.high_open else "maximum"] = interval.high
    choices = getattr(constants, f"{name}_CHOICES", None)
    if choices is not None:
        out["enum"] = list(choices)
    return out


Number = Annotated[Union[StrictInt, float], AfterValidator(float)]  # 2 and 2.0 alike; True is not a number


def setting(name: str, kind: str = "int") -> Any:
    """The type of a setting with constant ``name``: ``int`` (strict), ``float`` (an int is taken), ``str``, ``bool``
    or ``str list``; its bounds and choices from constants.py, also written into the JSON Schema."""
    base = {"int": StrictInt, "float": Number, "str": StrictStr, "bool": StrictBool,
            "str list": list[StrictStr]}[kind]
    json_type = {"int": "integer", "float": "number", "str": "string", "bool": "boolean"}.get(kind)
    schema = ({"type": json_type, **_json_bounds(name)} if json_type else
              {"type": "array", "items": {"type": "string"}})
    schema["default"] = list(getattr(constants, name)) if kind == "str list" else getattr(constants, name)
    return Annotated[base, _checked(name), WithJsonSchema(schema)]


def default(name: str):
    """Field(default_factory=...) reading the constant at validation time (tests and sites may change it)."""
    value = getattr(constants, name)
    return Field(default_factory=lambda: list(getattr(constants, name)) if isinstance(value, tuple)
                 else getattr(constants, name), validate_default=True)


class Block(BaseModel):
    """A mapping of the YAML file: unknown keys refused."""
    model_config = ConfigDict(extra="forbid", frozen=True)


def _ae_title(value: str) -> str:
    value = value.strip()
    if not value or len(value) > 16 or "\\" in value or not value.isascii() or not value.isprintable():
        raise PydanticCustomError("ae_title", _literal(f"an AE title is 1-16 printable ASCII characters without "
                                                       f"'\\', got {value!r}"))
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("blank", "expected a non-empty value")
    return value.strip()


AETitle = Annotated[StrictStr, AfterValidator(_ae_title)]
Text = Annotated[StrictStr, AfterValidator(_not_blank)]
Port = setting("ROUTER_PORT")


# --- blocks --------------------------------------------------------------------------------------


class DicomDestination(Block):
    """A DICOM node the router sends to with C-STORE."""
    ae_title: AETitle
    host: Text
    port: Port
    tls: ClientTLSBlock | None = None


class FolderDestination(Block):
    """A folder the router copies to (a quarantine, a share)."""
    folder: Text


class HttpTLSBlock(Block):
    """HTTPS towards a DICOMweb destination: the CA that verifies it, the router's client certificate (PEM files)."""
    ca: Text | None = None
    cert: Text | None = None
    key: Text | None = None


class DicomwebDestination(Block):
    """A DICOMweb service the router sends to with STOW-RS (POST {dicomweb}/studies: delivery/dicomweb.py). HTTP
    basic: ``username`` with ``password_env`` or ``password_file``; a bearer token: ``token_env`` or ``token_file``."""
    dicomweb: Text = Field(description="the service's base URL, the part before /studies")
    username: StrictStr = ""
    password_env: Text | None = None
    password_file: Text | None = None
    token_env: Text | None = None
    token_file: Text | None = None
    tls: HttpTLSBlock | None = None
    timeout_s: setting("ROUTER_DICOMWEB_TIMEOUT_S", "float") = default("ROUTER_DICOMWEB_TIMEOUT_S")
    batch: setting("ROUTER_DICOMWEB_BATCH") = default("ROUTER_DICOMWEB_BATCH")
    batch_mb: setting("ROUTER_DICOMWEB_BATCH_MB") = default("ROUTER_DICOMWEB_BATCH_MB")


def _destination_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        return "folder" if "folder" in value else "dicomweb" if "dicomweb" in value else "dicom"
    return None


Destination = Annotated[Union[Annotated[DicomDestination, Tag("dicom")], Annotated[FolderDestination, Tag("folder")],
                              Annotated[DicomwebDestination, Tag("dicomweb")]],
                        Discriminator(_destination_kind)]


class ClientTLSBlock(Block):
    """DICOM over TLS towards one destination."""
    ca: Text | None = None
    cert: Text | None = None
    key: Text | None = None
    check_hostname: setting("ROUTER_TLS_CHECK_HOSTNAME", "bool") = default("ROUTER_TLS_CHECK_HOSTNAME")
    server_hostname: StrictStr = ""


class ServerTLSBlock(Block):
    """DICOM over TLS on the router's own port: PEM files of its certificate and key, the senders' CA."""
    cert: Text
    key: Text
    ca: Text | None = None
    require_client_cert: setting("ROUTER_TLS_REQUIRE_CLIENT_CERT", "bool") = default("ROUTER_TLS_REQUIRE_CLIENT_CERT")


class OrthancSourceBlock(Block):
    """Pull new instances from an Orthanc's change feed. The password: ``password_env`` or ``password_file``."""
    url: Text
    username: StrictStr = ""
    password_env: StrictStr = constants.ROUTER_ORTHANC_PASSWORD_ENV
    password_file: Text | None = None
    poll_s: setting("ROUTER_ORTHANC_POLL_S", "float") = default("ROUTER_ORTHANC_POLL_S")
    batch: setting("ROUTER_ORTHANC_BATCH") = default("ROUTER_ORTHANC_BATCH")
    timeout_s: setting("ROUTER_ORTHANC_TIMEOUT_S", "float") = default("ROUTER_ORTHANC_TIMEOUT_S")
    start_from: setting("ROUTER_ORTHANC_START_FROM", "str") = default("ROUTER_ORTHANC_START_FROM")
    modalities: setting("ROUTER_ORTHANC_MODALITIES", "str list") = default("ROUTER_ORTHANC_MODALITIES")


class MetricsBlock(Block):
    """Prometheus /metrics."""
    host: Text = Field(default_factory=lambda: constants.ROUTER_METRICS_HOST)
    port: setting("ROUTER_METRICS_PORT") = default("ROUTER_METRICS_PORT")


class ConsoleTLSBlock(Block):
    cert: Text
    key: Text


class ConsoleBlock(Block):
    """The web console and review list. The token: ``token_env`` or ``token_file``; users: ``users_file``."""
    host: Text = Field(default_factory=lambda: constants.ROUTER_CONSOLE_HOST)
    port: setting("ROUTER_CONSOLE_PORT") = default("ROUTER_CONSOLE_PORT")
    allowed_hosts: Union[StrictStr, list[StrictStr]] = default("ROUTER_CONSOLE_ALLOWED_HOSTS")
    trusted_proxies: Union[StrictStr, list[StrictStr]] = default("ROUTER_CONSOLE_TRUSTED_PROXIES")
    tls: ConsoleTLSBlock | None = None
    token_env: StrictStr = Field(default_factory=lambda: constants.ROUTER_CONSOLE_TOKEN_ENV)
    token_file: Text | None = None
    users_file: Text | None = None
    session_hours: setting("ROUTER_CONSOLE_SESSION_HOURS", "float") = default("ROUTER_CONSOLE_SESSION_HOURS")
    idle_minutes: setting("ROUTER_CONSOLE_IDLE_MINUTES", "float") = default("ROUTER_CONSOLE_IDLE_MINUTES")
    max_failures: setting("ROUTER_CONSOLE_MAX_FAILURES") = default("ROUTER_CONSOLE_MAX_FAILURES")
    failure_window_s: setting("ROUTER_CONSOLE_FAILURE_WINDOW_S", "float") = default("ROUTER_CONSOLE_FAILURE_WINDOW_S")
    review_days: setting("ROUTER_CONSOLE_REVIEW_DAYS", "float") = default("ROUTER_CONSOLE_REVIEW_DAYS")
    review_max_mb: setting("ROUTER_CONSOLE_REVIEW_MAX_MB") = default("ROUTER_CONSOLE_REVIEW_MAX_MB")
    corrections_dir: Text | None = None


class StowBlock(Block):
    """STOW-RS intake (POST /studies). The token: ``token_env`` or ``token_file``; users: ``users_file``."""
    host: Text = Field(default_factory=lambda: constants.ROUTER_STOW_HOST)
    port: setting("ROUTER_STOW_PORT") = default("ROUTER_STOW_PORT")
    tls: ConsoleTLSBlock | None = None
    token_env: StrictStr = Field(default_factory=lambda: constants.ROUTER_STOW_TOKEN_ENV)
    token_file: Text | None = None
    users_file: Text | None = None
    max_request_mb: setting("ROUTER_STOW_MAX_REQUEST_MB") = default("ROUTER_STOW_MAX_REQUEST_MB")
    max_instance_mb: setting("ROUTER_STOW_MAX_INSTANCE_MB") = default("ROUTER_STOW_MAX_INSTANCE_MB")
    max_concurrent: setting("ROUTER_STOW_MAX_CONCURRENT") = default("ROUTER_STOW_MAX_CONCURRENT")
    max_failures: setting("ROUTER_STOW_MAX_FAILURES") = default("ROUTER_STOW_MAX_FAILURES")
    failure_window_s: setting("ROUTER_STOW_FAILURE_WINDOW_S", "float") = default("ROUTER_STOW_FAILURE_WINDOW_S")


# A routing rule ({name, match, destination}) is checked by utils/routing/decision/rules.py, which names each
# problem with the rule's number and name (fields, operators, values, destinations).
RuleBlock = Annotated[Any, WithJsonSchema({
    "type": "object", "required": ["name", "match", "destination"], "additionalProperties": False,
    "properties": {"name": {"type": "string"}, "match": {"type": "object", "minProperties": 1},
                   "destination": {"type": "string"}}})]


class ShadowBlock(BaseModel):
    """mode: shadow: ``destination``, or ``body_part_map`` + ``default`` (checked by decision/shadow.py)."""
    model_config = ConfigDict(extra="allow", frozen=True)


def _threshold(value: Any) -> float | str:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"  # resolved once the model is loaded (RouterConfig.resolve_threshold)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PydanticCustomError("threshold", _literal(f"expected a number or 'auto', got {value!r}"))
    return _checked("THRESHOLD").func(float(value))


Threshold = Annotated[Any, AfterValidator(_threshold),
                      WithJsonSchema({"anyOf": [{"type": "number", **_json_bounds("THRESHOLD")}, {"const": "auto"}],
                                      "default": constants.THRESHOLD})]


class RouterFile(Block):
    """The router's YAML file (router.example.yaml shows every block)."""
    model: Text = Field(description="a training run directory, a .keras, .tflite or .onnx file")
    destinations: dict[StrictStr, Destination] = Field(min_length=1)
    ae_title: AETitle = Field(default_factory=lambda: constants.ROUTER_AE_TITLE)
    host: StrictStr = Field(default_factory=lambda: constants.ROUTER_HOST)
    port: Port = default("ROUTER_PORT")
    threshold: Threshold = Field(default_factory=lambda: constants.THRESHOLD, validate_default=True)
    spool_dir: Text = Field(default_factory=lambda: constants.ROUTER_SPOOL_DIR)
    audit_log: Text | None = None
    batch_size: setting("ROUTER_BATCH_SIZE") = default("ROUTER_BATCH_SIZE")
    batch_wait_ms: setting("ROUTER_BATCH_WAIT_MS") = default("ROUTER_BATCH_WAIT_MS")
    max_associations: setting("ROUTER_MAX_ASSOCIATIONS") = default("ROUTER_MAX_ASSOCIATIONS")
    retry_initial_s: setting("ROUTER_RETRY_INITIAL_S", "float") = default("ROUTER_RETRY_INITIAL_S")
    retry_max_s: setting("ROUTER_RETRY_MAX_S", "float") = default("ROUTER_RETRY_MAX_S")
    max_attempts: setting("ROUTER_MAX_ATTEMPTS") = default("ROUTER_MAX_ATTEMPTS")
    max_classify_attempts: setting("ROUTER_MAX_CLASSIFY_ATTEMPTS") = default("ROUTER_MAX_CLASSIFY_ATTEMPTS")
    mode: setting("ROUTER_MODE", "str") = default("ROUTER_MODE")
    min_free_mb: setting("ROUTER_MIN_FREE_MB") = default("ROUTER_MIN_FREE_MB")
    min_free_percent: setting("ROUTER_MIN_FREE_PERCENT", "float") = default("ROUTER_MIN_FREE_PERCENT")
    drift_min_images: setting("ROUTER_DRIFT_MIN_IMAGES") = default("ROUTER_DRIFT_MIN_IMAGES")
    drift_p_value: setting("ROUTER_DRIFT_P_VALUE", "float") = default("ROUTER_DRIFT_P_VALUE")
    decode_pool: setting("DECODE_POOL", "str") = default("DECODE_POOL")
    decode_workers: setting("DECODE_WORKERS") = default("DECODE_WORKERS")
    decode_timeout_s: setting("DECODE_TIMEOUT_S", "float") = default("DECODE_TIMEOUT_S")
    decode_memory_limit_mb: setting("DECODE_MEMORY_LIMIT_MB") = default("DECODE_MEMORY_LIMIT_MB")
    decode_threads: setting("DECODE_THREADS") = default("DECODE_THREADS")
    allowed_callers: list[AETitle] = Field(default_factory=list)
    rules: list[RuleBlock] = Field(default_factory=list)  # checked by decision/rules.py
    orthanc_source: OrthancSourceBlock | None = None
    tls: ServerTLSBlock | None = None
    metrics: MetricsBlock | None = None
    console: ConsoleBlock | None = None
    stow: StowBlock | None = None
    shadow: ShadowBlock | None = None


DicomDestination.model_rebuild()



# --- errors -------------------------------------------------------------------------------------

_TYPE_NAMES = {"int_type": "int", "int_parsing": "int", "float_type": "float", "float_parsing": "float",
               "string_type": "str", "bool_type": "bool", "list_type": "list", "dict_type": "dict",
               "model_type": "dict", "model_attributes_type": "dict", "union_tag_not_found": "dict"}


_INTERNAL = ("function-", "union[", "json-or-python", "constrained-", "lax-", "strict-", "nullable[")  # pydantic's
_MEMBERS = {"int", "float", "str", "list[str]"}  # the members of a union, named in a location after the field


def _path(loc: tuple) -> str:
    """pydantic's location -> the YAML path: ``destinations.chest.port``, ``rules[2]`` (the validators' and union
    members' names pydantic puts in between are left out)."""
    out = ""
    for index, part in enumerate(loc):
        if index == 2 and loc[0] == "destinations" and part in ("dicom", "folder", "dicomweb"):
            continue  # the tag that tells a DICOM node from a folder or a DICOMweb service
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith(_INTERNAL) or part in _MEMBERS:
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The models a field's annotation can hold (through Optional, Union, Annotated, list and dict)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The model whose mapping holds the key at ``loc`` (for "did you mean")."""
    model: type[BaseModel] | None = RouterFile
    for part in loc[:-1]:
        if part in ("dicom", "folder", "dicomweb"):
            model = {"dicom": DicomDestination, "folder": FolderDestination, "dicomweb": DicomwebDestination}[part]
        elif isinstance(part, str) and model is not None and part in model.model_fields:
            found = _models_in(model.model_fields[part].annotation)
            model = found[0] if len(found) == 1 else None
    return model


def _message(error: dict) -> str:
    loc, kind, value = tuple(error["loc"]), error["type"], error.get("input")
    path = _path(loc)
    if kind == "extra_forbidden":
        parent, key = _path(loc[:-1]), loc[-1]
        if key in SECRET_KEYS:
            return (f"{path}: secrets are not written in the configuration file; give {SECRET_KEYS[key]} "
                    f"(an environment variable, or a file only the router's user can read)")
        model = _model_at(loc)
        known = list(model.model_fields) if model is not None else []
        close = difflib.get_close_matches(str(key), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else (f"; known keys: {sorted(known)}" if known else "")
        return f"{parent or 'top level'}: unknown key {key!r}{hint}"
    if kind == "missing":
        return f"{path}: required"
    if kind == "constant_range":
        return f"{path} {error['msg']}"
    if kind in _TYPE_NAMES:
        return f"{path}: expected {_TYPE_NAMES[kind]}, got {type(value).__name__} {value!r}"
    if kind == "too_short" and loc[-1:] == ("destinations",):
        return f"{path}: required (one per class, plus 'uncertain')"
    return f"{path}: {error['msg']}"


def validate_document(raw: dict[str, Any]) -> tuple[RouterFile | None, list[str]]:
    """The validated document, or None and every problem (YAML path: what is wrong), in file order."""
    try:
        return RouterFile.model_validate(raw), []
    except ValidationError as error:
        problems: list[str] = []
        for item in error.errors(include_url=False):
            text = _message(item)
            if text not in problems:
                problems.append(text)
        return None, problems


def json_schema() -> dict[str, Any]:
    schema = RouterFile.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "DICOM Imaging Router configuration (router.yaml)"
    return schema


def main() -> int:
    json.dump(json_schema(), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
