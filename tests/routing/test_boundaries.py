"""The router's layout keeps its promises (utils/routing/__init__.py draws it): the queue module is the only code
that speaks SQL to the spool database, the node builds each part with what it needs instead of setting attributes
on it afterwards, and the router reaches the classifier only through the inference engine and predictor
interface (utils/infer), never a model library."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROUTING = ROOT / "utils" / "routing"
SQL = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|PRAGMA|CREATE TABLE)\b[^\n]*\b(FROM|INTO|SET|TABLE|items|meta|=)",
                 re.IGNORECASE)


def modules() -> list[Path]:
    return sorted(ROUTING.rglob("*.py"))


def test_the_rooms_exist():
    rooms = {p.name for p in ROUTING.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert rooms == {"intake", "decision", "delivery", "operations"}
    assert (ROUTING / "queue.py").is_file() and (ROUTING / "node.py").is_file()


def test_only_the_queue_module_speaks_sql():
    offenders = []
    for path in modules():
        if path == ROUTING / "queue.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("execute", "executemany", "executescript", "connect"):
                base = node.value
                if not (isinstance(base, ast.Name) and base.id in ("socket", "assoc", "ae")):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.search(node.value):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value[:60]!r}")
    assert not offenders, "SQL outside utils/routing/queue.py:\n" + "\n".join(offenders)


def test_the_node_builds_parts_with_what_they_need():
    """No ``part.attribute = value`` after a part is built (``self.x = ...`` on the node itself is its own state)."""
    tree = ast.parse((ROUTING / "node.py").read_text())
    wired = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                for each in (target.elts if isinstance(target, ast.Tuple) else [target]):
                    if isinstance(each, ast.Attribute) and not (isinstance(each.value, ast.Name)
                                                                and each.value.id == "self"):
                        wired.append(f"node.py:{node.lineno}: {ast.unparse(each)} = ...")
    assert not wired, "\n".join(wired)


def test_the_router_uses_the_classifier_only_through_utils_infer():
    for path in modules():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not re.match(r"(keras|tensorflow|models|utils\.train)(\.|$)", name), \
                    f"{path.relative_to(ROOT)}:{node.lineno} imports {name}"
