"""``reap calibrate``: every expert's statistics from calibration data streamed through the model.

The calibration sequences go through :class:`reap.stream.LayerStreamer` one decoder layer at a time; each MoE
layer's statistics (float64, :mod:`reap.saliency`) are all-reduced across ranks and written after every layer
(rank 0 only), so ``--resume`` continues at the next layer.

Data parallel: under ``torchrun`` each rank takes every WORLD_SIZE-th sequence, statistics are all-reduced after
each layer (NCCL on GPU, gloo on CPU) and only rank 0 writes.

``--resume`` of a complete stats file does nothing (and says so). Thin data (:func:`thin_data`: fewer than
:data:`MIN_PAIRS_PER_EXPERT` routed (token, expert) pairs per expert in a layer, or more than a quarter of a layer's
experts never routed) is a warning, before the run when the token count alone shows it and after it; with
``strict`` an error. An interrupt leaves the stats file with every finished layer, and says so.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from reap import __version__
from reap.arch import Layout
from reap.checkpoint import Checkpoint
from reap.errors import UserError, plural
from reap.progress import Progress, use_bars
from reap.stream import Dist, EngineOptions, LayerStreamer, peak_memory

#: fewer routed (token, expert) pairs per expert than this in a layer is thin calibration data
MIN_PAIRS_PER_EXPERT = 4
#: more never-routed experts than this share of a layer is thin calibration data
MAX_NEVER_ROUTED = 0.25


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
    strict: bool = False  # thin calibration data is an error, not a warning


def _data_meta(data) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(data).items()}


def thin_data(stats, layout: Layout, tokens: int | None = None) -> str | None:
    """Why the statistics are too thin to rank experts by, or None. With ``tokens`` (before the run) only what the
    token count shows: top-k pairs per token cannot reach MIN_PAIRS_PER_EXPERT per expert."""
    E, tie = layout.num_experts, ("experts never routed all score 0 and among equal scores the pruner drops the "
                                  "higher expert id first, so the cut falls by index order, not by saliency")
    fix = "calibrate on more or longer samples (--samples, --max-length), or pass --strict to make this an error"
    if tokens is not None:
        pairs = tokens * layout.top_k
        if pairs >= MIN_PAIRS_PER_EXPERT * E:
            return None
        return (f"thin calibration data: {tokens} tokens x top-{layout.top_k} = {pairs} routed (token, expert) pairs "
                f"per layer for {E} experts (fewer than {MIN_PAIRS_PER_EXPERT} per expert); {tie}; {fix}")
    thin = []
    for layer in layout.moe_layers:
        if layer not in stats.completed:
            continue
        pairs, never = int(stats.count[layer].sum()), int((stats.count[layer] == 0).sum())
        if pairs < MIN_PAIRS_PER_EXPERT * E or never > MAX_NEVER_ROUTED * E:
            thin.append((never, -pairs, layer))
    if not thin:
        return None
    never, pairs, layer = max(thin)
    return (f"thin calibration data: {len(thin)} of {len(layout.moe_layers)} MoE layers are thin, e.g. layer {layer}: "
            f"{-pairs} routed (token, expert) pairs for {E} experts and {never} of them never routed (wanted: at "
            f"least {MIN_PAIRS_PER_EXPERT} pairs per expert, at most {MAX_NEVER_ROUTED:.0%} never routed); {tie}; {fix}")


def check_thin(message: str | None, strict: bool, log) -> None:
    """Warn about thin data, or with ``strict`` refuse it."""
    if message is None:
        return
    if strict:
        raise UserError(message.replace(", or pass --strict to make this an error", "") + " (--strict)")
    log("warning: " + message)


def calibrate(opts: CalibrateOptions, ckpt: Checkpoint | None = None, log=print, layout: Layout | None = None):
    """Stream the calibration data through the model; return (ExpertStats, summary dict).

    With ``opts.out`` the statistics are written after every layer (rank 0 only), so ``resume`` can pick
    up at the next layer. ``layout``: the checkpoint's (validated) layout, when the caller has it.
    """
    from reap.data import calibration_sequences, load_tokenizer
    from reap.saliency import ExpertStats, LayerAccumulator
    from reap.validate import derive_checked

    opts = replace(opts, engine=opts.engine.resolved())
    ckpt = ckpt or Checkpoint(opts.model)
    spec = layout or derive_checked(ckpt)
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
            if set(range(spec.num_layers)) <= stats.completed:
                log(f"{out} is complete (all {spec.num_layers} layers); nothing to do (--overwrite calibrates again)")
                done = dict(stats.meta.get("summary") or {})
                done.update({"layers": 0, "already_complete": True, "tokens": stats.meta.get("tokens", done.get("tokens"))})
                return stats, done
        elif not opts.overwrite:
            raise UserError(f"stats file {out} exists; pass --resume to continue it, --overwrite to replace it, or choose another --out")
    elif opts.resume and out is None:
        raise UserError("--resume needs --out STATS (the stats file to continue)")
    if out is not None and not out.parent.exists():
        raise UserError(f"the folder of --out ({out.parent}) does not exist; create it first")

    dist = Dist.from_env(opts.engine.device)
    progress = opts.engine.progress and dist.rank == 0
    tokenizer = load_tokenizer(ckpt.path, trust_remote_code=opts.engine.trust_remote_code, config=ckpt.config)
    sequences = calibration_sequences(opts.data, tokenizer, log=log if progress else None)
    mine = sequences[dist.rank :: dist.world]
    bars = use_bars()
    engine = opts.engine if bars else replace(opts.engine, progress=False)  # in a log: one line per layer instead
    streamer = LayerStreamer(ckpt, spec, mine, engine, dist)
    tokens = dist.sum_int(streamer.tokens, streamer.device)
    check_thin(thin_data(None, spec, tokens), opts.strict, log if dist.rank == 0 else (lambda _m: None))
    meta.update({"samples": len(sequences), "tokens": tokens, "world_size": dist.world})
    if opts.recipe is not None:
        meta["options"] = opts.recipe
    if stats is None:
        stats = ExpertStats(spec.num_layers, spec.num_experts, meta)
    start_layer = 0
    while start_layer in stats.completed:
        start_layer += 1
    if dist.rank == 0:
        log(f"calibrating {ckpt.name}: {len(sequences)} samples, {tokens} tokens, {spec.num_layers} layers x "
            f"{spec.num_experts} experts (top-{spec.top_k}), {streamer.device} {opts.engine.dtype}, "
            f"hidden states on {streamer.store.mode}" + (f", {dist.world} ranks" if dist.world > 1 else "")
            + (f"; resuming at layer {start_layer}" if start_layer else ""))
    t0 = time.perf_counter()
    layer = start_layer
    try:
        streamer.prefetch(0)
        streamer.embed()
        bar = Progress(spec.num_layers, "layers", unit="layer", enabled=progress, log=log, every=0.0)
        for layer in range(spec.num_layers):
            if layer < start_layer:  # replay: rebuild the hidden states, stats are already final
                streamer.run_layer(layer, None, desc=f"replay {layer + 1}/{spec.num_layers}")
                bar.update()
                continue
            acc = LayerAccumulator(spec.num_experts, streamer.device)
            streamer.run_layer(layer, acc)
            acc.all_reduce()
            stats.set_layer(layer, acc)
            if out is not None and dist.rank == 0:
                stats.save(out)
            bar.set_postfix(**{"tokens/s": f"{streamer.tokens * dist.world / streamer.stats.layer_seconds[-1]:.0f}"})
            bar.update()
        bar.close()
    except KeyboardInterrupt as err:
        done = sorted(stats.completed)
        if out is not None:
            err.reap_note = (f"{out} keeps {plural(len(done), 'finished layer')} of {spec.num_layers}: run the same "
                             f"command with --resume to continue at layer {len(done)}" if done else
                             f"no layer was finished, so {out} was not written")
        else:
            err.reap_note = "nothing was published (the statistics were in memory only)"
        raise
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
    check_thin(thin_data(stats, spec), opts.strict, log if dist.rank == 0 else (lambda _m: None))
    return stats, summary
