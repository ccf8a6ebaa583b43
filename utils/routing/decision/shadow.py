"""Shadow mode, a silent trial before go-live: the model classifies and the audit log records its decision,
but every object is forwarded by the site's existing rule. The report then weighs the evidence.

    mode: shadow                   # default: route (the model's label picks the destination)
    shadow:
      destination: pacs            # everything the model decides goes to this destination; or, instead:
      # body_part_map: {CHEST: chest_ai, ABDOMEN: pacs}   # BodyPartExamined (trimmed, any case) -> destination
      # default: pacs                                     # tags not in the map, and objects without one

The routes are names under ``destinations:``. Routing rules (utils/routing/decision/rules.py) still come first, as in
route mode: a CT goes to ``pass_through`` either way. Everything the model decides is forwarded by the shadow
rule, also what it could not read (the site forwarded that before the router too), so the trial changes
nothing downstream. Objects given up after repeated failures (``classification_failed``) go to ``unreadable``
as in route mode.

What is recorded: the queue row keeps the model's label (a class, ``uncertain`` or ``unreadable``) in
``label`` and the shadow rule's destination in ``route``; ``decided_by`` is ``shadow:destination`` or
``shadow:body_part_map``. The audit's ``classified`` line is route mode's (label, top_label, confidence,
body_part_examined, tag_disagrees, ...) with ``route`` the destination actually used, plus ``mode: "shadow"``,
``model_route`` (where route mode would have sent it) and ``probabilities`` (class -> probability). The
``started`` line adds ``mode``, ``shadow`` (the rule) and ``class_names``.

The report (:func:`build_report`; ``python router.py --config router.yaml --shadow-report``) reads the audit
log: ``classified`` lines decided by the model (``shadow:...`` or ``model:...``; the last one per SOP
instance in the period) and ``corrected`` lines written by reviewers (``sop_instance_uid``, ``label``: the
right class, ``previous_label``, ``who``; the latest per SOP instance wins, whenever it was written). It
gives the agreement of the model's top label with the BodyPartExamined tag (tag -> class by
utils.infer.decisions.tag_classes, the mapping behind the audit's ``tag_disagrees``), the confusion against
reviewers' labels, the share that would have been routed automatically (confidence >= threshold) with its
accuracy against corrections and against the tag, and where route mode would have sent each object versus
where it went. Every rate comes with the number of objects it rests on and a 95% Wilson interval.
``to_markdown()``, ``to_html()`` (a fragment, for the console) and ``to_dict()`` (JSON) render it.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import html
import json
import math
import os
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.config import ConfigError, refuse_unknown_keys
from utils.infer.decisions import OTHER_CLASSES, UNCERTAIN, UNREADABLE, tag_classes
from utils.routing.operations.audit import records as audit_records
from utils.untrusted import log_safe

ROUTE, SHADOW = "route", "shadow"  # the values of ``mode`` (utils/constants.py ROUTER_MODE_CHOICES)
DESTINATION, BODY_PART_MAP = "destination", "body_part_map"  # the two kinds of shadow rule
_KEYS = (DESTINATION, BODY_PART_MAP, "default")
CORRECTED = "corrected"  # audit event of a reviewer's correction (written by the console)
THIN_N = 30  # below this many objects a rate is flagged as thin evidence
Z95 = 1.959963984540054  # two-sided 95% normal quantile (Wilson interval)


# --- the rule ----------------------------------------------------------------------------------


def normalise_body_part(value: str | None) -> str:
    """BodyPartExamined as the map compares it: trimmed, upper case ("" when missing)."""
    return (value or "").strip().upper()


@dataclass(frozen=True)
class ShadowRule:
    """Where shadow mode forwards what the model decided: one destination, or one per BodyPartExamined."""

    destination: str | None = None  # everything goes here (kind "destination")
    body_part_map: dict[str, str] = field(default_factory=dict)  # normalised tag -> route (kind "body_part_map")
    default: str | None = None  # with body_part_map: tags missing or not in it

    @property
    def kind(self) -> str:
        return DESTINATION if self.destination is not None else BODY_PART_MAP

    @property
    def decided_by(self) -> str:
        """What the queue and the audit record as ``decided_by``: ``shadow:destination`` / ``shadow:body_part_map``."""
        return f"{SHADOW}:{self.kind}"

    def route(self, body_part: str | None) -> str:
        """The destination of an object with this BodyPartExamined (None or "" when it has none)."""
        if self.destination is not None:
            return self.destination
        return self.body_part_map.get(normalise_body_part(body_part), self.default)

    def routes(self) -> set[str]:
        return {self.destination} if self.destination is not None else {*self.body_part_map.values(), self.default}

    def describe(self) -> str:
        if self.destination is not None:
            return f"shadow rule destination: everything the model decides -> {self.destination}"
        pairs = ", ".join(f"{tag} -> {route}" for tag, route in self.body_part_map.items())
        return f"shadow rule body_part_map (BodyPartExamined, trimmed, any case): {pairs}; otherwise -> {self.default}"

    def to_dict(self) -> dict[str, Any]:
        if self.destination is not None:
            return {DESTINATION: self.destination}
        return {BODY_PART_MAP: dict(self.body_part_map), "default": self.default}


def describe_mode(mode: str, rule: ShadowRule | None) -> list[str]:
    """What ``--check`` prints about the mode."""
    if mode != SHADOW or rule is None:
        return ["mode: route (the model's label picks the destination)"]
    return [("mode: shadow (the model classifies and the audit records it; objects the model decides are forwarded "
            "by the shadow rule, routing rules still come first)"), "  " + rule.describe()]


def parse_shadow(mode: str, raw: Any, destinations: Collection[str], where: str) -> ShadowRule | None:
    """The ``shadow`` block for ``mode``; None in route mode. ConfigError names the key and what is wrong."""
    label = f"{where}: shadow"
    if mode != SHADOW:
        if raw is not None:
            raise ConfigError(f"{label}: a shadow block without 'mode: shadow' would be ignored and the model's "
                              f"label would pick each destination; set 'mode: shadow' for a trial, or remove the "
                              f"block to route by the model")
        return None
    if raw is None:
        raise ConfigError(f"{where}: mode: shadow needs a shadow block: 'destination: <route>', or "
                          f"'body_part_map: {{CHEST: <route>, ...}}' with 'default: <route>'")
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: expected a mapping with destination, or body_part_map and default; "
                          f"got {type(raw).__name__} {raw!r}")
    refuse_unknown_keys(raw, _KEYS, label)
    if (DESTINATION in raw) == (BODY_PART_MAP in raw):
        raise ConfigError(f"{label}: give exactly one of 'destination' (everything goes there) and "
                          f"'body_part_map' (by BodyPartExamined), not {'both' if DESTINATION in raw else 'neither'}")
    if DESTINATION in raw:
        if "default" in raw:
            raise ConfigError(f"{label}.default: goes with body_part_map; with destination everything goes there")
        return ShadowRule(destination=_route(raw[DESTINATION], destinations, f"{label}.{DESTINATION}"))
    mapping = raw[BODY_PART_MAP]
    if not isinstance(mapping, dict) or not mapping:
        raise ConfigError(f"{label}.{BODY_PART_MAP}: expected a non-empty mapping of BodyPartExamined values to "
                          f"destinations, got {mapping!r}")
    if "default" not in raw:
        raise ConfigError(f"{label}.default: required with body_part_map: the destination of objects whose "
                          f"BodyPartExamined is missing or not in the map")
    parsed: dict[str, str] = {}
    written: dict[str, str] = {}
    for tag, route in mapping.items():
        if not isinstance(tag, str) or not normalise_body_part(tag):
            raise ConfigError(f"{label}.{BODY_PART_MAP}: {tag!r}: expected a BodyPartExamined value (text)")
        key = normalise_body_part(tag)
        if key in parsed:
            raise ConfigError(f"{label}.{BODY_PART_MAP}: {written[key]!r} and {tag!r} are the same tag "
                              f"(compared trimmed and in upper case)")
        parsed[key], written[key] = _route(route, destinations, f"{label}.{BODY_PART_MAP}.{tag}"), tag
    return ShadowRule(body_part_map=parsed, default=_route(raw["default"], destinations, f"{label}.default"))


def _route(value: Any, destinations: Collection[str], label: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{label}: expected the name of a destination, got {value!r}")
    if value not in destinations:
        close = difflib.get_close_matches(value, list(destinations), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"{label}: unknown destination {value!r}{hint}; the destinations are "
                          f"{sorted(destinations)}")
    return value


# --- the report --------------------------------------------------------------------------------


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of k successes in n trials ((0, 1) for n = 0)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


@dataclass(frozen=True)
class Proportion:
    """k of n, with its 95% Wilson interval."""

    k: int
    n: int

    @property
    def rate(self) -> float | None:
        return self.k / self.n if self.n else None

    @property
    def interval(self) -> tuple[float, float] | None:
        return wilson(self.k, self.n) if self.n else None

    def describe(self) -> str:
        """``80.0% (4/5; 95% CI 37.6-96.4%; thin evidence, n=5)``, or ``no evidence (n=0)``."""
        if not self.n:
            return "no evidence (n=0)"
        low, high = self.interval
        thin = f"; thin evidence, n={self.n}" if self.n < THIN_N else ""
        return f"{100 * self.rate:.1f}% ({self.k}/{self.n}; 95% CI {100 * low:.1f}-{100 * high:.1f}%{thin})"

    def to_dict(self) -> dict[str, Any]:
        low, high = self.interval or (None, None)
        return {"k": self.k, "n": self.n, "rate": self.rate, "ci95": [low, high] if self.n else None,
                "thin": self.n < THIN_N}


@dataclass
class ShadowReport:
    """What the audit log says about the model over a period (see the module docstring)."""

    audit_log: str
    since: str | None  # ISO 8601 UTC; classification times, since inclusive, until exclusive
    until: str | None
    first: str | None  # first and last classification by the model in the period
    last: str | None
    threshold: float | None  # None: unknown, the recorded labels decide what was auto-routed
    threshold_source: str
    class_names: list[str]
    class_names_source: str
    classified: int  # objects (distinct SOP instances) the model decided in the period
    modes: dict[str, int]  # of those, per mode they were classified in
    readable: int
    unreadable: int  # the model could not look at them (broken pixel data, ...)
    repeated: int  # classified lines beyond one per object (re-sent objects; the last one counts)
    by_rule: dict[str, int]  # objects decided before the model (rules; same in both modes): decided_by -> count
    tag_agreement: Proportion  # model top label among the classes the tag stands for
    tag_missing: int
    tag_unmapped: int  # a tag no class claims (and no catch-all class)
    tag_catch_all: int  # compared, the tag standing only for the catch-all class ("others")
    tag_table: dict[str, dict[str, int]]  # tag (trimmed, upper case; "(missing)") -> model top label -> objects
    reviewed: Proportion  # model top label == reviewer's label, among reviewed objects
    confusion: dict[str, dict[str, int]]  # model top label -> reviewer's label -> objects
    auto_routed: Proportion  # confidence >= threshold, among readable objects
    auto_vs_corrections: Proportion
    auto_vs_tag: Proportion
    routes: dict[str, dict[str, int]]  # where route mode would have sent it -> where it went -> objects
    nodes: dict[str, str] = field(default_factory=dict)  # route -> its node (with a configuration)
    corrections: int = 0  # objects with a correction in the log (any period)
    corrections_elsewhere: int = 0  # of those, objects the model did not decide in this period
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            out[name] = value.to_dict() if isinstance(value, Proportion) else value
        return out

    def to_markdown(self) -> str:
        return _render(self._blocks(), markdown=True)

    def to_html(self) -> str:
        """An HTML fragment (headings, paragraphs, lists, tables; no styles or scripts) for the console."""
        return _render(self._blocks(), markdown=False)

    def _route_name(self, route: str) -> str:
        return f"{route} ({self.nodes[route]})" if route in self.nodes else route

    def _blocks(self) -> list[tuple]:
        period = f"{self.since or 'the beginning'} to {self.until or 'now'}"
        seen = f"; classifications from {self.first} to {self.last}" if self.first else ""
        threshold = f"{self.threshold:.4g}" if self.threshold is not None else "unknown"
        model = (f"Model classes {self.class_names} ({self.class_names_source}); "
                 f"threshold {threshold} ({self.threshold_source}).")
        tags = ("Tag -> class as in the audit's tag_disagrees (utils/infer/decisions.py BODY_PART_TAGS; a class "
                "not listed there stands for the tag equal to its name; a tag no class claims stands for the "
                "catch-all class, if the model has one). "
                f"Compared {self.tag_agreement.n}; tag missing {self.tag_missing}; tag no class stands for "
                f"{self.tag_unmapped}; counted as the catch-all class {self.tag_catch_all}.")
        blocks: list[tuple] = [
            ("h1", "Shadow mode report"),
            ("p", f"Audit log {self.audit_log}; period {period} (UTC, by classification time){seen}."),
            ("p", model),
            ("h2", "Summary"),
            ("ul", [f"Objects the model decided: {self.classified} ("
                    + ", ".join(f"{mode} mode {n}" for mode, n in sorted(self.modes.items())) + ")"
                    + (f"; it could not read {self.unreadable}" if self.unreadable else "")
                    + (f"; {self.repeated} more classifications of re-sent objects (the last one counts)"
                       if self.repeated else ""),
                    "Decided by routing rules before the model (the same in both modes): "
                    + (", ".join(f"{k} {v}" for k, v in sorted(self.by_rule.items())) or "none"),
                    f"Model agrees with the BodyPartExamined tag: {self.tag_agreement.describe()}",
                    f"Model agrees with reviewers' corrections: {self.reviewed.describe()}",
                    f"Would have been routed automatically (confidence >= {threshold}): {self.auto_routed.describe()}",
                    f"Of those, right by reviewers' corrections: {self.auto_vs_corrections.describe()}",
                    f"Of those, agreeing with the tag: {self.auto_vs_tag.describe()}"]),
            ("h2", "Model vs BodyPartExamined tag"),
            ("p", tags),
            _table("tag", self.tag_table),
            ("h2", "Model vs reviewers' corrections"),
            ("p", f"Rows: the model's top label; columns: the reviewer's label (latest correction per object). "
                  f"Objects reviewed: {self.reviewed.n}."
                  + (f" Corrections for {self.corrections_elsewhere} objects the model did not decide in this "
                     f"period are left out." if self.corrections_elsewhere else "")),
            _table("model \\ reviewer", self.confusion),
            ("h2", "Routes: route mode vs where the object went"),
            ("table", ["route mode would have sent it to", "it went to", "objects"],
             [[self._route_name(a), self._route_name(b), str(n)]
              for a, row in sorted(self.routes.items()) for b, n in sorted(row.items())]),
            ("h2", "How to read this"),
            ("ul", self.notes),
        ]
        return blocks


def _table(corner: str, rows: dict[str, dict[str, int]]) -> tuple:
    columns = sorted({c for row in rows.values() for c in row})
    body = [[name, *(str(row.get(c, 0)) for c in columns), str(sum(row.values()))] for name, row in sorted(rows.items())]
    return ("table", [corner, *columns, "total"], body)


def _render(blocks: list[tuple], *, markdown: bool) -> str:
    out: list[str] = []
    for kind, *content in blocks:
        if kind in ("h1", "h2"):
            out.append(("#" if kind == "h1" else "##") + " " + content[0] if markdown
                       else f"<{kind}>{html.escape(content[0])}</{kind}>")
        elif kind == "p":
            out.append(content[0] if markdown else f"<p>{html.escape(content[0])}</p>")
        elif kind == "ul":
            items = content[0]
            out.append("\n".join(f"- {i}" for i in items) if markdown else
                       "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>")
        elif kind == "table":
            header, rows = content
            if not rows:
                out.append("(none)" if markdown else "<p>(none)</p>")
            elif markdown:
                # a cell may hold a sender's BodyPartExamined: escaped, so it cannot break the table or the terminal
                lines = ["| " + " | ".join(log_safe(c).replace("|", "\\|") for c in r) + " |" for r in [header, *rows]]
                lines.insert(1, "|" + "---|" * len(header))
                out.append("\n".join(lines))
            else:
                head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
                body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    return "\n\n".join(out) + "\n" if markdown else "\n".join(out) + "\n"


# --- reading the audit log ---------------------------------------------------------------------


def parse_time(value: str | _dt.datetime | _dt.date, *, end: bool = False) -> _dt.datetime:
    """A moment in UTC from ISO 8601 text (``2026-03-01``, ``2026-03-01T08:00``, ``...Z``, ``...+01:00``; without
    an offset: UTC). A date alone is the start of that day, or with ``end`` the start of the next one (so that
    ``--until 2026-03-31`` includes the 31st). ValueError for anything else."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = _dt.date.fromisoformat(text) if len(text) == 10 else _dt.datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"expected an ISO 8601 date or time such as 2026-03-01 or 2026-03-01T08:00Z, "
                             f"got {text!r}") from None
    if not isinstance(value, _dt.datetime):
        value = _dt.datetime.combine(value, _dt.time(), _dt.UTC) + _dt.timedelta(days=1 if end else 0)
    return value.replace(tzinfo=_dt.UTC) if value.tzinfo is None else value.astimezone(_dt.UTC)


def _when(record: dict[str, Any]) -> _dt.datetime | None:
    """When it happened: ``at`` for a line written later by reconciliation, else ``time``."""
    try:
        return parse_time(record.get("at") or record["time"])
    except (KeyError, TypeError, ValueError):
        return None


def _key(record: dict[str, Any]) -> str:
    return record.get("sop_instance_uid") or f"item:{record.get('item')}"


def _by_model(record: dict[str, Any]) -> bool:
    return str(record.get("decided_by") or "").startswith(("model:", f"{SHADOW}:"))


def build_report(source, since=None, until=None, *, threshold: float | None = None,
                 class_names: list[str] | None = None) -> ShadowReport:
    """The report for the audit log of ``source`` (a RouterConfig, or the path of an audit.jsonl).

    ``since`` / ``until`` (datetime or ISO text, see :func:`parse_time`; ``until`` exclusive) select
    classifications by time; corrections count whenever they were written. The threshold is ``threshold``,
    else the configuration's number, else the one the last ``started`` line recorded (``threshold: auto``
    resolved), else unknown (the recorded labels say what was auto-routed). The model's classes are
    ``class_names``, else the configured model's metadata, else the last ``started`` line's, else the top
    labels seen (the report says which).
    """
    config = None if isinstance(source, (str, os.PathLike)) else source
    path = Path(source) if config is None else Path(config.audit_log)
    if not path.exists():
        raise FileNotFoundError(f"no audit log at {path}: the router has not run with this configuration yet")
    since_t = parse_time(since) if since is not None else None
    until_t = parse_time(until, end=True) if until is not None else None
    notes: list[str] = []

    decided: dict[str, dict[str, Any]] = {}
    lines = 0
    by_rule: dict[str, str] = {}
    corrections: dict[str, dict[str, Any]] = {}
    started: dict[str, Any] = {}
    for record in audit_records(path, with_rotated=True):
        event = record.get("event")
        if event == CORRECTED:
            corrections[_key(record)] = record  # in order: the latest wins
            continue
        when = _when(record)
        if event == "started":
            if until_t is None or (when is not None and when < until_t):
                started = record
            continue
        if event != "classified" or when is None:
            continue
        if (since_t is not None and when < since_t) or (until_t is not None and when >= until_t):
            continue
        if _by_model(record):
            lines += 1
            decided[_key(record)] = {**record, "_when": when}
        else:
            by_rule[_key(record)] = str(record.get("decided_by") or "(not recorded)")

    threshold, threshold_source = _threshold(threshold, config, started)
    class_names, class_names_source = _class_names(class_names, config, started, decided.values())
    catch_all = {c for c in class_names if c in OTHER_CLASSES}

    modes: Counter = Counter()
    tag_table: dict[str, Counter] = {}
    confusion: dict[str, Counter] = {}
    routes: dict[str, Counter] = {}
    tag_ok = tag_n = missing = unmapped = caught = 0
    rev_ok = rev_n = auto_n = auto_rev_ok = auto_rev_n = auto_tag_ok = auto_tag_n = unreadable = untold = 0
    for key, record in decided.items():
        modes[record.get("mode") or (SHADOW if str(record["decided_by"]).startswith(SHADOW) else ROUTE)] += 1
        label = record.get("label") or ""
        # a line reconciled after a crash has the queue's columns only: the label, but no top label
        top = record.get("top_label") or (label if label not in (UNCERTAIN, UNREADABLE) else None)
        used = record.get("route") or "(not recorded)"
        if label == UNREADABLE:
            unreadable += 1
            routes.setdefault(UNREADABLE, Counter())[used] += 1
            continue
        confidence = record.get("confidence")
        auto = (confidence is not None and confidence >= threshold) if threshold is not None else label != UNCERTAIN
        auto_n += auto
        routes.setdefault(top if auto and top else UNCERTAIN, Counter())[used] += 1
        if top is None:  # uncertain, its best guess not recorded: counted above, compared with nothing
            untold += 1
            continue
        tag = normalise_body_part(record.get("body_part_examined"))
        tag_table.setdefault(tag or "(missing)", Counter())[top] += 1
        stands_for = tag_classes(tag, class_names)
        if not tag:
            missing += 1
        elif not stands_for:
            unmapped += 1
        else:
            agree = top in stands_for
            tag_n, tag_ok = tag_n + 1, tag_ok + agree
            caught += stands_for <= catch_all
            if auto:
                auto_tag_n, auto_tag_ok = auto_tag_n + 1, auto_tag_ok + agree
        correction = corrections.get(key)
        if correction is not None:
            right = str(correction.get("label") or "")
            confusion.setdefault(top, Counter())[right] += 1
            rev_n, rev_ok = rev_n + 1, rev_ok + (top == right)
            if auto:
                auto_rev_n, auto_rev_ok = auto_rev_n + 1, auto_rev_ok + (top == right)

    readable = len(decided) - unreadable
    times = sorted(r["_when"] for r in decided.values())
    report = ShadowReport(
        audit_log=str(path), since=_iso(since_t), until=_iso(until_t),
        first=_iso(times[0]) if times else None, last=_iso(times[-1]) if times else None,
        threshold=threshold, threshold_source=threshold_source, class_names=list(class_names),
        class_names_source=class_names_source, classified=len(decided), modes=dict(modes), readable=readable,
        unreadable=unreadable, repeated=lines - len(decided), by_rule=dict(Counter(by_rule.values())),
        tag_agreement=Proportion(tag_ok, tag_n), tag_missing=missing, tag_unmapped=unmapped, tag_catch_all=caught,
        tag_table={k: dict(v) for k, v in tag_table.items()}, reviewed=Proportion(rev_ok, rev_n),
        confusion={k: dict(v) for k, v in confusion.items()}, auto_routed=Proportion(auto_n, readable),
        auto_vs_corrections=Proportion(auto_rev_ok, auto_rev_n), auto_vs_tag=Proportion(auto_tag_ok, auto_tag_n),
        routes={k: dict(v) for k, v in routes.items()},
        nodes={r: d.node for r, d in config.destinations.items()} if config is not None else {},
        corrections=len(corrections), corrections_elsewhere=len(set(corrections) - set(decided)), notes=notes)
    notes.extend(_notes(report))
    if untold:
        notes.append(f"{untold} uncertain objects have no top label recorded (audit lines rebuilt after a crash): "
                     f"they count in the auto-routed share, not in the comparisons.")
    return report


def _iso(moment: _dt.datetime | None) -> str | None:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z") if moment is not None else None


def _threshold(given, config, started) -> tuple[float | None, str]:
    if given is not None:
        return float(given), "given"
    configured = getattr(config, "threshold", None)
    if isinstance(configured, (int, float)):
        return float(configured), "the configuration's, or --threshold"
    if isinstance(started.get("threshold"), (int, float)):
        return float(started["threshold"]), f"recorded when the router started at {started.get('time')}"
    return None, "unknown: the labels recorded at the time say what was auto-routed"


def _class_names(given, config, started, decided) -> tuple[list[str], str]:
    if given:
        return list(given), "given"
    if config is not None:
        try:
            from utils.artifacts.model_file import read_metadata

            return list(read_metadata(config.model).spec.class_names), f"the model {config.model}"
        except (OSError, ValueError):
            pass  # the model may be elsewhere now; the audit log may know
    if started.get("class_names"):
        return list(started["class_names"]), f"recorded when the router started at {started.get('time')}"
    seen = sorted({r.get("top_label") for r in decided if r.get("top_label")})
    return seen, ("inferred from the top labels seen: a class the model never predicted is missing, and tags "
                  "only it stands for count as no class's")


def _notes(r: ShadowReport) -> list[str]:
    notes = []
    if not r.readable:
        notes.append("The model decided no readable object in this period: there is nothing to judge yet.")
    thin = [f"{name} (n={p.n})" for name, p in (("the tag", r.tag_agreement), ("reviewers' corrections", r.reviewed),
                                                 ("corrections of auto-routed objects", r.auto_vs_corrections))
            if p.n < THIN_N]
    if r.readable and thin:
        notes.append(f"Thin evidence (fewer than {THIN_N} objects) behind the agreement with {', '.join(thin)}: "
                     f"read the intervals, not the percentages.")
    notes.append("Reviewers' corrections are the ground truth, but only for the objects reviewers looked at. If they "
                 "open mostly the doubtful ones, the accuracy against corrections understates the model; a reviewer "
                 "who confirms a right answer should record it as a correction with the same label, and a random "
                 "sample reviewed this way gives an unbiased figure.")
    notes.append("The BodyPartExamined tag is what the modality or operator wrote; it is often missing, generic or "
                 "wrong, so a disagreement is not always the model's error. Agreement with the tag is a cheap check on "
                 "every object, the corrections are the measure.")
    notes.append("Switch to mode: route when the auto-routed share is useful and the lower end of the interval of its "
                 "accuracy against corrections is acceptable for the destinations involved; objects below the "
                 "threshold keep going to 'uncertain' for people to route.")
    if r.modes.get(ROUTE):
        notes.append(f"{r.modes[ROUTE]} of the objects were classified in route mode (they went where the model "
                     f"said).")
    if r.threshold is None:
        notes.append("The threshold is unknown: the labels recorded at the time decide what counts as auto-routed.")
    return notes


def report_command(config, *, since: str | None = None, until: str | None = None, output: str | None = None) -> int:
    """``router.py --shadow-report``: print the report as Markdown; with ``output``, also write it (``.json``,
    ``.md`` or ``.html`` by the file's suffix). 0, or 2 for a bad period, a missing log or an unknown suffix."""
    import sys

    suffix = Path(output).suffix.lower() if output else ""
    if output and suffix not in (".json", ".md", ".html"):
        print(f"error: --output {output}: expected a .json, .md or .html file", file=sys.stderr)
        return 2
    try:
        report = build_report(config, since, until)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.to_markdown(), end="")
    if output:
        text = {".json": lambda: json.dumps(report.to_dict(), indent=2) + "\n", ".md": report.to_markdown,
                ".html": report.to_html}[suffix]()
        Path(output).write_text(text, encoding="utf-8")
        print(f"written to {output}")
    return 0

