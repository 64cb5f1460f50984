"""``--overwrite`` replaces only what reap wrote, end to end through the real CLI (issue 26, item 4).

``reap prune --overwrite`` replaces an existing --out only if it is empty or a previous reap output (a reap report
listing every file in it); a folder with anything else in it (the user's notes, a sub-folder, the current
directory) is refused in one line with exit code 2, nothing written and nothing deleted. ``reap calibrate
--overwrite`` replaces only a reap stats file. The unit-level rule and the re-check at the swap are in
tests/test_staging.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import snapshot
from typer.testing import CliRunner

from reap.cli import app

PRUNE = ["--ratio", "0.3", "--method", "random", "-q"]


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_refused(res, *needles: str) -> str:
    """Exit code 2, one line 'reap: error: ...' on stderr naming each needle, nothing on stdout."""
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert isinstance(res.exception, SystemExit)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reap: error: "), res.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert res.stdout == ""
    return lines[0]


def user_folder(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("my notes")
    (path / "important.txt").write_text("do not lose")
    (path / "sub").mkdir()
    (path / "sub" / "data.csv").write_text("1,2,3")
    return path


def check_output(src: Path, out: Path) -> dict:
    """A valid pruned output: the report's kept experts are the surgery's (checked against the source bytes), its
    ``files`` every file of the folder; no staging, old or lock folder left beside it."""
    from test_prune import check_surgery

    report = json.loads((out / "reap_report.json").read_text())
    check_surgery(src, out, {int(k): v["kept"] for k, v in report["layers"].items()})
    assert report["files"] == sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return report


@pytest.mark.parametrize("where", ["folder", "cwd"])
def test_overwrite_refuses_a_folder_with_user_files(tiny_fp32, tmp_path, monkeypatch, where):
    work = user_folder(tmp_path / "userdir")
    out = work
    if where == "cwd":
        monkeypatch.chdir(work)
        out = Path(".")
    before, siblings = snapshot(work), sorted(p.name for p in tmp_path.iterdir())
    line = assert_refused(cli("prune", tiny_fp32, "--out", out, *PRUNE, "--overwrite"),
                          f"--out {work.resolve()}", "did not write (important.txt, notes.txt, sub/)",
                          "choose another --out or remove them")
    assert ("(the current directory)" in line) == (where == "cwd")
    assert snapshot(work) == before  # nothing deleted, nothing written into it
    assert sorted(p.name for p in tmp_path.iterdir()) == siblings  # no lock, staging or old folder beside it
    # without --overwrite it is refused the same way (and --overwrite would not help)
    assert_refused(cli("prune", tiny_fp32, "--out", out, *PRUNE), "did not write (important.txt, notes.txt, sub/)",
                   "even with --overwrite")
    assert snapshot(work) == before


def test_overwrite_replaces_a_previous_output(tiny_fp32, tmp_path):
    out = tmp_path / "out"
    assert cli("prune", tiny_fp32, "--out", out, *PRUNE, "--seed", "1").exit_code == 0
    first = check_output(tiny_fp32, out)
    assert_refused(cli("prune", tiny_fp32, "--out", out, *PRUNE, "--seed", "2"), "a previous reap output",
                   "pass --overwrite")
    res = cli("prune", tiny_fp32, "--out", out, *PRUNE, "--seed", "2", "--overwrite")
    assert res.exit_code == 0, res.output
    second = check_output(tiny_fp32, out)
    assert second["layers"] != first["layers"]  # the new choice, not the old output left in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # the summary and card `reap report DIR` rewrites are reap's too: still replaceable
    (out / "reap_summary.txt").write_text("rewritten by reap report")
    res = cli("prune", tiny_fp32, "--out", out, *PRUNE, "--seed", "3", "--overwrite")
    assert res.exit_code == 0, res.output
    check_output(tiny_fp32, out)


def test_overwrite_accepts_an_empty_folder(tiny_fp32, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    res = cli("prune", tiny_fp32, "--out", out, *PRUNE, "--overwrite")
    assert res.exit_code == 0, res.output
    check_output(tiny_fp32, out)


def test_overwrite_refuses_a_previous_output_the_user_added_to(tiny_fp32, tmp_path):
    out = tmp_path / "out"
    assert cli("prune", tiny_fp32, "--out", out, *PRUNE).exit_code == 0
    (out / "notes.txt").write_text("my notes on this model")
    (out / "eval").mkdir()
    (out / "eval" / "result.json").write_text("{}")
    before = snapshot(out)
    assert_refused(cli("prune", tiny_fp32, "--out", out, *PRUNE, "--overwrite"), "did not write (eval/, notes.txt)")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # a forged report (not reap's) makes nothing in the folder reap's
    user = user_folder(tmp_path / "forged")
    (user / "reap_report.json").write_text(json.dumps({"tool": "other", "files": ["notes.txt"]}))
    before = snapshot(user)
    assert_refused(cli("prune", tiny_fp32, "--out", user, *PRUNE, "--overwrite"), "notes.txt", "reap_report.json")
    assert snapshot(user) == before


def test_overwrite_replaces_a_previous_output_that_is_the_current_directory(tiny_fp32, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert cli("prune", tiny_fp32, "--out", out, *PRUNE, "--seed", "1").exit_code == 0
    monkeypatch.chdir(out)
    res = cli("prune", tiny_fp32, "--out", ".", *PRUNE, "--seed", "2", "--overwrite")
    assert res.exit_code == 0, res.output
    monkeypatch.chdir(tmp_path)
    check_output(tiny_fp32, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_calibrate_overwrite_replaces_only_a_stats_file(tiny_fp32, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n" * 3}) + "\n" for i in range(4)))
    args = ["--dataset", data, "--max-length", "32", "--samples", "4", "--device", "cpu", "--greedy-tokens", "0", "-q",
            "--overwrite"]
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    folder = user_folder(tmp_path / "userdir")
    other = tmp_path / "model.safetensors"  # a safetensors file, but not reap's statistics
    other.write_bytes((tiny_fp32 / sorted(p.name for p in tiny_fp32.glob("*.safetensors"))[0]).read_bytes())
    before = snapshot(tmp_path)
    for out, needle in ((notes, "is not a reap stats file"), (folder, "is a folder"), (other, "something else")):
        assert_refused(cli("calibrate", tiny_fp32, "--out", out, *args), f"--out {out}", needle)
    assert snapshot(tmp_path) == before  # nothing replaced, nothing written beside them
    # a stats file reap wrote is replaced
    stats = tmp_path / "stats.safetensors"
    for _ in range(2):
        res = cli("calibrate", tiny_fp32, "--out", stats, *args)
        assert res.exit_code == 0, res.output
    from reap.calibrate.stats import ExpertStats

    assert ExpertStats.load(stats).completed


def test_a_file_added_to_the_previous_output_during_the_run_is_kept(tiny_fp32, tmp_path, monkeypatch):
    """The check is made again at the swap: a file the user saves into the old output while the new one is being
    written refuses the swap; the old output stays as it was, with that file, and nothing is published."""
    import reap.rewrite.surgery

    out = tmp_path / "out"
    assert cli("prune", tiny_fp32, "--out", out, *PRUNE, "--seed", "1").exit_code == 0
    before = snapshot(out)
    verify = reap.rewrite.surgery.verify

    def meanwhile(*args, **kwargs):
        (out / "notes.txt").write_text("saved while reap was writing")
        return verify(*args, **kwargs)

    monkeypatch.setattr(reap.rewrite.surgery, "verify", meanwhile)
    assert_refused(cli("prune", tiny_fp32, "--out", out, *PRUNE, "--seed", "2", "--overwrite"),
                   "changed while reap was writing it", "(notes.txt)", "nothing was published")
    after = snapshot(out)
    assert after.pop("notes.txt")[2] == b"saved while reap was writing"
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
