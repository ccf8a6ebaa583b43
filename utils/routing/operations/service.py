"""What router.py does besides running: logging set-up, --check, --status, --requeue-failed.

``--check`` says for the router's port and for each destination whether it speaks TLS (which CA, client
certificate, hostname check) and does its C-ECHO the way the forwarder connects, over TLS where configured.
With an ``orthanc_source``, ``--check`` asks that Orthanc for its version and last change (the credentials are
checked too) and ``--status`` shows the cursor, Orthanc's last change and how far behind the router is.
"""

from __future__ import annotations

import logging
import time

from utils.routing import queue as _queue
from utils.routing.intake import space
from utils.routing.operations.config import RouterConfig, check_model_exists, load_config  # noqa: F401 (router.py uses them)
from utils.routing.node import EXIT_MODEL_FAILED, EXIT_WORKER_FAILED, STATE_KEY, RouterNode  # noqa: F401
from utils.routing.queue import SpoolLockedError  # noqa: F401
from utils.routing.decision.shadow import describe_mode
from utils.untrusted import EscapeControlCharacters, log_safe

log = logging.getLogger(__name__)

STATUS_LATEST = 5  # unreadable objects listed by --status

# pynetdicom logs every failed connection attempt as an error; the forwarder reports a down
# destination once (log and audit), so these repeats are dropped.
_REPEATED = ("Association request failed: unable to connect to remote", "TCP Initialisation Error")


class _DropRepeats(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in _REPEATED)


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)  # also when an entry script configured logging already
    pynetdicom_log = logging.getLogger("pynetdicom")
    pynetdicom_log.setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    pynetdicom_log.addFilter(_DropRepeats())
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropRepeats())
        if not any(isinstance(f, EscapeControlCharacters) for f in handler.filters):
            handler.addFilter(EscapeControlCharacters())  # a peer's CR/LF or ESC never forges or hides a log line


def echo(ae_title: str, host: str, port: int, called: str, timeout: float = 10, tls=None) -> str | None:
    """C-ECHO a node (over TLS with ``tls``, a utils.routing.tls.ClientTLS); None when it answered success, else
    what went wrong."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called, tls_args=tls.tls_args(host) if tls else None)
    if not assoc.is_established:
        return ("association rejected" if assoc.is_rejected else
                "no association (down, unreachable, or the TLS handshake failed: see the log above)" if tls else
                "no association (down or unreachable)")
    try:
        status = assoc.send_c_echo()
        return None if status and status.Status == 0 else f"C-ECHO status {status.get('Status', 'none')}"
    finally:
        assoc.release()


def describe_config(config: RouterConfig) -> str:
    """The resolved configuration as YAML (defaults filled in, paths absolute), secrets masked: the Orthanc password
    shows as ``*** ($VARIABLE)`` or ``*** (file PATH)``, the console token and users never appear (only where they are
    read from)."""
    import yaml

    text = yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None, width=120)
    return "resolved configuration (secrets masked):\n" + "".join(f"  {line}\n" for line in text.splitlines())


def check(config: RouterConfig) -> int:
    """Load the model, check every label has a destination, the spool's free space; print the routing rules in
    order; C-ECHO each DICOM destination, probe each DICOMweb one (utils.dicomweb.http.probe)."""
    from utils.infer.predictor import load_predictor

    print(describe_config(config))
    predictor = load_predictor(config.model)
    config.check_routes(predictor.spec.class_names)
    threshold = config.resolve_threshold(predictor)  # "auto" without a calibrated model is refused here
    print(f"model {predictor.model_id} ({predictor.backbone}): classes {list(predictor.spec.class_names)}")
    print(describe_threshold(config.threshold, threshold))
    print(describe_callers(config.allowed_callers))
    problems = 0
    reading = space.measure(config.spool_dir, config.min_free_mb, config.min_free_percent)
    problems += reading.below  # the router would refuse every object
    print(f"spool {config.spool_dir}: {space.describe(reading, config.spool_dir)}")
    print(f"listening on {config.host}:{config.port} with " + (config.tls.describe() if config.tls else "plain TCP"))
    print(config.metrics.describe() if config.metrics else "metrics: off (no metrics block)")
    print(config.console.describe() if config.console else "web console: off (no console block)")
    print(config.stow.describe() if config.stow else "STOW-RS intake: off (no stow block)")
    for line in describe_mode(config.mode, config.shadow):
        print(line)
    print("routing rules, first match wins (then the built-in default; read from the header before the model):")
    for line in config.rule_set().describe(config.destinations):
        print(line)
    seen: dict[str, str | None] = {}
    probed: dict[str, tuple[bool, str]] = {}
    for route, dest in sorted(config.destinations.items()):
        if dest.is_folder:
            print(f"  {route:<16} -> folder {dest.folder}")
            continue
        if dest.dicomweb is not None:  # no C-ECHO in DICOMweb: a search for one study, with the credentials and TLS
            from utils.dicomweb.http import probe

            if dest.node not in probed:
                probed[dest.node] = probe(dest.dicomweb.endpoint)
            ok, line = probed[dest.node]
            problems += not ok
            print(f"  {route:<16} -> {dest.dicomweb.describe()}: {line}")
            continue
        if dest.node not in seen:
            seen[dest.node] = echo(config.ae_title, dest.host, dest.port, dest.ae_title, tls=dest.tls)
        result = seen[dest.node]
        problems += result is not None
        how = dest.tls.describe(dest.host) if dest.tls else "plain TCP"
        print(f"  {route:<16} -> {dest.node} ({how}): {'echo ok' if result is None else result}")
    if config.orthanc_source is not None:
        from utils.routing.intake.orthanc_source import CURSOR_KEY, check_source, read_cursor

        cursor = read_cursor(_read_meta_if_any(config, CURSOR_KEY))
        ok, line = check_source(config.orthanc_source, cursor)
        problems += not ok
        print(line)
    return 1 if problems else 0


def describe_threshold(setting: float | str, threshold: float) -> str:
    """The threshold in use and where it came from: the number given (file or --threshold) or ``auto``."""
    from utils.infer.decisions import AUTO_THRESHOLD

    how = ("auto: the model's calibrated recommendation" if setting == AUTO_THRESHOLD else f"given: {setting:.4g}")
    return f"threshold {threshold:.4g} ({how}); a top probability below it routes to 'uncertain'"


def describe_callers(allowed: tuple[str, ...]) -> str:
    """What ``allowed_callers`` lets in (utils/routing/intake/scp.py sets pynetdicom's ``require_calling_aet``)."""
    if not allowed:
        return "allowed_callers: any calling AE title may associate (none configured)"
    return (f"allowed_callers: {', '.join(allowed)}: only these calling AE titles (exact, case-sensitive) may "
            "associate; any other is rejected at association, for C-STORE and C-ECHO alike (A-ASSOCIATE-RJ, "
            "calling AE title not recognised)")


def _read_meta_if_any(config: RouterConfig, key: str) -> str | None:
    """A note in the spool database; None when there is no database yet."""
    try:
        return _queue.read_meta(config.spool_dir, key)
    except FileNotFoundError:
        return None


def print_status(config: RouterConfig, latest: int = STATUS_LATEST) -> int:
    """Counts per state, per route and per deciding rule or model; free space (reception paused?); unreadable objects by reason and the latest
    ones; retries; failures."""
    from utils.infer.decisions import UNREADABLE

    counts, failed = _queue.read_status(config.spool_dir)
    summary = _queue.read_summary(config.spool_dir, UNREADABLE, latest)
    print(f"spool {config.spool_dir}: " + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "empty"))
    if config.shadow is not None:
        print(f"  mode: shadow, {config.shadow.describe()} (the model is recorded, not followed; "
              "router.py --shadow-report weighs the trial)")
    state = describe_state(_queue.read_meta(config.spool_dir, STATE_KEY), _queue.spool_in_use(config.spool_dir))
    if state:
        print(f"  router: {state}")
    print("  disk: " + space.describe(space.measure(config.spool_dir, config.min_free_mb, config.min_free_percent),
                                      config.spool_dir))
    if summary.routes:
        print("  by route: " + ", ".join(f"{k} {v}" for k, v in summary.routes.items()))
    if summary.decided_by:
        print("  decided by: " + ", ".join(f"{k} {v}" for k, v in summary.decided_by.items()))
    if summary.unreadable_by_reason:
        total = sum(summary.unreadable_by_reason.values())
        print(f"  unreadable {total} by reason: " + ", ".join(f"{k} {v}" for k, v in summary.unreadable_by_reason.items()))
        print("  latest unreadable (newest first):")
        for item in summary.latest_unreadable:
            print(f"    {_utc(item.updated_at)} {_cut(item.sop_instance_uid or item.file)} ({item.state}): "
                  f"{_cut(item.classify_reason)}")
    for item in summary.classify_retries:  # (also the objects being classified right now)
        print(f"  classification tried {item.classify_attempts} of {config.max_classify_attempts} times:"
              f" {_cut(item.sop_instance_uid or item.file)}"
              + (f", last error {_cut(item.reason)}" if item.reason else ""))
    for item in failed:
        print(f"  failed {_cut(item.sop_instance_uid)} -> {item.route}: {_cut(item.reason, 1000)} (file {item.file})")
    if config.orthanc_source is not None:
        from utils.routing.intake.orthanc_source import CURSOR_KEY, NOTE_KEY, describe_status

        for line in describe_status(config.orthanc_source, _queue.read_meta(config.spool_dir, CURSOR_KEY),
                                    _queue.read_meta(config.spool_dir, NOTE_KEY)):
            print("  " + line)
    return 0


def describe_state(note: str | None, in_use: bool | None = None) -> str:
    """The router's last note about itself (utils.routing.node ``_note_state``) in words; "" for none.

    ``in_use``: whether a process holds the spool's lock (:func:`utils.routing.queue.spool_in_use`). A note that
    says the router is loading or running while nobody holds the lock was left by a router that did not stop
    cleanly (kill -9, a crash, a power loss): it is reported as not running."""
    import json

    if not note:
        return ""
    try:
        state = json.loads(note)
        text = f"{state['state']} since {_utc(state['time'])} (pid {state.get('pid', '?')})"
    except (ValueError, KeyError, TypeError):
        return f"unreadable note {note[:100]!r}"
    if in_use is False and state.get("state") != "stopped":
        return (f"not running (a stale note from a router that did not stop cleanly, e.g. kill -9: no process holds "
                f"the spool's lock; it last noted: {text})")
    if state.get("model_id"):
        text += f", model {state['model_id']}"
    if state.get("failure"):
        text += f": {state['failure']} (exit status {state.get('exit_code')})"
    return text


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _cut(text: str, limit: int = 200) -> str:
    """``text`` for the terminal: a sender's control characters escaped (utils/untrusted.py), at most ``limit``."""
    text = log_safe(text, len(text) * 10)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def requeue_failed(config: RouterConfig) -> int:
    return _queue.requeue_failed(config.spool_dir)
