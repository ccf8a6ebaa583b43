"""``router.py --backup DIR``: a consistent copy of a spool, taken while the router runs.

Order matters: the queue database first (SQLite's online backup API: the database as of one commit, one
self-contained file), then the files *that copy* refers to, so the backup never holds a row without the file it
was waiting with, except for an object delivered between the two steps (its file is gone: counted as skipped; after
a restore that row shows as ``failed`` with ``spool_file_missing``, and its audit line says it was delivered).
Then ``review/``, the corrections dataset, the audit log(s) and the configuration file, and ``backup.json``.

The backup mirrors the spool's layout (``queue.sqlite3``, ``files/``, ``review/``, ``corrections/``, the audit
log under its own name), so restoring is putting it back in place. Files the router only ever writes by a rename
(spool files, review links, the corrections dataset) are hard-linked when on the same filesystem, else copied;
nothing is ever moved or changed in the spool. The audit log, appended in place, is copied up to its last whole line.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from utils.routing import queue as _queue
from utils.routing.operations.config import RouterConfig
from utils.routing.node import STATE_KEY

log = logging.getLogger(__name__)

MANIFEST = "backup.json"
_CHUNK = 1 << 20


class BackupError(RuntimeError):
    """The backup cannot be made (target not empty, no queue); nothing was written or it is incomplete."""


@dataclass
class Tally:
    """What one part of the backup did: files linked, copied, skipped (gone meanwhile) and their bytes."""

    linked: int = 0
    copied: int = 0
    skipped: int = 0
    bytes: int = 0
    skipped_names: list[str] = field(default_factory=list)

    def describe(self) -> str:
        text = (f"{self.linked + self.copied} files ({self.linked} hard-linked, {self.copied} copied, "
                f"{self.bytes / 1e6:.1f} MB)")
        return text + (f", {self.skipped} gone meanwhile (delivered) and skipped" if self.skipped else "")


def backup(config: RouterConfig, target: str | os.PathLike,
           config_file: str | os.PathLike | None = None) -> tuple[dict, dict[str, Tally]]:
    """Back up ``config``'s spool into ``target`` (absent or an empty folder): (the manifest written as backup.json,
    what each part copied)."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise BackupError(f"{target} exists and is not an empty folder; choose a new one")
    spool = Path(config.spool_dir)
    if not (spool / "queue.sqlite3").is_file():
        raise BackupError(f"{spool / 'queue.sqlite3'}: no queue here (has the router run with this spool_dir?)")
    target.mkdir(parents=True, exist_ok=True)
    started = _dt.datetime.now(_dt.UTC)
    integrity = _queue.backup_database(spool, target / "queue.sqlite3")
    if integrity != "ok":
        raise BackupError(f"the copy of the queue database fails its integrity check: {integrity}")
    counts, _ = _queue.read_status(target)
    parts: dict[str, Tally] = {}
    parts["files"] = tally = Tally()
    (target / "files").mkdir()
    for name in _queue.unsettled_files(target):
        _link_or_copy(spool / "files" / name, target / "files" / name, tally, name)
    parts["review"] = _tree(spool / "review", target / "review")
    corrections = config.console.corrections_dir if config.console and config.console.corrections_dir else None
    parts["corrections"] = _tree(Path(corrections or spool / "corrections"), target / "corrections")
    parts["audit"] = audit = Tally()
    audit_log = Path(config.audit_log)
    for path in sorted(audit_log.parent.glob(audit_log.name + "*")) if audit_log.parent.is_dir() else []:
        if path.is_file() and not path.name.endswith(".part"):  # the log and its rotated predecessors
            _copy_whole_lines(path, target / path.name, audit)
    if config_file is not None and Path(config_file).is_file():
        shutil.copy2(config_file, target / Path(config_file).name)
    state = _queue.read_meta(target, STATE_KEY)
    manifest = {
        "time": started.isoformat(timespec="seconds"),
        "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "router_version": _version(),
        "spool_dir": str(spool),
        "audit_log": str(audit_log),
        "corrections_dir": str(corrections or spool / "corrections"),
        "config_file": str(config_file) if config_file else None,
        "router_running": _queue.spool_in_use(spool),
        "integrity_check": integrity,
        "rows_by_state": dict(sorted(counts.items())),
        "model_id": _state_model(state) or _queue.latest_model_id(target),
        "files": {name: asdict(part) for name, part in parts.items()},
    }
    (target / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest, parts


def backup_command(config: RouterConfig, target: str, config_file: str | None) -> int:
    """router.py --backup: back up, print what was copied; 0, or 2 when it cannot."""
    try:
        manifest, parts = backup(config, target, config_file)
    except (BackupError, OSError, sqlite3.Error) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = ", ".join(f"{k} {v}" for k, v in manifest["rows_by_state"].items()) or "no rows"
    running = "router running" if manifest["router_running"] else "router stopped"
    print(f"backup of {manifest['spool_dir']} in {target} ({running}):")
    print(f"  queue.sqlite3: integrity {manifest['integrity_check']}; {rows}; model {manifest['model_id'] or '-'}")
    for name, part in parts.items():
        print(f"  {name}: {part.describe()}")
    print(f"  config: {Path(config_file).name if config_file else '-'}; manifest: {MANIFEST}")
    return 0


def _link_or_copy(source: Path, target: Path, tally: Tally, name: str) -> None:
    """Hard-link ``source`` as ``target`` (copy across filesystems); a source gone meanwhile is skipped."""
    try:
        size = source.stat().st_size
        try:
            os.link(source, target)
            tally.linked += 1
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            shutil.copy2(source, target)
            tally.copied += 1
        tally.bytes += size
    except FileNotFoundError:
        tally.skipped += 1
        tally.skipped_names.append(name)


def _tree(source: Path, target: Path) -> Tally:
    """Everything under ``source`` (files written by a rename, never appended): linked or copied."""
    tally = Tally()
    if not source.is_dir():
        return tally
    for folder, _, names in os.walk(source):
        relative = Path(folder).relative_to(source)
        (target / relative).mkdir(parents=True, exist_ok=True)
        for name in sorted(names):
            if not os.path.islink(Path(folder) / name):  # the router never writes links there: not followed
                _link_or_copy(Path(folder) / name, target / relative / name, tally, str(relative / name))
    return tally


def _copy_whole_lines(source: Path, target: Path, tally: Tally) -> None:
    """Copy an append-only log as it is now, up to its last complete line (a line being written is left out)."""
    try:
        with open(source, "rb") as reader, open(target, "xb") as writer:
            remaining, end = os.fstat(reader.fileno()).st_size, 0
            while remaining > 0:
                chunk = reader.read(min(_CHUNK, remaining))
                if not chunk:
                    break
                newline = chunk.rfind(b"\n")
                if newline >= 0:
                    end = writer.tell() + newline + 1
                writer.write(chunk)
                remaining -= len(chunk)
            writer.truncate(end)
    except FileNotFoundError:
        tally.skipped += 1
        tally.skipped_names.append(source.name)
        return
    tally.copied += 1
    tally.bytes += end


def _state_model(note: str | None) -> str | None:
    try:
        return json.loads(note).get("model_id") if note else None
    except (ValueError, AttributeError):
        return None


def _version() -> str | None:
    """``git describe`` of the router's checkout when it is one (cheap); None otherwise."""
    try:
        result = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], capture_output=True, text=True,
                                timeout=5, cwd=Path(__file__).resolve().parents[3], check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None
