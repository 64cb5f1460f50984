"""Hidden-state checkpoints of a calibration run, for ``--resume``: every batch's hidden states after a layer
(and what the layers hand on), written beside the stats file every ``--checkpoint-every`` layers, so that a resumed run
replays at most the layers since the last one; a run resumed with other batches replays from the embeddings."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from reap.core.errors import UserError
from reap.stream.ranks import Dist
from reap.stream.streamer import LayerStreamer

class HiddenCheckpoint:
    """Every rank's hidden states after a layer, beside the stats file (``STATS.hidden/rank{r}-after-{L}/``), so
    that ``--resume`` continues at the next layer with no layer replayed. A checkpoint counts once its ``done``
    file exists; the older one is removed only when every rank has written the newer one."""

    def __init__(self, stats_path: Path, dist: Dist, every: int | None):
        self.root = stats_path.with_name(stats_path.name + ".hidden")
        self.dist, self.every, self.auto = dist, every, every is None
        self.written: list[Path] = []
        self.seconds = 0.0

    def _dir(self, layer: int) -> Path:
        return self.root / f"rank{self.dist.rank}-after-{layer}"

    def latest(self, below: int) -> int | None:
        """The newest layer every rank has a complete checkpoint after, not later than ``below``."""
        mine = [int(p.name.rpartition("-")[2]) for p in self.root.glob(f"rank{self.dist.rank}-after-*")
                if (p / "done").exists()] if self.root.is_dir() else []
        mine = [m for m in mine if m <= below]
        best = max(mine, default=-1)
        if self.dist.world > 1:
            import torch
            import torch.distributed as d

            t = torch.tensor([best], dtype=torch.int64, device="cuda" if d.get_backend() == "nccl" else "cpu")
            d.all_reduce(t, op=d.ReduceOp.MIN)
            best = int(t.item())
        return best if best >= 0 and best in mine else None

    def due(self, layer: int, last: int, layer_seconds: float, nbytes: int) -> bool:
        """Whether to write after ``layer``. Automatically: as often as keeps the writing under ~10% of the compute
        time, the writing estimated at 1 GB/s until one has been timed."""
        if self.every == 0 or layer == last:
            return False
        if self.auto:
            write = self.seconds if self.written else nbytes / 1e9
            self.every = max(1, math.ceil(write / (0.1 * max(layer_seconds, 1e-6))))
        due = (layer + 1) % self.every == 0
        if self.dist.world > 1:  # every rank must decide alike: the writing ends in a barrier
            import torch
            import torch.distributed as d

            flag = torch.tensor([int(due)], dtype=torch.int64,
                                device="cuda" if d.get_backend() == "nccl" else "cpu")
            d.all_reduce(flag, op=d.ReduceOp.MAX)
            due = bool(flag.item())
        return due

    def write(self, streamer: LayerStreamer, layer: int) -> None:
        t0 = time.perf_counter()
        path = self._dir(layer)
        shutil.rmtree(path, ignore_errors=True)
        streamer.store.save(path, len(streamer.batches))
        (path / "meta.json").write_text(json.dumps({"arity": streamer._arity, "batches": [
            list(b.ids.shape) for b in streamer.batches]}))
        (path / "done").write_text("")
        self.dist.barrier()
        for old in self.written:
            shutil.rmtree(old, ignore_errors=True)
        self.written = [path]
        self.seconds = time.perf_counter() - t0

    def matches(self, streamer: LayerStreamer, layer: int) -> bool:
        """Whether the checkpoint after ``layer`` holds this run's batches (on every rank): a run resumed with another
        --batch-tokens (after running out of memory, say) replays the layers instead."""
        meta = json.loads((self._dir(layer) / "meta.json").read_text())
        same = meta["batches"] == [list(b.ids.shape) for b in streamer.batches]
        if self.dist.world > 1:
            import torch
            import torch.distributed as d

            flag = torch.tensor([int(same)], dtype=torch.int64, device="cuda" if d.get_backend() == "nccl" else "cpu")
            d.all_reduce(flag, op=d.ReduceOp.MIN)
            same = bool(flag.item())
        return same

    def restore(self, streamer: LayerStreamer, layer: int) -> None:
        path = self._dir(layer)
        meta = json.loads((path / "meta.json").read_text())
        if meta["batches"] != [list(b.ids.shape) for b in streamer.batches]:
            raise UserError(f"--resume: the hidden states in {path} were made with other batches (a different "
                            "--batch-tokens or data); start fresh with --overwrite")
        streamer.store.restore(path, len(streamer.batches))
        streamer._arity = {int(k): v for k, v in meta["arity"].items()}
        self.written = [path]

    def remove(self) -> None:
        self.dist.barrier()
        if self.dist.rank == 0:
            self.clear()

    def clear(self) -> None:
        """Delete what reap wrote under ``STATS.hidden`` (its ``rank*-after-*`` checkpoints), then the folder if
        that left it empty: a file someone else put there stays, and so does the folder around it."""
        if not self.root.is_dir() or self.root.is_symlink():
            return
        for path in self.root.glob("rank*-after-*"):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
        try:
            self.root.rmdir()
        except OSError:  # not empty: files reap did not write
            pass
