"""``reap calibrate``: every expert's statistics from calibration data streamed through the model.

The calibration sequences go through :class:`reap.stream.streamer.LayerStreamer` one decoder layer at a time; each MoE
layer's statistics (float64, :mod:`reap.calibrate.stats`) are all-reduced across ranks and written after every layer
(rank 0 only), so ``--resume`` continues at the next layer.

Multi-token-prediction modules (kept unless ``drop_mtp``) run after the last decoder layer (:mod:`reap.stream.mtp`);
their statistics are rows num_layers + k of the stats file, and ``--resume`` continues across them.

Data parallel: under ``torchrun`` each rank takes every WORLD_SIZE-th sequence, statistics are all-reduced after
each layer (NCCL on GPU, gloo on CPU) and only rank 0 writes.

``--resume`` of a complete stats file does nothing (and says so). Thin data (:func:`thin_data`: fewer than
:data:`MIN_PAIRS_PER_EXPERT` routed (token, expert) pairs per expert in a layer, or more than a quarter of a layer's
experts never routed) is a warning, before the run when the token count alone shows it and after it; with
``strict`` an error. An interrupt leaves the stats file with every finished layer, and says so. Running out of GPU
(or CPU) memory, on the prefetch thread too, is one line (:func:`out_of_memory_error`): where, how much was asked and
free, the flags that help (a smaller ``--batch-tokens``, ``--offload cpu``, a smaller ``--greedy-memory``), and the
stats file's finished layers for ``--resume`` (hidden-state checkpoints made with other batches are replayed, not
refused). The plan line says when a batch's activations or the greedy search likely do not fit the memory free now
(:func:`memory_warnings`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from reap import __version__
from reap.model.arch import Layout
from reap.io.checkpoint import Checkpoint
from reap.core.errors import UserError, plural
from reap.core.options import CalibrateOptions
from reap.core.progress import Progress, use_bars
from reap.stream.ranks import Dist
from reap.stream.streamer import LayerStreamer, peak_memory
from reap.calibrate.checkpoints import HiddenCheckpoint
from reap.calibrate.memory import _cuda_available, _kept, memory_warnings, out_of_memory_error

#: fewer routed (token, expert) pairs per expert than this in a layer is thin calibration data
MIN_PAIRS_PER_EXPERT = 4
#: more never-routed experts than this share of a layer is thin calibration data
MAX_NEVER_ROUTED = 0.25


# -- calibration -----------------------------------------------------------------------------------------
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


def _check_replaceable_stats(out: Path) -> None:
    """``--overwrite`` replaces only a reap stats file (a safetensors file whose metadata says ``reap-stats``, of any
    version): a folder, a link to one, or any other file is refused before anything is computed."""
    from reap.calibrate.stats import _FORMAT

    if out.is_dir():
        raise UserError(f"--out {out} is a folder; --overwrite replaces only a reap stats file: pass a file name such "
                        f"as {out / 'stats.safetensors'}")
    why = None
    try:
        from safetensors import safe_open

        with safe_open(str(out), framework="pt", device="cpu") as fh:
            if (fh.metadata() or {}).get("format") != _FORMAT:
                why = "a safetensors file of something else"
    except Exception as err:  # noqa: BLE001 - not a safetensors file at all, or unreadable
        why = (str(err).splitlines() or [type(err).__name__])[0] or type(err).__name__
    if why is not None:
        raise UserError(f"--out {out} is not a reap stats file ({why}); --overwrite replaces only a stats file reap "
                        "wrote: choose another --out or remove it")


def calibrate(opts: CalibrateOptions, ckpt: Checkpoint | None = None, log=print, layout: Layout | None = None,
              observers=()):
    """Stream the calibration data through the model; return (ExpertStats, summary dict).

    With ``opts.out`` the statistics are written after every layer (rank 0 only), so ``resume`` can pick
    up at the next layer. ``layout``: the checkpoint's (validated) layout, when the caller has it. ``observers``:
    the caller's layer observers (:mod:`reap.stream.observers`), run after the greedy search on every MoE layer.
    """
    from reap.data.tokens import calibration_sequences, load_tokenizer
    from reap.calibrate.greedy import GreedySearch
    from reap.calibrate.stats import ExpertStats, LayerAccumulator
    from reap.model.validate import derive_checked

    opts = replace(opts, engine=opts.engine.resolved())
    ckpt = ckpt or Checkpoint(opts.model)
    spec = layout or derive_checked(ckpt, keep_mtp=not opts.drop_mtp)
    rows = spec.stat_layers  # the decoder layers, then the MTP modules (kept ones)
    out = Path(opts.out) if opts.out else None
    meta = {
        "tool_version": __version__,
        "model": str(ckpt.path),
        "family": spec.family,
        "num_layers": rows,
        "mtp_layers": spec.mtp_layers,
        "num_experts": spec.num_experts,
        "top_k": spec.top_k,
        "n_group": spec.n_group,  # expert groups: the cut `reap report --ratio` shows keeps them equal
        "topk_group": spec.topk_group,
        "data": _data_meta(opts.data),
        "dtype": opts.engine.dtype,
    }
    stats = None
    if out is not None and out.exists():
        if opts.resume:
            stats = ExpertStats.load(out)
            mismatch = [k for k in ("model", "num_experts", "num_layers", "data", "dtype") if stats.meta.get(k) != meta[k]]
            if mismatch:
                mtp = (f" (this model's {plural(spec.mtp_layers, 'MTP module')} are calibrated as layers "
                       f"{spec.num_layers}..{rows - 1}; --drop-mtp leaves them out)"
                       if "num_layers" in mismatch and (spec.mtp_layers or stats.meta.get("mtp_layers")) else "")
                raise UserError(
                    f"--resume: {out} was made with different {', '.join(mismatch)} "
                    f"({', '.join(f'{k}={stats.meta.get(k)!r}' for k in mismatch)}){mtp}; rerun with the same options "
                    "or start fresh with --overwrite"
                )
            if set(range(rows)) <= stats.completed:
                log(f"{out} is complete (all {rows} layers); nothing to do (--overwrite calibrates again)")
                done = dict(stats.meta.get("summary") or {})
                done.update({"layers": 0, "already_complete": True, "tokens": stats.meta.get("tokens", done.get("tokens"))})
                return stats, done
        elif not opts.overwrite:
            raise UserError(f"stats file {out} exists; pass --resume to continue it, --overwrite to replace it, or choose another --out")
        else:
            _check_replaceable_stats(out)
    elif opts.resume and out is None:
        raise UserError("--resume needs --out STATS (the stats file to continue)")
    if out is not None and not out.parent.exists():
        raise UserError(f"the folder of --out ({out.parent}) does not exist; create it first")

    dist = Dist.from_env(opts.engine.device)
    progress = opts.engine.progress and dist.rank == 0
    bars = use_bars()
    engine = opts.engine if bars else replace(opts.engine, progress=False)  # in a log: one line per layer instead
    if engine.device == "cpu" or engine.device == "auto" and not _cuda_available():
        from reap.stream.ranks import cpu_speed

        cpu_speed()  # the rates the ETA is sized by, measured before layer 0's loading competes for the cores
    greedy = GreedySearch()
    try:
        # layer 0 loads while the data is tokenized; the greedy search runs after each MoE layer's batches
        streamer = LayerStreamer(ckpt, spec, None, engine, dist, observers=[greedy, *observers],
                                 accumulator=LayerAccumulator)
    except RuntimeError as err:  # torch.OutOfMemoryError among them
        oom = out_of_memory_error(err, engine, kept=_kept(out, stats if opts.resume else None, rows))
        if oom is None:
            raise
        raise oom from None
    first = start_layer = 0
    layer = None  # the layer running (for an out-of-memory error's line)
    try:
        tokenizer = load_tokenizer(ckpt.path, trust_remote_code=opts.engine.trust_remote_code, config=ckpt.config)
        sequences = calibration_sequences(opts.data, tokenizer, log=log if progress else None)
        streamer.set_sequences(sequences[dist.rank :: dist.world])
        tokens = dist.sum_int(streamer.tokens, streamer.device)
        check_thin(thin_data(None, spec, tokens), opts.strict, log if dist.rank == 0 else (lambda _m: None))
        meta.update({"samples": len(sequences), "tokens": tokens, "world_size": dist.world})
        if opts.recipe is not None:
            meta["options"] = opts.recipe
        if stats is None:
            stats = ExpertStats(rows, spec.num_experts, meta)
        while start_layer in stats.completed:
            start_layer += 1
        hidden = HiddenCheckpoint(out, dist, opts.checkpoint_every) if out is not None else None
        if hidden is not None and not start_layer and dist.rank == 0:
            hidden.clear()  # a fresh run: an old run's hidden states are stale (and only those are deleted)
        restored = hidden.latest(start_layer - 1) if hidden is not None and start_layer else None
        if restored is not None and not hidden.matches(streamer, restored):
            if dist.rank == 0:
                log(f"note: the hidden states kept after layer {restored} were made with other batches (another "
                    f"--batch-tokens or --max-length): "
                    + (f"layers 0..{restored} are" if restored else "layer 0 is") + " run again from the embeddings "
                    "(their statistics are kept)")
            hidden.written = [hidden._dir(restored)]  # removed once a checkpoint of this run's batches is written
            restored = None
        plan = streamer.plan()  # once: its sizes do not change while the layers run
        if dist.rank == 0:
            from reap.core.humanize import human_bytes

            eta = plan["eta_s"] * (rows - start_layer) / rows
            log(f"plan: {plural(plan['batches'], 'batch', 'batches')} per rank, hidden states "
                f"{human_bytes(plan['hidden_bytes'])} per rank on {plan['hidden_on']}, largest layer "
                f"{human_bytes(plan['layer_bytes'])} read per layer, a batch's activations ~"
                f"{human_bytes(plan['peak_bytes'])} ({human_bytes(max(0, plan['room_bytes']))} of {plan['memory']} "
                "memory left for them); rough ETA "
                + (f"{eta / 60:.1f} min" if eta >= 60 else f"{eta:.0f} s")
                + " (" + (f"{plan['greedy_s'] * (rows - start_layer) / rows:.0f} s of it the greedy search, which "
                          "--greedy-tokens 0 skips; " if plan["greedy_s"] >= 1 else "")
                + (f"at {plan['assumed_flops'] / 1e9:.0f} GFLOP/s and {plan['assumed_bandwidth'] / 1e9:.1f} GB/s "
                   "measured on this CPU now" if plan.get("measured") else
                   f"assuming {plan['assumed_flops'] / 1e12:g} TFLOP/s") + " and 2 GB/s reads)")
            log(f"calibrating {ckpt.name}: {len(sequences)} samples, {tokens} tokens, {spec.num_layers} layers x "
                f"{spec.num_experts} experts (top-{spec.top_k})"
                + (f" + {plural(spec.mtp_layers, 'MTP module')}" if spec.mtp_layers else "")
                + f", {streamer.device} {opts.engine.dtype}, "
                f"hidden states on {streamer.store.mode}" + (f", {dist.world} ranks" if dist.world > 1 else "")
                + (f"; resuming at layer {start_layer}" if start_layer else "")
                + (f" from the hidden states after layer {restored}" if restored is not None else "")
                + (f"; each layer read once per node ({streamer.loader.reader.share.world} ranks share it)"
                   if streamer.loader.reader.share is not None else ""))
            for line in memory_warnings(plan, opts.engine):
                log("warning: " + line)
        t0 = time.perf_counter()
        if restored is not None:
            hidden.restore(streamer, restored)
        else:
            streamer.embed()
        first = restored + 1 if restored is not None else 0
        bar = Progress(rows, "layers", unit="layer", enabled=progress, log=log, every=0.0)
        if first:
            bar.update(first)
        for layer in range(first, rows):
            # rows >= num_layers: MTP module layer - num_layers, run after the last decoder layer (reap.stream.mtp)
            run = streamer.run_layer if layer < spec.num_layers else \
                (lambda i, acc, desc=None: streamer.run_mtp(i - spec.num_layers, acc))
            if layer < start_layer:  # replay since the last hidden-state checkpoint: stats are already final
                run(layer, None, desc=f"replay {layer + 1}/{rows}")
                bar.update()
                continue
            acc = LayerAccumulator(spec.num_experts, streamer.device)
            run(layer, acc)
            acc.all_reduce()
            stats.set_layer(layer, acc)
            if out is not None and dist.rank == 0:
                stats.save(out)  # first the statistics, then the hidden states: a kill between replays one layer
            if hidden is not None and hidden.due(layer, rows - 1, streamer.stats.layer_seconds[-1],
                                                 plan["hidden_bytes"]):
                hidden.write(streamer, layer)
            bar.set_postfix(**{"tokens/s": f"{streamer.tokens * dist.world / streamer.stats.layer_seconds[-1]:.0f}"})
            bar.update()
        bar.close()
        if hidden is not None and not opts.keep_checkpoint:
            hidden.remove()
    except RuntimeError as err:  # torch.OutOfMemoryError among them: one line with the fix, the stats file resumable
        mtp = layer is not None and layer >= spec.num_layers
        oom = out_of_memory_error(err, engine, streamer=streamer, kept=_kept(out, stats, rows),
                                  layer=layer - spec.num_layers if mtp else layer,
                                  name="MTP module" if mtp else "layer")
        if oom is None:
            raise
        raise oom from None
    except KeyboardInterrupt as err:
        done = sorted(stats.completed) if stats is not None else []
        if out is not None:
            err.reap_note = (f"{out} keeps {plural(len(done), 'finished layer')} of {rows}: run the same "
                             f"command with --resume to continue at layer {len(done)}" if done else
                             f"no layer was finished, so {out} was not written")
        else:
            err.reap_note = "nothing was published (the statistics were in memory only)"
        raise
    finally:
        streamer.close()
    seconds = time.perf_counter() - t0
    ran = rows - first  # layers run in this call, replayed ones included
    summary = {"tokens": tokens, "seconds": round(seconds, 3), "layers": rows - start_layer,
               "layers_run": ran, "tokens_per_second_per_layer": round(tokens * ran / max(seconds, 1e-9), 1),
               # where the time went: each layer run, of that the wait for its weights and the greedy search; the
               # GPU warm-up batch, run while the data was tokenized (outside ``seconds``)
               "warmup_seconds": round(streamer.warmup_seconds, 3),
               "layer_seconds": [round(t, 3) for t in streamer.stats.layer_seconds],
               "weights_wait_seconds": [round(t, 3) for t in streamer.stats.wait_seconds],
               "greedy_seconds": round(greedy.seconds, 3),
               "selfcheck_seconds": round(streamer.selfcheck.seconds, 4),
               **{k: round(v, 3) for k, v in peak_memory(streamer.device).items()}}
    stats.meta["summary"] = summary
    # what the run-time self-check compared, and whether the matrix knows this model type
    from reap.model.families import support

    known = support(spec.model_type)
    stats.meta["selfcheck"] = {"support": known, "checked": streamer.selfcheck.results}
    if streamer.selfcheck.results and dist.rank == 0:
        layers = ", ".join(str(r["layer"]) for r in streamer.selfcheck.results)
        line = f"run-time self-check passed (layer{'s' if ',' in layers else ''} {layers}: reap's experts == transformers')"
        log(f"note: {known['text']}; {line}" if known["status"] != "verified" else line)
    if out is not None and dist.rank == 0:
        stats.save(out)
    dist.barrier()
    check_thin(thin_data(stats, spec), opts.strict, log if dist.rank == 0 else (lambda _m: None))
    return stats, summary
