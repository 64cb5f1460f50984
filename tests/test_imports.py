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
