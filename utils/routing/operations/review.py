"""The review loop: what the router keeps of objects under review, and what an operator does with them.

The console (utils/routing/operations/console.py) is one way to use it; :class:`ReviewDesk` works without the web layer
(scripts, tests)::

    desk = ReviewDesk(queue, audit, class_names, destinations, review_dir, corrections_dir)
    desk.requeue(item_id, who="alice")              # send it through the router again
    desk.correct(item_id, "spine", who="alice")     # forward it to spine's destination + corrections dataset

The review list: objects whose label is ``uncertain``, whose BodyPartExamined tag disagrees with the model's top
class (``tag_disagrees``), or that a destination kept refusing (state ``failed``), until an operator acted on them
(the queue's ``reviewed`` column).

What is kept, under the spool, while the console is on (:class:`Keeper`, called by the classifier before it
commits its decisions; nothing is kept with the console off):

- ``thumbs/<item id>.jpg``: a thumbnail (at most ``THUMBNAIL_PX``) of the image the model saw, for every object the
  model decoded; deleted once the queue no longer has the item's row (history is kept ``queue.HISTORY_DAYS``);
- ``review/<item id>.dcm``: the object as received, for objects under review: a hard link to the spool file (no
  copy; it outlives the spool file, which is deleted once forwarded), deleted after ``review_days`` or, oldest
  first, beyond ``review_max_mb``. A failed object needs none: its spool file stays while it is failed.

Requeue: a failed object gets a fresh set of delivery attempts to its route (``--requeue-failed`` for one object);
an object already delivered is stored again as a new queue row, ``received``, and classified again by the current
model and rules. Correct: the object goes to the destination of the corrected label (a new ``classified`` row with
``decided_by`` ``review:<who>``; a failed object is re-routed in place), through the normal forwarders (at least
once, audited ``forwarded``), and is added to the corrections dataset. Confirming the label an object was already
forwarded by (or is queued by), to the same node, records the confirmation only (audit ``corrected`` with
``confirmed: true``, ``forwarded: false``; corrections dataset): it is not sent there a second time::

    <corrections_dir>/labels.csv        path,label,group,sop_instance_uid,previous_label,who,time
    <corrections_dir>/files/<SOP Instance UID>.dcm     (invalid-uid-<...>.dcm when it is not a valid UID)

``labels.csv`` is a source prepare.py reads (layout (c), ``path,label[,group]``; group = Patient ID, so that a
grouped split keeps a patient's images together); correcting the same object again replaces its row. The file
name comes from utils/untrusted.py's ``safe_uid`` (a sender's UID never chooses the folder) and the values a sender
chose (UID, Patient ID) are written with their control characters escaped, one row per line. Audit
events: ``corrected`` (sop_instance_uid, item, new_item, label, previous_label, top_label, who, auth, route,
destination, dataset) and ``requeued`` (sop_instance_uid, item, new_item, previous_label, state, who, auth); a new
row also gets its ``received`` line (``source: "review"``, ``copy_of``) and, when corrected, its ``classified`` line.
"""

from __future__ import annotations

import csv
import datetime as _dt
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from utils.infer.decisions import UNCERTAIN
from utils.routing.queue import (
    QueueReader,
    CLASSIFIED,
    FAILED,
    FORWARDED,
    PENDING,
    Classification,
    QueueItem,
    fsync_dir,
    write_durably,
)
from utils.untrusted import UnsafePathError, contained, log_safe, safe_uid

log = logging.getLogger(__name__)

THUMBNAIL_PX = 128  # longest side of a thumbnail
THUMBNAIL_QUALITY = 80  # JPEG quality
PRUNE_EVERY_S = 3600.0  # the keeper prunes at start and then at most this often
CORRECTIONS_COLUMNS = ("path", "label", "group", "sop_instance_uid", "previous_label", "who", "time")
CELL_MAX = 1024  # characters of a sender's value in a labels.csv cell
_SENT = {FORWARDED: "forwarded to", CLASSIFIED: "on its way to"}  # states of an object its route's node has or gets


class ReviewError(ValueError):
    """An action that cannot be done (unknown item, label not a class, no copy kept); the message says why."""


def thumb_path(spool_dir: Path, item_id: int) -> Path:
    return Path(spool_dir) / "thumbs" / f"{int(item_id)}.jpg"


def review_path(spool_dir: Path, item_id: int) -> Path:
    return Path(spool_dir) / "review" / f"{int(item_id)}.dcm"


def needs_review(decision: Classification) -> bool:
    return decision.label == UNCERTAIN or decision.tag_disagrees == 1


class Keeper:
    """Thumbnails and review copies, made by the classifier just before it commits a batch's decisions."""

    def __init__(self, spool_dir: Path, *, review_days: float, review_max_mb: int) -> None:
        self.spool_dir = Path(spool_dir)
        self.thumbs, self.review = self.spool_dir / "thumbs", self.spool_dir / "review"
        self.review_days, self.review_max_mb = review_days, review_max_mb
        self._pruned_at = 0.0

    def keep(self, items: Sequence[QueueItem], decisions: Sequence[Classification], decoded: Sequence | None) -> None:
        """A thumbnail of each decoded image, a hard link for each object under review; never raises (the
        classification goes on without them)."""
        try:
            for i, (item, decision) in enumerate(zip(items, decisions)):
                image = getattr(decoded[i], "image", None) if decoded is not None else None
                if image is not None:
                    self._thumbnail(item.id, image)
                if needs_review(decision):
                    self._link(self.spool_dir / "files" / item.file, review_path(self.spool_dir, item.id))
            if time.monotonic() - self._pruned_at > PRUNE_EVERY_S:
                self.prune()
        except Exception as error:  # noqa: BLE001 - the console's extras must never hold back routing
            log.warning("could not keep thumbnails / review copies: %s", error)

    def _thumbnail(self, item_id: int, image) -> None:
        import cv2

        height, width = image.shape[:2]
        scale = THUMBNAIL_PX / max(height, width)
        if scale < 1:
            image = cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))),
                               interpolation=cv2.INTER_AREA)
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, THUMBNAIL_QUALITY])
        if ok:
            self.thumbs.mkdir(exist_ok=True)
            target = thumb_path(self.spool_dir, item_id)
            temporary = target.with_suffix(".part")
            temporary.write_bytes(data.tobytes())
            os.replace(temporary, target)

    def _link(self, source: Path, target: Path) -> None:
        self.review.mkdir(exist_ok=True)
        target.unlink(missing_ok=True)  # an id reused by a new spool database
        try:
            os.link(source, target)
        except OSError:  # a filesystem without hard links: a copy
            shutil.copyfile(source, target)

    def prune(self) -> dict[str, int]:
        """Delete review copies past ``review_days`` or, oldest first, beyond ``review_max_mb``, and thumbnails and
        review copies whose queue row is gone; counts of what was deleted."""
        self._pruned_at = time.monotonic()
        report = {"review_deleted": 0, "thumbs_deleted": 0}
        known = _item_ids(self.spool_dir)
        copies = []
        for path in _listing(self.review, "*.dcm"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            copies.append((stat.st_mtime, stat.st_size, path))
        copies.sort()
        total = sum(size for _, size, _ in copies)
        oldest = time.time() - self.review_days * 86400
        for mtime, size, path in copies:
            if mtime < oldest or total > self.review_max_mb * 1_000_000 or _stem_id(path) not in known:
                path.unlink(missing_ok=True)
                total -= size
                report["review_deleted"] += 1
        for path in _listing(self.thumbs, "*.jpg"):
            if _stem_id(path) not in known:
                path.unlink(missing_ok=True)
                report["thumbs_deleted"] += 1
        if any(report.values()):
            log.info("review: pruned %s", report)
        return report


def _listing(folder: Path, pattern: str) -> list[Path]:
    return list(folder.glob(pattern)) if folder.is_dir() else []


def _stem_id(path: Path) -> int | None:
    return int(path.stem) if path.stem.isdigit() else None


def _item_ids(spool_dir: Path) -> set[int]:
    return QueueReader(spool_dir).ids()


@dataclass(frozen=True)
class Outcome:
    """What an action did: the item acted on, the row now carrying the object, and a sentence for the operator."""

    item: int
    new_item: int
    message: str


class ReviewDesk:
    """Requeue and correct objects of the review list. ``wake(route)`` wakes the worker of a route ("" = the
    classifier); ``destinations``: route -> utils.routing.operations.config.Destination."""

    def __init__(self, queue, audit, class_names: Sequence[str], destinations: dict, review_dir: Path,
                 corrections_dir: Path, wake: Callable[[str], None] = lambda route: None, *,
                 forward: bool = True) -> None:
        """``forward=False`` (shadow mode): a correction is recorded (audit, corrections dataset) but not forwarded:
        the site's own rule already delivered the object, and a trial must not send anything live."""
        self.forward = forward
        self.queue, self.audit = queue, audit
        self.class_names = tuple(class_names)
        self.destinations = destinations
        self.spool_dir = Path(review_dir).parent
        self.corrections_dir = Path(corrections_dir)
        self.wake = wake
        self._lock = threading.Lock()  # one action at a time (two operators on the same object)

    def _item(self, item_id: int) -> QueueItem:
        try:
            return self.queue.get(int(item_id))
        except (TypeError, ValueError, AttributeError) as error:  # no such row
            raise ReviewError(f"no object with item id {item_id} in the queue") from error

    def _kept_copy(self, item: QueueItem) -> Path:
        """The object's bytes as received: the review copy, else the spool file while the queue keeps it."""
        copy = review_path(self.spool_dir, item.id)
        if copy.is_file():
            return copy
        spooled = self.queue.path(item)
        if item.state in (*PENDING, FAILED) and spooled.is_file():
            return spooled
        raise ReviewError(f"item {item.id} ({item.sop_instance_uid}) was delivered and no copy of it is kept "
                          f"(review copies are made while the console is on, and pruned after review_days)")

    def requeue(self, item_id: int, *, who: str, auth: str = "") -> Outcome:
        """A failed object: new delivery attempts to its route. A delivered one: classified again (new row)."""
        with self._lock:
            item = self._item(item_id)
            if item.state == FAILED:
                if not self.queue.retry_failed(item.id):
                    raise ReviewError(f"item {item.id} is no longer failed")
                new_id, what = item.id, f"delivery to {item.route} retried"
                self.wake(item.route)
            elif item.state in PENDING:
                raise ReviewError(f"item {item.id} is still in the queue ({item.state}): nothing to requeue")
            else:
                new = self.queue.resubmit(self._kept_copy(item).read_bytes(), item)
                self._audit_new_row(new, item, who)
                new_id, what = new.id, f"queued again as item {new.id}, to be classified"
                self.wake("")
            self._record(item, "requeued", sop_instance_uid=item.sop_instance_uid, item=item.id, new_item=new_id,
                         previous_label=item.label, state=item.state, who=who, auth=auth or None)
            log.info("%s requeued item %d (%s): %s", log_safe(who), item.id, log_safe(item.sop_instance_uid), what)
            return Outcome(item.id, new_id, f"item {item.id}: {what}")

    def correct(self, item_id: int, label: str, *, who: str, auth: str = "") -> Outcome:
        """Forward the object to ``label``'s destination and add it to the corrections dataset."""
        with self._lock:
            item = self._item(item_id)
            if label not in self.class_names:
                raise ReviewError(f"{label!r} is not one of the model's classes {list(self.class_names)}")
            if self.forward and label not in self.destinations:
                raise ReviewError(f"no destination is configured for {label!r}")
            data = self._kept_copy(item).read_bytes()
            dataset_file = self._add_to_dataset(item, data, label, who)
            if not self.forward:
                self._record(
                    item, "corrected",
                    sop_instance_uid=item.sop_instance_uid, item=item.id, new_item=None, label=label,
                    previous_label=item.label, top_label=_top_label(item.probs), who=who, auth=auth or None,
                    route=None, destination=None, forwarded=False, dataset=str(dataset_file))
                log.info("%s corrected item %d (%s): %s -> %s (shadow mode: recorded, not forwarded)", log_safe(who),
                         item.id, log_safe(item.sop_instance_uid), item.label, label)
                return Outcome(item.id, item.id, f"item {item.id}: corrected to {label} and added to "
                                                 f"{self.corrections_dir / 'labels.csv'}; not forwarded (shadow mode: "
                                                 f"the site's rule delivered it)")
            already = self._delivered_to(item, label)
            if already is not None:  # a confirmation: the object is (or is being) at that node already
                self._record(
                    item, "corrected",
                    sop_instance_uid=item.sop_instance_uid, item=item.id, new_item=item.id, label=label,
                    previous_label=item.label, top_label=_top_label(item.probs), who=who, auth=auth or None,
                    route=label, destination=already, forwarded=False, confirmed=True, dataset=str(dataset_file))
                log.info("%s confirmed item %d (%s): %s, already %s %s: not forwarded again", log_safe(who), item.id,
                         log_safe(item.sop_instance_uid), label, _SENT[item.state], already)
                return Outcome(item.id, item.id, f"item {item.id}: {label} confirmed and added to "
                                                 f"{self.corrections_dir / 'labels.csv'}; not forwarded again "
                                                 f"(already {_SENT[item.state]} {already})")
            decision = Classification(0, label, None, "", label, f"corrected from {item.label or '-'} by {who}",
                                      f"review:{who}")
            if item.state == FAILED and self.queue.retry_failed(item.id, decision):
                new_id = item.id  # its spool file is still there: re-routed in place
            else:
                new = self.queue.resubmit(data, item, decision)
                self._audit_new_row(new, item, who)
                new_id = new.id
            destination = self.destinations[label].node
            self._record(
                item, "corrected",
                sop_instance_uid=item.sop_instance_uid, item=item.id, new_item=new_id, label=label,
                previous_label=item.label, top_label=_top_label(item.probs), who=who, auth=auth or None, route=label,
                destination=destination, dataset=str(dataset_file))
            self.wake(label)
            log.info("%s corrected item %d (%s): %s -> %s", log_safe(who), item.id, log_safe(item.sop_instance_uid),
                     item.label, label)
            return Outcome(item.id, new_id, f"item {item.id}: corrected to {label}, forwarded to {destination} "
                                            f"as item {new_id}, added to {self.corrections_dir / 'labels.csv'}")

    def _delivered_to(self, item: QueueItem, label: str) -> str | None:
        """For a confirmation (``label`` is the item's label), the node ``label`` goes to when ``item`` was forwarded
        there already (or is queued for it: classified, not yet delivered); None when a correction has to send it."""
        if label != item.label or item.state not in _SENT or item.route not in self.destinations:
            return None
        node = self.destinations[label].node
        return node if self.destinations[item.route].node == node else None

    def _record(self, row: QueueItem, event: str, /, **fields) -> None:
        """Commit the action on the item's row (with its line's fields), then write the audit line. A kill between
        the two costs the line until the next start, which writes it from the row (utils/routing/operations/reconcile.py)."""
        at = self.queue.mark_reviewed(row.id, event, fields)
        self.audit.write(event, **fields, reviewed_at=at)

    def _audit_new_row(self, new: QueueItem, item: QueueItem, who: str) -> None:
        """The ``received`` (and, when decided, ``classified``) lines of a resubmitted row, as the SCP and the
        classifier write them for every other row (so the next start's reconciliation owes none)."""
        self.audit.write("received", sop_instance_uid=new.sop_instance_uid, sop_class_uid=new.sop_class_uid,
                         transfer_syntax=new.transfer_syntax, calling_ae=new.calling_ae, size=new.size, item=new.id,
                         duplicate=False, source="review", copy_of=item.id, who=who)
        if new.state == CLASSIFIED:
            self.audit.write("classified", sop_instance_uid=new.sop_instance_uid, item=new.id, label=new.label,
                             top_label=None, confidence=None, model_id="", route=new.route, reason=new.reason,
                             decided_by=new.decided_by)

    def _add_to_dataset(self, item: QueueItem, data: bytes, label: str, who: str) -> Path:
        """Write the file (durably) and its row of labels.csv (replacing an earlier correction of the same object)."""
        files = self.corrections_dir / "files"
        files.mkdir(parents=True, exist_ok=True)
        name = f"{safe_uid(item.sop_instance_uid) if item.sop_instance_uid else f'item-{int(item.id)}'}.dcm"
        try:
            contained(files, name)
        except UnsafePathError as error:  # a link of that name pointing out of the folder: tampering
            raise ReviewError(f"cannot add item {item.id} to the corrections dataset: {error}") from error
        target = files / name
        write_durably(target, data)  # a rename: an existing file or link of that name is replaced, not followed
        row = {"path": f"files/{target.name}", "label": label, "group": log_safe(item.patient_id, CELL_MAX),
               "sop_instance_uid": log_safe(item.sop_instance_uid, CELL_MAX), "previous_label": item.label,
               "who": log_safe(who, CELL_MAX),
               "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
        labels = self.corrections_dir / "labels.csv"
        rows = []
        if labels.is_file():
            with open(labels, newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if r.get("path") != row["path"]]
        rows.append(row)
        temporary = labels.with_name(f".{uuid.uuid4().hex}.csv.part")
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, CORRECTIONS_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, labels)
        fsync_dir(self.corrections_dir)
        return target


def _top_label(probs: str) -> str | None:
    import json

    try:
        values = json.loads(probs) if probs else {}
    except ValueError:
        return None
    return max(values, key=values.get) if values else None

