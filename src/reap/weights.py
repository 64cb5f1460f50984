"""A layer's weights, from the shards into transformers' model and back to the meta device.

* :class:`LayerReader`: stored tensors read straight into reusable (pinned) buffers, one read per tensor in file
  order, the page cache dropped behind the reads; with a :class:`reap.ranks.WeightShare`, each rank of a node reads
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
from typing import TYPE_CHECKING

import torch

from reap.checkpoint import Checkpoint
from reap.errors import UserError
from reap.formats import dequantize, group_parts

if TYPE_CHECKING:
    from reap.arch import Layout


class LayerReader:
    """Reads stored tensors straight into a reusable buffer (pinned when the compute device is a GPU), one read per
    tensor in file order, and drops the page-cache pages it read (``posix_fadvise(DONTNEED)``) unless told to keep
    them: no checkpoint file stays mapped and the page cache does not fill with the model, so host memory stays
    bounded by the buffers (two layers in flight) and the hidden states, whatever the model's size.

    A slot's tensors are views into its buffer: they are valid until the slot is read into again."""

    ALIGN = 64  # every tensor starts at a multiple of this in the buffer (any dtype can view it)

    def __init__(self, ckpt: Checkpoint, pin: bool, keep_cache: bool = False, threads: int = 4, share=None):
        """``share``: a :class:`WeightShare` of the ranks on this node: each reads 1/N of every buffer and the ranks
        all-gather the rest (NCCL over NVLink, gloo on the CPU), so the node reads each layer once."""
        from reap.checkpoint import DTYPES

        self.ckpt, self.pin, self.keep_cache, self.share = ckpt, pin, keep_cache, share
        self.dtypes = DTYPES
        self._buffers: dict[object, torch.Tensor] = {}
        self._io = cf.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="reap-read")  # queue depth for NVMe

    def _read_one(self, view, info, offset: int, lo: int = 0, hi: int | None = None) -> None:
        """Bytes [lo, hi) of the buffer that belong to ``info`` (stored at ``offset`` in the buffer)."""
        begin = max(offset, lo)
        end = min(offset + info.nbytes, hi if hi is not None else offset + info.nbytes)
        if begin >= end:
            return
        fd = os.open(self.ckpt.path / info.shard, os.O_RDONLY)
        try:
            done = begin
            while done < end:
                n = os.preadv(fd, [view[done:end]], info.start + done - offset)
                if n <= 0:
                    raise UserError(f"{info.shard} ended early while reading {info.name}; re-download that shard")
                done += n
            if not self.keep_cache and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, info.start + begin - offset, end - begin, os.POSIX_FADV_DONTNEED)
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
        with ``device``, the filled part of the buffer is copied there in one transfer and the views are on it."""
        plan, size = self._layout(names)
        share = self.share
        if share is not None:  # equal chunks for the all-gather
            size = -(-max(size, 1) // (share.world * self.ALIGN)) * share.world * self.ALIGN
        buf = self._buffers.get(slot) if slot is not None else None
        if buf is None or buf.numel() < size:
            buf = torch.empty(max(size, 1), dtype=torch.uint8, pin_memory=self.pin)
            if slot is not None:
                self._buffers[slot] = buf
        view = buf.numpy()
        out: dict[str, torch.Tensor] = {}
        lo, hi = (share.rank * size // share.world, (share.rank + 1) * size // share.world) if share else (0, size)
        for future in [self._io.submit(self._read_one, view, info, offset, lo, hi) for info, offset in plan]:
            future.result()
        base = buf[:size]
        if share is not None:
            base = share.gather(base, lo, hi, device)
        elif device is not None and device.type != "cpu":
            base = base.to(device, non_blocking=True)
        for info, offset in plan:
            out[info.name] = base[offset : offset + info.nbytes].view(self.dtypes[info.dtype]).reshape(info.shape)
        return out


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
