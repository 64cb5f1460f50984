"""``reap calibrate``: every expert's statistics from calibration data streamed through the model.

The calibration sequences go through :class:`reap.stream.LayerStreamer` one decoder layer at a time; each MoE
layer's statistics (float64, :mod:`reap.saliency`) are all-reduced across ranks and written after every layer
(rank 0 only), so ``--resume`` continues at the next layer.

Data parallel: under ``torchrun`` each rank takes every WORLD_SIZE-th sequence, statistics are all-reduced after
each layer (NCCL on GPU, gloo on CPU) and only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from reap import __version__
from reap.arch import derive
from reap.checkpoint import Checkpoint
from reap.errors import UserError
from reap.stream import Dist, EngineOptions, LayerStreamer, peak_memory


# -- calibration -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrateOptions:
    model: str
    data: Any  # reap.data.DataOptions
    out: Path | None = None  # stats file (safetensors); None = keep in memory
    engine: EngineOptions = EngineOptions()
    resume: bool = False
    overwrite: bool = False
    recipe: dict[str, Any] | None = None  # the effective CLI options, recorded in the stats metadata
    # hidden states written beside the stats file every N layers so that --resume replays none (0: never; None:
    # automatically, as often as keeps the writing under ~10% of the compute); kept after the run if asked
    checkpoint_every: int | None = None
    keep_checkpoint: bool = False


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
            shutil.rmtree(self.root, ignore_errors=True)


def _data_meta(data) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(data).items()}


def calibrate(opts: CalibrateOptions, ckpt: Checkpoint | None = None, log=print):
    """Stream the calibration data through the model; return (ExpertStats, summary dict).

    With ``opts.out`` the statistics are written after every layer (rank 0 only), so ``resume`` can pick
    up at the next layer.
    """
    from reap.data import calibration_sequences, load_tokenizer
    from reap.saliency import ExpertStats, LayerAccumulator

    opts = replace(opts, engine=opts.engine.resolved())
    ckpt = ckpt or Checkpoint(opts.model)
    spec = derive(ckpt)
    out = Path(opts.out) if opts.out else None
    meta = {
        "tool_version": __version__,
        "model": str(ckpt.path),
        "family": spec.family,
        "num_layers": spec.num_layers,
        "num_experts": spec.num_experts,
        "top_k": spec.top_k,
        "data": _data_meta(opts.data),
        "dtype": opts.engine.dtype,
    }
    stats = None
    if out is not None and out.exists():
        if opts.resume:
            stats = ExpertStats.load(out)
            mismatch = [k for k in ("model", "num_experts", "num_layers", "data", "dtype") if stats.meta.get(k) != meta[k]]
            if mismatch:
                raise UserError(
                    f"--resume: {out} was made with different {', '.join(mismatch)} "
                    f"({', '.join(f'{k}={stats.meta.get(k)!r}' for k in mismatch)}); rerun with the same options "
                    "or start fresh with --overwrite"
                )
        elif not opts.overwrite:
            raise UserError(f"stats file {out} exists; pass --resume to continue it, --overwrite to replace it, or choose another --out")
    elif opts.resume and out is None:
        raise UserError("--resume needs --out STATS (the stats file to continue)")
    if out is not None and not out.parent.exists():
        raise UserError(f"the folder of --out ({out.parent}) does not exist; create it first")

    dist = Dist.from_env(opts.engine.device)
    streamer = LayerStreamer(ckpt, spec, None, opts.engine, dist)  # layer 0 loads while the data is tokenized
    try:
        tokenizer = load_tokenizer(ckpt.path, trust_remote_code=opts.engine.trust_remote_code)
        sequences = calibration_sequences(opts.data, tokenizer)
        streamer.set_sequences(sequences[dist.rank :: dist.world])
        tokens = dist.sum_int(streamer.tokens, streamer.device)
        meta.update({"samples": len(sequences), "tokens": tokens, "world_size": dist.world})
        if opts.recipe is not None:
            meta["options"] = opts.recipe
        if stats is None:
            stats = ExpertStats(spec.num_layers, spec.num_experts, meta)
        start_layer = 0
        while start_layer in stats.completed:
            start_layer += 1
        hidden = HiddenCheckpoint(out, dist, opts.checkpoint_every) if out is not None else None
        if hidden is not None and not start_layer and dist.rank == 0:
            shutil.rmtree(hidden.root, ignore_errors=True)  # a fresh run: an old run's hidden states are stale
        restored = hidden.latest(start_layer - 1) if hidden is not None and start_layer else None
        if dist.rank == 0:
            from reap.arch import human_bytes

            plan = streamer.plan()
            eta = plan["eta_s"] * (spec.num_layers - start_layer) / spec.num_layers
            log(f"plan: {plan['batches']} batches per rank, hidden states {human_bytes(plan['hidden_bytes'])} per rank "
                f"on {plan['hidden_on']}, largest layer {human_bytes(plan['layer_bytes'])} read per layer; rough ETA "
                + (f"{eta / 60:.1f} min" if eta >= 60 else f"{eta:.0f} s")
                + f" (assuming {plan['assumed_flops'] / 1e12:g} TFLOP/s and 2 GB/s reads)")
            log(f"calibrating {ckpt.path.name}: {len(sequences)} samples, {tokens} tokens, {spec.num_layers} layers x "
                f"{spec.num_experts} experts (top-{spec.top_k}), {streamer.device} {opts.engine.dtype}, "
                f"hidden states on {streamer.store.mode}" + (f", {dist.world} ranks" if dist.world > 1 else "")
                + (f"; resuming at layer {start_layer}" if start_layer else "")
                + (f" from the hidden states after layer {restored}" if restored is not None else "")
                + (f"; each layer read once per node ({streamer.reader.share.world} ranks share it)"
                   if streamer.reader.share is not None else ""))
        t0 = time.perf_counter()
        if restored is not None:
            hidden.restore(streamer, restored)
        else:
            streamer.embed()
        first = restored + 1 if restored is not None else 0
        layer_bar = tqdm(range(first, spec.num_layers), desc="layers", unit="layer", file=sys.stderr,
                         disable=not opts.engine.progress or dist.rank != 0)
        for layer in layer_bar:
            if layer < start_layer:  # replay since the last hidden-state checkpoint: stats are already final
                streamer.run_layer(layer, None, desc=f"replay {layer + 1}/{spec.num_layers}")
                continue
            acc = LayerAccumulator(spec.num_experts, streamer.device)
            streamer.run_layer(layer, acc)
            acc.all_reduce()
            stats.set_layer(layer, acc)
            if out is not None and dist.rank == 0:
                stats.save(out)  # first the statistics, then the hidden states: a kill between replays one layer
            if hidden is not None and hidden.due(layer, spec.num_layers - 1, streamer.stats.layer_seconds[-1],
                                                 streamer.plan()["hidden_bytes"]):
                hidden.write(streamer, layer)
            layer_bar.set_postfix(tok_s=f"{streamer.tokens * dist.world / streamer.stats.layer_seconds[-1]:.0f}")
        layer_bar.close()
        if hidden is not None and not opts.keep_checkpoint:
            hidden.remove()
    finally:
        streamer.close()
    seconds = time.perf_counter() - t0
    ran = spec.num_layers - first  # layers run in this call, replayed ones included
    summary = {"tokens": tokens, "seconds": round(seconds, 3), "layers": spec.num_layers - start_layer,
               "layers_run": ran, "tokens_per_second_per_layer": round(tokens * ran / max(seconds, 1e-9), 1),
               **{k: round(v, 3) for k, v in peak_memory(streamer.device).items()}}
    stats.meta["summary"] = summary
    if out is not None and dist.rank == 0:
        stats.save(out)
    dist.barrier()
    return stats, summary
