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
    got = _imported("import reap.checkpoint, reap.writer, reap.staging, reap.validate, reap.errors, reap.progress")
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
    assert {"reap.plan", "reap.selection", "reap.surgery", "reap.derive"} <= graph.keys()
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
