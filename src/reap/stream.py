"""The layer streamer: a model's decoder layers run one at a time, as transformers wrote them.

The model is transformers' own class built from ``config.json`` with every parameter on the meta device
(:func:`reap.arch.build_model`). The text model's own tensors outside the decoder layers (embeddings, final
norm, ...) are loaded once; then, layer by layer, the layer's stored tensors are read from the shards (by a
background thread, one layer ahead), dequantized on the compute device (:mod:`reap.formats`), loaded by
transformers' own loader (its conversion mapping merges per-expert tensors into fused ones), every batch's hidden
states go through the layer, and the layer returns to the meta device.

What a layer is called with is what transformers' base model passes it: for each batch, the base model's own
forward runs with the decoder layers replaced by pass-throughs and stops at the layer in question
(:meth:`LayerStreamer.layer_call`), so masks per layer kind, rotary embeddings, per-layer inputs and hash-routing
token ids are the model's own. The MoE blocks run as transformers wrote them too (routers, shared experts,
gates); only the experts go through reap's implementation (:mod:`reap.moe`), which computes each expert on its
routed tokens and feeds the statistics. Hidden states stay on the GPU when they fit, else in (pinned) CPU
memory, else on disk.

Legend: B sequences in a batch, S padded length, H hidden, T tokens.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from reap.arch import Layout, build_config, build_model, model_class
from reap.checkpoint import Checkpoint
from reap.errors import UserError
from reap.formats import dequantize, group_parts
from reap.moe import ExpertsProbe, use_reap_experts
from reap.options import EngineOptions

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- torch.distributed -------------------------------------------------------------------------------
@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, device: str) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend=backend)
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def sum_int(self, value: int, device: torch.device) -> int:
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t)
        return int(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def resolve_device(device: str, dist: Dist) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
        if device == "cuda":
            device = f"cuda:{dist.local_rank}"
    elif device != "cpu":
        raise UserError(f"--device {device!r} is not supported; use cpu, cuda or cuda:N")
    return torch.device(device)


# -- hidden-state storage ------------------------------------------------------------------------------
class HiddenStore:
    """Per-batch hidden states between layers, on the device, in CPU memory, or in files on disk; plus what else
    a decoder layer returns that the base model hands the next layer (GLM-5's indexer top-k, say: ``extras``).

    On disk, each batch is one file (large sequential writes and reads); a batch is written on a background thread
    while the next one computes, and the next batch is read ahead while this one computes (batches are visited in
    order, every layer)."""

    def __init__(self, mode: str, device: torch.device, workdir: Path | None):
        self.mode, self.device = mode, device
        self._items: dict[int, torch.Tensor] = {}
        self._extras: dict[int, tuple] = {}
        self._tmp = None
        if mode == "disk":
            if workdir is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="reap-hidden-")
                workdir = Path(self._tmp.name)
            self.dir = Path(workdir)
            self.dir.mkdir(parents=True, exist_ok=True)
            self._io = cf.ThreadPoolExecutor(max_workers=2, thread_name_prefix="reap-hidden-io")
            self._writes: dict[int, cf.Future] = {}
            self._reads: dict[int, cf.Future] = {}
            self.count = 0  # batches put so far (the read-ahead wraps around at this count)

    def _file(self, i: int) -> Path:
        return self.dir / f"hidden-{i}.safetensors"

    def _write(self, i: int, h: torch.Tensor) -> None:
        from safetensors.torch import save_file

        save_file({"h": h}, str(self._file(i)))

    def _load(self, i: int) -> torch.Tensor:
        from safetensors.torch import load_file

        write = self._writes.get(i)
        if write is not None:
            write.result()
        return load_file(str(self._file(i)))["h"]

    def put(self, i: int, h: torch.Tensor) -> None:
        if self.mode == "device":
            self._items[i] = h
        elif self.mode == "cpu":
            if self.device.type != "cuda":
                self._items[i] = h
                return
            # one pinned buffer per batch, reused every layer: a single device-to-host copy, no re-pinning;
            # the stream orders it after this layer's reads of the same buffer
            buf = self._items.get(i)
            if buf is None or buf.shape != h.shape or buf.dtype != h.dtype:
                buf = torch.empty(h.shape, dtype=h.dtype, pin_memory=True)
                self._items[i] = buf
            buf.copy_(h, non_blocking=True)
        else:
            host = h.to("cpu").contiguous()  # waits for the device copy; the file is written in the background
            self.count = max(self.count, i + 1)
            previous = self._writes.get(i)
            if previous is not None:
                previous.result()
            self._writes[i] = self._io.submit(self._write, i, host)

    def get(self, i: int) -> torch.Tensor:
        if self.mode == "disk":
            pending = self._reads.pop(i, None)
            h = pending.result() if pending is not None else self._load(i)
            nxt = (i + 1) % self.count if self.count else None
            if nxt is not None and nxt != i and nxt not in self._reads:
                self._reads[nxt] = self._io.submit(self._load, nxt)  # read ahead
            return h.to(self.device)
        return self._items[i].to(self.device, non_blocking=True)

    def put_extras(self, i: int, extras: tuple) -> None:
        """The other outputs of the layer that produced batch i's hidden states (tensors or None)."""
        if self.mode == "device" or not extras:
            self._extras[i] = extras
        elif self.mode == "cpu":
            self._extras[i] = tuple(t.to("cpu") if isinstance(t, torch.Tensor) else t for t in extras)
        else:
            from safetensors.torch import save_file

            tensors = {str(j): t.to("cpu").contiguous() for j, t in enumerate(extras) if isinstance(t, torch.Tensor)}
            save_file(tensors, str(self.dir / f"extras-{i}.safetensors"))
            self._extras[i] = tuple(None if isinstance(t, torch.Tensor) else t for t in extras)

    def get_extras(self, i: int) -> tuple:
        extras = self._extras.get(i, ())
        if self.mode == "disk" and extras:
            from safetensors.torch import load_file

            saved = load_file(str(self.dir / f"extras-{i}.safetensors"))
            extras = tuple(saved[str(j)] if str(j) in saved else t for j, t in enumerate(extras))
        return tuple(t.to(self.device) if isinstance(t, torch.Tensor) else t for t in extras)

    def save(self, path: Path, n: int) -> int:
        """Batches 0..n-1 (hidden states and extras) as safetensors files in ``path`` (a new folder); bytes."""
        from safetensors.torch import save_file

        path.mkdir(parents=True)
        total = 0
        for i in range(n):
            tensors = {"h": self.get(i).to("cpu").contiguous()}
            extras = self.get_extras(i)
            tensors.update({f"x{j}": t.to("cpu").contiguous() for j, t in enumerate(extras) if isinstance(t, torch.Tensor)})
            meta = {"extras": str(len(extras))}
            save_file(tensors, str(path / f"batch-{i}.safetensors"), metadata=meta)
            total += sum(t.numel() * t.element_size() for t in tensors.values())
        return total

    def restore(self, path: Path, n: int) -> None:
        """Batches 0..n-1 as :meth:`save` wrote them."""
        from safetensors import safe_open

        for i in range(n):
            with safe_open(str(path / f"batch-{i}.safetensors"), framework="pt", device="cpu") as f:
                count = int((f.metadata() or {}).get("extras", "0"))
                self.put(i, f.get_tensor("h").to(self.device))
                names = set(f.keys())
                self.put_extras(i, tuple(f.get_tensor(f"x{j}").to(self.device) if f"x{j}" in names else None
                                         for j in range(count)))

    def close(self) -> None:
        self._items.clear()
        self._extras.clear()
        if self.mode == "disk":
            self._io.shutdown(wait=True, cancel_futures=True)
        if self._tmp is not None:
            self._tmp.cleanup()


@dataclass
class Batch:
    ids: torch.Tensor  # [B, S] int64, right-padded
    lengths: list[int]

    @property
    def padded(self) -> bool:
        return min(self.lengths) != self.ids.shape[1]

    def mask(self) -> torch.Tensor:
        """[B, S] 1 for real tokens, 0 for padding."""
        B, S = self.ids.shape
        return (torch.arange(S).unsqueeze(0) < torch.tensor(self.lengths).unsqueeze(1)).long()


def make_batches(sequences: list[list[int]], batch_tokens: int, max_square: int | None = None) -> list[Batch]:
    """Consecutive sequences grouped so that B x S (padded) stays within batch_tokens (at least one each) and, with
    ``max_square``, B x S x S too (attention that materializes its [B, heads, S, S] scores: long sequences get
    batches of their own)."""
    batches, group = [], []
    for seq in sequences:
        width = max(len(seq), *(len(g) for g in group)) if group else len(seq)
        if group and ((len(group) + 1) * width > batch_tokens
                      or (max_square is not None and (len(group) + 1) * width * width > max_square)):
            batches.append(group)
            group = []
        group.append(seq)
    if group:
        batches.append(group)
    out = []
    for group in batches:
        width = max(len(s) for s in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        for row, seq in enumerate(group):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        out.append(Batch(ids, [len(s) for s in group]))
    return out


# -- loading tensors into transformers' model -------------------------------------------------------------
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


class _Stop(Exception):
    """Raised by the pass-through layer that was asked for: its call has been captured."""


@dataclass
class WeightShare:
    """The ranks of one node sharing the reading of each layer: rank r reads bytes [r, r + 1) x size / N of the
    layer's buffer, the ranks all-gather the rest (on the GPU over NCCL on a stream of its own; gloo on the CPU)."""

    group: object  # torch.distributed process group of the node's ranks
    rank: int
    world: int
    stream: object = None  # torch.cuda.Stream for the exchange

    @classmethod
    def for_node(cls, device: torch.device) -> "WeightShare":
        import torch.distributed as dist

        world, local = dist.get_world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
        group, _ = dist.new_subgroups(group_size=local) if local < world else (dist.new_group(), None)
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        return cls(group, dist.get_rank(group), dist.get_world_size(group), stream)

    def gather(self, host: torch.Tensor, lo: int, hi: int, device: torch.device | None) -> torch.Tensor:
        """``host`` [size] with this rank's bytes [lo, hi) filled -> every rank's bytes, on ``device``."""
        import torch.distributed as dist

        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                full = torch.empty(host.numel(), dtype=torch.uint8, device=device)
                dist.all_gather_into_tensor(full, host[lo:hi].to(device, non_blocking=True), group=self.group)
            self.stream.synchronize()
            return full
        chunks = list(host.split(hi - lo))
        dist.all_gather(chunks, host[lo:hi].clone(), group=self.group)
        return host if device is None or device.type == "cpu" else host.to(device, non_blocking=True)


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


# -- the streamer ----------------------------------------------------------------------------------------
@dataclass
class StreamStats:
    tokens: int = 0
    layer_seconds: list[float] = field(default_factory=list)


class LayerStreamer:
    """Runs sequences through the model one decoder layer at a time; see the module docstring."""

    def __init__(self, ckpt: Checkpoint, layout: Layout, sequences: list[list[int]] | None, opts: EngineOptions,
                 dist: Dist | None = None):
        """``sequences`` may come later (:meth:`set_sequences`): layer 0 is read and materialized in the background
        from here on, while the caller tokenizes."""
        opts = opts.resolved()
        self.ckpt, self.layout, self.opts = ckpt, layout, opts
        self.dist = dist or Dist()
        self.device = resolve_device(opts.device, self.dist)
        if opts.dtype not in DTYPES:
            raise UserError(f"--dtype {opts.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        self.dtype = DTYPES[opts.dtype]
        if opts.batch_tokens <= 0:
            raise UserError("--batch-tokens must be a positive number of tokens, e.g. 16384")
        cfg = build_config(ckpt.config)
        self.model = build_model(cfg, model_class(cfg, ckpt.config), self.dtype)
        self.experts = use_reap_experts(self.model)
        self.layers = self.model.get_submodule(layout.layers_path)
        self.text = self.model.get_submodule(layout.layers_path.rpartition(".")[0])
        self.text_path = layout.layers_path.rpartition(".")[0]
        for sub in self.text.modules():  # buffers (rotary frequencies, correction biases...) live on the device
            for name, b in list(sub._buffers.items()):
                if b is not None:
                    sub._buffers[name] = b.to(self.device)
        self._stored = self._stored_by_layer()
        # transformers' loader works in the calling thread (so on the prefetch thread's CUDA stream), not in a pool
        os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
        if opts.exchange not in ("auto", "read", "share"):
            raise UserError(f"--weight-exchange {opts.exchange!r} is not one of auto, read, share")
        share = None
        if self.dist.world > 1 and (opts.exchange == "share" or (opts.exchange == "auto" and self.device.type == "cuda")):
            share = WeightShare.for_node(self.device)
        # without sharing, ranks of one node read the same files: the first read leaves the pages for the others
        self.reader = LayerReader(ckpt, pin=self.device.type == "cuda", share=share,
                                  keep_cache=opts.keep_page_cache or (self.dist.world > 1 and share is None))
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="reap-prefetch")
        self._read_pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="reap-readahead")
        self._pending: dict[int, cf.Future] = {}
        self._reads: dict[int, cf.Future] = {}
        self._arity: dict[int, int] = {}  # layer -> length of the tuple it returns (0: a tensor)
        self._load(self._stored["base"], "the embeddings and final norm")
        self.prefetch(0)
        self.batches: list[Batch] = []
        self.tokens = 0
        self.store: HiddenStore | None = None
        if sequences is not None:
            self.set_sequences(sequences)

    def set_sequences(self, sequences: list[list[int]]) -> None:
        """The calibration (or evaluation) sequences: batches, and where their hidden states live. Where the model's
        attention materializes its scores (eager attention), a batch's [B, heads, S, S] float32 scores stay within
        ~4 GiB."""
        text = self.model.config.get_text_config()
        max_square = None
        if getattr(self.model.config, "_attn_implementation", None) == "eager":
            max_square = (4 << 30) // (4 * max(1, getattr(text, "num_attention_heads", 1) or 1))
        self.batches = make_batches(sequences, self.opts.batch_tokens, max_square)
        self.tokens = sum(sum(b.lengths) for b in self.batches)
        self.store = HiddenStore(self._offload_mode(), self.device, self.opts.workdir)
        self.stats = StreamStats(tokens=self.tokens)

    # -- which stored tensors belong where
    def _stored_by_layer(self) -> dict:
        prefix = self.layout.layers_path + "."
        out: dict = {"base": [], "head": []}
        head = self.model.get_output_embeddings()
        head_names = {f"{self._path_of(head)}.{n}" for n, _ in head.named_parameters()} if head is not None else set()
        for name, role in self.layout.roles.items():
            target = role.model
            if target is None or role.kind == "mtp":
                continue
            if target.startswith(prefix):
                out.setdefault(int(target[len(prefix):].partition(".")[0]), []).append(name)
            elif target.startswith(self.text_path + "."):
                out["base"].append(name)
            elif target in head_names:
                out["head"].append(name)
        return out

    def _path_of(self, module) -> str:
        return next(n for n, m in self.model.named_modules() if m is module)

    # -- placement
    def _offload_mode(self) -> str:
        mode = self.opts.offload
        if mode not in ("auto", "device", "cpu", "disk"):
            raise UserError(f"--offload {mode!r} is not one of auto, device, cpu, disk")
        if mode != "auto":
            return mode
        need = self.tokens * self.layout.hidden_size * torch.finfo(self.dtype).bits // 8
        need += sum(b.ids.numel() - sum(b.lengths) for b in self.batches) * self.layout.hidden_size * 4
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if need < free - 3 * self.layer_bytes() - (8 << 30):
                return "device"
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):  # pragma: no cover
            available = 1 << 40
        return "cpu" if need < available // 2 else "disk"

    def plan(self) -> dict:
        """What the run will hold and roughly take: tokens, batches, hidden-state bytes and where they live, the
        largest layer's weights, and a rough time (2 FLOPs per active parameter and token at an assumed rate, plus
        reading every layer at an assumed 2 GB/s)."""
        from reap.formats import stored_params

        hidden = self.tokens * self.layout.hidden_size * torch.finfo(self.dtype).bits // 8
        active = 0.0  # parameters a token meets in the layers (experts: top-k of E)
        for layer, names in ((k, v) for k, v in self._stored.items() if isinstance(k, int)):
            for name in names:
                info, role = self.ckpt.infos[name], self.layout.roles[name]
                n = stored_params(name, info.dtype, info.numel, self.layout.format)
                active += n * (self.layout.top_k / self.layout.num_experts if role.part == "experts" else 1)
        rate = 250e12 if self.device.type == "cuda" else 0.05e12 * max(1, torch.get_num_threads())
        read = sum(self.ckpt.infos[n].nbytes for k, v in self._stored.items() if isinstance(k, int) for n in v)
        eta = 2 * active * self.tokens / rate + read / 2e9
        return {"tokens": self.tokens, "batches": len(self.batches), "hidden_bytes": hidden, "hidden_on": self.store.mode,
                "layer_bytes": max((sum(self.ckpt.infos[n].nbytes for n in v) for k, v in self._stored.items()
                                    if isinstance(k, int)), default=0), "eta_s": eta, "assumed_flops": rate}

    def layer_bytes(self, layer: int | None = None) -> int:
        """Bytes of one layer's weights in the compute dtype (the largest layer when ``layer`` is None)."""
        sizes = [sum(self.ckpt.infos[n].numel for n in names) * torch.finfo(self.dtype).bits // 8
                 for key, names in self._stored.items() if isinstance(key, int) and (layer is None or key == layer)]
        return max(sizes, default=0)

    # -- reading and materializing a layer (on the prefetch thread, on its own CUDA stream, one layer ahead)
    def prefetch(self, layer: int) -> None:
        """Start preparing layer ``layer``. On a GPU its bytes are read by the read-ahead thread, which reads layer
        after layer back to back into the two buffer slots (a slot is free once its layer's bytes are on the device);
        every read goes through that one thread, so ranks sharing the reading exchange in the same order."""
        if not 0 <= layer < self.layout.num_layers or layer in self._pending:
            return
        if self._side is not None:
            for ahead in (layer, layer + 1):  # slot (layer + 1) % 2 last held layer - 1, already on the device
                if ahead < self.layout.num_layers and ahead not in self._reads and ahead not in self._pending:
                    self._reads[ahead] = self._read_pool.submit(self._read_layer, ahead)
        self._pending[layer] = self._pool.submit(self._prepare, layer)

    def _read_layer(self, layer: int) -> dict[str, torch.Tensor]:
        """Layer ``layer``'s stored tensors in its slot (on the device already when the ranks share the reading)."""
        device = self.device if self.reader.share is not None else None
        return self.reader.read(self._stored.get(layer, []), slot=layer % 2, device=device)

    def _prepare(self, layer: int):
        """Copy layer ``layer`` to the device, dequantize it and load it into transformers' model, all while the
        previous layer computes; returns the model keys still missing and the CUDA event the compute stream waits
        for. On the CPU the layer is also read here."""
        if self._side is None:
            return self._load_raw(self._read_layer(layer), f"layer {layer}"), None
        host = self._reads.pop(layer).result()
        with torch.cuda.stream(self._side):
            raw = {n: t.to(self.device, non_blocking=True) for n, t in host.items()}
            self._side.synchronize()  # the host slot is free again once its bytes are on the device
            missing = self._load_raw(raw, f"layer {layer}")
            event = torch.cuda.Event()
            event.record(self._side)
        return missing, event

    def _materialize(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Stored tensors -> base-name tensors on the device, quantized ones dequantized there; the per-expert
        tensors of one projection are dequantized together (one kernel for the stack, not one per expert)."""
        fmt = self.layout.format
        raw = {n: t.to(self.device, non_blocking=True) for n, t in raw.items()}  # no-op when read to the device
        state, stacks = {}, {}
        for base, parts in group_parts(list(raw), fmt).items():
            if "scale" not in parts:
                state[base] = raw[parts["values"]]
                continue
            role = self.layout.roles.get(parts["values"])
            key = base
            if role is not None and role.kind == "expert" and role.span:
                key = base[: role.span[0]] + "*" + base[role.span[1]:]
            stacks.setdefault(key, []).append((base, parts))
        for key, items in stacks.items():
            shapes = {tuple(raw[p["values"]].shape) for _, p in items} | {("s", *raw[p["scale"]].shape) for _, p in items}
            if len(items) == 1 or len(shapes) != 2:
                for base, parts in items:
                    state[base] = dequantize({k: raw[v] for k, v in parts.items()}, fmt, self.dtype, self.ckpt.config, base)
                continue
            stacked = {part: torch.stack([raw[p[part]] for _, p in items]) for part in items[0][1] if part != "shape"}
            if "shape" in items[0][1]:  # a logical-shape companion (compressed-tensors weight_shape): one per stack
                shapes = {tuple(raw[p["shape"]].tolist()) for _, p in items}
                if len(shapes) != 1:
                    for base, parts in items:
                        state[base] = dequantize({k: raw[v] for k, v in parts.items()}, fmt, self.dtype,
                                                 self.ckpt.config, base)
                    continue
                stacked["shape"] = torch.tensor((len(items), *shapes.pop()))
            for (base, _), t in zip(items, dequantize(stacked, fmt, self.dtype, self.ckpt.config, key).unbind(0)):
                state[base] = t
        return state

    def _load_raw(self, raw: dict[str, torch.Tensor], what: str) -> set[str]:
        return load_into(self.model, self._materialize(raw), self.device, self.dtype, what)

    def _load(self, names: list[str], what: str) -> set[str]:
        """Load tensors kept for the whole run (embeddings, norm, head) from a buffer of their own."""
        return self._load_raw(self.reader.read(names, device=self.device), what)

    def load_layer(self, layer: int) -> torch.nn.Module:
        """Decoder layer ``layer`` on the device (prepared by the prefetch thread; the next one starts there)."""
        self.prefetch(layer)
        missing, event = self._pending.pop(layer).result()
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        self.prefetch(layer + 1)
        prefix = f"{self.layout.layers_path}.{layer}."
        absent = sorted(k for k in missing if k.startswith(prefix))
        if absent:
            raise UserError(f"layer {layer}: the checkpoint has no tensor for transformers' {absent[0]}; a shard is "
                            "missing or the checkpoint does not match its config.json")
        return self.layers[layer]

    def free_layer(self, layer: int) -> None:
        if self.device.type == "cuda":  # its weights may be reused by the next layer's loading on the other stream
            torch.cuda.current_stream(self.device).synchronize()
        to_meta(self.layers[layer])

    # -- what transformers' base model passes each layer
    def _forward_base(self, i: int | Batch, stubs: dict[int, object]):
        """Run the text model's own forward on batch ``i`` (an index, or a batch of its own) with decoder layers j
        replaced by ``stubs[j]``."""
        b = self.batches[i] if isinstance(i, int) else i
        for j, fn in stubs.items():
            self.layers[j].forward = fn
        try:
            mask = b.mask().to(self.device) if b.padded else None
            return self.text(input_ids=b.ids.to(self.device), attention_mask=mask, use_cache=False)
        finally:
            for j in stubs:
                del self.layers[j].forward

    def _passthrough(self, j: int, i: int | None, h: torch.Tensor | None = None):
        """A stand-in for decoder layer j on batch i: returns its input (or ``h``) as the layer would, with what
        else the last layer that ran returned for this batch (the base model may hand it to the next layer)."""
        arity = self._arity.get(j, 0)

        def forward(*args, **kwargs):
            out = h if h is not None else (args[0] if args else kwargs["hidden_states"])
            if not arity:
                return out
            extras = tuple(self.store.get_extras(i))[: arity - 1] if i is not None else ()
            return (out, *extras, *(None,) * (arity - 1 - len(extras)))

        return forward

    def layer_call(self, i: int, layer: int) -> tuple[tuple, dict]:
        """(args, kwargs) of transformers' base model's call of decoder layer ``layer`` for batch ``i``."""
        return self.layer_call_for(i, layer)

    def layer_call_for(self, i: int | Batch, layer: int) -> tuple[tuple, dict]:
        """The same for batch ``i`` or for a batch of its own (an MTP module's shifted tokens)."""
        captured: dict = {}

        def capture(*args, **kwargs):
            captured["call"] = (args, kwargs)
            raise _Stop

        stubs = {j: self._passthrough(j, i if isinstance(i, int) else None) for j in range(layer)}
        stubs[layer] = capture
        try:
            self._forward_base(i, stubs)
        except _Stop:
            return captured["call"]
        raise UserError(f"transformers' {type(self.text).__name__} never called decoder layer {layer}; reap cannot "
                        "stream this model")

    # -- running
    def embed(self) -> None:
        """The hidden states the base model gives layer 0 (embeddings, scaled or expanded as the model does)."""
        with torch.inference_mode():
            for i in range(len(self.batches)):
                args, kwargs = self.layer_call(i, 0)
                self.store.put(i, args[0] if args else kwargs["hidden_states"])

    @torch.inference_mode()
    def run_layer(self, layer: int, accumulator=None, desc: str | None = None) -> None:
        """Run every batch through decoder layer ``layer``; MoE statistics go to ``accumulator``."""
        t0 = time.perf_counter()
        module = self.load_layer(layer)
        probes = []
        moe = self.layout.moe.get(layer)
        sample = hook = None
        if moe is not None:
            experts = module.get_submodule(moe.experts[len(f"{self.layout.layers_path}.{layer}."):])
            experts._reap_probe = ExpertsProbe(accumulator)
            probes.append(experts)
            sample, hook = self.greedy_start(module, moe, experts, layer, accumulator)
        bar = tqdm(total=self.tokens, unit="tok", unit_scale=True, file=sys.stderr, leave=False,
                   desc=desc or f"layer {layer + 1}/{self.layout.num_layers}",
                   disable=not self.opts.progress or self.dist.rank != 0)
        try:
            for i, b in enumerate(self.batches):
                args, kwargs = self.layer_call(i, layer)
                h = self.store.get(i)
                args = (h, *args[1:]) if args else args
                if not args:
                    kwargs = {**kwargs, "hidden_states": h}
                for experts in probes:
                    experts._reap_probe.token_mask = b.mask().reshape(-1).bool().to(self.device) if b.padded else None
                out = module(*args, **kwargs)
                if isinstance(out, tuple):  # (hidden states, what the base model hands the next layer, ...)
                    self._arity[layer] = len(out)
                    self.store.put_extras(i, tuple(out[1:]))
                    out = out[0]
                self.store.put(i, out)
                bar.update(sum(b.lengths))
            if sample is not None:
                hook = self.greedy_finish(module, moe, experts, layer, sample, hook, accumulator)
        finally:
            bar.close()
            if hook is not None:
                hook.remove()
            for experts in probes:
                del experts._reap_probe
            self.free_layer(layer)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats.layer_seconds.append(time.perf_counter() - t0)

    # -- the greedy re-routing order (reap.saliency.greedy_routed_order) on a sample of each MoE layer's input
    def _block_of(self, module, moe, layer: int):
        return module.get_submodule(moe.block[len(f"{self.layout.layers_path}.{layer}."):]) if moe.block != \
            f"{self.layout.layers_path}.{layer}" else module

    def greedy_sample_size(self) -> int:
        """Tokens per layer in the greedy sample (all ranks together): ``greedy_tokens``, fewer where every expert's
        output on them would not fit ``greedy_memory`` GiB."""
        from reap.saliency import greedy_sample_tokens

        elem = torch.empty((), dtype=self.dtype).element_size()
        return greedy_sample_tokens(self.layout.num_experts, self.layout.hidden_size, elem, self.opts.greedy_tokens,
                                    self.opts.greedy_memory * (1 << 30))

    def greedy_start(self, module, moe, experts, layer: int, accumulator):
        """(TokenSample, hook) of the greedy search for this MoE layer (module: its decoder layer), or (None, None)
        when nothing is accumulated or the search is off (``greedy_tokens`` 0)."""
        if accumulator is None or self.opts.greedy_tokens <= 0:
            return None, None
        return self._greedy_sampler(module, moe, experts, layer)

    def greedy_finish(self, module, moe, experts, layer: int, sample, hook, accumulator):
        """After the layer's batches: stop sampling and put the greedy order (or why there is none) on
        ``accumulator``. Returns the hook still to remove (None)."""
        if hook is not None:
            hook.remove()
        if sample is not None:
            accumulator.greedy_order, accumulator.greedy_note = self._greedy(module, moe, experts, layer, sample)
            accumulator.greedy_sample = getattr(self, "_greedy_size", 0)
        return None

    def _greedy_sampler(self, module, moe, experts, layer: int):
        """(TokenSample, hook): a forward pre-hook on the layer's MoE block keeps every ceil(T / S)-th real token of
        its input, in calibration order (T: this rank's tokens, S: its share of the sample)."""
        from reap.saliency import TokenSample

        size = -(-self.greedy_sample_size() // self.dist.world)
        if size <= 0:
            return TokenSample(1), None
        sample = TokenSample(size, stride=max(1, -(-self.tokens // size)))
        block = self._block_of(module, moe, layer)

        def pre(mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            x = x.reshape(-1, x.shape[-1])
            mask = experts._reap_probe.token_mask
            sample.add(x[mask] if mask is not None and mask.numel() == x.shape[0] else x)

        return sample, block.register_forward_pre_hook(pre, with_kwargs=True)

    def _greedy(self, module, moe, experts, layer: int, sample) -> tuple[list[int] | None, str | None]:
        """(removal order, None), or (None, why weighted-ean stands in for this layer)."""
        self._greedy_size = 0
        from reap.moe import RouterDriver, expert_outputs
        from reap.saliency import greedy_routed_order

        fallback = "; weighted-ean (sum of g x ||f||) stands in for greedy-rerouted in this layer"
        spec, E, K = self.layout, self.layout.num_experts, self.layout.top_k
        if spec.n_group > 1:
            return None, f"group-limited routing (n_group {spec.n_group}) is not a plain top-k{fallback}"
        if moe.id_tables:
            return None, f"hash routing (expert-id tables) does not re-route{fallback}"
        if sample.size == 0 and self.dist.world == 1:
            return None, (f"--greedy-memory {self.opts.greedy_memory:g} GiB holds no token's {E} expert outputs"
                          f"{fallback}")
        xs = sample.rows if sample.size else None
        if self.dist.world > 1:  # every rank greedy-searches the same sample (all ranks' tokens): the same order
            import torch.distributed as d

            parts = [None] * self.dist.world
            d.all_gather_object(parts, xs.cpu() if xs is not None else None)
            xs = torch.cat([p.to(self.device) for p in parts if p is not None])
        block = self._block_of(module, moe, layer)
        try:
            driver = RouterDriver(block, experts, moe.tensors, moe.block, K, E)
            ids_k, w_k = driver(xs)
            xe = driver.inputs.reshape(xs.shape[0], -1)  # the experts' own input (a block may project first)
            ids_n, w_n = driver(xs, None, K + 1)
        except (ValueError, RuntimeError, TypeError, KeyError, IndexError) as err:
            return None, f"its router cannot be driven with experts removed ({err}){fallback}"
        member = (ids_n[:, :, None] == ids_k[:, None, :]).any(-1)  # [S, K+1]
        nested = member.sum(1) == K
        if float(nested.float().mean()) < 0.999:
            return None, (f"its top-{K + 1} choice does not contain its top-{K} for {int((~nested).sum())} of "
                          f"{xs.shape[0]} tokens{fallback}")
        def constant(t):  # the same value for every token (up to rounding)
            return bool((t.max() - t.min()) <= 1e-3 * t.abs().mean())

        renorm = constant(w_k.double().sum(1))  # the chosen weights renormalized (times a constant scale, maybe)
        if not renorm:
            _, w_all = driver(xs[:4096], None, E)
            if constant(w_all.double().sum(1)):  # a softmax over all experts, not renormalized over the chosen
                return None, ("its weights are a softmax over all experts, not renormalized over the chosen ones, so "
                              "removing an expert rescales every token's output; the greedy error model assumes "
                              f"renormalized (or independent sigmoid) weights{fallback}")

        def route(removed, rows):
            x = xs[rows.to(xs.device)]
            ids_a, _ = driver(x, removed, K)
            ids_b, w_b = driver(x, removed, K + 1)
            last = (ids_b[:, :, None] != ids_a[:, None, :]).all(-1)  # [S, K+1]: the next choice
            pos = torch.argsort(last.to(torch.int8), dim=1, stable=True)  # the top-k first, the next choice last
            return ids_b.gather(1, pos), w_b.gather(1, pos)

        # every expert's output on the sample [S, E, H] (model dtype), one expert at a time
        S = self._greedy_size = xs.shape[0]
        outputs = None
        grouped = experts._reap_probe.grouped if experts._reap_probe.grouped is not None else False
        try:
            for e in range(E):
                counts = torch.zeros(E, dtype=torch.long, device=xs.device)
                counts[e] = S
                ids = torch.full((S,), e, dtype=torch.long, device=xs.device)
                y = expert_outputs(experts, xe, ids, counts, grouped)
                if outputs is None:
                    outputs = y.new_empty(S, E, y.shape[-1])
                outputs[:, e] = y
        except (RuntimeError, ValueError, TypeError) as err:  # an experts module reap's replay does not fit
            return None, f"its experts could not be run on the sample ({str(err).splitlines()[0]}){fallback}"
        order = greedy_routed_order(route, outputs, K, renormalize=renorm)
        return order, None

    @torch.inference_mode()
    def final_output(self, i: int):
        """The base model's output for batch i: its forward runs with every layer a pass-through, the last one
        giving the stored hidden states, so whatever it does after the last layer (final norm) is its own code."""
        last = self.layout.num_layers - 1
        stubs = {j: self._passthrough(j, i) for j in range(last)}
        stubs[last] = self._passthrough(last, i, self.store.get(i))
        return self._forward_base(i, stubs)

    def run_mtp(self, k: int, accumulator=None) -> None:
        """Multi-token-prediction module k (after the last decoder layer; :mod:`reap.mtp`)."""
        from reap.mtp import MtpRunner

        t0 = time.perf_counter()
        if getattr(self, "_mtp", None) is None:
            self._mtp = MtpRunner(self)
        self._mtp.run(k, accumulator)
        self.stats.layer_seconds.append(time.perf_counter() - t0)

    def load_head(self) -> None:
        """The LM head's tensors (tied to the embeddings where the model says so)."""
        head = self.model.get_output_embeddings()
        if self._stored["head"]:
            self._load(self._stored["head"], "the LM head")
        if head.weight.device.type == "meta":
            if not getattr(self.model.config.get_text_config(), "tie_word_embeddings", False):
                raise UserError(f"{self.ckpt.path} has no LM head tensor and config.json does not tie it to the "
                                "embeddings; the checkpoint is incomplete (re-download its shards)")
            head.weight = self.model.get_input_embeddings().weight

    @torch.inference_mode()
    def logits(self, i: int, output, positions: torch.Tensor) -> torch.Tensor:
        """Batch i's logits [B, P, V] at ``positions``, by the model's own head (its forward with the base model
        answering ``output``: softcapping, scaling and vocabulary cuts are the model's code)."""
        b = self.batches[i]
        self.text.forward = lambda *args, **kwargs: output
        try:
            mask = b.mask().to(self.device) if b.padded else None
            return self.model(input_ids=b.ids.to(self.device), attention_mask=mask, use_cache=False,
                              logits_to_keep=positions.to(self.device)).logits
        finally:
            del self.text.forward

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._read_pool.shutdown(wait=True, cancel_futures=True)
        self.reader.close()
        if self.store is not None:
            self.store.close()
        self.ckpt.close()


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak host RSS and (on CUDA) peak device memory, in GiB."""
    out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)}
    if device.type == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / (1 << 30)
    return out
