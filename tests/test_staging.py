"""The pieces behind safe writing and reading, unit by unit: shard-header validation (reap.model.validate), the output lock,
staging folders and their stale detection, the free-space check and size-checked writes (reap.io.staging), signals and
OS errors (reap.core.errors). End to end they are exercised by tests/test_faults.py."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from reap.core.errors import Terminated, UserError, describe_os_error, signals_as_interrupts
from reap.io.staging import (
    OWNER_NAME,
    OutputLock,
    atomic_directory,
    check_complete,
    check_free_space,
    clean_stale,
    owner_alive,
    owner_record,
    write_text,
)
from reap.io.headers import check_header, span_bytes
from reap.io.outputs import foreign_entries


def _header(**tensors) -> dict:
    return {"__metadata__": {"format": "pt"}, **tensors}


def _t(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize("header, size, needle", [
    (_header(a=_t(), b=_t(offsets=(16, 24))), 24, "unaccounted"),  # a gap
    (_header(a=_t()), 16, "bytes after its last tensor"),  # trailing bytes
    (_header(a=_t(), b=_t(offsets=(4, 12))), 12, "overlaps"),
    (_header(a=_t(offsets=(8, 0))), 8, "reversed"),
    (_header(a=_t(offsets=(0, 4))), 4, "needs 8 bytes"),
    (_header(a=_t(dtype="BF17")), 8, "'BF17'"),
    (_header(a=_t(shape=(2.0,))), 8, "shape"),
    (_header(a=_t(shape=(-2,))), 8, "shape"),
    (_header(a={"dtype": "F32", "shape": [2]}), 8, "data_offsets"),
    (_header(a=_t()), 4, "truncated"),
    ({"__metadata__": {"format": 1}, "a": _t()}, 8, "__metadata__"),
    ([1, 2], 0, "not an object"),
])
def test_check_header_refuses_what_safetensors_refuses(header, size, needle, tmp_path):
    with pytest.raises(UserError, match=needle) as err:
        check_header(tmp_path / "x.safetensors", header, 0, size)
    assert "x.safetensors" in str(err.value) and "\n" not in str(err.value)


def test_check_header_accepts_valid_and_subbyte_dtypes(tmp_path):
    check_header(tmp_path / "x", _header(a=_t(), b=_t("BF16", (3,), (8, 14)), c=_t("F4", (4,), (14, 16))), 0, 16)
    check_header(tmp_path / "x", _header(e=_t("F32", (0, 4), (0, 0))), 0, 0)  # empty tensors are fine
    assert span_bytes("F4", (3,)) is None and span_bytes("F8_E8M0", (5,)) == 5


def test_lock_is_exclusive_and_released(tmp_path):
    out = tmp_path / "out"
    with OutputLock(out) as lock:
        assert lock.path.is_file() and json.loads(lock.path.read_text())["pid"] == os.getpid()
        with pytest.raises(UserError, match="another reap .* is writing --out"):
            OutputLock(out).acquire()  # even from this process: one writer per target
    assert not lock.path.exists()


def test_stale_locks_dead_pid_and_reused_pid_are_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    lock = tmp_path / ".out.lock"
    notes = []
    for record in ({"pid": dead.pid, "host": socket.gethostname()},  # gone
                   {**owner_record(), "proc_start": -5}):  # this pid, but started at another time: a reused id
        lock.write_text(json.dumps(record))
        with OutputLock(out, notes.append):
            pass
        assert not lock.exists()
    assert len(notes) == 2 and all("removed a stale lock" in n for n in notes)


def test_lock_of_another_host_is_respected(tmp_path):
    (tmp_path / ".out.lock").write_text(json.dumps({"pid": 1, "host": "node-17", "since": "09:00", "command": "reap x"}))
    with pytest.raises(UserError, match="on node-17.*delete .*out.lock"):
        OutputLock(tmp_path / "out").acquire()
    assert owner_alive({"pid": 1, "host": "node-17"}) is None


def test_clean_stale_removes_dead_owners_and_reports_the_rest(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "out"
    stale = tmp_path / f".out.incomplete-{dead.pid}-aaaa"
    legacy = tmp_path / ".out.incomplete-deadbeef"  # an older reap's name, no owner record
    alive = tmp_path / ".out.incomplete-1-bbbb"
    far = tmp_path / ".out.incomplete-2-cccc"
    for folder, record in ((stale, {"pid": dead.pid, "host": socket.gethostname()}), (legacy, None),
                           (alive, {"pid": os.getppid(), "host": socket.gethostname()}),
                           (far, {"pid": 2, "host": "elsewhere"})):
        folder.mkdir()
        (folder / "model-00001.safetensors").write_bytes(b"x" * 1000)
        if record:
            (folder / OWNER_NAME).write_text(json.dumps(record))
    notes = []
    removed = clean_stale(target, notes.append)
    assert sorted(removed) == sorted([stale, legacy]) and alive.exists() and far.exists()
    assert sum("left by an interrupted run" in n for n in notes) == 2
    assert any("a running reap" in n for n in notes) and any("another host" in n for n in notes)


def _reap_output(folder: Path, files: dict[str, str], listed: list[str] | None = None) -> Path:
    """A folder as a pruned output leaves it: the files, and a reap report listing them (or ``listed``; None in the
    list's place: a report of a reap before the list)."""
    folder.mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    report = {"tool": "reap", "version": "0", "layers": {}}
    if listed != []:
        report["files"] = sorted({*files, "reap_report.json"}) if listed is None else listed
    (folder / "reap_report.json").write_text(json.dumps(report))
    return folder


def test_atomic_directory_rechecks_the_target_and_keeps_the_old_one_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "t"
    with pytest.raises(UserError, match="appeared while"):
        with atomic_directory(target, overwrite=False) as tmp:
            assert (tmp / OWNER_NAME).is_file()  # the owner record, removed before publishing
            target.mkdir()
            (target / "theirs").write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == ["t"] and [p.name for p in target.iterdir()] == ["theirs"]
    # overwriting replaces only reap's own output: a user's file is refused, nothing deleted, nothing published
    with pytest.raises(UserError, match=r"files reap did not write \(theirs\)"):
        with atomic_directory(target) as tmp:
            (tmp / "mine").write_text("y")
    assert [p.name for p in tmp_path.iterdir()] == ["t"] and [p.name for p in target.iterdir()] == ["theirs"]
    (target / "theirs").unlink()
    _reap_output(target, {"model.safetensors": "w"})
    with atomic_directory(target) as tmp:  # a previous reap output: replaced as a whole, no owner record published
        (tmp / "mine").write_text("y")
    assert [p.name for p in target.iterdir()] == ["mine"]
    assert [p.name for p in tmp_path.iterdir()] == ["t"]  # no .t.old-* left
    _reap_output(target, {"mine": "y"})
    real = os.replace
    calls = []

    def second_fails(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise OSError(errno.EIO, "I/O error", str(b))
        return real(a, b)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(OSError):
        with atomic_directory(target) as tmp:
            (tmp / "new").write_text("z")
    monkeypatch.setattr(os, "replace", real)
    assert sorted(p.name for p in target.iterdir()) == ["mine", "reap_report.json"]  # the previous output back
    assert [p.name for p in tmp_path.iterdir()] == ["t"]


def test_atomic_directory_checks_the_old_output_again_after_moving_it_aside(tmp_path, monkeypatch):
    """A file written into the old output between the last check of --out and the rename (through a process that
    has the folder open) is found in the renamed folder: the old output goes back, nothing is published."""
    target = _reap_output(tmp_path / "t", {"model.safetensors": "w"})
    real = os.replace

    def user_writes_meanwhile(a, b):
        real(a, b)
        if Path(a) == target:  # the old output moved aside: someone still writes into it
            (Path(b) / "notes.txt").write_text("mine")

    monkeypatch.setattr(os, "replace", user_writes_meanwhile)
    with pytest.raises(UserError, match=r"changed while reap was writing it.*\(notes\.txt\)") as err:
        with atomic_directory(target) as tmp:
            (tmp / "new").write_text("z")
    monkeypatch.setattr(os, "replace", real)
    assert "\n" not in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == ["t"]  # back in place, no staging or .t.old-* folder
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors", "notes.txt", "reap_report.json"]
    assert (target / "notes.txt").read_text() == "mine"


def test_foreign_entries_names_what_reap_did_not_write(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert foreign_entries(empty) == []
    user = tmp_path / "user"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("x")
    assert foreign_entries(user) == ["notes.txt", "sub/"]
    # a report that is not reap's (another tool's, or not JSON) makes nothing reap's
    for text in ('{"tool": "other", "layers": {}}', "not json", '["reap"]', '{"tool": "reap"}'):
        (user / "reap_report.json").write_text(text)
        assert foreign_entries(user) == ["notes.txt", "reap_report.json", "sub/"], text
    own = _reap_output(tmp_path / "own", {"config.json": "{}", "model-1.safetensors": "w", "extra/tokenizer.json": "t"})
    assert foreign_entries(own) == []
    (own / "reap_summary.txt").write_text("s")  # `reap report DIR` writes these later: reap's too
    (own / "README.md").write_text("card")
    assert foreign_entries(own) == []
    (own / "extra" / "mine.txt").write_text("x")  # added by the user: in a folder of reap's, named itself
    (own / "sub" / "deep").mkdir(parents=True)  # a folder reap never made, named as a whole
    (own / "eval.json").write_text("{}")
    (own / "link").symlink_to(own / "config.json")  # a link is never reap's
    assert foreign_entries(own) == ["eval.json", "extra/mine.txt", "link", "sub/"]
    # a report of a reap before the files list: fixed names, the index's shards and copies of the recorded source
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text("t")
    old = _reap_output(tmp_path / "old", {"config.json": "{}", "model.safetensors.index.json":
                                          json.dumps({"weight_map": {"a": "model-1.safetensors"}}),
                                          "model-1.safetensors": "w", "tokenizer.json": "t", "notes.txt": "x",
                                          "model-2.safetensors": "w"}, listed=[])
    report = json.loads((old / "reap_report.json").read_text())
    (old / "reap_report.json").write_text(json.dumps({**report, "source": str(src)}))
    assert foreign_entries(old) == ["model-2.safetensors", "notes.txt"]


def test_free_space_and_size_checked_writes(tmp_path, monkeypatch):
    check_free_space(tmp_path, 1, "a test")
    with pytest.raises(UserError, match="needs about .* free"):
        check_free_space(tmp_path, 1 << 60, "a test")
    path = write_text(tmp_path / "a.txt", "héllo")
    assert path.read_bytes() == "héllo".encode()
    (tmp_path / "empty.md").write_text("")
    (tmp_path / "copied.json").write_text("")
    check_complete(tmp_path, {"copied.json": 0, "a.txt": 6, "empty.md": 0})
    with pytest.raises(OSError, match="empty after writing"):
        check_complete(tmp_path, {"copied.json": 0})
    with pytest.raises(OSError, match="copied 6 of 7 bytes"):
        check_complete(tmp_path, {"a.txt": 7, "empty.md": 0, "copied.json": 0})


def test_os_errors_read_as_one_line_with_the_fix():
    assert describe_os_error(OSError(errno.ENOSPC, "No space left on device", "/x/y")) == (
        "No space left on device (/x/y): the disk is full: free space there or choose another place")
    assert "read-only" in describe_os_error(OSError(errno.EROFS, "Read-only file system", "/x"))
    assert "chattr -i" in describe_os_error(PermissionError(errno.EPERM, "Operation not permitted", "/x"))
    assert "check the path" in describe_os_error(OSError(errno.EBADF, "Bad file descriptor"))


def test_sigterm_becomes_an_interrupt_once():
    with pytest.raises(Terminated) as err:
        with signals_as_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
            signal.pthread_sigmask(signal.SIG_BLOCK, [])  # let the handler run
            for _ in range(1000):
                pass
    assert err.value.exit_code == 143 and err.value.name == "SIGTERM" and isinstance(err.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored
