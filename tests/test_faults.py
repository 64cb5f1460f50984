"""Faults and corrupt inputs (issue 14), one test per row of its table: never publish a bad checkpoint, never a
traceback, never leave staging behind.

Every refusal is checked the same way: exit code 2 (or the signal's 128+N), one line on stderr, no traceback, nothing
published beside the target (no output, no staging folder, no lock), the input untouched. Corrupt inputs are copies
of the tiny generated MiniMax-M2 checkpoint, damaged here. Disk faults run reap in a private mount namespace on a
small tmpfs (full, read-only, immutable) and are skipped, with the reason, where the machine does not allow that.
Signals, kills and concurrent writers run ``tests/reap_faulty.py`` (the CLI with a slow disk injected) in a
subprocess.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from reap.cli import app

pytestmark = pytest.mark.slow  # every fault end to end (subprocesses, tmpfs mounts, signals): ~4 minutes on 2 cores

FAULTY = Path(__file__).with_name("reap_faulty.py")
W1 = "model.layers.0.block_sparse_moe.experts.{e}.w1.weight"
ROUTER = "model.layers.1.block_sparse_moe.gate.weight"


def cli(*args, **kw):
    return CliRunner().invoke(app, [str(a) for a in args], **kw)


def snapshot(path: Path) -> dict:
    if not path.exists():
        return {}
    return {p.relative_to(path).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(path.rglob("*"))}


def one_line(stderr: str, *needles: str) -> str:
    """The run ended with exactly one line `reap: ...` (after whatever it logged before), and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    ours = [line for line in lines if line.startswith("reap: ")]
    assert len(ours) == 1 and lines[-1] == ours[0], stderr
    for needle in needles:
        assert needle in ours[0], (needle, ours[0])
    return ours[0]


def refused(res, *needles: str) -> str:
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert isinstance(res.exception, SystemExit)
    assert res.stdout == ""
    return one_line(res.stderr, *needles)


@pytest.fixture
def model(tiny_fp32, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_fp32, tmp_path / "model"))


def index_of(model: Path) -> dict[str, str]:
    return json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]


def edit_header(model: Path, tensor: str, edit) -> str:
    """Rewrite the header of the shard holding ``tensor`` with ``edit(header)`` (the data bytes stay); its name."""
    shard = index_of(model)[tensor]
    blob = (model / shard).read_bytes()
    (hlen,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + hlen])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    (model / shard).write_bytes(struct.pack("<Q", len(new)) + new + blob[8 + hlen:])
    return shard


def edit_tensors(model: Path, tensor: str, edit) -> str:
    """Rewrite the shard holding ``tensor`` with safetensors after ``edit(tensors)`` (a consistent file); its name."""
    shard = index_of(model)[tensor]
    tensors = load_file(str(model / shard))
    edit(tensors)
    save_file(tensors, str(model / shard), metadata={"format": "pt"})
    return shard


def assert_prune_and_inspect_refuse(model: Path, tmp_path: Path, *needles: str, calibrated: Path | None = None) -> None:
    """prune (random, and calibrated when a dataset is given) and inspect refuse, with the same line; nothing
    published, the input untouched."""
    before, listing = snapshot(model), sorted(p.name for p in tmp_path.iterdir())
    runs = [["prune", model, "--out", tmp_path / "out", "--ratio", "0.25", "--method", "random"], ["inspect", model]]
    if calibrated is not None:
        runs.append(["prune", model, "--out", tmp_path / "out", "--ratio", "0.25", "--dataset", calibrated,
                     "--device", "cpu"])
    lines = {refused(cli(*args), *needles) for args in runs}
    assert len(lines) == 1, lines  # inspect reports the same problem as prune
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # no out, no .out.incomplete-*, no .out.lock
    assert snapshot(model) == before


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("faults-data") / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": f"def g{i}(a):\n    return a + {i}\n" * 6}) + "\n" for i in range(12)))
    return path


# -- corrupt headers ------------------------------------------------------------------------------------------------
def _consecutive(header: dict) -> tuple[str, str]:
    """Two tensors of the same size whose bytes follow each other."""
    entries = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    for (a, na), (b, nb) in zip(entries, entries[1:]):
        if a[1] == b[0] and a[1] - a[0] == b[1] - b[0]:
            return na, nb
    raise AssertionError("no two consecutive tensors of one size")


@pytest.mark.parametrize("how", ["into another", "half"])
def test_overlapping_offsets(model, tmp_path, how):
    first = W1.format(e=3)
    names = {}

    def overlap(header):
        a, b = _consecutive(header)
        start, end = header[a]["data_offsets"]
        shift = (end - start) if how == "into another" else (end - start) // 2
        header[b]["data_offsets"] = [header[b]["data_offsets"][0] - shift, header[b]["data_offsets"][1] - shift]
        names.update(a=a, b=b)

    shard = edit_header(model, first, overlap)
    assert_prune_and_inspect_refuse(model, tmp_path, "overlaps", names["b"], shard)


@pytest.mark.parametrize("how, needle", [("reversed", "reversed data_offsets"), ("short", "needs")])
def test_reversed_or_short_spans(model, tmp_path, how, needle):
    name = W1.format(e=2)

    def damage(header):
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [end, begin] if how == "reversed" else [begin, end - 4]

    shard = edit_header(model, name, damage)
    assert_prune_and_inspect_refuse(model, tmp_path, needle, name, shard)


def test_unknown_dtype(model, tmp_path):
    name = W1.format(e=1)
    shard = edit_header(model, name, lambda h: h[name].update(dtype="BF17"))
    assert_prune_and_inspect_refuse(model, tmp_path, "'BF17'", name, shard)


def test_same_tensor_in_two_shards(model, tmp_path):
    index = index_of(model)
    name = W1.format(e=0)
    other = next(s for s in sorted(set(index.values())) if s != index[name])
    copy = load_file(str(model / index[name]))[name]
    edit_tensors(model, next(n for n, s in index.items() if s == other), lambda t: t.update({name: copy}))
    assert_prune_and_inspect_refuse(model, tmp_path, "two shards", name, other)


# -- expert shapes, expert counts, routers ------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["transposed", "shrunken"])
def test_one_expert_shape_differs(model, tmp_path, how):
    name = W1.format(e=5)
    if how == "transposed":  # the same bytes, the header says [in, out]
        shard = edit_header(model, name, lambda h: h[name].update(shape=h[name]["shape"][::-1]))
    else:  # a consistent file whose tensor lost a row
        shard = edit_tensors(model, name, lambda t: t.update({name: t[name][:-1].clone()}))
    assert_prune_and_inspect_refuse(model, tmp_path, name, shard, "another expert")


def test_every_expert_transposed_does_not_match_the_config(model, tmp_path):
    """All experts alike but not what config.json makes transformers expect: refused before any byte is written."""
    for e in range(16):
        name = W1.format(e=e)
        edit_header(model, name, lambda h, n=name: h[n].update(shape=h[n]["shape"][::-1]))
    assert_prune_and_inspect_refuse(model, tmp_path, "does not match its config.json", "w1.weight")


@pytest.mark.parametrize("value, needle", [(float("nan"), "1 NaN"), (float("inf"), "1 infinite")])
def test_non_finite_router_row(model, tmp_path, texts, value, needle):
    def poison(t):
        t[ROUTER][5, 7] = value

    shard = edit_tensors(model, ROUTER, poison)
    assert_prune_and_inspect_refuse(model, tmp_path, ROUTER, shard, needle, "expert 5", calibrated=texts)
    if value != value:  # NaN: the message does not say Inf, and the other way round
        assert "infinite" not in refused(cli("inspect", model))


@pytest.mark.parametrize("count, needle", [(8, "expected 8 experts"), (17, "expected 17 experts")])
def test_config_expert_count_differs_from_disk(model, tmp_path, count, needle):
    config = json.loads((model / "config.json").read_text())
    config["num_local_experts"] = count
    (model / "config.json").write_text(json.dumps(config))
    assert_prune_and_inspect_refuse(model, tmp_path, needle)


# -- disks: full, read-only, immutable (a private mount namespace with a small tmpfs) -------------------------------
@pytest.fixture(scope="module")
def tmpfs(tmp_path_factory):
    """Runs a shell script in a private mount namespace where MNT is a fresh tmpfs of SIZE KiB (vanishing with it)."""
    probe = tmp_path_factory.mktemp("tmpfs-probe")
    try:
        ok = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                             f"mount -t tmpfs -o size=64k tmpfs {probe} && touch {probe}/x && chattr +i {probe}/x"],
                            capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        pytest.skip("needs `unshare -m` and `mount -t tmpfs` (root, or a user namespace that allows mounts) and "
                    "chattr on tmpfs to make a small, full, read-only or immutable disk")

    def run(size_kb: int, mnt: Path, script: str, env: dict | None = None) -> tuple[int, str, str, dict[str, int]]:
        """(exit code of `script`, its stdout, its stderr, {path under MNT: size} after it)."""
        mnt.mkdir(parents=True, exist_ok=True)
        listing, rc = mnt.parent / f"{mnt.name}.listing", mnt.parent / f"{mnt.name}.rc"
        shell = (f"mount -t tmpfs -o size={size_kb}k tmpfs {mnt} || exit 99\n{script}\necho $? > {rc}\n"
                 f"find {mnt} -mindepth 1 -printf '%P\\t%s\\n' > {listing}\n"
                 f"chattr -R -i {mnt} 2>/dev/null; true")
        res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", shell], capture_output=True,
                             text=True, timeout=300, env={**os.environ, **(env or {})})
        assert res.returncode != 99, res.stderr
        files = dict(line.rsplit("\t", 1) for line in listing.read_text().splitlines() if line)
        return int(rc.read_text()), res.stdout, res.stderr, {k: int(v) for k, v in files.items()}

    return run


def _reap(*args) -> str:
    return shlex.join([sys.executable, str(FAULTY), *map(str, args)])


def test_free_space_is_checked_before_writing(tiny_fp32, tmp_path, tmpfs):
    mnt = tmp_path / "disk"
    rc, out, err, files = tmpfs(512, mnt, _reap("prune", tiny_fp32, "--out", mnt / "out", "--ratio", "0.25",
                                                "--method", "random"))
    assert rc == 2 and out == ""
    one_line(err, "needs about", "free")
    assert files == {}  # not a byte written: no staging folder, no lock


def test_disk_full_while_writing_the_shards(tiny_fp32, tmp_path, tmpfs):
    """The space check passes (another program fills the disk meanwhile): exit 2, one line, nothing published."""
    mnt = tmp_path / "disk"
    before = snapshot(tiny_fp32)
    rc, out, err, files = tmpfs(700, mnt, _reap("prune", tiny_fp32, "--out", mnt / "out", "--ratio", "0.25",
                                                "--method", "random", "-q"), env={"REAP_NO_SPACE_CHECK": "1"})
    assert rc == 2 and out == ""
    one_line(err, "No space left on device", "disk is full", "nothing was published")
    assert files == {}
    assert snapshot(tiny_fp32) == before


def test_shards_fit_but_side_files_do_not(tiny_fp32, tmp_path, tmpfs):
    """Disks a little smaller than the whole output needs (the shards fit): every run either publishes a complete
    output (no empty or short file) or fails with exit 2 and publishes nothing; runs fail on the side files (the card,
    the summary, a picture), which were published empty or truncated before."""
    prune = ["prune", tiny_fp32, "--ratio", "0.25", "--method", "random", "-q"]
    mnt = tmp_path / "big"
    rc, _, err, _ = tmpfs(8192, mnt, f"{_reap(*prune, '--out', mnt / 'out')} && df -k --output=used {mnt} | tail -1 "
                                     f"> {tmp_path / 'used'}")
    assert rc == 0, err
    used = int((tmp_path / "used").read_text())  # KiB the complete output takes on tmpfs
    failed_on = []
    for short in (4, 12, 24, 40, 60, 90):
        mnt = tmp_path / f"disk-{short}"
        rc, out, err, files = tmpfs(used - short, mnt, _reap(*prune, "--out", mnt / "out"),
                                    env={"REAP_NO_SPACE_CHECK": "1"})
        if rc == 0:
            assert {f.split("/")[0] for f in files} == {"out"}, files
            assert all(size > 0 for f, size in files.items() if f != "out"), files
        else:
            assert rc == 2, err
            line = one_line(err, "disk is full", "nothing was published")
            assert files == {}, files
            failed_on.append(line.split("(")[1].split(")")[0].rsplit("/", 1)[-1])
    side = [name for name in failed_on if not name.endswith(".safetensors")]
    assert side, failed_on  # some runs failed on a side file: failing them is the point
    assert any(name.endswith((".png", ".md", ".txt")) for name in side), side


def test_side_file_failures_fail_the_run(tiny_fp32, tmp_path, monkeypatch):
    """Everywhere (no tmpfs needed): a card, summary or picture that cannot be written fails the run, exit 2."""
    import errno

    import reap.report

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "README.md")

    for target in ("write_model_card", "summary_text", "heatmap"):
        with monkeypatch.context() as m:
            m.setattr(reap.report, target, full)
            refused(cli("prune", tiny_fp32, "--out", tmp_path / "out", "--ratio", "0.25", "--method", "random", "-q"),
                    "disk is full", "nothing was published")
        assert list(tmp_path.iterdir()) == []


def test_read_only_and_immutable_targets(tiny_fp32, tmp_path, tmpfs, texts):
    mnt = tmp_path / "disk"
    prune = _reap("prune", tiny_fp32, "--out", mnt / "p" / "out", "--ratio", "0.25", "--method", "random", "-q")
    rc, out, err, files = tmpfs(4096, mnt, f"mkdir {mnt}/p && mount -o remount,ro {mnt} && {prune}")
    assert rc == 2 and out == ""
    one_line(err, "read-only", "choose a writable place")
    assert set(files) == {"p"}
    rc, out, err, files = tmpfs(4096, mnt, f"mkdir {mnt}/p && chattr +i {mnt}/p && {prune}")
    assert rc == 2 and out == ""
    one_line(err, "not permitted", "chattr -i")
    assert set(files) == {"p"}
    # eval --out to a read-only place: refused before the evaluation, in one line
    evaluate = _reap("eval", tiny_fp32, "--dataset", texts, "--out", mnt / "r.json", "--device", "cpu", "-q")
    rc, out, err, files = tmpfs(4096, mnt, f"mount -o remount,ro {mnt} && {evaluate}")
    assert rc == 2 and out == ""
    one_line(err, "cannot be written", "nothing was evaluated")
    assert files == {}


def test_eval_result_is_printed_before_it_is_written(tiny_fp32, tmp_path, texts, monkeypatch):
    import errno

    import reap.evaluate

    def fails(path, result):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(reap.evaluate, "write_json", fails)
    res = cli("eval", tiny_fp32, "--dataset", texts, "--max-tokens", "64", "--seq-len", "32", "--device", "cpu", "-q",
              "--json", "--out", tmp_path / "r.json")
    assert res.exit_code == 2
    assert json.loads(res.stdout)["tokens"] == 64  # the result is not lost
    one_line(res.stderr, "disk is full")


# -- kills, signals, interrupts ----------------------------------------------------------------------------------
def _start(*args, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(FAULTY), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env})


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out waiting for the run to start writing")
        time.sleep(0.05)


def _beside(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def test_kill_9_leftovers_are_removed_and_reported_by_the_next_run(tiny_fp32, tmp_path):
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    for i in range(3):  # each run cleans up what the one before it left, and is killed in turn
        mark = tmp_path / f"mark{i}"
        proc = _start("prune", tiny_fp32, "--out", out, "--ratio", "0.25", "--method", "random", "-q",
                      env={"REAP_SLOW_SHARD": "30", "REAP_MARK": str(mark)})
        _wait_for(mark, proc)
        proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=30)
        left = _beside(out)
        assert sum(n.startswith(".out.incomplete-") for n in left) == 1 and ".out.lock" in left, left
        if i:
            assert "left by an interrupted run" in stderr and "removed a stale lock" in stderr, stderr
    res = subprocess.run([sys.executable, "-m", "reap", "prune", tiny_fp32, "--out", out, "--ratio", "0.25", "--method",
                          "random", "-q"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("left by an interrupted run") == 1 and "removed a stale lock" in res.stderr
    assert _beside(out) == [] and (out / "config.json").is_file()


@pytest.mark.parametrize("sig, code, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGHUP, 129, "SIGHUP")])
def test_termination_signals_clean_up_like_ctrl_c(tiny_fp32, tmp_path, sig, code, name):
    out = tmp_path / "out"
    mark = tmp_path / "mark"
    proc = _start("prune", tiny_fp32, "--out", out, "--ratio", "0.25", "--method", "random", "-q",
                  env={"REAP_SLOW_SHARD": "30", "REAP_MARK": str(mark)})
    _wait_for(mark, proc)
    assert any(n.startswith(".out.incomplete-") for n in _beside(out))
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    one_line(stderr, f"terminated by {name}", "nothing was published")
    assert stdout == "" and not out.exists() and _beside(out) == []


def test_ctrl_c_during_calibrate_keeps_the_stats_for_resume(tiny_fp32, tmp_path, texts):
    from reap.calibrate.stats import ExpertStats

    stats, mark = tmp_path / "s.safetensors", tmp_path / "mark"
    proc = _start("calibrate", tiny_fp32, "--dataset", texts, "--out", stats, "--max-length", "48", "--device", "cpu",
                  "-q", env={"REAP_SLOW_LAYER": "20", "REAP_MARK": str(mark)})
    _wait_for(mark, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    line = one_line(stderr, "interrupted", str(stats), "--resume", "1 finished layer")
    assert "removed" not in line
    assert ExpertStats.load(stats).completed == {0}


def test_resume_of_a_complete_stats_file_is_a_no_op(tiny_fp32, tmp_path, texts):
    stats = tmp_path / "s.safetensors"
    args = ["calibrate", tiny_fp32, "--dataset", texts, "--out", stats, "--max-length", "48", "--device", "cpu", "-q"]
    assert cli(*args).exit_code == 0
    before = (stats.read_bytes(), stats.stat().st_mtime_ns)
    t0 = time.perf_counter()
    res = cli(*[a for a in args if a != "-q"], "--resume", "--json")
    assert res.exit_code == 0, res.output
    assert time.perf_counter() - t0 < 10
    assert "is complete (all 3 layers); nothing to do" in res.stderr
    assert json.loads(res.stdout)["already_complete"] is True
    assert (stats.read_bytes(), stats.stat().st_mtime_ns) == before


# -- out of memory (issue 26): one line with where, how much and the flags that help; the stats file resumable ----
OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB "
       "is free. Process 4242 has 60.00 GiB memory in use. Including non-PyTorch memory, this process has 18.12 GiB "
       "memory in use. Of the allocated memory 17.50 GiB is allocated by PyTorch, and 100.00 MiB is reserved by "
       "PyTorch but unallocated.")


def _raise(err: BaseException):
    def raises(*args, **kwargs):
        raise err

    return raises


def _calibrate(model, texts, stats, *extra):
    return cli("calibrate", model, "--dataset", texts, "--out", stats, "--max-length", "48", "--device", "cpu", "-q",
               *extra)


def test_out_of_memory_in_a_batch_is_one_line_and_the_stats_resume(tiny_fp32, tmp_path, texts, monkeypatch):
    """A CUDA out-of-memory error in layer 1's second batch (simulated on the CPU): exit code 2, one line with the
    layer, the batch, the sizes, --batch-tokens and --offload cpu; the stats file keeps layer 0 and --resume with a
    smaller --batch-tokens finishes it (the hidden states kept after layer 0 were made with other batches: replayed),
    equal to an uninterrupted run."""
    from reap.calibrate.stats import FIELDS, ExpertStats
    from reap.stream.streamer import LayerStreamer

    layer_call = LayerStreamer.layer_call

    def out_of_memory(self, i, layer):
        if layer == 1 and i == 1:
            raise torch.OutOfMemoryError(OOM)
        return layer_call(self, i, layer)

    monkeypatch.setattr(LayerStreamer, "layer_call", out_of_memory)
    stats = tmp_path / "s.safetensors"
    line = refused(_calibrate(tiny_fp32, texts, stats, "--batch-tokens", "200", "--offload", "device"),
                   "out of GPU memory in layer 1, batch 2 of 3 (4 x 48 padded tokens)",
                   "tried to allocate 2.00 GiB with 1.06 GiB free of 79.19 GiB", "other processes holding 60.01 GiB",
                   "--batch-tokens 64 (now 200)", "--offload cpu", f"{stats} keeps 1 finished layer of 3",
                   "--resume", "continue at layer 1")
    assert "Traceback" not in line and ExpertStats.load(stats).completed == {0}
    monkeypatch.setattr(LayerStreamer, "layer_call", layer_call)
    res = _calibrate(tiny_fp32, texts, stats, "--batch-tokens", "64", "--resume")
    assert res.exit_code == 0, res.output
    fresh = tmp_path / "fresh.safetensors"
    assert _calibrate(tiny_fp32, texts, fresh, "--batch-tokens", "64").exit_code == 0
    a, b = ExpertStats.load(stats), ExpertStats.load(fresh)
    assert a.completed == {0, 1, 2}
    for f in FIELDS:  # layer 0 in batches of 4 sequences, 1 and 2 in batches of 1: float32 blocking differs
        torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=1e-5, atol=1e-6)


def test_out_of_memory_elsewhere_says_where(tiny_fp32, tmp_path, texts, monkeypatch):
    """Loading a layer's weights (on the prefetch thread: its error re-raised by the compute thread), the greedy
    search, the embeddings before any layer, the CPU's allocator, and `reap eval`: one line each."""
    import reap.calibrate.greedy_order
    from reap.stream.loader import LayerLoader

    stats = tmp_path / "s.safetensors"
    load_layer = LayerLoader._load_layer

    def loading(self, raw, layer):
        if layer == 2:
            raise torch.OutOfMemoryError(OOM)
        return load_layer(self, raw, layer)

    with monkeypatch.context() as m:
        m.setattr(LayerLoader, "_load_layer", loading)
        refused(_calibrate(tiny_fp32, texts, stats, "--greedy-tokens", "0"), "out of GPU memory loading layer 2's "
                "weights", "--batch-tokens", f"{stats} keeps 2 finished layers of 3", "continue at layer 2")
    with monkeypatch.context() as m:
        m.setattr(reap.calibrate.greedy_order, "greedy_routed_order", _raise(torch.OutOfMemoryError(OOM)))
        refused(_calibrate(tiny_fp32, texts, stats, "--overwrite"), "out of GPU memory in layer 0's greedy search",
                "--greedy-memory 2 (now 4 GiB)", f"no layer was finished, so {stats} was not written")
    load = LayerLoader._load

    def embeddings(self, names, what):
        if what.startswith("the embeddings"):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried "
                               "to allocate 1073741824 bytes.")
        return load(self, names, what)

    with monkeypatch.context() as m:
        m.setattr(LayerLoader, "_load", embeddings)
        refused(_calibrate(tiny_fp32, texts, tmp_path / "t.safetensors"), "out of CPU memory before the first layer "
                "ran (loading the model's embeddings): tried to allocate 1.00 GiB with", "--batch-tokens")
    from reap.stream.streamer import LayerStreamer

    layer_call = LayerStreamer.layer_call
    with monkeypatch.context() as m:
        m.setattr(LayerStreamer, "layer_call", lambda self, i, layer: _raise(torch.OutOfMemoryError(OOM))()
                  if layer == 1 else layer_call(self, i, layer))
        refused(cli("eval", tiny_fp32, "--dataset", texts, "--max-tokens", "64", "--seq-len", "32", "--device", "cpu",
                    "-q", "--offload", "device"), "out of GPU memory in layer 1, batch 1 of 1", "--batch-tokens",
                "--offload cpu", "nothing was written (evaluating tiny-fp32)")


# -- thin data ---------------------------------------------------------------------------------------------------------
def test_thin_calibration_data_warns_and_strict_refuses(tiny_fp32, tmp_path):
    data = tmp_path / "one-token.jsonl"
    data.write_text("".join(json.dumps({"text": c}) + "\n" for c in "abcd"))  # 4 tokens: 16 routed pairs per layer
    res = cli("prune", tiny_fp32, "--out", tmp_path / "out", "--ratio", "0.25", "--dataset", data, "--device", "cpu",
              "-q")
    assert res.exit_code == 0, res.output
    warning = [line for line in res.stderr.splitlines() if line.startswith("warning: thin calibration data")]
    assert warning and "16 routed (token, expert) pairs" in warning[0] and "higher expert id first" in warning[0]
    assert "--strict" in warning[0]
    shutil.rmtree(tmp_path / "out")
    refused(cli("prune", tiny_fp32, "--out", tmp_path / "out", "--ratio", "0.25", "--dataset", data, "--device", "cpu",
                "-q", "--strict"), "thin calibration data", "(--strict)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one-token.jsonl"]


# -- one writer per target -----------------------------------------------------------------------------------------
def test_a_second_writer_of_the_same_out_is_refused(tiny_fp32, tmp_path):
    out, mark = tmp_path / "out", tmp_path / "mark"
    first = _start("prune", tiny_fp32, "--out", out, "--ratio", "0.25", "--method", "random", "-q",
                   env={"REAP_SLOW_SHARD": "1", "REAP_MARK": str(mark)})
    _wait_for(mark, first)
    line = refused(cli("prune", tiny_fp32, "--out", out, "--ratio", "0.25", "--method", "random", "--seed", "9", "-q"),
                   "another reap", f"pid {first.pid}", "is writing --out")
    assert "reap prune" in line  # the other run's command, to tell which one it is
    first.communicate(timeout=300)
    assert first.returncode == 0
    report = json.loads((out / "reap_report.json").read_text())
    assert report["seed"] == 0 and _beside(out) == []  # the first run's output, published once


def test_a_stale_lock_is_taken_over(tiny_fp32, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    (tmp_path / ".out.lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "since": "earlier"}))
    res = cli("prune", tiny_fp32, "--out", out, "--ratio", "0.25", "--method", "random", "-q")
    assert res.exit_code == 0, res.output
    assert "removed a stale lock" in res.stderr and _beside(out) == []


def test_a_target_that_appears_during_the_run_is_not_replaced(tiny_fp32, tmp_path, monkeypatch):
    import reap.rewrite.surgery

    out = tmp_path / "out"
    verify = reap.rewrite.surgery.verify

    def meanwhile(*args, **kwargs):
        out.mkdir()
        (out / "theirs.txt").write_text("written by another program")
        return verify(*args, **kwargs)

    monkeypatch.setattr(reap.rewrite.surgery, "verify", meanwhile)
    refused(cli("prune", tiny_fp32, "--out", out, "--ratio", "0.25", "--method", "random", "-q"), "appeared while",
            "nothing was published")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"] and _beside(out) == []


# -- report --eval, recorded commands ---------------------------------------------------------------------------------
def test_report_eval_is_validated(tiny_fp32, tmp_path, texts):
    out = tmp_path / "pruned"
    assert cli("prune", tiny_fp32, "--out", out, "--ratio", "0.25", "--method", "random", "-q").exit_code == 0
    other = tmp_path / "other.json"
    assert cli("eval", tiny_fp32, "--dataset", texts, "--max-tokens", "64", "--seq-len", "32", "--device", "cpu", "-q",
               "--out", other).exit_code == 0  # the original's own evaluation: another model
    card = (out / "README.md").read_bytes()
    refused(cli("report", out, "--eval", other), "is of", "not of this pruned model")
    for bad in ('{"loss": "low"}', "[1, 2]", '{"original": {"loss": 1.0}}', "{not json"):
        (tmp_path / "bad.json").write_text(bad)
        refused(cli("report", out, "--eval", tmp_path / "bad.json"), "bad.json")
    assert (out / "README.md").read_bytes() == card
    mine = tmp_path / "mine.json"
    assert cli("eval", out, "--dataset", texts, "--baseline", tiny_fp32, "--max-tokens", "64", "--seq-len", "32",
               "--device", "cpu", "-q", "--out", mine).exit_code == 0
    res = cli("report", out, "--eval", mine)
    assert res.exit_code == 0, res.output
    assert "## Evaluation" in (out / "README.md").read_text()


def test_recorded_command_is_shell_quoted(tiny_fp32, tmp_path, monkeypatch):
    out = tmp_path / "my models" / "pruned 'v1'"
    out.parent.mkdir()
    argv = ["reap", "prune", str(tiny_fp32), "--out", str(out), "--ratio", "0.25", "--method", "random", "-q"]
    monkeypatch.setattr(sys, "argv", argv)
    assert cli(*argv[1:]).exit_code == 0
    report = json.loads((out / "reap_report.json").read_text())
    assert shlex.split(report["command"]) == argv
    card = (out / "README.md").read_text()
    assert report["command"] in card
    from reap.report import reproduce_command

    rebuilt = reproduce_command({**report, "command": "python -m pytest"}, out)
    assert shlex.split(rebuilt)[3:5] == ["--out", str(out)]
