"""The command line on bad input: one line on stderr, exit code 2, nothing written, the input untouched.

Broken models are copies of a tiny fixture in tmp_path, damaged. Most cases run in-process through typer's
CliRunner on ``reap.cli.app`` (fast); the real entry point (``python -m reap``) runs in a subprocess for
a hub-like id with an empty HF_HOME and for one successful prune.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reap.cli import app



def snapshot(path: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file and folder under path (dotfiles included): (size, mtime_ns, bytes)."""
    if not path.exists():
        return {}
    snap = {}
    for p in sorted(path.rglob("*")):
        st = p.stat()
        snap[p.relative_to(path).as_posix()] = (st.st_size, st.st_mtime_ns, p.read_bytes() if p.is_file() else b"")
    return snap


def cli(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def assert_user_error(res, *needles: str) -> str:
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert isinstance(res.exception, SystemExit)  # not an unexpected exception caught by the runner
    err = res.stderr
    assert "Traceback" not in res.output
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reap: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    assert res.stdout == ""
    return err


@pytest.fixture
def model(tiny_fp32, tmp_path) -> Path:
    """A private copy of the tiny fp32 model, free to damage."""
    return Path(shutil.copytree(tiny_fp32, tmp_path / "model"))


def shards(model: Path) -> list[str]:
    weight_map = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    return sorted(set(weight_map.values()))


def run_failing(model: Path, out: Path, args: list, *needles: str) -> str:
    """Run `reap prune MODEL --out OUT ARGS`; check the error contract and that nothing changed on disk."""
    parent = next(p for p in out.parents if p.exists())
    before_parent = sorted(p.name for p in parent.iterdir())
    before_model = snapshot(model) if model.exists() else None
    before_out = snapshot(out)
    res = cli("prune", model, "--out", out, *args)
    err = assert_user_error(res, *needles)
    assert sorted(p.name for p in parent.iterdir()) == before_parent  # no --out, no .out.incomplete-*
    assert snapshot(out) == before_out
    if before_model is not None:
        assert snapshot(model) == before_model
    return err


# -- ratios -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ratio, needle",
    [("0", "strictly between 0 and 1"), ("1", "strictly between 0 and 1"), ("1.5", "strictly between 0 and 1"),
     ("-0.1", "strictly between 0 and 1"), ("nan", "strictly between 0 and 1"), ("inf", "strictly between 0 and 1"),
     ("0.85", "fewer than the 4"),  # floor(16 x 0.85) = 13 dropped leaves 3 < top-k 4
     ("0.05", "0 experts")],  # floor(16 x 0.05) = 0
)
def test_bad_ratio(tiny_fp32, tmp_path, ratio, needle):
    run_failing(tiny_fp32, tmp_path / "out", ["--ratio", ratio, "--method", "random"], needle)


def test_largest_ratio_that_keeps_top_k_works(tiny_fp32, tmp_path):
    res = cli("prune", tiny_fp32, "--out", tmp_path / "out", "--ratio", "0.75", "--method", "random", "-q")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_local_experts"] == 4


# -- output directory ---------------------------------------------------------------------------------------
def test_out_is_the_input(model):
    run_failing(model, model, ["--ratio", "0.3", "--method", "random"], "input model directory")


def test_out_inside_the_input(model):
    run_failing(model, model / "pruned", ["--ratio", "0.3", "--method", "random"], "inside")
    assert not (model / "pruned").exists()


def test_out_contains_the_input(model, tmp_path):
    run_failing(model, tmp_path, ["--ratio", "0.3", "--method", "random"], "contains the input")


def test_out_not_empty_needs_overwrite(tiny_fp32, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("from an earlier run")
    run_failing(tiny_fp32, out, ["--ratio", "0.3", "--method", "random"], "--overwrite")
    assert (out / "old.txt").read_text() == "from an earlier run"

    # an earlier reap output needs --overwrite too, and is replaced with it (a folder holding files reap did not
    # write is refused even then: tests/test_overwrite.py)
    (out / "old.txt").unlink()
    assert cli("prune", tiny_fp32, "--out", out, "--ratio", "0.5", "--method", "random", "-q").exit_code == 0
    run_failing(tiny_fp32, out, ["--ratio", "0.3", "--method", "random"], "--overwrite")
    res = cli("prune", tiny_fp32, "--out", out, "--ratio", "0.3", "--method", "random", "--overwrite", "-q")
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .out.old-* or .out.incomplete-* left


def test_out_is_a_file(tiny_fp32, tmp_path):
    (tmp_path / "out").write_text("x")
    run_failing(tiny_fp32, tmp_path / "out", ["--ratio", "0.3", "--method", "random"], "is a file")


def test_out_parent_missing(tiny_fp32, tmp_path):
    run_failing(tiny_fp32, tmp_path / "a" / "b", ["--ratio", "0.3", "--method", "random"], "does not exist")
    assert not (tmp_path / "a").exists()


# -- the model ----------------------------------------------------------------------------------------------
def test_missing_model_path(tmp_path):
    run_failing(tmp_path / "nope", tmp_path / "out", ["--ratio", "0.3", "--method", "random"], "does not exist")


def test_truncated_shard(model, tmp_path):
    shard = model / shards(model)[3]
    os.truncate(shard, shard.stat().st_size - 100)
    run_failing(model, tmp_path / "out", ["--ratio", "0.3", "--method", "random"], "truncated", shard.name)


def test_garbage_shard(model, tmp_path):
    shard = model / shards(model)[0]
    shard.write_bytes(b"\xff" * 64)
    run_failing(model, tmp_path / "out", ["--ratio", "0.3", "--method", "random"], shard.name)


def test_missing_shard(model, tmp_path):
    name = shards(model)[2]
    (model / name).unlink()
    run_failing(model, tmp_path / "out", ["--ratio", "0.3", "--method", "random"], "missing", name)


def test_index_names_a_tensor_absent_from_its_shard(model, tmp_path):
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    names = shards(model)
    victim = next(n for n, s in index["weight_map"].items() if s == names[0])
    index["weight_map"][victim] = names[1]  # the index now says it lives in another shard
    index_path.write_text(json.dumps(index))
    run_failing(model, tmp_path / "out", ["--ratio", "0.3", "--method", "random"], victim, names[1])


def test_unknown_architecture(model, tmp_path):
    config_path = model / "config.json"
    config = json.loads(config_path.read_text())
    config["model_type"] = "minimax_m9"
    config_path.write_text(json.dumps(config))
    run_failing(model, tmp_path / "out", ["--ratio", "0.3", "--method", "random"], "minimax_m9",
                "not implemented by the installed transformers", "src/reap/model/arch.py")


def test_config_of_another_architecture(model, tmp_path):
    config_path = model / "config.json"
    config = json.loads(config_path.read_text())
    config["model_type"] = "qwen3_moe"  # the shards are MiniMax-M2's: transformers' Qwen3-MoE loads none of them
    config_path.write_text(json.dumps(config))
    run_failing(model, tmp_path / "out", ["--ratio", "0.3", "--method", "random"], "mlp.experts", "does not match")


def test_config_without_expert_count(model, tmp_path):
    config_path = model / "config.json"
    config = json.loads(config_path.read_text())
    del config["num_local_experts"]
    config_path.write_text(json.dumps(config))
    run_failing(model, tmp_path / "out", ["--ratio", "0.3", "--method", "random"], "expert count", "config.json")


def test_config_not_json(model, tmp_path):
    (model / "config.json").write_text("{not json")
    run_failing(model, tmp_path / "out", ["--ratio", "0.3", "--method", "random"], "config.json")


# -- keep files ---------------------------------------------------------------------------------------------
GOOD = {str(layer): list(range(8)) for layer in range(3)}


@pytest.mark.parametrize(
    "content, needle",
    [
        ("{'0': [1, 2]}", "not valid JSON"),
        ("[1, 2, 3]", "JSON object"),
        (json.dumps({"0": list(range(8)), "1": list(range(8))}), "no entry for layer(s) [2]"),
        (json.dumps({**GOOD, "3": list(range(8))}), "names layer 3, which is not an MoE layer"),
        (json.dumps({**GOOD, "1": [0, 1, 2, 3, 4, 5, 6, 6]}), "expert 6 more than once"),
        (json.dumps({**GOOD, "2": [0, 1, 2, 3, 4, 5, 6, 16]}), "names expert 16"),
        (json.dumps({**GOOD, "2": [0, 1, 2, 3, 4, 5, 6, -1]}), "names expert -1"),
        (json.dumps({**GOOD, "0": [0, 1, 2]}), "fewer than the 4 each token is routed to"),
        (json.dumps({**GOOD, "0": list(range(9))}), "different numbers of experts"),
        (json.dumps({**GOOD, "0": "0-7"}), "list of integer"),
    ],
)
def test_bad_keep_file(tiny_fp32, tmp_path, content, needle):
    keep = tmp_path / "keep.json"
    keep.write_text(content)
    run_failing(tiny_fp32, tmp_path / "out", ["--keep", keep], needle)


def test_missing_keep_file(tiny_fp32, tmp_path):
    run_failing(tiny_fp32, tmp_path / "out", ["--keep", tmp_path / "nope.json"], "does not exist")


def test_keep_and_ratio_together(tiny_fp32, tmp_path):
    keep = tmp_path / "keep.json"
    keep.write_text(json.dumps(GOOD))
    run_failing(tiny_fp32, tmp_path / "out", ["--keep", keep, "--ratio", "0.3"], "not both")


def test_neither_keep_nor_ratio(tiny_fp32, tmp_path):
    run_failing(tiny_fp32, tmp_path / "out", [], "--ratio")


# -- methods ------------------------------------------------------------------------------------------------
def test_unknown_method(tiny_fp32, tmp_path):
    run_failing(tiny_fp32, tmp_path / "out", ["--ratio", "0.3", "--method", "magic"], "'magic'", "random")


@pytest.mark.parametrize("method", [None, "reap", "ean"])
def test_saliency_method_needs_calibration(tiny_fp32, tmp_path, method):
    args = ["--ratio", "0.3"] + (["--method", method] if method else [])
    run_failing(tiny_fp32, tmp_path / "out", args, "--dataset", "--stats")


# -- the real entry point -----------------------------------------------------------------------------------
def _python_m_reap(*args, env_extra=None, cwd=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "reap", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def test_hub_id_not_in_cache(tmp_path):
    hf_home = tmp_path / "hf"
    hf_home.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    res = _python_m_reap("prune", "some-org/not-a-cached-model", "--out", work / "out", "--ratio", "0.3",
                         "--method", "random", env_extra={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}, cwd=work)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reap: error: "), res.stderr
    assert "some-org/not-a-cached-model" in res.stderr and str(hf_home) in res.stderr
    assert res.stdout == ""
    assert list(work.iterdir()) == [] and list(hf_home.iterdir()) == []


@pytest.mark.slow  # end to end through `python -m reap` in a subprocess
def test_python_m_reap_prunes_the_fp8_fixture(mini_m2_fp8, tmp_path):
    """The installed entry point end to end on the released-format fixture (odd shard names kept)."""
    out = tmp_path / "out"
    res = _python_m_reap("prune", mini_m2_fp8, "--out", out, "--ratio", "0.5", "--method", "random", "--seed", "1",
                         "--json")
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)  # --json: the result as one JSON object, nothing else on stdout
    assert result["out"] == str(out) and (result["experts_before"], result["experts_after"]) == (64, 32)
    assert "Traceback" not in res.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-{i:05d}-of-00009.safetensors" for i in range(7)]
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 32
    report = json.loads((out / "reap_report.json").read_text())
    assert report["command"].startswith("reap prune ") and report["seed"] == 1


def test_version_and_help():
    res = cli("--version")
    assert res.exit_code == 0 and res.stdout.strip().startswith("reap ")
    res = cli("prune", "--help")
    assert res.exit_code == 0 and "--keep" in res.stdout and "--ratio" in res.stdout


# -- help, version, --quiet (issue 26) ------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [[], ["prune"], ["calibrate"], ["eval"], ["report"], ["inspect"], ["demo"]])
def test_help_is_whole_at_80_columns(command):
    """No line wider than the terminal, no option name cut short (rich's table printed `--protect-super-expe…`), no
    `<bool>`/`<str>` type labels; every long flag whole on a line of its own."""
    import re

    import typer.main

    res = cli(*command, "--help", env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), "\n".join(line for line in lines if len(line) > 80)
    assert "…" not in res.stdout and "<bool>" not in res.stdout and "<str>" not in res.stdout
    group = typer.main.get_command(app)
    cmd = group.commands[command[0]] if command else group
    shown = set(re.findall(r"^  (?:-\w, )?(--[\w-]+)", res.stdout, flags=re.M))
    flags = {opt for p in cmd.params if p.param_type_name == "option" for opt in p.opts if opt.startswith("--")}
    assert flags <= shown | {"--help"}, flags - shown
    if not command:
        assert "  --version  Show the version and exit." in lines, res.stdout


def test_version_prints_the_version():
    from reap import __version__

    res = _python_m_reap("--version")
    assert res.returncode == 0 and res.stdout == f"reap {__version__}\n" and res.stderr == "", (res.stdout, res.stderr)
    res = _python_m_reap("--version", "prune")  # eager: before the command
    assert res.returncode == 0 and res.stdout == f"reap {__version__}\n", res.stdout


def test_quiet_log_passes_only_warnings_and_notices():
    from reap.core.progress import quiet_log

    seen = []
    say = quiet_log(seen.append)
    for line in ("plan: 1 batch per rank", "calibrating tiny: 5 samples", "pruning tiny: 16 -> 12 experts",
                 "tokenizing 5 records", "layers: 1/3 (33%)", "verifying the output", "wrote out.json",
                 "warning: thin calibration data", "note: d.jsonl has only 10 tokens",
                 "removed a stale lock of pid 1", "greedy-rerouted: 1 MoE layer [0] use weighted-ean instead"):
        say(line)
    assert seen == ["warning: thin calibration data", "note: d.jsonl has only 10 tokens",
                    "removed a stale lock of pid 1", "greedy-rerouted: 1 MoE layer [0] use weighted-ean instead"]


def test_quiet_prints_only_the_result(tiny_fp32, tmp_path):
    """-q: no plan, status or progress line on stderr (calibrating here included); the result on stdout."""
    from reap.core.progress import NOTICES

    res = cli("prune", tiny_fp32, "--out", tmp_path / "random", "--ratio", "0.5", "--method", "random", "-q")
    assert res.exit_code == 0, res.output
    assert res.stderr == "" and res.stdout.startswith("wrote ") and len(res.stdout.splitlines()) == 1, res.output
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n" * 20}) + "\n" for i in range(5)))
    res = cli("prune", tiny_fp32, "--out", tmp_path / "calibrated", "--ratio", "0.25", "--dataset", data, "--device",
              "cpu", "--max-length", "128", "-q")
    assert res.exit_code == 0, res.output
    assert all(line.lower().startswith(NOTICES) for line in res.stderr.splitlines()), res.stderr
    assert len(res.stdout.splitlines()) == 1 and res.stdout.startswith("wrote "), res.stdout
    loud = cli("prune", tiny_fp32, "--out", tmp_path / "loud", "--ratio", "0.25", "--dataset", data, "--device", "cpu",
               "--max-length", "128")
    assert loud.exit_code == 0 and "plan: " in loud.stderr and "pruning " in loud.stderr, loud.output
