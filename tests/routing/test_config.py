"""The router's YAML configuration: defaults, strict checking, routes against the model's classes."""

import dataclasses
import math
import re
from pathlib import Path

import pytest
import yaml

import router
from utils import config as flags
from utils import constants
from utils.config import ConfigError
from utils.routing.operations.config import _CONSTANTS, RouterConfig, load_config
from utils.routing.operations.schema import RouterFile

from .conftest import CLASSES, ROOT

DESTINATIONS = {c: {"ae_title": c.upper()[:16], "host": "127.0.0.1", "port": 2000 + i} for i, c in enumerate(CLASSES)}
DESTINATIONS["uncertain"] = {"ae_title": "REVIEW", "host": "127.0.0.1", "port": 3000}


def write(tmp_path: Path, **settings) -> Path:
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump({"model": "model.keras", "destinations": DESTINATIONS, **settings}))
    return path


def test_example_file_loads_and_covers_the_default_classes():
    config = load_config(ROOT / "router.example.yaml")
    config.check_routes(constants.CLASS_NAMES)
    assert config.port == 11112 and config.host == "127.0.0.1"  # a local try-it set-up
    assert config.destinations["unreadable"].folder == config.spool_dir / "quarantine"  # follows spool_dir
    assert 4242 not in {d.port for d in config.destinations.values()}  # Orthanc's default port: taken beside one
    assert load_config(ROOT / "router.example.yaml", {"spool_dir": "/tmp/elsewhere"}).destinations[
        "unreadable"].folder == Path("/tmp/elsewhere/quarantine")
    assert config.model == str(ROOT / "runs" / "demo")  # relative to the file's folder


def test_defaults_come_from_constants(tmp_path):
    config = load_config(write(tmp_path))
    assert (config.ae_title, config.port, config.threshold) == (constants.ROUTER_AE_TITLE, constants.ROUTER_PORT,
                                                                constants.THRESHOLD)
    assert config.spool_dir == tmp_path / constants.ROUTER_SPOOL_DIR
    assert config.audit_log == config.spool_dir / "audit.jsonl"
    assert config.destinations["unreadable"].folder == config.spool_dir / "quarantine"
    assert config.destinations["spine"].node == "SPINE@127.0.0.1:2003"
    assert config.max_classify_attempts == constants.ROUTER_MAX_CLASSIFY_ATTEMPTS


def test_overrides_win_over_the_file(tmp_path):
    config = load_config(write(tmp_path, port=5000), {"port": 6000, "threshold": None, "ae_title": "NEW"})
    assert (config.port, config.ae_title, config.threshold) == (6000, "NEW", constants.THRESHOLD)


@pytest.mark.parametrize("settings, message", [
    ({"prot": 104}, "did you mean 'port'"),
    ({"port": "104x"}, "expected int"),
    ({"port": 70000}, "port must be between"),
    ({"threshold": 1.5}, "threshold must be between 0 and 1, got 1.5"),
    ({"threshold": True}, "threshold: expected a number or 'auto', got True"),
    ({"ae_title": "A_TITLE_LONGER_THAN_16"}, "AE title"),
    ({"retry_max_s": 0.1, "retry_initial_s": 1}, "retry_max_s"),
    ({"max_classify_attempts": 0}, "max_classify_attempts must be >= 1"),
    ({"max_classify_attempts": 2.5}, "expected int"),
    ({"destinations": {"spine": {"ae_title": "X", "host": "h"}}}, r"destinations\.spine\.port: required"),
    ({"destinations": {"spine": {"ae_title": "X", "host": "h", "port": 1, "tls": True}}},
     r"destinations\.spine\.tls: expected dict, got bool True"),
    ({"destinations": {"spine": "pacs"}}, "destinations.spine: expected dict"),
    ({"destinations": {"spine": {"ae_title": "X", "host": "h", "port": 0}}},
     "destinations.spine.port must be between 1 and 65535, got 0"),
    ({"decode_pool": "auto"}, r"decode_pool must be one of \('processes', 'threads'\)"),
    ({"decode_threads": 65}, r"decode_threads must be"),
    ({"model": None}, "model: expected str, got NoneType"),
])
def test_bad_settings_are_refused_with_the_key(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, **settings))


def test_routes_must_cover_the_models_classes(tmp_path):
    destinations = {k: v for k, v in DESTINATIONS.items() if k != "spine"}
    destinations["spien"] = DESTINATIONS["spine"]
    config = load_config(write(tmp_path, destinations=destinations))
    with pytest.raises(ConfigError, match=r"no destination for \['spine'\].*spien \(did you mean spine\?\)"):
        config.check_routes(CLASSES)


def test_folder_destinations(tmp_path):
    destinations = {**DESTINATIONS, "others": {"folder": "others"}, "unreadable": {"folder": "/srv/quarantine"}}
    config = load_config(write(tmp_path, destinations=destinations))
    assert config.destinations["others"].folder == tmp_path / "others"
    assert config.destinations["unreadable"].folder == Path("/srv/quarantine")
    config.check_routes(CLASSES)


def test_router_flags_and_help(capsys):
    args = router.parse_args(["--config", "x.yaml", "--router-port", "2000", "--threshold", "0.7"])
    assert router.overrides(args) == {"ae_title": None, "host": None, "port": 2000, "spool_dir": None,
                                      "threshold": 0.7, "model": None}
    with pytest.raises(SystemExit):
        router.parse_args(["--config", "x.yaml", "--router-prot", "1"])
    assert "did you mean --router-port" in capsys.readouterr().err


def test_router_refuses_a_bad_config_with_exit_code_2(tmp_path, capsys):
    assert router.main(["--config", str(write(tmp_path, prot=1))]) == 2
    assert "unknown key 'prot'" in capsys.readouterr().err


RANGED = {key: name for key, name in _CONSTANTS.items() if flags.value_range(name)}


@pytest.mark.parametrize("key", sorted(RANGED))
def test_an_out_of_range_value_is_refused_naming_the_yaml_key(tmp_path, key):
    """Every numeric router setting is checked against its constant's range (utils/constants.py)."""
    interval, kind = flags.value_range(RANGED[key]), type(getattr(constants, RANGED[key]))
    outside = [kind(interval.low if interval.low_open else interval.low - 1)]
    if not math.isinf(interval.high):
        outside.append(kind(interval.high if interval.high_open else interval.high + 1))
    for value in outside:
        with pytest.raises(ConfigError, match=rf"router.yaml: {key} must be {re.escape(interval.rule())}, "
                                              rf"got {re.escape(repr(value))}$"):
            load_config(write(tmp_path, **{key: value}))


def test_router_bounds_come_from_constants_py(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "ROUTER_BATCH_SIZE_RANGE", "[1, 8]")
    with pytest.raises(ConfigError, match=r"router.yaml: batch_size must be between 1 and 8, got 16$"):
        load_config(write(tmp_path))  # the default (16) is now outside
    assert load_config(write(tmp_path, batch_size=8)).batch_size == 8


def test_every_router_setting_is_a_config_field():
    """Each ROUTER_* constant is a YAML key (its name without the prefix) and a RouterConfig field; the
    ROUTER_ORTHANC_* constants are the keys of the orthanc_source block instead."""
    assert set(RouterFile.model_fields) == {f.name for f in dataclasses.fields(RouterConfig)}
    assert set(_CONSTANTS) <= set(RouterFile.model_fields)
    assert {"port", "batch_size", "max_classify_attempts", "threshold", "decode_timeout_s",
            "decode_threads"} <= set(RANGED)


def test_decode_threads_reach_the_classifiers_decoding_pool(tmp_path):
    """JPEG 2000 / HTJ2K: OpenJPEG threads per frame, set in the YAML like the other decode_* keys."""
    from utils.io.isolation import PoolSettings

    config = load_config(write(tmp_path, decode_threads=2))
    assert config.decode_threads == 2 and load_config(write(tmp_path)).decode_threads == 0
    pool = PoolSettings(config.decode_pool, config.decode_workers, config.decode_timeout_s,
                        config.decode_memory_limit_mb, config.decode_threads)
    assert pool.thread_count == 2


@pytest.mark.parametrize("value", ["auto", "AUTO", " auto "])
def test_threshold_auto_is_accepted_and_resolved_with_the_model(tmp_path, value):
    from types import SimpleNamespace

    from utils.artifacts.model_file import ModelMetadata
    from utils.preprocessing import PreprocessSpec

    config = load_config(write(tmp_path, threshold=value))
    assert config.threshold == "auto"
    spec = PreprocessSpec(class_names=CLASSES, image_size=32, channels=1)
    calibrated = SimpleNamespace(spec=spec, metadata=ModelMetadata(spec, calibration={
        "temperature": 1.3, "threshold": {"value": 0.91, "target_accuracy": 0.995, "coverage": 0.8, "accuracy": 0.996,
                                          "reachable": True}}))
    assert config.resolve_threshold(calibrated) == 0.91
    with pytest.raises(ValueError, match=r"has none.*python calibrate.py .*model.keras"):
        config.resolve_threshold(SimpleNamespace(spec=spec, metadata=ModelMetadata(spec)))
    numeric = load_config(write(tmp_path, threshold=0.7))
    assert numeric.resolve_threshold(calibrated) == 0.7  # a number is used as it is


def test_a_threshold_that_is_neither_a_number_nor_auto_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"router.yaml: threshold: expected a number or 'auto', got 'high'"):
        load_config(write(tmp_path, threshold="high"))


def test_the_router_refuses_to_start_with_auto_and_an_uncalibrated_model(tmp_path):
    """The node resolves ``auto`` as soon as the model is loaded, before it accepts anything."""
    from types import SimpleNamespace

    from utils.artifacts.model_file import ModelMetadata
    from utils.preprocessing import PreprocessSpec
    from utils.routing.node import RouterNode

    spec = PreprocessSpec(class_names=CLASSES, image_size=32, channels=1)
    predictor = SimpleNamespace(spec=spec, model_id="m", backbone="", metadata=ModelMetadata(spec),
                                predict=lambda x: pytest.fail("the model must not run"))
    config = load_config(write(tmp_path, threshold="auto", spool_dir=str(tmp_path / "spool")))
    node = RouterNode(config, predictor=predictor)
    with pytest.raises(ValueError, match="calibrate.py"):
        node.start()
    assert node.server is None and node.classifier is None


def test_router_threshold_flag_takes_auto_and_check_refuses_an_uncalibrated_model(tmp_path, capsys):
    from .conftest import brightness_model

    args = router.parse_args(["--config", "x.yaml", "--threshold", "AUTO"])
    assert router.overrides(args)["threshold"] == "auto"
    with pytest.raises(SystemExit):
        router.parse_args(["--config", "x.yaml", "--threshold", "1.5"])
    assert "--threshold" in capsys.readouterr().err
    model = brightness_model(tmp_path / "model.keras")
    folders = {c: {"folder": str(tmp_path / c)} for c in (*CLASSES, "uncertain")}
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump({"model": str(model), "destinations": folders, "threshold": "auto",
                                    "spool_dir": str(tmp_path / "spool")}))
    assert router.main(["--config", str(path), "--check"]) == 2
    assert "calibrate.py" in capsys.readouterr().err
    assert router.main(["--config", str(path), "--check", "--threshold", "0.6"]) == 0
    out = capsys.readouterr().out
    assert "threshold 0.6 (given: 0.6); a top probability below it routes to 'uncertain'" in out
    assert "allowed_callers: any calling AE title may associate" in out
    path.write_text(yaml.safe_dump({"model": str(model), "destinations": folders, "threshold": 0.5,
                                    "spool_dir": str(tmp_path / "spool"), "allowed_callers": ["ORTHANC", "CR1"]}))
    assert router.main(["--config", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "threshold 0.5 (given: 0.5)" in out
    assert "allowed_callers: ORTHANC, CR1: only these calling AE titles (exact, case-sensitive) may associate; " \
           "any other is rejected at association, for C-STORE and C-ECHO alike" in out


def test_a_missing_or_broken_file_is_named_with_the_line_or_the_setting(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert router.main(["--config", "router.yaml", "--check"]) == 2
    assert capsys.readouterr().err == "error: router.yaml: no such configuration file (--config)\n"
    Path("router.yaml").write_text("model: m.keras\ndestinations:\n  spine: {folder: out}\n  bad: x: y\n")
    assert router.main(["--config", "router.yaml", "--check"]) == 2
    assert capsys.readouterr().err == "error: router.yaml: line 4, column 9: mapping values are not allowed here\n"
    Path("router.yaml").write_text("model: m.keras\ndestinations:\n  spine: {folder: out}\n   bad: x\n")
    with pytest.raises(ConfigError, match=r"^router.yaml: line 4, column 4: expected <block end>.* \(while parsing "
                       r"a block mapping at line 3, column 3\)$"):
        load_config("router.yaml")
    Path("router.yaml").write_text(yaml.safe_dump({"model": "runs/x/best.keras", "destinations": DESTINATIONS}))
    assert router.main(["--config", "router.yaml", "--check"]) == 2
    assert capsys.readouterr().err == ("error: model runs/x/best.keras not found (the config's model: key, relative "
                                       "to the config file's folder)\n")
    assert router.main(["--config", "router.yaml", "--check", "--model", "elsewhere.keras"]) == 2
    assert "error: model elsewhere.keras not found (--model, relative to" in capsys.readouterr().err


def test_check_says_where_the_threshold_came_from():
    from utils.routing.operations.service import describe_threshold

    assert describe_threshold("auto", 0.96634).startswith("threshold 0.9663 (auto: the model's calibrated "
                                                          "recommendation)")
    assert describe_threshold(0.5, 0.5).startswith("threshold 0.5 (given: 0.5)")


def test_orthanc_source_block_is_checked_and_its_password_never_written_out(tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTER_ORTHANC_PASSWORD", "secret-from-env")
    config = load_config(write(tmp_path, orthanc_source={"url": "http://127.0.0.1:8042/", "username": "router",
                                                         "poll_s": 2, "modalities": []}))
    source = config.orthanc_source
    assert (source.url, source.poll_s, source.modalities) == ("http://127.0.0.1:8042", 2.0, ())
    assert (source.batch, source.start_from) == (constants.ROUTER_ORTHANC_BATCH, constants.ROUTER_ORTHANC_START_FROM)
    assert source.password == "secret-from-env" and "secret" not in repr(source) + repr(config)
    assert config.to_dict()["orthanc_source"]["password"] == "*** ($ROUTER_ORTHANC_PASSWORD)"
    (tmp_path / "orthanc.pw").write_text("from-a-file\n")
    source = load_config(write(tmp_path, orthanc_source={"url": "http://x", "username": "router",
                                                         "password_file": "orthanc.pw"})).orthanc_source
    assert source.password == "from-a-file" and "from-a-file" not in repr(source)
    with pytest.raises(ConfigError, match=r"orthanc_source.password: secrets are not written in the configuration "
                                          r"file; give password_env or password_file"):
        load_config(write(tmp_path, orthanc_source={"url": "http://x", "username": "u", "password": "p"}))
    assert load_config(write(tmp_path)).orthanc_source is None
    assert load_config(write(tmp_path, orthanc_source={"url": "http://pacs:8042"})).orthanc_source.modalities == \
        constants.ROUTER_ORTHANC_MODALITIES


@pytest.mark.parametrize(("block", "message"), [
    ({}, r"orthanc_source.url: required"),
    ("http://x", r"orthanc_source: expected dict, got str"),
    ({"url": "ftp://x"}, r"orthanc_source.url: expected http\(s\)"),
    ({"url": "http://x", "user": "a"}, r"orthanc_source: unknown key 'user'"),
    ({"url": "http://x", "username": "a"}, r"give both username and a password"),
    ({"url": "http://x", "poll_s": 0}, r"orthanc_source.poll_s must be"),
    ({"url": "http://x", "batch": 5000}, r"orthanc_source.batch must be between 1 and 1000"),
    ({"url": "http://x", "start_from": "now"}, r"orthanc_source.start_from must be one of"),
    ({"url": "http://x", "modalities": ["cr"]}, r"orthanc_source.modalities: Modality values are upper case"),
    ({"url": "http://x", "modalities": "CR"}, r"orthanc_source.modalities: expected list"),
])
def test_orthanc_source_errors_name_the_key(tmp_path, block, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, orthanc_source=block))


def test_every_problem_is_reported_at_once_with_its_yaml_path(tmp_path):
    """One run of the router names every mistake in the file, each with where it is, not the first one only."""
    path = write(tmp_path, batch_size=0, prot=104, threshold="high",
                 destinations={**DESTINATIONS, "spine": {"ae_title": "SPINE", "host": "h", "port": 0}},
                 metrics={"port": "x"}, console={"tokn": "x"},
                 orthanc_source={"url": "http://pacs:8042", "username": "u", "password": "in-the-yaml"})
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    lines = str(raised.value).splitlines()
    expected = ["destinations.spine.port must be between 1 and 65535, got 0", "threshold: expected a number or 'auto'",
                "batch_size must be >= 1, got 0", "metrics.port: expected int, got str 'x'",
                "console: unknown key 'tokn' (did you mean 'token_env'?)",
                "orthanc_source.password: secrets are not written in the configuration file",
                "top level: unknown key 'prot' (did you mean 'port'?)"]
    for text in expected:
        assert sum(text in line for line in lines) == 1, (text, lines)
    assert len(lines) == len(expected) and all(line.startswith(f"{path}: ") for line in lines)
    assert "in-the-yaml" not in str(raised.value)
    # what only a built configuration can check is also gathered: two blocks wrong after the schema passed
    path = write(tmp_path, tls={"cert": "missing.crt", "key": "missing.key"},
                 orthanc_source={"url": "ftp://pacs"}, rules=[{"name": "x", "match": {"modality": "CT"},
                                                              "destination": "nowhere"}])
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    text = str(raised.value)
    assert "tls.cert" in text and "orthanc_source.url: expected http(s)" in text and "unknown destination 'nowhere'" \
        in text, text


def test_the_json_schema_in_docs_is_the_schemas_and_validates_the_example():
    """docs/router.schema.json (for editors) is what the router checks: regenerate it with
    python -m utils.routing.operations.schema > docs/router.schema.json"""
    import json

    import jsonschema

    from utils.routing.operations.schema import json_schema

    shipped = json.loads((ROOT / "docs" / "router.schema.json").read_text())
    assert shipped == json.loads(json.dumps(json_schema())), "docs/router.schema.json is stale: regenerate it"
    validator = jsonschema.Draft202012Validator(shipped)
    validator.validate(yaml.safe_load((ROOT / "router.example.yaml").read_text()))
    assert shipped["properties"]["batch_size"]["minimum"] == 1  # bounds from ROUTER_BATCH_SIZE_RANGE
    assert shipped["properties"]["decode_pool"]["enum"] == list(constants.DECODE_POOL_CHOICES)
    wrong = list(validator.iter_errors({"model": "m", "destinations": {"a": {"folder": "q"}}, "port": 0,
                                        "orthanc_source": {"url": "http://x", "password": "p"}}))
    assert {tuple(e.absolute_path)[:1] for e in wrong} == {("port",), ("orthanc_source",)}


def test_check_prints_the_resolved_configuration_with_secrets_masked(tmp_path, monkeypatch):
    from utils.routing.operations.service import describe_config

    monkeypatch.setenv("ROUTER_ORTHANC_PASSWORD", "orthanc-secret-value")
    monkeypatch.setenv("ROUTER_CONSOLE_TOKEN", "Console-Token-0123456789-abcdef")
    config = load_config(write(tmp_path, orthanc_source={"url": "http://pacs:8042", "username": "router"},
                               console={"port": 8108}))
    text = describe_config(config)
    assert "password: '*** ($ROUTER_ORTHANC_PASSWORD)'" in text and "token_env: ROUTER_CONSOLE_TOKEN" in text
    assert "batch_size: 16" in text and f"spool_dir: {config.spool_dir}" in text
    for secret in ("orthanc-secret-value", "Console-Token-0123456789-abcdef"):
        assert secret not in text and secret not in repr(config) and secret not in str(config.to_dict())
