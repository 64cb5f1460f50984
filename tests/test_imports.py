"""What must not import torch (or transformers), checked in a fresh interpreter.

`reap --help` and every command's help answer at once, and the byte layer of the rewrite (reading shard headers and
byte ranges, validation, staging, writing shards) stands on its own: it never needs torch, so copying kept tensors
never goes through it. Deriving a layout does need transformers' meta model (issue 12: layouts come from
transformers, not from hand-written tables), so `reap prune --keep` and `reap inspect` import torch there, once;
the copying itself stays byte ranges.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, sys
{body}
print(json.dumps({{m: m in sys.modules for m in ("torch", "transformers", "numpy")}}))
"""


def _imported(body: str) -> dict[str, bool]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(body=body)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["prune", "--help"], ["calibrate", "--help"], ["inspect", "--help"],
                                  ["eval", "--help"], ["report", "--help"]])
def test_help_imports_no_torch(argv):
    body = f"""
from typer.testing import CliRunner
from reap.cli import app
res = CliRunner().invoke(app, {argv!r})
assert res.exit_code == 0, res.output
"""
    got = _imported(body)
    assert not got["torch"] and not got["transformers"], got


def test_the_byte_layer_of_the_rewrite_imports_no_torch():
    got = _imported("import reap.io.checkpoint, reap.io.writer, reap.io.staging, reap.model.validate, reap.core.errors, reap.core.progress")
    assert not got["torch"] and not got["transformers"], got


def _import_graph() -> dict[str, set[str]]:
    """reap module -> the reap modules it imports, function-local imports included (``if TYPE_CHECKING`` blocks
    are not imports at run time), read from the source with ``ast``."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "src" / "reap"
    mods = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        mods[".".join(("reap", *parts[:-1])) if parts[-1] == "__init__" else ".".join(("reap", *parts))] = path
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        typing_only = {id(x) for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
                       for x in ast.walk(n)}
        deps = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("reap") and not node.level:
                deps |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods}
                deps |= {node.module} & mods.keys()
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names} & mods.keys()
        # a package and its own submodules import each other by design (reap.formats, reap.report)
        graph[name] = {d for d in deps if d != name and not d.startswith(name + ".") and not name.startswith(d + ".")}
    return graph


def test_no_import_circle_even_through_function_local_imports():
    graph = _import_graph()
    assert {"reap.selection.plan", "reap.selection.choose", "reap.rewrite.surgery", "reap.model.derive"} <= graph.keys()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            assert state.get(dep) != 1, "import circle: " + " -> ".join(path[path.index(dep):] + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


# -- the stages: which package may import which (every import counted, function-local ones too) ------------------
#: package -> the packages it may import (the jobs and the CLI at the top of reap may import every package)
LAYERS: dict[str, set[str]] = {
    "core": set(),  # errors, options, progress, names, humanize
    "formats": {"core"},  # weight formats, dequantization
    "io": {"core", "formats"},  # shards and headers, writing, staging
    "model": {"core", "formats", "io"},  # the layout from transformers, validation, the support matrix
    "data": {"core", "model"},  # records, chat, token ids
    "selection": {"core"},  # criteria, plans and their rules, choosing
    "stream": {"core", "formats", "io", "model", "data"},  # one layer at a time, reap's experts, the self-check
    "calibrate": {"core", "formats", "io", "model", "data", "stream", "selection"},  # statistics, greedy search
    # merges and the router re-fit, a layer observer the prune job hands calibration
    "recover": {"core", "formats", "io", "model", "data", "stream", "selection", "calibrate"},
    "rewrite": {"core", "formats", "io", "model", "selection"},  # the pruned checkpoint, verified
    "report": {"core", "formats", "io", "model", "selection", "calibrate"},  # pictures, text, card, inspect
    "testing": {"core", "formats", "io", "model"},  # tiny checkpoints
}
#: edges against the table still to be turned around (issue 27: observers instead of mixins, callbacks from the job)
KNOWN_BACK_EDGES: set[tuple[str, str]] = set()


def _package_edges() -> dict[tuple[str, str], set[str]]:
    """(package, package it imports) -> the module edges behind it, for reap's stage packages."""
    def package(mod: str) -> str | None:  # reap.X or reap.X.y with X a stage package; None for the top modules
        name = mod.split(".")[1] if mod.count(".") else None
        return name if name in LAYERS else None

    edges: dict[tuple[str, str], set[str]] = {}
    for mod, deps in _import_graph().items():
        for dep in deps:
            a, b = package(mod), package(dep)
            if a is not None and b is None and dep != "reap":
                edges.setdefault((a, "the jobs and the CLI"), set()).add(f"{mod} -> {dep}")
            elif a is not None and b is not None and a != b:
                edges.setdefault((a, b), set()).add(f"{mod} -> {dep}")
    return edges


def test_the_packages_are_the_stages_and_every_module_sits_in_one():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "src" / "reap"
    packages = {p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(LAYERS)
    top = sorted(p.stem for p in root.glob("*.py"))
    assert len(top) <= 10, top  # the jobs and the CLI
    for pkg in packages:
        doc = ast_docstring(root / pkg / "__init__.py")
        assert doc, f"reap.{pkg} has no docstring saying what it owns"


def ast_docstring(path) -> str | None:
    import ast

    return ast.get_docstring(ast.parse(path.read_text()))


def test_the_layer_table_has_no_circle():
    state: dict[str, int] = {}

    def visit(pkg: str, path: list[str]) -> None:
        state[pkg] = 1
        for dep in sorted(LAYERS[pkg]):
            assert state.get(dep) != 1, "circle in LAYERS: " + " -> ".join(path + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[pkg] = 2

    for pkg in LAYERS:
        if pkg not in state:
            visit(pkg, [pkg])


def test_every_import_goes_down_the_layer_table():
    """A package imports only the packages below it in LAYERS: an edge against the table fails here, naming the
    modules; the jobs and the CLI (modules at the top of reap) may import anything."""
    against = {(a, b): mods for (a, b), mods in _package_edges().items() if b not in LAYERS.get(a, set())}
    assert set(against) - KNOWN_BACK_EDGES == set(), {k: sorted(v) for k, v in against.items()}
    assert KNOWN_BACK_EDGES - set(against) == set(), "a back edge was fixed: take it out of KNOWN_BACK_EDGES"


def test_the_layer_test_fails_on_a_back_edge(monkeypatch):
    """The check above can fail: one import of the rewrite from the io layer is an edge against the table."""
    graph = _import_graph()
    graph["reap.io.staging"] = graph["reap.io.staging"] | {"reap.rewrite.surgery"}
    monkeypatch.setattr(__import__(__name__), "_import_graph", lambda: graph)
    with pytest.raises(AssertionError, match="reap.io.staging -> reap.rewrite.surgery"):
        test_every_import_goes_down_the_layer_table()


#: modules still over the ~400-line size of one concern, with the lines they may not grow past (issue 27 left them)
OVERSIZE = {"reap.formats": 430}


def test_no_module_over_about_400_lines():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "src" / "reap"
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(("reap", *(parts[:-1] if parts[-1] == "__init__" else parts)))
        lines = len(path.read_text().splitlines())
        assert lines <= OVERSIZE.get(name, 420), f"{name} has {lines} lines: split it by concern"
