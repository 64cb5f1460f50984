"""Hidden states between decoder layers, and the batches they come in.

* :class:`Batch`: right-padded token ids of a few sequences and their lengths (the attention mask);
* :func:`make_batches`: consecutive sequences grouped within a padded-token budget (and, for attention that
  materializes its scores, a B x S x S budget);
* :class:`HiddenStore`: each batch's hidden states (and what else a decoder layer hands the next one) between
  layers, on the compute device, in CPU memory (pinned when computing on a GPU), or in files on disk written and
  read ahead in the background; saved to and restored from hidden-state checkpoints;
* memory: a batch's rough peak of activations (:func:`batch_peak_bytes`) and the greedy search's, where
  ``--offload auto`` puts the hidden states given the memory free now (:func:`offload_choice`), the ``--batch-tokens``
  that would fit (:func:`suggest_batch_tokens`), and the one line an out-of-memory error becomes
  (:func:`out_of_memory`, :func:`where_out_of_memory`, :func:`describe_out_of_memory`).

Legend: B sequences in a batch, S padded length (in the greedy search's helpers: sampled tokens), K top-k, H hidden,
C expert outputs cached per sampled token.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch


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



# -- memory: what a batch needs, where the hidden states go, what an out-of-memory error means -------------------
#: memory kept free beside the estimates: allocator fragmentation, library workspaces (cuBLAS, attention kernels)
MARGIN = 2 << 30


def batch_peak_bytes(rows: int, width: int, hidden: int, elem: int, *, top_k: int = 1, expert_intermediate: int = 0,
                     dense_intermediate: int = 0, heads: int = 0, eager: bool = False) -> int:
    """A rough peak of the activations a batch of ``rows`` x ``width`` padded tokens holds in a decoder layer, in
    bytes (``elem``: bytes per value of the compute dtype): the layer's input, output, residual and a normed copy,
    plus the largest of attention (queries, keys, values, output; with ``eager`` attention its [B, heads, S, S]
    scores and their softmax), the routed experts (reap's experts: the N = T x top-k (token, expert) pairs' inputs,
    intermediate activations and outputs, then the outputs un-sorted and weighted) and a dense MLP."""
    tokens = rows * width
    base = 4 * tokens * hidden * elem
    attention = 4 * tokens * hidden * elem + (rows * heads * width * width * (4 + 2 * elem) if eager else 0)
    n, inter = tokens * top_k, expert_intermediate
    experts = max(n * (hidden + 3 * inter) * elem, n * (2 * hidden + inter) * elem, n * hidden * (2 * elem + 4))
    dense = 3 * tokens * dense_intermediate * elem
    return base + max(attention, experts, dense)


#: the greedy search's work chunks (expert calls of its cache fill, float64 gathers of its steps): at most this many
#: bytes at once, or an eighth of --greedy-memory where that is less
GREEDY_WORK_BYTES = 512 << 20


def greedy_work_limit(memory_bytes: float) -> int:
    """The bytes the greedy search's work chunks may take at once within a ``memory_bytes`` budget."""
    return int(min(GREEDY_WORK_BYTES, memory_bytes // 8))


def greedy_token_bytes(slots: int, hidden: int, elem: int, top_k: int) -> int:
    """What the greedy search (:mod:`reap.calibrate.greedy`) holds per sampled token: its input [H] (the model's dtype,
    ``elem`` bytes), its C = ``slots`` cached expert outputs [C, H] with their expert ids (int64), its unpruned MoE
    output [H] and its routing (K+1 ids and weights, K error changes) in float64."""
    return slots * (hidden * elem + 8) + hidden * (elem + 8) + (top_k + 1) * 16 + top_k * 8


def greedy_pair_bytes(hidden: int, intermediate: int, elem: int) -> int:
    """The transient bytes per (token, expert) pair that the greedy search computes at once: the pair's input, its up
    (and gate) projection and activation (``intermediate``, the hidden size where unknown), its output and the
    output's un-sorted copy."""
    return (3 * hidden + 3 * (intermediate or hidden)) * elem


def greedy_peak_bytes(sample: int, slots: int, hidden: int, elem: int, top_k: int, intermediate: int = 0,
                      memory_bytes: float = 4 << 30) -> int:
    """The greedy search's peak, what ``--greedy-memory`` (``memory_bytes``) bounds: per token
    (:func:`greedy_token_bytes`) the sample, the cache of expert outputs [S, C, H] and the float64 arrays, plus the
    work chunks (:func:`greedy_work_limit`, less where the sample needs less: its S x C pairs computed at once, its
    [S, K+1, H] float64 gathers with their source)."""
    if sample <= 0:
        return 0
    need = sample * max(slots * greedy_pair_bytes(hidden, intermediate, elem), (top_k + 3) * hidden * (8 + elem))
    return sample * greedy_token_bytes(slots, hidden, elem, top_k) + min(greedy_work_limit(memory_bytes), need)


def offload_choice(hidden_bytes: int, peak_bytes: int, device_room: int | None, host_available: int) -> str:
    """Where ``--offload auto`` keeps the hidden states (``hidden_bytes`` in all): on the device when they, the peak
    of a batch (``peak_bytes``) and :data:`MARGIN` fit in ``device_room`` (the device memory left once the weights
    are placed, measured when the run is planned; None computing on the CPU), else in CPU memory when they take at
    most half of ``host_available``, else on disk."""
    if device_room is not None and hidden_bytes + peak_bytes + MARGIN <= device_room:
        return "device"
    return "cpu" if hidden_bytes < host_available // 2 else "disk"


def suggest_batch_tokens(batch_tokens: int, peak_bytes: int, room_bytes: int) -> int | None:
    """None when a batch's activations (``peak_bytes`` at ``batch_tokens``) fit ``room_bytes``; else the
    ``--batch-tokens`` to pass: the largest power of two at most batch_tokens x room / peak, with MARGIN to spare
    (a batch's peak grows about linearly with its tokens), 0 when not even 16 tokens fit."""
    if peak_bytes + MARGIN <= room_bytes:
        return None
    fit = batch_tokens * (room_bytes - MARGIN) / max(1, peak_bytes)
    if fit < 16:
        return 0
    return 1 << int(math.log2(fit))


def host_available() -> int:
    """Bytes of memory the system can give now without swapping (MemAvailable: free memory and the page cache it
    can drop), or the free pages where /proc/meminfo has no such line."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # pragma: no cover
        return 1 << 40


_UNITS = {"bytes": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def _size(text: str, pattern: str) -> int | None:
    """The size (bytes) that ``pattern``'s group spells in torch's out-of-memory message ('2.00 GiB'), or None."""
    m = re.search(pattern, text)
    if m is None:
        return None
    number, _, unit = m.group(1).partition(" ")
    try:
        return int(float(number) * _UNITS.get(unit, 1))
    except ValueError:
        return None


def out_of_memory(err: BaseException) -> str | None:
    """``"gpu"`` or ``"cpu"`` when ``err`` is an allocation that failed (torch's OutOfMemoryError, a CUDA or cuBLAS
    allocation error, the CPU allocator's 'not enough memory'), else None."""
    if isinstance(err, torch.OutOfMemoryError):
        return "gpu"
    if not isinstance(err, RuntimeError):
        return None
    text = str(err)
    if "CUDA out of memory" in text or "CUDA error: out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text:
        return "gpu"
    if "DefaultCPUAllocator: not enough memory" in text or "DefaultCPUAllocator: can't allocate memory" in text:
        return "cpu"
    return None


def where_out_of_memory(err: BaseException) -> dict:
    """Where in reap's code an out-of-memory error was raised, from its traceback (on a worker thread too: a
    future's result re-raises the worker's frames): ``layer`` and ``batch`` (run_layer's), ``phase`` ("loading" the
    layer's weights, "greedy" search, "loss" of an evaluation, else "forward")."""
    out: dict = {"phase": "forward"}
    tb = err.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        name, local = frame.f_code.co_name, frame.f_locals
        if name == "run_layer" and isinstance(local.get("layer"), int):
            out["layer"] = local["layer"]
            if isinstance(local.get("i"), int):
                out["batch"] = local["i"]
        elif name in ("load_layer", "_prepare", "_read_layer", "_load_layer") or (
                name == "_load" and frame.f_code.co_filename.endswith("loader.py")):
            out["phase"] = "loading"
            if isinstance(local.get("layer"), int):
                out.setdefault("layer", local["layer"])
        elif name == "_greedy":  # reap.calibrate.greedy.GreedySearch._greedy
            out["phase"] = "greedy"
        elif name in ("summed_loss", "logits", "final_output", "load_head"):
            out["phase"] = "loss"
        tb = tb.tb_next
    return out


def describe_out_of_memory(err: BaseException, *, kind: str, what: str, batch_tokens: int, hidden_on: str,
                           batches: list[Batch] | None = None, greedy_memory: float | None = None,
                           device: torch.device | None = None, kept: str = "") -> str:
    """One line for an out-of-memory error: where (``what``: 'layer 7', 'batch 3 of 12'), how much was asked and
    free (from torch's message, else measured now), and what to pass instead; ``kept``: what the run kept (its
    stats file, for ``--resume``)."""
    text = " ".join(str(err).split())
    asked = _size(text, r"Tried to allocate ([\d.]+ \w+)") or _size(text, r"you tried to allocate (\d+) bytes")
    free = _size(text, r"of which ([\d.]+ \w+) is free")
    total = _size(text, r"total capacity of ([\d.]+ \w+)")
    mine = _size(text, r"this process has ([\d.]+ \w+) memory in use")
    if kind == "gpu" and free is None and device is not None and device.type == "cuda":
        try:
            free, total = torch.cuda.mem_get_info(device)
        except RuntimeError:  # pragma: no cover - the device is gone
            pass
    if kind == "cpu" and free is None:
        free = host_available()
    from reap.core.humanize import human_bytes

    memory = "GPU" if kind == "gpu" else "CPU"
    figures = ""
    said = []
    if asked is not None:
        said.append(f"tried to allocate {human_bytes(asked)}")
    if free is not None:
        said.append(f"{human_bytes(free)} free" + (f" of {human_bytes(total)}" if total else ""))
    figures = (": " + " with ".join(said)) if said else ""
    if total and free is not None and mine is not None and total - free - mine > (1 << 30):
        figures += (f", other processes holding {human_bytes(total - free - mine)} (nvidia-smi shows them: stop "
                    "them or pick another GPU with CUDA_VISIBLE_DEVICES)")
    largest = max((b.ids.numel() for b in batches or []), default=batch_tokens)
    base = min(batch_tokens, largest)
    smaller = 1 << int(math.log2(base * 0.6)) if base >= 2 else 0  # a power of two, at least 40% fewer tokens
    longest = max((b.ids.shape[1] for b in batches or []), default=0)
    fixes = []
    if greedy_memory is not None:
        fixes.append(f"--greedy-memory {max(0.25, greedy_memory / 2):g} (now {greedy_memory:g} GiB)")
    if smaller:
        fixes.append(f"--batch-tokens {smaller} (now {batch_tokens})")
    if longest > max(1, smaller):
        fixes.append(f"--max-length {max(1, longest // 2)} (a sequence of {longest} tokens is a batch of its own)")
    if kind == "gpu" and hidden_on == "device":
        fixes.append("--offload cpu (the hidden states in CPU memory instead of on the GPU)")
    if kind == "cpu" and hidden_on == "cpu":
        fixes.append("--offload disk (the hidden states in files)")
    fix = ("pass " + ", or ".join(fixes)) if fixes else f"free {memory} memory"
    return f"out of {memory} memory {what}{figures}; {fix}" + (f"; {kept}" if kept else "")
