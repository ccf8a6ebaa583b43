"""A DICOM node that classifies each received X-ray and forwards it to the AI model for its body part.

    python router.py --config router.yaml                 # run (Ctrl-C / SIGTERM stop it cleanly)
    kill -HUP <pid>                                       # reload configuration and model while running
    python router.py --config router.yaml --check         # check config and model, C-ECHO each destination
    python router.py --config router.yaml --status        # what the queue holds (works while it runs)
    python router.py --config router.yaml --backup DIR    # a consistent copy of the spool (works while it runs)
    python router.py --config router.yaml --requeue-failed
    python router.py --config router.yaml --shadow-report --since 2026-03-01 --output trial.json

Storage SCP + Verification SCP (C-ECHO) on --router-port. Every received object is written to
the spool and fsynced before success is answered, classified in batches, and forwarded by
C-STORE, in the transfer syntax it arrived in, to the destination configured for its label
(plus "uncertain" below the threshold and "unreadable" for non-images and broken files). The
queue survives restarts and kill -9; a spool file is deleted only after its destination
confirmed it. With an ``orthanc_source`` the router also pulls each new instance from an Orthanc's
change feed into the same queue, keeping its cursor there (nothing is lost while the router is down).
With a ``console`` block the router also serves a web console (utils/routing/operations/console.py; off by default, on
127.0.0.1 unless configured): counts, destinations' health, the latest decisions with thumbnails, search, and a
review list where an operator with the token requeues an object or corrects its label (forwarded to that label's
destination, audited, added to a corrections dataset that prepare.py reads). See router.example.yaml and
docs/ROUTER.md.

SIGHUP reloads the configuration file and the model without stopping reception (rules, destinations,
threshold, shadow settings, retries, model: between batches; a configuration or model that fails is
refused with its reason and the running one stays; the audit log is reopened for logrotate); the
console's "Reload" does the same. See docs/ROUTER.md, "Changing a running router".

The router listens as soon as its queue is recovered: the model is loaded in the background and
what arrives meanwhile waits in the spool (a .tflite or .onnx model needs no TensorFlow).

Exit status: 0 after SIGTERM / SIGINT; 1 when --check found a problem; 2 for a bad configuration
or a failed start, including a model that could not be loaded (noticed after reception began: the
router stops accepting, what it received waits in the spool); 3 when a worker thread died or hung
(the router stops accepting and exits so that its supervisor, e.g. systemd with
Restart=on-failure, starts it again).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import sys

from utils import config
from utils.infer.decisions import threshold_value

# Settings that flags may override (YAML keys without the ROUTER_ prefix; see utils/routing/operations/config.py).
FLAGS = ("ROUTER_AE_TITLE", "ROUTER_HOST", "ROUTER_PORT", "ROUTER_SPOOL_DIR")  # and --threshold (number or auto)

log = logging.getLogger("router")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = config.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, metavar="FILE", help="router YAML file (required)")
    parser.add_argument("--model", default=None, help="overrides the configuration's model (run dir or .keras)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--check", action="store_true", help="check config and model, C-ECHO destinations, exit")
    action.add_argument("--status", action="store_true",
                        help="print the queue's counts, unreadable objects with their reasons and failed ones, exit")
    action.add_argument("--requeue-failed", action="store_true", help="retry objects marked failed, exit")
    action.add_argument("--backup", metavar="DIR", default=None,
                        help="copy the spool (queue database, waiting files, review, corrections, audit log, config) "
                        "into DIR, new or empty, also while the router runs; exit")
    action.add_argument("--shadow-report", action="store_true",
                        help="summarise the audit log for a go-live decision (agreement with the tag and with "
                        "reviewers' corrections, share auto-routed at the threshold and its accuracy), exit")
    parser.add_argument("--since", metavar="ISO", default=None,
                        help="--shadow-report: from this date or time, UTC unless it has an offset (default: the start)")
    parser.add_argument("--until", metavar="ISO", default=None,
                        help="--shadow-report: before this time; a date alone includes that day (default: now)")
    parser.add_argument("--output", metavar="FILE", default=None,
                        help="--shadow-report: also write the report to FILE (.json, .md or .html)")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    # Overrides default to None: unset flags leave the YAML (then constants.py) value in place.
    config.add_flags(parser, FLAGS, **{config.dest_name(n): None for n in FLAGS})
    parser.add_argument("--threshold", type=threshold_value, default=None, metavar="{0..1,auto}",
                        help=config.constant_comments()["THRESHOLD"] + "; 'auto': the threshold the model's "
                        "calibration recommends (calibrate.py). Overrides the configuration's threshold")
    args = parser.parse_args(argv)
    if not args.shadow_report and (args.since or args.until or args.output):
        parser.error("--since, --until and --output go with --shadow-report")
    return args


def overrides(args: argparse.Namespace) -> dict:
    return {"ae_title": args.router_ae_title, "host": args.router_host, "port": args.router_port,
            "spool_dir": args.router_spool_dir, "threshold": args.threshold, "model": args.model}


def main(argv: list[str] | None = None) -> int:
    args, _ = config.start(parse_args, argv, FLAGS)
    from utils.routing.operations import service

    service.configure_logging(args.log_level)
    try:
        settings = service.load_config(args.config, overrides(args))
    except (config.ConfigError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.status:
        try:
            return service.print_status(settings)
        except FileNotFoundError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    if args.backup:
        from utils.routing.operations.backup import backup_command

        return backup_command(settings, args.backup, args.config)
    if args.shadow_report:
        from utils.routing.decision.shadow import report_command

        return report_command(settings, since=args.since, until=args.until, output=args.output)
    if args.requeue_failed:
        print(f"{service.requeue_failed(settings)} failed objects queued again")
        return 0
    try:
        service.check_model_exists(settings, ("--model" if args.model else "the config's model: key")
                                   + ", relative to the config file's folder")
    except config.ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.check:
        try:
            return service.check(settings)
        except (config.ConfigError, OSError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2

    return run(service.RouterNode(settings, read_config=lambda: service.load_config(args.config, overrides(args))))


def run(node) -> int:
    """Start ``node`` and serve until SIGTERM / SIGINT (0), until a worker fails (EXIT_WORKER_FAILED) or until the
    model turns out not to load (EXIT_MODEL_FAILED)."""
    from utils.routing.operations import service

    stop = []
    previous = {sig: signal.signal(sig, lambda number, frame: stop.append(number))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    if hasattr(signal, "SIGHUP"):  # reload: configuration, model, audit log (logrotate); in a thread of its own
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda number, frame: threading.Thread(
            target=node.reload, kwargs={"source": "SIGHUP"}, name="reload", daemon=True).start())
    try:
        try:
            node.start()
        except (config.ConfigError, service.SpoolLockedError, OSError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(f"router {node.config.ae_title} listening on port {node.port}", flush=True)
        while not stop and not node.wait(0.5):
            pass
        if node.failure:
            log.critical("stopped: %s (exit status %d)", node.failure, node.exit_code)
        else:
            log.info("stopping (signal %s)", stop[0] if stop else "-")
        node.stop()
        return node.exit_code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    from utils.routing.node import EXIT_WORKER_FAILED

    code = main()
    if code == EXIT_WORKER_FAILED:
        # A worker failed: a hung decoder thread would keep the interpreter from exiting (it joins
        # thread pools at exit), so leave at once; the queue and the audit log are closed already.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
