"""Hidden states between decoder layers, and the batches they come in.

* :class:`Batch`: right-padded token ids of a few sequences and their lengths (the attention mask);
* :func:`make_batches`: consecutive sequences grouped within a padded-token budget (and, for attention that
  materializes its scores, a B x S x S budget);
* :class:`HiddenStore`: each batch's hidden states (and what else a decoder layer hands the next one) between
  layers, on the compute device, in CPU memory (pinned when computing on a GPU), or in files on disk written and
  read ahead in the background; saved to and restored from hidden-state checkpoints.

Legend: B sequences in a batch, S padded length.
"""

from __future__ import annotations

import concurrent.futures as cf
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

