"""Routing rules: which objects the model may decide about, and where the others go, from the header alone.

A projection X-ray classifier must not decide about CT, MR, ultrasound or reports. Before an
object reaches the model the classifier thread runs the configured ``rules`` (first match
wins), then the built-in default:

    rules:
      - name: ct-mr-us                         # letters, digits, . _ -; recorded as decided_by "rule:ct-mr-us"
        match: {modality: {in: [CT, MR, US]}}  # every field of match must hold
        destination: pass_through              # a name under destinations:, or "model"
      - name: room3-to-model
        match: {calling_ae: XR_ROOM3, BodyPartExamined: {missing: true}}   # scalar: equals; list: in
        destination: model
      - name: no-localizers
        match: {"(0008,0008)": {regex: ".*LOCALIZER.*"}}
        destination: unreadable

Fields: ``modality`` (Modality), ``sop_class_uid``, ``calling_ae``, ``transfer_syntax`` (the last
three as the queue recorded them from the C-STORE; ``sop_class_uid`` falls back to the header's),
or any DICOM keyword (``BodyPartExamined``) or tag (``(0018,0015)``, ``0018,0015``, ``00180015``).
Operators: ``equals``, ``in``, ``regex`` (Python syntax, the whole value must match; ``(?i)`` for
case-insensitive), ``missing: true`` (absent or empty; ``false``: present with a value), and
``not: {<one operator>}``. An attribute with several values (ImageType ``ORIGINAL\\PRIMARY``)
matches equals / in / regex when one of its values does. UIDs may be written as pydicom keywords
(``CTImageStorage``).

The built-in default, after the configured rules (:func:`default_rules`): an object goes to the
model when its Modality is CR, DX, DR or RG (compared trimmed and upper-case, as predict.py's
header guard utils.infer.decisions.not_projection does: ``dx`` is DX), or, when it has no Modality,
when its SOP class is Computed Radiography or Digital X-Ray (For Presentation / For Processing).
Configured rules compare values exactly as written. Anything else goes to
the ``pass_through`` destination, or, when none is configured, to ``unreadable`` with reason
``not_projection_radiography``: never to a body-part destination.

Only the header is read (pydicom, stopping before Pixel Data, only the attributes the rules
name), and only when a rule needs it: rules on ``calling_ae`` / ``sop_class_uid`` /
``transfer_syntax`` cost no file access. A file whose header cannot be read goes to
``unreadable`` with reason ``header_unreadable``. Each decision names who made it
(:attr:`RuleDecision.decided_by`): ``rule:<name>``, or the model (``model:<model_id>``, set by
the classifier).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.config import ConfigError
from utils.infer.decisions import NOT_PROJECTION, PROJECTION_MODALITIES, PROJECTION_SOP_CLASSES, UNREADABLE

MODEL = "model"  # a rule's destination that sends the object on to the classifier
PASS_THROUGH = "pass_through"  # the destination of what the default keeps from the model
HEADER_UNREADABLE = "header_unreadable"  # reason code (and decided_by) of a file whose header cannot be read
ROUTED_BY_RULE = "routed_by_rule"  # reason code of an object a configured rule sent to ``unreadable``

# NOT_PROJECTION, PROJECTION_MODALITIES, PROJECTION_SOP_CLASSES: utils.infer.decisions (the same guard as predict.py's)

QUEUE_FIELDS = ("sop_class_uid", "calling_ae", "transfer_syntax")  # recorded by the SCP: no file access needed
UID_FIELDS = ("sop_class_uid", "transfer_syntax")
OPERATORS = ("equals", "in", "regex", "missing", "not")
_RULE_KEYS = ("name", "match", "destination")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_TAG = re.compile(r"\(?\s*([0-9A-Fa-f]{4})\s*,?\s*([0-9A-Fa-f]{4})\s*\)?")
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")
_CS = re.compile(r"[A-Z0-9 _]{0,16}")  # a Code String value (PS3.5 6.2): what Modality and other CS tags hold
_PIXEL_DATA = 0x7FE00010
_SOP_CLASS_TAG = 0x00080016
_MODALITY_TAG = 0x00080060
_CHARSET_TAG = 0x00080005
_BODY_PART_TAG = 0x00180015


@dataclass(frozen=True)
class Condition:
    """One field of a rule's ``match``: an operator on a header attribute or a queue field."""

    field: str  # as written: "modality", "calling_ae", "BodyPartExamined", "(0018,0015)"
    tag: int | None  # the header attribute read; None for the queue's fields
    operator: str  # equals, in, regex or missing
    values: tuple[str, ...] = ()  # equals: one; in: several
    pattern: re.Pattern | None = None  # regex
    missing: bool = True  # missing: true / false
    negated: bool = False  # wrapped in not: {...}
    normalise: bool = False  # values trimmed and upper-cased first: the built-in rules only, as not_projection does

    def test(self, values: Sequence[str]) -> bool:
        """``values``: the attribute's values ([] when absent or empty)."""
        if self.normalise:
            values = [text for v in values if (text := v.strip().upper())]
        if self.operator == "missing":
            found = not values if self.missing else bool(values)
        elif self.operator == "regex":
            found = any(self.pattern.fullmatch(v) for v in values)
        else:
            found = any(v in self.values for v in values)
        return found != self.negated

    def describe(self) -> str:
        if self.operator == "missing":
            text = f"{self.field} {'missing' if self.missing else 'present'}"
        elif self.operator == "regex":
            text = f"{self.field} regex {self.pattern.pattern!r}"
        elif self.operator == "equals":
            text = f"{self.field} equals {_shown(self.field, self.values[0])}"
        else:
            text = f"{self.field} in [{', '.join(_shown(self.field, v) for v in self.values)}]"
        return f"not ({text})" if self.negated else text

    def to_dict(self) -> dict[str, Any]:
        spec: Any = {"equals": self.values[0] if self.values else None, "in": list(self.values),
                     "regex": self.pattern.pattern if self.pattern else None, "missing": self.missing}[self.operator]
        spec = {self.operator: spec}
        return {self.field: {"not": spec} if self.negated else spec}


@dataclass(frozen=True)
class Rule:
    name: str
    conditions: tuple[Condition, ...]  # all must hold; empty only for the built-in catch-all
    destination: str  # MODEL, or the name of a configured destination
    builtin: bool = False

    def describe(self) -> str:
        return " and ".join(c.describe() for c in self.conditions) or "anything else"

    def to_dict(self) -> dict[str, Any]:
        match: dict[str, Any] = {}
        for condition in self.conditions:
            match.update(condition.to_dict())
        return {"name": self.name, "match": match, "destination": self.destination}


@dataclass(frozen=True)
class RuleDecision:
    """Where the rules send one object."""

    destination: str  # MODEL, or a route (a destination's name)
    decided_by: str  # "rule:<name>", or HEADER_UNREADABLE
    reason: str = ""  # why, when the route is "unreadable"
    rule: str = ""  # the rule's name ("" when the header could not be read)
    header: dict[str, str | None] = field(default_factory=dict)  # BodyPartExamined and Modality, if read


def _builtin(name: str, conditions: tuple[Condition, ...], destination: str) -> Rule:
    return Rule(name, conditions, destination, builtin=True)


def default_rules(pass_through: bool) -> tuple[Rule, ...]:
    """The built-in policy after the configured rules: projection radiography to the model, the rest away."""
    return (
        _builtin("projection", (Condition("modality", _MODALITY_TAG, "in", PROJECTION_MODALITIES, normalise=True),),
                 MODEL),
        _builtin("projection-sop-class", (Condition("modality", _MODALITY_TAG, "missing", normalise=True),
                                          Condition("sop_class_uid", None, "in", PROJECTION_SOP_CLASSES,
                                                    normalise=True)), MODEL),
        _builtin("not-projection", (), PASS_THROUGH if pass_through else UNREADABLE),
    )


BUILTIN_NAMES = tuple(r.name for r in default_rules(True))


class RuleSet:
    """The configured rules, then the built-in default; :meth:`decide` routes one queued object."""

    def __init__(self, rules: Sequence[Rule], destinations: Collection[str]) -> None:
        self.pass_through = PASS_THROUGH in destinations
        self.rules: tuple[Rule, ...] = (*rules, *default_rules(self.pass_through))
        self.tags = sorted({c.tag for r in self.rules for c in r.conditions if c.tag is not None}
                           | {_SOP_CLASS_TAG, _MODALITY_TAG, _BODY_PART_TAG, _CHARSET_TAG})

    def decide(self, item, path: str | Path) -> RuleDecision:
        """The first rule ``item`` (a queue row, its file at ``path``) matches; the header is read only if needed."""
        subject = _Subject(item, Path(path), self.tags)
        try:
            for rule in self.rules:
                if all(c.test(subject.values(c)) for c in rule.conditions):
                    return RuleDecision(rule.destination, f"rule:{rule.name}", self._reason(rule, subject),
                                        rule.name, subject.summary())
        except HeaderError as error:
            return RuleDecision(UNREADABLE, HEADER_UNREADABLE, f"{HEADER_UNREADABLE}: {error}")
        raise AssertionError("the built-in catch-all rule always matches")  # pragma: no cover

    def _reason(self, rule: Rule, subject: _Subject) -> str:
        if rule.destination != UNREADABLE:
            return ""
        if not rule.builtin:
            return f"{ROUTED_BY_RULE}: {rule.name}"
        modality = subject.values(Condition("modality", _MODALITY_TAG, "missing"))
        sop_class = subject.values(Condition("sop_class_uid", None, "missing"))
        return (f"{NOT_PROJECTION}: Modality {modality[0] if modality else '(none)'}, SOP class "
                f"{_shown('sop_class_uid', sop_class[0]) if sop_class else '(none)'}; "
                f"no '{PASS_THROUGH}' destination is configured")

    def describe(self, destinations: dict | None = None) -> list[str]:
        """One line per rule, in order, for ``router.py --check``: number, name, condition, destination."""
        lines, width = [], max(len(r.name) for r in self.rules)
        for number, rule in enumerate(self.rules, 1):
            target = rule.destination
            if target == MODEL:
                target = "model (classify)"
            elif destinations and target in destinations:
                target = f"{target} ({destinations[target].node})"
            if rule.builtin and rule.destination == UNREADABLE:
                target += f", reason {NOT_PROJECTION}: no '{PASS_THROUGH}' destination is configured"
            kind = "default" if rule.builtin else "rule"
            lines.append(f"{number:>3}. {kind:<7} {rule.name:<{width}}  {rule.describe()}  -> {target}")
        return lines


class HeaderError(ValueError):
    """The object's header cannot be read, so no rule on it can be evaluated."""


class _Subject:
    """One object as the rules see it: the queue's fields, and its header read once, on first need."""

    def __init__(self, item, path: Path, tags: list[int]) -> None:
        self.item, self.path, self.tags = item, path, tags
        self._header = None

    def header(self):
        if self._header is None:
            import pydicom

            try:
                self._header = pydicom.dcmread(self.path, stop_before_pixels=True, specific_tags=self.tags)
            except Exception as error:  # whatever the parser raises, the object is still routed
                raise HeaderError(f"{type(error).__name__}: {error}"[:500]) from error
        return self._header

    def values(self, condition: Condition) -> list[str]:
        if condition.tag is None:
            value = str(getattr(self.item, condition.field, "") or "").strip()
            if not value and condition.field == "sop_class_uid":  # a file registered without its meta
                return self._header_values(_SOP_CLASS_TAG)
            return [value] if value else []
        return self._header_values(condition.tag)

    def _header_values(self, tag: int) -> list[str]:
        dataset = self.header()
        if tag >> 16 == 0x0002:
            dataset = getattr(dataset, "file_meta", None) or {}
        try:
            element = dataset.get(tag) if hasattr(dataset, "get") else None
            return element_values(element)
        except Exception as error:  # a value pydicom cannot convert (bad charset, bad number)
            raise HeaderError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}): {type(error).__name__}: {error}"[:500]) from error

    def summary(self) -> dict[str, str | None]:
        """BodyPartExamined and Modality, if the header was read anyway (for the audit line)."""
        if self._header is None:
            return {}
        out = {}
        for key, tag in (("Modality", _MODALITY_TAG), ("BodyPartExamined", _BODY_PART_TAG)):
            try:
                out[key] = "\\".join(element_values(self._header.get(tag))) or None
            except Exception:  # noqa: BLE001, S112 - informative only
                continue
        return out


def element_values(element) -> list[str]:
    """An attribute's values as strings, empty ones dropped: [] when it is absent or empty."""
    if element is None:
        return []
    value = element.value
    if element.VR == "SQ":
        return ["(sequence)"] if value else []
    if value is None:
        return []
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("latin-1").strip("\x00 ").split("\\")
    elif isinstance(value, str) or not isinstance(value, Sequence):
        value = [value]
    return [text for v in value if (text := str(v).strip("\x00 "))]


# --- parsing and checking the YAML ---------------------------------------------------------


def parse_rules(raw: Any, destinations: Collection[str], where: str) -> tuple[Rule, ...]:
    """The ``rules`` list of the YAML file, checked: ConfigError naming the rule and the field."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: rules: expected a list of rules (name, match, destination), "
                          f"got {type(raw).__name__}")
    rules, seen = [], set()
    for number, spec in enumerate(raw, 1):
        rule = _parse_rule(spec, number, destinations, where)
        if rule.name in seen:
            raise ConfigError(f"{where}: rule {number} ('{rule.name}'): name: another rule is called "
                              f"'{rule.name}' already; names must be unique (they are recorded as decided_by)")
        seen.add(rule.name)
        rules.append(rule)
    return tuple(rules)


def _parse_rule(spec: Any, number: int, destinations: Collection[str], where: str) -> Rule:
    label = f"{where}: rule {number}"
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"{label}: empty rule; expected a mapping with name, match and destination, got {spec!r}")
    name = spec.get("name")
    if isinstance(name, str) and name:
        label += f" ('{name}')"
    for key in spec:
        if key not in _RULE_KEYS:
            close = difflib.get_close_matches(str(key), _RULE_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; a rule has {list(_RULE_KEYS)}"
            raise ConfigError(f"{label}: unknown key {key!r}{hint}")
    missing = [k for k in _RULE_KEYS if k not in spec]
    if missing:
        raise ConfigError(f"{label}: missing {', '.join(missing)} (a rule needs name, match and destination)")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"{label}: name: expected 1-64 letters, digits, '.', '_' or '-' (starting with a letter "
                          f"or digit), got {name!r}")
    if name in BUILTIN_NAMES:
        raise ConfigError(f"{label}: name: '{name}' is the name of a built-in default rule "
                          f"({', '.join(BUILTIN_NAMES)}); choose another")
    match = spec["match"]
    if not isinstance(match, dict) or not match:
        raise ConfigError(f"{label}: match: empty rule; expected a mapping of at least one field to an operator, e.g. "
                          f"{{modality: {{in: [CT, MR]}}}}, got {match!r}")
    conditions = tuple(_parse_condition(str(key), value, f"{label}: match.{key}") for key, value in match.items())
    return Rule(name, conditions, _parse_destination(spec["destination"], destinations, f"{label}: destination"))


def _parse_destination(value: Any, destinations: Collection[str], label: str) -> str:
    known = sorted(destinations)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{label}: expected '{MODEL}' or a destination name ({', '.join(known)}), got {value!r}")
    if value != MODEL and value not in destinations:
        close = difflib.get_close_matches(value, [*known, MODEL], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{label}: unknown destination '{value}'{hint}; a rule sends to '{MODEL}' (classify) or "
                          f"to one of the configured destinations: {', '.join(known)}")
    return value


def _resolve_field(name: str, label: str) -> tuple[int | None, str]:
    """(tag, VR) of a rule's field: None for the queue's fields; VR '' when unknown (private tags)."""
    from pydicom.datadict import dictionary_VR, keyword_dict, tag_for_keyword

    if name in QUEUE_FIELDS:
        return None, "UI" if name in UID_FIELDS else "AE"
    if name == "modality":
        return _MODALITY_TAG, "CS"
    tag_match = _TAG.fullmatch(name.strip())
    if tag_match and ("," in name or len(name.strip()) == 8):
        tag = int(tag_match.group(1) + tag_match.group(2), 16)
    elif (tag := tag_for_keyword(name)) is None:
        close = difflib.get_close_matches(name, [*QUEUE_FIELDS, "modality", *keyword_dict], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{label}: unknown field '{name}'{hint}; a field is modality, sop_class_uid, calling_ae, "
                          f"transfer_syntax, a DICOM keyword (BodyPartExamined) or a tag ((0018,0015))")
    if tag >= _PIXEL_DATA:
        raise ConfigError(f"{label}: ({tag >> 16:04X},{tag & 0xFFFF:04X}) is at or after Pixel Data; rules read the "
                          f"header only, up to (7FE0,0010)")
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        vr = ""
    return tag, vr


def _parse_condition(name: str, spec: Any, label: str) -> Condition:
    tag, vr = _resolve_field(name, label)
    negated = False
    if not isinstance(spec, dict):  # shorthand: a scalar is equals, a list is in
        spec = {"in": spec} if isinstance(spec, list) else {"equals": spec}
    if set(spec) == {"not"}:
        negated, spec = True, spec["not"]
        if not isinstance(spec, dict):
            spec = {"in": spec} if isinstance(spec, list) else {"equals": spec}
        label += ".not"
    if len(spec) != 1:
        raise ConfigError(f"{label}: expected exactly one operator of {list(OPERATORS)}, got {sorted(spec) or 'none'}")
    [(operator, argument)] = spec.items()
    if operator not in OPERATORS or operator == "not":
        close = difflib.get_close_matches(str(operator), OPERATORS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        what = "'not' takes one operator, not another 'not'" if operator == "not" else f"unknown operator {operator!r}"
        raise ConfigError(f"{label}: {what}{hint}; operators: {', '.join(OPERATORS)}")
    label = f"{label}.{operator}"
    if operator == "missing":
        if not isinstance(argument, bool):
            raise ConfigError(f"{label}: expected true or false, got {argument!r}")
        return Condition(name, tag, operator, missing=argument, negated=negated)
    if vr == "SQ":
        raise ConfigError(f"{label}: {name} is a sequence; it has no value to compare (only 'missing' applies)")
    if operator == "regex":
        if not isinstance(argument, str) or not argument:
            raise ConfigError(f"{label}: expected a regular expression (a string), got {argument!r}")
        try:
            pattern = re.compile(argument)
        except re.error as error:
            raise ConfigError(f"{label}: bad regular expression {argument!r}: {error}") from error
        return Condition(name, tag, operator, pattern=pattern, negated=negated)
    if operator == "in":
        if not isinstance(argument, list) or not argument:
            raise ConfigError(f"{label}: expected a non-empty list of values, got {argument!r}")
        values = tuple(_value(v, name, vr, label) for v in argument)
    else:
        values = (_value(argument, name, vr, label),)
    return Condition(name, tag, operator, values, negated=negated)


def _value(value: Any, name: str, vr: str, label: str) -> str:
    """A value to compare with, as text; UIDs by keyword are translated; impossible CS values refused."""
    if isinstance(value, bool):
        raise ConfigError(f"{label}: got the boolean {value!r}; YAML reads yes/no/on/off/true/false as booleans: "
                          f"quote the value ('{'YES' if value else 'NO'}')")
    if value is None:
        raise ConfigError(f"{label}: got no value (null); to match an absent attribute use 'missing: true'")
    if not isinstance(value, (str, int, float)):
        raise ConfigError(f"{label}: expected a text or number, got {type(value).__name__} {value!r}")
    text = str(value).strip()
    if vr == "UI":
        return _uid(text, name, label)
    if vr == "CS" and not _CS.fullmatch(text):
        raise ConfigError(f"{label}: {text!r} can never match: {name} holds a DICOM code string (upper-case letters, "
                          f"digits, space and '_', 16 at most), e.g. {text.upper()[:16]!r}")
    return text


def _uid(text: str, name: str, label: str) -> str:
    from pydicom.uid import UID_dictionary

    if _UID.fullmatch(text) and len(text) <= 64:
        return text
    by_keyword = {entry[4]: uid for uid, entry in UID_dictionary.items() if entry[4]}
    if text in by_keyword:
        return by_keyword[text]
    close = difflib.get_close_matches(text, list(by_keyword), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ConfigError(f"{label}: {text!r} is neither a UID nor the keyword of one{hint}; {name} is a UID such as "
                      f"1.2.840.10008.5.1.4.1.1.2 or its pydicom keyword (CTImageStorage)")


def _shown(name: str, value: str) -> str:
    """A value as --check shows it: UIDs with their name."""
    if name in UID_FIELDS or name == "SOPClassUID":
        from pydicom.uid import UID

        uid_name = UID(value).name
        return f"{value} ({uid_name})" if uid_name and uid_name != value else value
    return value
