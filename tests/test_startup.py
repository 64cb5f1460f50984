"""Bad arguments are refused at once: one line, exit code 2, nothing written, before torch or transformers is imported.

Issue 26: `reap prune M --out o --ratio 1.5` (or a missing --keep file, an unknown --method or --offload) used to
fail only after the 8-11 s it takes to import torch and transformers and derive the model's layout. Each case runs
`reap` in a fresh interpreter where importing torch or transformers raises (so a command that reaches them fails
with a traceback, not the expected line), on a real model (so that nothing but the order of the checks makes them
fast), and reports which of them were imported when it exited.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = r"""
import json, sys, time

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} was imported before the argument error")
        return None

sys.meta_path.insert(0, NoTorch())
sys.argv = ["reap", *json.loads(sys.argv[1])]
t0 = time.perf_counter()
from reap.cli import main
try:
    main()
    code = 0
except SystemExit as done:
    code = done.code
print(json.dumps({"code": code, "seconds": time.perf_counter() - t0,
                  "heavy": sorted(m for m in ("torch", "transformers") if m in sys.modules)}))
"""


def refused_without_torch(cwd: Path, args: list, *needles: str) -> str:
    """Run ``reap ARGS`` in ``cwd`` with torch and transformers blocked; check the one-line refusal."""
    before = sorted(p.name for p in cwd.iterdir())
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps([str(a) for a in args])], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr  # e.g. "torch was imported before the argument error"
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.stdout.strip().splitlines()[:-1] == []  # nothing on stdout but the probe's line
    assert got["code"] == 2 and got["heavy"] == [], got
    assert got["seconds"] < 5, got  # ~0.3 s; was 8-11 s
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reap: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert sorted(p.name for p in cwd.iterdir()) == before  # nothing written
    return lines[0]


@pytest.fixture
def work(tmp_path) -> Path:
    (tmp_path / "d.jsonl").write_text('{"text": "def f(x):\\n    return x\\n"}\n')
    return tmp_path


CASES = {
    "ratio out of range": (["prune", "{M}", "--out", "o", "--ratio", "1.5"], ["strictly between 0 and 1"]),
    "ratio not a number": (["prune", "{M}", "--out", "o", "--ratio", "lots"], ["Invalid value for '--ratio'"]),
    "missing keep file": (["prune", "{M}", "--out", "o", "--keep", "nope.json"],
                          ["keep file nope.json does not exist"]),
    "unknown method": (["prune", "{M}", "--out", "o", "--ratio", "0.3", "--method", "REAP"],
                       ["'REAP'", "did you mean 'reap'?"]),
    "unknown offload": (["prune", "{M}", "--out", "o", "--ratio", "0.3", "--dataset", "d.jsonl", "--offload", "ram"],
                        ["--offload 'ram'", "auto, device, cpu, disk"]),
    "greedy default without its search": (["prune", "{M}", "--out", "o", "--ratio", "0.3", "--dataset", "d.jsonl",
                                           "--greedy-tokens", "0"], ["greedy-rerouted", "--greedy-tokens 0"]),
    "missing dataset file": (["prune", "{M}", "--out", "o", "--ratio", "0.3", "--dataset", "nope.jsonl"],
                             ["nope.jsonl not found"]),
    "missing stats file": (["prune", "{M}", "--out", "o", "--ratio", "0.3", "--stats", "nope.safetensors"],
                           ["nope.safetensors does not exist"]),
    "no calibration": (["prune", "{M}", "--out", "o", "--ratio", "0.3"], ["needs calibration", "--dataset"]),
    "keep and ratio": (["prune", "{M}", "--out", "o", "--ratio", "0.3", "--keep", "d.jsonl"], ["not both"]),
    "unknown device": (["calibrate", "{M}", "--dataset", "d.jsonl", "--out", "s.safetensors", "--device", "gpu"],
                       ["--device 'gpu'", "did you mean 'cuda'?"]),
    "zero batch tokens": (["calibrate", "{M}", "--dataset", "d.jsonl", "--out", "s.safetensors", "--batch-tokens", "0"],
                          ["--batch-tokens"]),
    "zero window": (["eval", "{M}", "--dataset", "d.jsonl", "--seq-len", "0"], ["--seq-len"]),
    "report method": (["report", "{M}", "--method", "reep"], ["did you mean 'reap'?"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_arguments_are_refused_before_torch_is_imported(tiny_fp32, work, case):
    args, needles = CASES[case]
    refused_without_torch(work, [str(a).replace("{M}", str(tiny_fp32)) for a in args], *needles)


def test_a_misspelled_recipe_key_is_refused_before_torch_is_imported(tiny_fp32, work):
    (work / "r.yaml").write_text(f"model: {tiny_fp32}\nration: 0.3\nmethod: random\n")
    refused_without_torch(work, ["prune", "--config", "r.yaml", "--out", "o"], "unknown key 'ration'",
                          "did you mean 'ratio'?")
    (work / "r.yaml").write_text(f"model: {tiny_fp32}\nratio: 0.3\nmethod: Random\n")
    refused_without_torch(work, ["prune", "--config", "r.yaml", "--out", "o"], "did you mean 'random'?")


def test_help_and_version_import_no_torch(work):
    for args in (["--version"], ["prune", "--help"], ["--help"]):
        proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], cwd=work, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        assert got["code"] == 0 and got["heavy"] == [], got
