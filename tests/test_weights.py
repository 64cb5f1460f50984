"""A layer's bytes: LayerReader's coalesced reads against safetensors' own reader.

Every tensor LayerReader reads (adjacent tensors scattered into the buffer by one ``preadv``) is compared byte for
byte with what ``safetensors.safe_open`` returns for it, with reads forced into many small runs, and with the
buffer split among ranks (each rank's part read alone); a shard cut short is a one-line error naming it.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors import safe_open

from reap.io.checkpoint import Checkpoint
from reap.core.errors import UserError
from reap.stream.weights import LayerReader


def _reference(path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _with(monkeypatch, path, **sizes) -> tuple[Checkpoint, dict[str, torch.Tensor]]:
    """The checkpoint and safetensors' own tensors of it, with LayerReader's sizes (RUN_BYTES...) set."""
    for name, value in sizes.items():
        monkeypatch.setattr(LayerReader, name, value)
    return Checkpoint(path), _reference(path)


@pytest.mark.parametrize("run_bytes, run_tensors", [(64 << 20, 512), (1000, 3), (1, 1)])
def test_every_tensor_equals_safetensors(tiny_fp8, run_bytes, run_tensors, monkeypatch):
    ckpt, want = _with(monkeypatch, tiny_fp8, RUN_BYTES=run_bytes, RUN_TENSORS=run_tensors)
    assert len({i.shard for i in ckpt.infos.values()}) > 2  # several shards
    reader = LayerReader(ckpt, pin=False)
    try:
        names = sorted(ckpt.infos)
        got = {k: _as_bytes(v) for k, v in reader.read(names, slot=0).items()}
        shapes = {k: (v.dtype, v.shape) for k, v in reader.read(names, slot=0).items()}
        runs = reader._runs(reader._layout(names)[0], 0, 1 << 62)
        assert len(runs) < len(names) if run_tensors > 1 else len(runs) == len(names)
        again = reader.read(names[::3], slot=0)  # the slot reused for a smaller set (got's views are stale now)
    finally:
        reader.close()
    assert set(got) == set(want)
    for name, t in want.items():
        assert shapes[name] == (t.dtype, t.shape), name
        assert got[name] == _as_bytes(t), name
    for name in names[::3]:
        assert _as_bytes(again[name]) == _as_bytes(want[name]), name


def test_ranks_parts_read_alone_make_the_whole_buffer(tiny_fp8, monkeypatch):
    """What a rank reads of a shared layer: its byte range [lo, hi) of the buffer, cut anywhere (inside tensors
    and padding); the parts of all ranks together are the whole buffer, and nothing outside a part is touched."""
    monkeypatch.setattr(LayerReader, "RUN_BYTES", 4096)
    ckpt = Checkpoint(tiny_fp8)
    reader = LayerReader(ckpt, pin=False)
    try:
        names = sorted(ckpt.infos)
        plan, size = reader._layout(names)
        whole = torch.zeros(size, dtype=torch.uint8)
        for run in reader._runs(plan, 0, size):
            reader._read_run(whole.numpy(), *run)
        for world in (2, 3, 7):
            joined = torch.zeros(size, dtype=torch.uint8)
            for rank in range(world):
                lo, hi = rank * size // world, (rank + 1) * size // world
                part = torch.full((size,), 7, dtype=torch.uint8)
                for run in reader._runs(plan, lo, hi):
                    reader._read_run(part.numpy(), *run)
                assert bool((part[:lo] == 7).all()) and bool((part[hi:] == 7).all())
                joined[lo:hi] = part[lo:hi]
            # padding between tensors is never read: compare the tensors' bytes only
            for info, offset in plan:
                assert torch.equal(joined[offset:offset + info.nbytes], whole[offset:offset + info.nbytes]), info.name
    finally:
        reader.close()


def test_a_shard_cut_short_is_a_one_line_error(tiny_fp8, tmp_path):
    src = tmp_path / "m"
    shutil.copytree(tiny_fp8, src)
    ckpt = Checkpoint(src)
    last = max(ckpt.infos.values(), key=lambda i: (i.shard, i.start))  # the last tensor of the last shard
    path = src / last.shard
    path.write_bytes(path.read_bytes()[: -max(1, last.nbytes // 2)])
    reader = LayerReader(ckpt, pin=False)
    try:
        with pytest.raises(UserError) as err:
            reader.read([n for n, i in ckpt.infos.items() if i.shard == last.shard])
    finally:
        reader.close()
    msg = str(err.value)
    assert "\n" not in msg and last.shard in msg and last.name in msg and "re-download" in msg


def test_bytes_move_to_a_device_in_one_piece(tiny_fp8):
    ckpt = Checkpoint(tiny_fp8)
    reader = LayerReader(ckpt, pin=False)
    try:
        names = sorted(ckpt.infos)[:5]
        raw = reader.read_bytes(names)
    finally:
        reader.close()
    assert raw.to(torch.device("cpu")) is raw  # already there: no copy
    views = raw.views()
    assert all(v.untyped_storage().data_ptr() == raw.base.untyped_storage().data_ptr() for v in views.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="reading to a GPU through pinned chunks needs CUDA")
@pytest.mark.parametrize("stage_bytes, stages", [(128 << 20, 4), (1000, 2), (4096, 1)])
def test_reads_to_a_gpu_through_pinned_chunks_equal_safetensors(tiny_fp8, stage_bytes, stages, monkeypatch):
    ckpt, want = _with(monkeypatch, tiny_fp8, STAGE_BYTES=stage_bytes, STAGES=stages)
    reader = LayerReader(ckpt, pin=True)
    try:
        names = sorted(ckpt.infos)
        first = reader.read_bytes(names[::2], device=torch.device("cuda"))
        second = reader.read_bytes(names[1::2], device=torch.device("cuda"))  # the ring reused: first stays intact
        got = {**first.views(), **second.views()}
        assert first.base.device.type == "cuda" and len(reader._stages) == stages
    finally:
        reader.close()
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert _as_bytes(got[name].cpu()) == _as_bytes(t), name
