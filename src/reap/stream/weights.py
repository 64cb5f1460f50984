"""A layer's weights, from the shards into transformers' model and back to the meta device.

* :class:`LayerReader`: stored tensors read straight into reusable (pinned) buffers (:class:`LayerBytes`), a few
  large reads per layer (adjacent tensors scattered into the buffer by one ``preadv``), the page cache dropped
  behind the reads; with a :class:`reap.stream.ranks.WeightShare`, each rank of a node reads
  its share and the ranks all-gather the rest;
* :func:`materialize`: stored tensors -> base-name tensors on the compute device, quantized ones dequantized there
  (:mod:`reap.formats`), the per-expert tensors of one projection together;
* :func:`load_into`: tensors loaded into the model by transformers' own loader (its conversion mapping and dtype
  plan), every tensor required to land;
* :func:`to_meta`: a module's parameters back on the meta device once its layer has run.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
from typing import TYPE_CHECKING

import torch

from reap.io.checkpoint import Checkpoint
from reap.core.errors import UserError
from reap.formats import dequantize, group_parts

if TYPE_CHECKING:
    from reap.model.arch import Layout


class LayerReader:
    """Reads stored tensors straight into a reusable buffer (pinned when the compute device is a GPU), adjacent ones
    by one read, and drops the page-cache pages it read (``posix_fadvise(DONTNEED)``) unless told to keep
    them: no checkpoint file stays mapped and the page cache does not fill with the model, so host memory stays
    bounded by the buffers (to a GPU: a ring of small pinned chunks; on the CPU: two layers in flight) and the
    hidden states, whatever the model's size.

    A slot's tensors are views into its buffer: they are valid until the slot is read into again."""

    ALIGN = 64  # every tensor starts at a multiple of this in the buffer (any dtype can view it)

    def __init__(self, ckpt: Checkpoint, pin: bool, keep_cache: bool = False, threads: int = 4, share=None):
        """``share``: a :class:`WeightShare` of the ranks on this node: each reads 1/N of every buffer and the ranks
        all-gather the rest (NCCL over NVLink, gloo on the CPU), so the node reads each layer once."""
        from reap.io.checkpoint import DTYPES

        self.ckpt, self.pin, self.keep_cache, self.share = ckpt, pin, keep_cache, share
        self.dtypes = DTYPES
        self._buffers: dict[object, torch.Tensor] = {}
        self._stage_lock = threading.Lock()
        self._io = cf.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="reap-read")  # queue depth for NVMe

    RUN_BYTES = 16 << 20  # one preadv reads at most this much (adjacent tensors of a shard, scattered into the buffer)
    RUN_TENSORS = 512  # and into at most this many buffers (IOV_MAX is 1024 on Linux)

    def _runs(self, plan: list, lo: int, hi: int) -> list[tuple[str, int, list]]:
        """This rank's bytes [lo, hi) of the buffer as (shard, file offset, [buffer ranges]) runs: adjacent on disk,
        read by one ``preadv`` each, so a layer of a thousand tensors is a few dozen reads (and a few dozen
        Python calls on the I/O threads, not one per tensor)."""
        runs: list[tuple[str, int, list]] = []
        size = 0
        for info, offset in plan:
            begin, end = max(offset, lo), min(offset + info.nbytes, hi)
            if begin >= end:
                continue
            pos = info.start + begin - offset
            last = runs[-1] if runs else None
            if (last is not None and last[0] == info.shard and last[1] + size == pos and size < self.RUN_BYTES
                    and len(last[2]) < self.RUN_TENSORS):
                last[2].append((begin, end, info.name))
            else:
                runs.append((info.shard, pos, [(begin, end, info.name)]))
                size = 0
            size += end - begin
        return runs

    def _read_run(self, view, shard: str, pos: int, pieces: list) -> None:
        """One run: the file's bytes from ``pos`` scattered into the buffer ranges ``pieces``."""
        bufs = [memoryview(view[b:e]) for b, e, _ in pieces]
        total = sum(e - b for b, e, _ in pieces)
        fd = os.open(self.ckpt.path / shard, os.O_RDONLY)
        try:
            done = 0
            while done < total:
                n = os.preadv(fd, bufs, pos + done)
                if n <= 0:
                    at, name = done, pieces[-1][2]
                    for b, e, nm in pieces:  # the tensor the file ended in
                        if at < e - b:
                            name = nm
                            break
                        at -= e - b
                    raise UserError(f"{shard} ended early while reading {name}; re-download that shard")
                done += n
                while n and bufs:  # drop what was filled; the first partly filled buffer keeps its rest
                    k = min(n, len(bufs[0]))
                    bufs[0] = bufs[0][k:]
                    n -= k
                    if not len(bufs[0]):
                        bufs.pop(0)
            if not self.keep_cache and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, pos, total, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._io.shutdown(wait=True, cancel_futures=True)

    def _layout(self, names: list[str]) -> tuple[list, int]:
        infos = sorted((self.ckpt.infos[n] for n in names), key=lambda i: (i.shard, i.start))
        out, offset = [], 0
        for info in infos:
            out.append((info, offset))
            offset += -(-info.nbytes // self.ALIGN) * self.ALIGN
        return out, offset

    def read(self, names: list[str], slot: object = None, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """The tensors ``names`` as stored (dtype, shape), read into buffer ``slot`` (None: a buffer of their own);
        with ``device``, the filled part of the buffer is copied there in one transfer and the views are on it (used on
        the caller's current stream: the buffer is not handed out again before that stream's work on it is done)."""
        out = self.read_bytes(names, slot, device)
        if out.base.is_cuda:
            out.base.record_stream(torch.cuda.current_stream(out.base.device))
        return out.views()

    def read_bytes(self, names: list[str], slot: object = None, device: torch.device | None = None) -> LayerBytes:
        """:meth:`read`, the buffer and where each tensor sits in it (:class:`LayerBytes`) rather than the views.
        To a GPU (and not shared among ranks), the bytes go through a few small pinned chunks straight into a
        buffer of their own on the device (``slot`` unused): see :meth:`_read_to_device`."""
        plan, size = self._layout(names)
        places = [(info.name, offset, info.nbytes, self.dtypes[info.dtype], info.shape) for info, offset in plan]
        if self.share is None and self.pin and device is not None and torch.device(device).type == "cuda":
            return LayerBytes(self._read_to_device(plan, size, torch.device(device)), places)
        share = self.share
        if share is not None:  # equal chunks for the all-gather
            size = -(-max(size, 1) // (share.world * self.ALIGN)) * share.world * self.ALIGN
        buf = self._buffers.get(slot) if slot is not None else None
        if buf is None or buf.numel() < size:
            buf = torch.empty(max(size, 1), dtype=torch.uint8, pin_memory=self.pin)
            if slot is not None:
                self._buffers[slot] = buf
        view = buf.numpy()
        lo, hi = (share.rank * size // share.world, (share.rank + 1) * size // share.world) if share else (0, size)
        for future in [self._io.submit(self._read_run, view, *run) for run in self._runs(plan, lo, hi)]:
            future.result()
        base = buf[:size]
        if share is not None:
            base = share.gather(base, lo, hi, device)
        out = LayerBytes(base, places)
        return out.to(device) if share is None and device is not None else out

    STAGE_BYTES = 128 << 20  # one pinned staging chunk
    STAGES = 4  # chunks in the ring: reads fill one while the copies of the others run

    def _read_to_device(self, plan: list, size: int, device: torch.device) -> torch.Tensor:
        """The bytes of ``plan`` in a new device buffer [size]: read chunk by chunk into a ring of pinned chunks
        (:data:`STAGES` x :data:`STAGE_BYTES`), each copied to the device on a stream of its own as soon as it is
        full while the next one is read. Pinned host memory stays at the ring's size whatever the layer's, and
        pinning it once is quick (pinning a whole layer's buffer takes seconds).

        The buffer is allocated on the copy stream, so the caching allocator hands it out again only to a later
        read's copies; its users (dequantization on the prefetch stream, parameters on the compute stream) are
        synchronized before their tensors are dropped (``_prepare``, ``free_layer``)."""
        with self._stage_lock:  # one ring: reads to the device from several threads take turns
            return self._read_staged(plan, size, device)

    def _read_staged(self, plan: list, size: int, device: torch.device) -> torch.Tensor:
        if getattr(self, "_stages", None) is None:
            self._copy = torch.cuda.Stream(device)
            self._stages = [torch.empty(self.STAGE_BYTES, dtype=torch.uint8, pin_memory=True)
                            for _ in range(self.STAGES)]
            self._stage_done: list = [None] * self.STAGES
        with torch.cuda.stream(self._copy):
            out = torch.empty(max(size, 1), dtype=torch.uint8, device=device)
        for k, c0 in enumerate(range(0, size, self.STAGE_BYTES)):
            c1, j = min(size, c0 + self.STAGE_BYTES), k % self.STAGES
            if self._stage_done[j] is not None:
                self._stage_done[j].synchronize()  # its last chunk is on the device: the chunk is free
            stage = self._stages[j]
            view = stage.numpy()
            runs = [(shard, pos, [(b - c0, e - c0, n) for b, e, n in pieces])
                    for shard, pos, pieces in self._runs(plan, c0, c1)]
            for future in [self._io.submit(self._read_run, view, *run) for run in runs]:
                future.result()
            with torch.cuda.stream(self._copy):
                out[c0:c1].copy_(stage[: c1 - c0], non_blocking=True)
                done = torch.cuda.Event()
                done.record(self._copy)
            self._stage_done[j] = done
        self._copy.synchronize()
        return out[:size]


class LayerBytes:
    """Stored tensors in one byte buffer: ``base`` [size] uint8 and, per tensor, (name, offset, bytes, dtype,
    shape). Copied to a device in one transfer; :meth:`views` are the tensors, views into the buffer."""

    def __init__(self, base: torch.Tensor, places: list[tuple]):
        self.base, self.places = base, places

    def to(self, device: torch.device) -> LayerBytes:
        """The same bytes on ``device`` (one asynchronous copy from pinned memory; no copy where they are already)."""
        device = torch.device(device) if device is not None else None
        here = self.base.device
        if device is None or (here.type == device.type and device.index in (None, here.index)):
            return self
        return LayerBytes(self.base.to(device, non_blocking=True), self.places)

    def views(self) -> dict[str, torch.Tensor]:
        return {name: self.base[offset : offset + nbytes].view(dtype).reshape(shape)
                for name, offset, nbytes, dtype, shape in self.places}


def materialize(raw: dict[str, torch.Tensor], layout: Layout, device: torch.device, dtype: torch.dtype,
                config: dict) -> dict[str, torch.Tensor]:
    """Stored tensors -> base-name tensors on the device, quantized ones dequantized there; the per-expert
    tensors of one projection are dequantized together (one kernel for the stack, not one per expert). ``layout``
    gives the format and which tensors are one expert's; ``config`` is config.json, for the dequantizers."""
    fmt = layout.format
    raw = {n: t.to(device, non_blocking=True) for n, t in raw.items()}  # no-op when read to the device
    state, stacks = {}, {}
    for base, parts in group_parts(list(raw), fmt).items():
        if "scale" not in parts:
            state[base] = raw[parts["values"]]
            continue
        role = layout.roles.get(parts["values"])
        key = base
        if role is not None and role.kind == "expert" and role.span:
            key = base[: role.span[0]] + "*" + base[role.span[1]:]
        stacks.setdefault(key, []).append((base, parts))
    for key, items in stacks.items():
        shapes = {tuple(raw[p["values"]].shape) for _, p in items} | {("s", *raw[p["scale"]].shape) for _, p in items}
        if len(items) == 1 or len(shapes) != 2:
            for base, parts in items:
                state[base] = dequantize({k: raw[v] for k, v in parts.items()}, fmt, dtype, config, base)
            continue
        stacked = {part: torch.stack([raw[p[part]] for _, p in items]) for part in items[0][1] if part != "shape"}
        if "shape" in items[0][1]:  # a logical-shape companion (compressed-tensors weight_shape): one per stack
            shapes = {tuple(raw[p["shape"]].tolist()) for _, p in items}
            if len(shapes) != 1:
                for base, parts in items:
                    state[base] = dequantize({k: raw[v] for k, v in parts.items()}, fmt, dtype,
                                             config, base)
                continue
            stacked["shape"] = torch.tensor((len(items), *shapes.pop()))
        for (base, _), t in zip(items, dequantize(stacked, fmt, dtype, config, key).unbind(0)):
            state[base] = t
    return state


def load_into(model, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype, what: str) -> set[str]:
    """Load stored-name tensors into ``model`` with transformers' own loader, as ``from_pretrained`` would in
    ``dtype`` (its conversion mapping renames, merges per-expert tensors into fused ones, transposes; its dtype plan
    keeps routers in float32 where the model says so); returns the model keys still missing. Every tensor must
    land: an unexpected or mis-shaped one is a checkpoint that does not match its config."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        info, _ = convert_and_load_state_dict_in_model(
            model, state, LoadStateDictConfig(weight_mapping=get_model_conversion_mapping(model),
                                              device_map={"": device}, dtype=dtype,
                                              dtype_plan=model._get_dtype_plan(dtype)))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    problems = [f"unexpected {sorted(info.unexpected_keys)[:3]}"] if info.unexpected_keys else []
    if info.mismatched_keys:
        name, got, want = sorted(info.mismatched_keys, key=str)[0]
        problems.append(f"{name} has shape {list(got)} where transformers expects {list(want)}")
    if info.conversion_errors:
        name, err = next(iter(info.conversion_errors.items()))
        problems.append(f"converting {name} failed: {str(err).strip().splitlines()[-1]}")
    if problems:
        raise UserError(f"{what}: the stored tensors do not fit transformers' {type(model).__name__} "
                        f"({'; '.join(problems)}); the checkpoint does not match its config.json")
    return set(info.missing_keys)


def to_meta(module: torch.nn.Module) -> None:
    """Every parameter of ``module`` back on the meta device (buffers stay: they are small and some are computed
    at construction, not stored)."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.device.type != "meta":
                sub._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
