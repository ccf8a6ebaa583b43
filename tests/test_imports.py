"""The import graph of the project's packages (utils/, models/): no cycles, and the code that serves a
model never imports the training code.

The graph is read with ``ast`` (nothing is imported), and every import counts: module level, inside
functions (lazy imports), and ``importlib.import_module("...")`` with a literal name; only imports
under ``if TYPE_CHECKING:`` are left out, as they never run.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("utils", "models")
TRAINING = ("utils.train.components", "utils.train.runner")
SERVING = ("utils.artifacts.model_file", "utils.artifacts.run_dir", "utils.artifacts.keras_objects",
           "utils.artifacts.export", "utils.infer.predictor", "utils.infer.engine", "utils.infer.decisions",
           "utils.infer.batch_predict")  # + every module of utils.routing


def project_modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of ``packages`` under ``root``."""
    modules = {}
    for package in packages:
        for file in sorted((root / package).rglob("*.py")):
            parts = list(file.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = file
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.AST, module: str, is_package: bool):
    """Every dotted name an import statement (or importlib.import_module call) in ``tree`` may load."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            # `from pkg import sub`: pkg.sub when it is a module, else (an attribute) pkg; see resolve()
            yield from (f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__"):
                yield node.args[0].value
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path = ROOT, packages=PACKAGES, *, with_parents: bool = False) -> dict[str, set[str]]:
    """Module -> the project modules it imports. ``with_parents`` adds the packages Python runs first
    (``import utils.x.y`` runs utils/__init__ and utils/x/__init__): right for "what does importing
    this run", left out for cycles (a package importing its own submodules is not a cycle)."""
    modules = project_modules(root, packages)

    def resolve(name: str) -> str | None:
        """The module itself, else its nearest enclosing project module (a.b.attr -> a.b), else None."""
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, file in modules.items():
        edges = set()
        tree = ast.parse(file.read_text(), str(file))
        for name in _imported_names(tree, module, file.name == "__init__.py"):
            target = resolve(name)
            if target is None:
                continue
            edges.add(target)
            if with_parents:
                parts = target.split(".")
                edges.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in modules)
        edges.discard(module)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def path_to(graph: dict[str, set[str]], start: str, targets) -> list[str] | None:
    """A shortest import chain from ``start`` to one of ``targets`` (breadth first), else None."""
    previous = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            if node in targets:
                chain = [node]
                while previous[chain[-1]] is not None:
                    chain.append(previous[chain[-1]])
                return chain[::-1]
            for child in sorted(graph.get(node, ())):
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    return None


def serving_modules(graph) -> list[str]:
    return [*SERVING, *sorted(m for m in graph if m.startswith("utils.routing."))]


def test_the_import_walker_sees_lazy_relative_and_dynamic_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text(textwrap.dedent("""
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from pkg import d  # never runs: no edge
        def later():
            from .sub import c  # lazy and relative
            return c
    """))
    (package / "sub" / "c.py").write_text("import importlib\nimportlib.import_module('pkg.a')\n")
    (package / "d.py").write_text("")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.sub.c"} and graph["pkg.sub.c"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    assert path_to(graph, "pkg.a", {"pkg.a"}) == ["pkg.a"] and path_to(graph, "pkg.b", {"pkg.d"}) is None


def test_the_real_graph_has_the_expected_edges():
    """The walker reads this project: known module-level and lazy edges are there."""
    graph = import_graph()
    assert {"utils.artifacts.keras_objects", "utils.artifacts.model_file"} <= graph["utils.train.components"]
    assert {"utils.artifacts.keras_objects", "models", "utils.preprocessing"} <= graph["utils.artifacts.model_file"]  # lazy ones too
    assert "utils.artifacts.model_file" in graph["utils.infer.predictor"] and "utils.infer.predictor" in graph["utils.routing.node"]


def test_no_import_cycles_in_utils_and_models():
    found = cycles(import_graph())
    assert not found, f"import cycles (lazy imports count): {found}"


def test_keras_objects_is_a_leaf():
    """The registered Keras objects import nothing of the project: loading a model needs them, and
    whatever they imported would be loaded with every model."""
    assert import_graph()["utils.artifacts.keras_objects"] == set()


@pytest.mark.parametrize("module", serving_modules(import_graph()))
def test_serving_modules_do_not_reach_the_training_code(module):
    chain = path_to(import_graph(with_parents=True), module, set(TRAINING))
    assert chain is None, f"{module} imports the training code: {' -> '.join(chain)}"


def test_loading_and_serving_a_model_imports_no_training_code():
    """At run time, in a fresh interpreter: load a compiled checkpoint (optimizer, schedule and metric
    included) and predict through every serving module; utils.train.components and utils.train.runner stay out."""
    script = textwrap.dedent("""
        import json, sys
        import numpy as np
        from utils.artifacts.model_file import load_model
        from utils.infer.predictor import load_predictor
        import utils.artifacts.export, utils.infer.batch_predict, utils.infer.engine
        import utils.routing.operations.service, utils.routing.node, utils.routing.decision.classifier, utils.routing.delivery.forwarder
        path = sys.argv[1]
        model, metadata = load_model(path, compile=True)
        predictor = load_predictor(path)
        probs = predictor.predict(np.zeros((2, *predictor.spec.input_shape), np.float32))
        print(json.dumps({"optimizer": type(model.optimizer).__name__, "shape": list(probs.shape),
                          "loaded": sorted(m for m in sys.modules if m in ("utils.train.components", "utils.train.runner"))}))
    """)
    fixture = ROOT / "tests" / "data" / "checkpoint_before_keras_objects.keras"
    result = subprocess.run([sys.executable, "-c", script, str(fixture)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"optimizer": "AdamL2", "shape": [2, 3], "loaded": []}


ENTRY_SCRIPTS = ("training.py", "test.py", "predict.py", "calibrate.py", "export.py", "prepare.py", "backfill.py",
                 "router.py")
HEAVY = ("tensorflow", "keras", "jax", "torch")


def test_every_entry_script_s_help_imports_no_tensorflow_or_keras():
    """``python SCRIPT --help`` for every entry script (one interpreter runs them in turn, each as
    __main__): it exits 0 with its usage, and neither TensorFlow nor Keras is imported, so --help
    is quick and free of TensorFlow's start-up lines (oneDNN, cuInit, absl), which
    TF_CPP_MIN_LOG_LEVEL cannot silence."""
    scripts = sorted(p.name for p in ROOT.glob("*.py"))
    assert set(ENTRY_SCRIPTS) <= set(scripts)
    script = textwrap.dedent("""
        import contextlib, io, json, runpy, sys
        heavy, report = sys.argv[1].split(","), {}
        for script in sys.argv[2:]:
            out, code = io.StringIO(), None
            sys.argv = [script, "--help"]
            with contextlib.redirect_stdout(out):
                try:
                    runpy.run_path(script, run_name="__main__")
                except SystemExit as exit:
                    code = exit.code
            report[script] = {"code": code or 0, "usage": out.getvalue().startswith("usage:"),
                              "heavy": [m for m in heavy if m in sys.modules]}
        print(json.dumps(report))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-c", script, ",".join(HEAVY), *scripts], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, check=False, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {s: {"code": 0, "usage": True, "heavy": []} for s in scripts}, report
    for noise in ("oneDNN", "cuInit", "cuda drivers", "absl"):
        assert noise not in result.stdout + result.stderr, result.stderr[-3000:]
