"""The model directory as files: the streaming safetensors writer, the lazy reader, output-directory checks and
the atomic directory."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from reap.io.checkpoint import Checkpoint, TensorInfo, read_header, resolve_model
from reap.io.outputs import check_output_dir
from reap.io.staging import atomic_directory
from reap.io.writer import Entry, other_files, tensor_bytes, write_safetensors
from reap.core.errors import UserError

FP8 = torch.float8_e4m3fn


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {
        "a.bf16": torch.randn(7, 5, generator=gen).to(torch.bfloat16),
        "b.fp8": (torch.randn(130, 129, generator=gen) * 10).to(FP8),
        "b.fp8_scale_inv": torch.rand(2, 2, generator=gen),
        "c.f32": torch.randn(3, generator=gen),
        "d.i64": torch.arange(6).reshape(2, 3),
        "e.scalar": torch.tensor(2.5),
        "f.empty": torch.zeros(0, 4),
    }


def _as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_write_safetensors_roundtrip_with_copies(tmp_path):
    """Fetched and byte-range-copied entries read back identically with safetensors.safe_open."""
    tensors = _tensors()
    src = tmp_path / "src.safetensors"
    save_file(tensors, str(src), metadata={"format": "pt"})  # the reference writer
    with open(src, "rb") as f:  # the byte ranges, from the header parsed here
        (hlen,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(hlen))
    infos = {n: TensorInfo(n, src.name, h["dtype"], tuple(h["shape"]), 8 + hlen + h["data_offsets"][0],
                           8 + hlen + h["data_offsets"][1]) for n, h in header.items() if n != "__metadata__"}
    entries = []
    for name, t in tensors.items():
        data = tensor_bytes(t)
        assert data == _as_bytes(t)
        entries.append(Entry(name, infos[name].dtype, tuple(t.shape), len(data), lambda d=data: d))
        entries.append(Entry.copy_of(infos[name], tmp_path, name="copy." + name))
    out = tmp_path / "out.safetensors"
    size = write_safetensors(out, entries, {"format": "pt", "note": "x"})
    assert size == 2 * sum(len(tensor_bytes(t)) for t in tensors.values())
    assert (out.stat().st_size - size) % 8 == 0  # header padded to 8 bytes
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
        assert set(f.keys()) == set(tensors) | {"copy." + n for n in tensors}
        for name, t in tensors.items():
            for key in (name, "copy." + name):
                got = f.get_tensor(key)
                assert got.dtype == t.dtype and got.shape == t.shape, key
                assert _as_bytes(got) == _as_bytes(t), key


def test_write_safetensors_rejects_wrong_sizes(tmp_path):
    with pytest.raises(ValueError, match="expected 8"):
        write_safetensors(tmp_path / "x.safetensors", [Entry("x", "F32", (2,), 4, lambda: b"\0" * 4)])
    with pytest.raises(ValueError, match="fetched 4 bytes"):
        write_safetensors(tmp_path / "y.safetensors", [Entry("y", "F32", (2,), 8, lambda: b"\0" * 4)])


def test_checkpoint_reads_what_the_index_says(mini_m2_fp8):
    ckpt = Checkpoint(mini_m2_fp8)
    weight_map = json.loads((mini_m2_fp8 / "model.safetensors.index.json").read_text())["weight_map"]
    assert ckpt.shards == list(dict.fromkeys(weight_map.values()))
    assert sorted(ckpt.shards) == [f"model-{i:05d}-of-00009.safetensors" for i in range(7)]
    assert set(ckpt.infos) == set(weight_map)
    name = "model.layers.4.block_sparse_moe.experts.17.w3.weight"
    with safe_open(str(mini_m2_fp8 / weight_map[name]), "pt") as f:
        ref = f.get_tensor(name)
    assert torch.equal(ckpt.tensor(name).view(torch.uint8), ref.view(torch.uint8))
    assert ckpt.total_bytes == json.loads((mini_m2_fp8 / "model.safetensors.index.json").read_text())["metadata"]["total_size"]


def test_single_file_model(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    save_file({"w": torch.ones(2, 2)}, str(tmp_path / "model.safetensors"))
    ckpt = Checkpoint(tmp_path)
    assert ckpt.shards == ["model.safetensors"] and torch.equal(ckpt.tensor("w"), torch.ones(2, 2))


def test_read_header_errors(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(100)}, str(good))
    header, start = read_header(good)
    assert header["w"]["shape"] == [100] and start == good.stat().st_size - 400
    short = tmp_path / "short.safetensors"
    short.write_bytes(good.read_bytes()[:-1])
    with pytest.raises(UserError, match="truncated"):
        read_header(short)
    for blob in (b"", b"\x01\x02", struct.pack("<Q", 10**12) + b"{}", struct.pack("<Q", 4) + b"{{{{"):
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(blob)
        with pytest.raises(UserError, match="not a readable safetensors file"):
            read_header(bad)


def test_resolve_model_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_model(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        resolve_model(tmp_path / "file")
    assert resolve_model(tmp_path) == tmp_path.resolve()


def test_pickle_only_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="safetensors"):
        Checkpoint(tmp_path)


def test_check_output_dir(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    assert check_output_dir(tmp_path / "out", [model], False) == (tmp_path / "out").resolve()
    for bad, needle in ((model, "input model"), (model / "x" / "y", "inside"), (tmp_path, "contains the input")):
        with pytest.raises(UserError, match=needle):
            check_output_dir(bad, [model], True)
    out = tmp_path / "out"
    out.mkdir()
    assert check_output_dir(out, [model], False) == out.resolve()  # empty is fine
    (out / "f").write_text("x")
    with pytest.raises(UserError, match="--overwrite"):
        check_output_dir(out, [model], False)
    with pytest.raises(UserError, match=r"did not write \(f\)"):  # --overwrite replaces only reap's own output
        check_output_dir(out, [model], True)
    (out / "reap_report.json").write_text(json.dumps({"tool": "reap", "layers": {}, "files": ["f", "reap_report.json"]}))
    with pytest.raises(UserError, match="pass --overwrite"):
        check_output_dir(out, [model], False)
    assert check_output_dir(out, [model], True) == out.resolve()


def test_atomic_directory(tmp_path):
    target = tmp_path / "t"
    with atomic_directory(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".t.incomplete-")
        (tmp / "a").write_text("1")
        assert not target.exists()
    assert (target / "a").read_text() == "1"
    (target / "reap_report.json").write_text(json.dumps({"tool": "reap", "layers": {}, "files": ["a", "reap_report.json"]}))
    # a previous reap output: replaced as a whole on success
    with atomic_directory(target) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    # an error or an interrupt removes the temporary folder and leaves the target as it was
    for exc in (RuntimeError("x"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with atomic_directory(target) as tmp:
                (tmp / "c").write_text("3")
                raise exc
        assert [p.name for p in tmp_path.iterdir()] == ["t"]
        assert sorted(p.name for p in target.iterdir()) == ["b"]


def test_other_files_skips_weights_and_vcs(tmp_path):
    for rel in ("tokenizer.json", "LICENSE", "sub/chat_template.jinja", "model-00001-of-00002.safetensors",
                "pytorch_model.bin", "consolidated.pth", ".git/HEAD", "__pycache__/x.pyc", "index.json"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    found = [p.relative_to(tmp_path).as_posix() for p in other_files(tmp_path, {"index.json"})]
    assert found == ["LICENSE", "sub/chat_template.jinja", "tokenizer.json"]


def test_copy_range_large_and_unaligned(tmp_path):
    """Byte-range copies larger than one chunk of copy_file_range / read, at odd offsets."""
    data = os.urandom((3 << 20) + 7)
    src = tmp_path / "blob"
    src.write_bytes(b"\xaa" * 13 + data + b"\xbb" * 5)
    info = TensorInfo("x", "blob", "U8", (len(data),), 13, 13 + len(data))
    write_safetensors(tmp_path / "x.safetensors", [Entry.copy_of(info, tmp_path)])
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.get_tensor("x").numpy().tobytes() == data


def _infos(path) -> dict[str, TensorInfo]:
    """Byte ranges of a safetensors file, from its header parsed here (independent of Checkpoint)."""
    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(hlen))
    return {n: TensorInfo(n, path.name, h["dtype"], tuple(h["shape"]), 8 + hlen + h["data_offsets"][0],
                          8 + hlen + h["data_offsets"][1]) for n, h in header.items() if n != "__metadata__"}


@pytest.mark.parametrize("rows", [[0, 1, 2, 5, 6, 9], [3], [9, 8, 0, 1, 4], list(range(10))])
def test_rows_of_equals_index_select(tmp_path, rows):
    """Rows taken from the stored bytes (router rows, bias entries, fused [E, ...] experts) == torch.index_select,
    for 1-, 2- and 3-D tensors of several dtypes, consecutive rows or not, in any order."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "router": torch.randn(10, 6, generator=g, dtype=torch.float32),
        "bias": torch.randn(10, generator=g).to(torch.bfloat16),
        "fused": torch.randn(10, 4, 3, generator=g).to(FP8),
        "blocks": torch.randint(0, 255, (10, 2, 3, 16), generator=g, dtype=torch.uint8),
    }
    src = tmp_path / "src.safetensors"
    save_file(tensors, str(src))
    infos = _infos(src)
    entries = [Entry.rows_of(infos[n], tmp_path, rows, name="sel." + n) for n in tensors]
    write_safetensors(tmp_path / "out.safetensors", entries)
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        for name, t in tensors.items():
            got, want = f.get_tensor("sel." + name), t.index_select(0, torch.tensor(rows))
            assert got.dtype == want.dtype and got.shape == want.shape
            assert _as_bytes(got) == _as_bytes(want), name
    runs = 1 + sum(1 for a, b in zip(rows, rows[1:]) if b != a + 1)
    assert len(entries[0].source[1]) == runs  # consecutive rows are one byte range
    with pytest.raises(ValueError, match="has 10 rows"):
        Entry.rows_of(infos["router"], tmp_path, [10])


def test_ranges_from_several_files_interleaved(tmp_path):
    """Ranges that continue each other are merged only within one source file: entries alternating between two
    files whose ranges happen to line up still copy the right bytes."""
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    da, db = os.urandom(4096), os.urandom(4096)
    a.write_bytes(da)
    b.write_bytes(db)
    entries = [
        Entry("a0", "U8", (100,), 100, source=(a, ((0, 100),))),
        Entry("b1", "U8", (100,), 100, source=(b, ((100, 100),))),  # continues a0's offsets, other file
        Entry("a2", "U8", (50,), 50, source=(a, ((200, 50),))),
        Entry("a3", "U8", (150,), 150, source=(a, ((250, 100), (1000, 50)))),  # continues a2, then a jump
        Entry("f", "U8", (3,), 3, fetch=lambda: b"xyz"),
        Entry("a4", "U8", (10,), 10, source=(a, ((1050, 10),))),  # continues a3, but after a fetched entry
    ]
    write_safetensors(tmp_path / "out.safetensors", entries)
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        got = {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}
    assert got == {"a0": da[:100], "b1": db[100:200], "a2": da[200:250], "a3": da[250:350] + da[1000:1050],
                   "f": b"xyz", "a4": da[1050:1060]}
    with pytest.raises(ValueError, match="expected"):  # ranges that do not add up to the size
        write_safetensors(tmp_path / "bad.safetensors", [Entry("x", "U8", (4,), 4, source=(a, ((0, 3),)))])


def test_background_sync_flushes_and_reports_failures(tmp_path):
    from reap.io.writer import BackgroundSync

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"x")
    with BackgroundSync() as sync:
        sync.submit_tree(tmp_path)
        sync.wait()  # files and folders can be flushed
        sync.submit(tmp_path / "missing")
        with pytest.raises(UserError, match="flushing the output to disk failed"):
            sync.wait()
        sync.submit(tmp_path / "d" / "f")  # the error was reported once; later work goes on
        sync.wait()
    with BackgroundSync(enabled=False) as off:  # --no-fsync: nothing queued, nothing raised
        off.submit(tmp_path / "missing")
        off.wait()
