"""``reap calibrate``: every expert's statistics from calibration data streamed through the model.

The calibration sequences go through :class:`reap.stream.LayerStreamer` one decoder layer at a time; each MoE
layer's statistics (float64, :mod:`reap.saliency`) are all-reduced across ranks and written after every layer
(rank 0 only), so ``--resume`` continues at the next layer.

Data parallel: under ``torchrun`` each rank takes every WORLD_SIZE-th sequence, statistics are all-reduced after
each layer (NCCL on GPU, gloo on CPU) and only rank 0 writes.
"""

from __future__ import annotations

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
    tokenizer = load_tokenizer(ckpt.path, trust_remote_code=opts.engine.trust_remote_code)
    sequences = calibration_sequences(opts.data, tokenizer)
    mine = sequences[dist.rank :: dist.world]
    streamer = LayerStreamer(ckpt, spec, mine, opts.engine, dist)
    tokens = dist.sum_int(streamer.tokens, streamer.device)
    meta.update({"samples": len(sequences), "tokens": tokens, "world_size": dist.world})
    if opts.recipe is not None:
        meta["options"] = opts.recipe
    if stats is None:
        stats = ExpertStats(spec.num_layers, spec.num_experts, meta)
    start_layer = 0
    while start_layer in stats.completed:
        start_layer += 1
    if dist.rank == 0:
        log(f"calibrating {ckpt.path.name}: {len(sequences)} samples, {tokens} tokens, {spec.num_layers} layers x "
            f"{spec.num_experts} experts (top-{spec.top_k}), {streamer.device} {opts.engine.dtype}, "
            f"hidden states on {streamer.store.mode}" + (f", {dist.world} ranks" if dist.world > 1 else "")
            + (f"; resuming at layer {start_layer}" if start_layer else ""))
    t0 = time.perf_counter()
    try:
        streamer.prefetch(0)
        streamer.embed()
        layer_bar = tqdm(range(spec.num_layers), desc="layers", unit="layer", file=sys.stderr,
                         disable=not opts.engine.progress or dist.rank != 0)
        for layer in layer_bar:
            if layer < start_layer:  # replay: rebuild the hidden states, stats are already final
                streamer.run_layer(layer, None, desc=f"replay {layer + 1}/{spec.num_layers}")
                continue
            acc = LayerAccumulator(spec.num_experts, streamer.device)
            streamer.run_layer(layer, acc)
            acc.all_reduce()
            stats.set_layer(layer, acc)
            if out is not None and dist.rank == 0:
                stats.save(out)
            layer_bar.set_postfix(tok_s=f"{streamer.tokens * dist.world / streamer.stats.layer_seconds[-1]:.0f}")
        layer_bar.close()
    finally:
        streamer.close()
    seconds = time.perf_counter() - t0
    summary = {"tokens": tokens, "seconds": round(seconds, 3), "layers": spec.num_layers - start_layer,
               "tokens_per_second_per_layer": round(tokens * (spec.num_layers - start_layer) / max(seconds, 1e-9), 1),
               **{k: round(v, 3) for k, v in peak_memory(streamer.device).items()}}
    stats.meta["summary"] = summary
    if out is not None and dist.rank == 0:
        stats.save(out)
    dist.barrier()
    return stats, summary
