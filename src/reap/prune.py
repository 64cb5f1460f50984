"""``reap prune``: check everything, choose the experts, rewrite: the whole job as one function.

:func:`prune_model` takes a frozen :class:`PruneOptions`, checks the model and the target (the target's lock held
from the check to the rename), turns the options into an :class:`reap.selection.plan.ExpertPlan` (a keep file; or a ratio and
a criterion's scores: chance, a stats file, or calibration right here, :mod:`reap.calibrate.run`) through
:mod:`reap.selection.choose`, records what the choice rests on in ``reap_report.json`` (:func:`base_report`) and hands the
plan to :func:`reap.rewrite.surgery.rewrite`, which writes, verifies and publishes the pruned checkpoint, the
report's pictures, summary and model card (:func:`report_files`) included.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reap import __version__
from reap.model.arch import Layout
from reap.io.checkpoint import Checkpoint
from reap.model.families import support
from reap.core.errors import UserError, plural
from reap.core.options import PruneOptions
from reap.selection.plan import ExpertPlan, Routing
from reap.selection.choose import experts_to_drop, plan_from_scores, read_keep_file
from reap.io.outputs import check_output_dir
from reap.io.staging import OutputLock, clean_stale
from reap.rewrite.surgery import SideFiles, SurgeryResult, id_remap, rewrite

if TYPE_CHECKING:  # torch is imported only where scores are computed: copying with --keep never needs it
    import torch


def base_report(ckpt: Checkpoint, spec: Layout, plan: ExpertPlan, ratio: float | None,
                scores: torch.Tensor | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``reap_report.json`` content: per layer the plan's kept and pruned experts (and the scores they were
    chosen by); the surgery adds sizes."""
    layers = {}
    for layer in plan.moe_layers:
        entry: dict[str, Any] = {"kept": plan.kept(layer), "pruned": plan.pruned(layer)}
        if scores is not None:
            entry["saliency"] = [float(x) for x in scores[layer].tolist()]
        layers[str(layer)] = entry
    return {
        "tool": "reap",
        "version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": shlex.join(["reap", *sys.argv[1:]]),
        "source": str(ckpt.path),
        "family": spec.family,
        "support": support(spec.model_type),  # whether the support matrix knows this model type
        "method": plan.method,
        "ratio": ratio,
        "num_experts": spec.num_experts,
        "top_k": spec.top_k,
        **(extra or {}),
        "layers": layers,
    }


# -- the whole job -----------------------------------------------------------------------------------
def prune_model(opts: PruneOptions, log=print) -> SurgeryResult | None:
    """Check everything, choose the experts (keep file, random, stats file or calibration), rewrite.

    Under torchrun every rank calibrates its share and only rank 0 writes; other ranks return None. Rank 0 holds
    the target's lock (reap.io.staging.OutputLock) from the check of --out to the rename, and removes the staging
    folders that interrupted runs left beside it. An existing --out is replaced (``--overwrite``) only if it is empty
    or a previous reap output holding nothing reap did not write (:func:`reap.io.outputs.check_output_dir`, checked
    again just before the swap); anything else is a UserError before anything is written.
    """
    from reap.model.validate import derive_checked

    ckpt = Checkpoint(opts.model)
    out = check_output_dir(opts.out, [ckpt.path], opts.overwrite)  # before the layout: no torch for a wrong --out
    spec = derive_checked(ckpt, keep_mtp=not opts.drop_mtp)
    if int(os.environ.get("RANK", "0")) != 0:
        return _prune_checked(opts, ckpt, spec, out, log)
    with OutputLock(out, log).acquire():
        out = check_output_dir(out, [ckpt.path], opts.overwrite)  # again: a run that held the lock may have finished
        clean_stale(out, log)
        return _prune_checked(opts, ckpt, spec, out, log)


def _prune_checked(opts: PruneOptions, ckpt: Checkpoint, spec: Layout, out: Path, log) -> SurgeryResult | None:
    layers, routing = spec.moe_layers, Routing.of(spec)
    if (opts.keep_file is None) == (opts.ratio is None):
        raise UserError("pass either --ratio R (choose experts by --method) or --keep KEEP.json, not both or neither")
    stats, scores, extra, recovery, router_rows = None, None, {}, None, {}
    if opts.keep_file is None:
        from reap.selection.criteria import get_criterion

        criterion = get_criterion(opts.method)  # UserError naming the known criteria
    if opts.keep_file is not None and (opts.multiple_of != 1 or opts.protect_super):
        raise UserError("--multiple-of and --protect-super-experts choose among scored experts; --keep names the "
                        "experts itself: drop them or pass --ratio")
    unused = [flag for flag, given in (("--stats", opts.stats is not None), ("--dataset", opts.calibration is not None))
              if given and (opts.keep_file is not None or not criterion.needs_data)]
    if unused:
        why = "--keep names the experts itself" if opts.keep_file is not None else f"--method {opts.method} uses no data"
        raise UserError(f"{' and '.join(unused)} would be ignored: {why}; drop it or choose a saliency --method")
    if opts.keep_file is not None:
        plan = read_keep_file(opts.keep_file, routing, layers)
        extra["keep_file"] = str(opts.keep_file)
    else:
        from reap.calibrate.stats import ExpertStats  # torch: not needed to copy with a keep file

        n_drop = experts_to_drop(routing, opts.ratio, opts.multiple_of)
        if opts.multiple_of > 1:
            plain = spec.num_experts - experts_to_drop(routing, opts.ratio)
            log(f"--multiple-of {opts.multiple_of}: keeping {spec.num_experts - n_drop} of {spec.num_experts} experts "
                f"per layer (--ratio {opts.ratio} alone keeps {plain})")
            extra["multiple_of"] = opts.multiple_of
        method = opts.method
        if not criterion.needs_data:
            if opts.protect_super:
                raise UserError(f"--protect-super-experts needs calibration statistics; --method {method} has none")
            scores = ExpertStats(spec.stat_layers, spec.num_experts).scores(method, opts.seed)
            extra["seed"] = opts.seed
        else:
            if opts.stats is not None and opts.calibration is not None:
                raise UserError("pass either --stats STATS or --dataset DATA, not both")
            if opts.stats is not None:
                stats = ExpertStats.load(opts.stats)
                check_stats(stats, spec, opts.stats)
                from reap.calibrate.run import check_thin, thin_data

                check_thin(thin_data(stats, spec), opts.strict, log)
                scores = stats.scores(method)  # before any other work: an old stats file fails here, in one line
            elif opts.calibration is not None:
                from dataclasses import replace

                from reap.calibrate.run import calibrate

                cal = opts.calibration
                if method != "greedy-rerouted":  # the search's order is read by that criterion only
                    cal = replace(cal, engine=replace(cal.engine, greedy_tokens=0))
                recovery = _recovery(opts, spec, routing, n_drop, log)
                stats, summary = calibrate(replace(cal, model=str(ckpt.path), out=None,
                                                   strict=opts.strict or cal.strict, drop_mtp=opts.drop_mtp), ckpt,
                                           log=log, layout=spec, observers=[recovery] if recovery else [])
                log(f"calibrated {summary['tokens']} tokens in {summary['seconds']:.1f}s")
            else:
                raise UserError(f"--method {method} needs calibration: pass --dataset DATA (e.g. a .jsonl file) "
                                "or --stats STATS from `reap calibrate`; or use --method random")
            scores = stats.scores(method)
            extra["calibration"] = stats.meta
            extra.update(_selection_notes(stats, spec, method, opts, n_drop, log))
            if opts.protect_super:
                from reap.selection.choose import protect, super_experts

                scores = protect(scores, super_experts(stats))
        plan = plan_from_scores(scores, routing, layers, n_drop, method, opts.multiple_of)
        if recovery is not None:
            plan, router_rows = _recovered_plan(plan, recovery, extra, log)
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    if opts.recipe is not None:
        extra["options"] = opts.recipe
    if spec.mtp_layers:  # multi-token-prediction modules: stats rows / report layers num_layers.. (reap.stream.mtp)
        extra["mtp"] = {"kept": True, "modules": spec.mtp_layers, "layers": list(range(spec.num_layers,
                                                                                        spec.stat_layers))}
    report = base_report(ckpt, spec, plan, opts.ratio, scores, extra)
    k = plan.kept_per_layer
    log(f"pruning {ckpt.name}: {spec.num_experts} -> {k} experts in {plural(len(layers), 'MoE layer')} "
        f"({plan.method}) -> {out}")
    remap = id_remap(ckpt, spec, plan)
    if remap:
        report["id_remap"] = {str(layer): ids for layer, ids in remap.items()}
        log(f"expert-id tables (hash routing) in {len(remap)} layers renumbered; a pruned expert's tokens go to the "
            "kept expert with the most similar router row (reap_report.json id_remap)")
    result = rewrite(ckpt, spec, plan, out, report, progress=opts.progress, stats=stats, fsync=opts.fsync,
                     id_remap=remap, overwrite=opts.overwrite, log=log, router_rows=router_rows,
                     neuron_columns=recovery.columns if recovery is not None else None,
                     side_files=report_files(ckpt.path, out, spec, stats, log))
    if spec.mtp_layers:
        rows = ", ".join(map(str, range(spec.num_layers, spec.stat_layers)))
        by = "by their own saliency" if stats is not None else f"by {plan.method}"
        log(f"kept {plural(spec.mtp_layers, 'multi-token-prediction module')} (report layer"
            f"{'s' if spec.mtp_layers > 1 else ''} {rows}), pruned to {k} experts {by} like every layer: MTP "
            "speculative decoding still works (--drop-mtp leaves them out)")
    if result.dropped_mtp:
        keys = list(spec.mtp_keys)
        log(f"left out the multi-token-prediction module ({result.dropped_mtp} tensors"
            + (f"; config {', '.join(keys)} set to 0" if keys else "") + "): its experts would not match the pruned "
            "expert count; serve without MTP speculative decoding" + (" (--drop-mtp)" if opts.drop_mtp else ""))
    return result


def _recovery(opts: PruneOptions, spec: Layout, routing, n_drop: int, log):
    """The recovery observer calibration runs for --merge / --refit-router (None without them)."""
    if opts.merge is None and not opts.refit_router:
        return None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--merge and --refit-router run in one process for now: run without torchrun")
    hashed = [layer for layer, moe in spec.moe.items() if moe.id_tables]
    if opts.refit_router and hashed:
        raise UserError(f"--refit-router: layers {hashed[0]}.. route by expert-id tables (hash routing), not by router "
                        "rows: prune without --refit-router")
    from reap.recover.observer import Recovery, RecoverSpec

    spec_ = RecoverSpec(opts.merge, opts.refit_router, opts.method, routing, n_drop, opts.multiple_of,
                        opts.protect_super, opts.seed, opts.recover_tokens)
    return Recovery(spec_, log=log)


def _recovered_plan(plan: ExpertPlan, recovery, extra: dict[str, Any], log) -> tuple[ExpertPlan, dict[int, Any]]:
    """The plan with the recovery's merges (its kept experts must be the plan's), its re-fit router rows, and what
    it did in the report's ``recovery``."""
    for layer in plan.moe_layers:
        got = [out.anchor for out in recovery.layers.get(layer, ())]
        if got != plan.kept(layer):  # pragma: no cover - the observer chooses with the same function
            raise AssertionError(f"layer {layer}: recovery kept {got}, the plan keeps {plan.kept(layer)}")
    merged = ExpertPlan(plan.num_experts, {layer: recovery.layers[layer] for layer in plan.moe_layers}, plan.method)
    spec = recovery.spec
    records = {str(layer): r for layer, r in sorted(recovery.records.items())}
    n_merged = sum(len(merged.merges(layer)) for layer in merged.moe_layers)
    folded = sum(len(out.sources) - 1 for layer in merged.moe_layers for out in merged.merges(layer).values())
    refit = sorted(recovery.router_rows)
    extra["recovery"] = {"merge": spec.merge, "refit_router": spec.refit, "tokens": spec.tokens,
                         "seconds": round(recovery.seconds, 3), "merged_experts": n_merged, "folded_experts": folded,
                         "refit_layers": refit, "layers": records}
    skipped = {layer: r["skipped"] for layer, r in records.items() if r.get("skipped")}
    if skipped:
        first = next(iter(skipped.values()))
        log(f"note: {plural(len(skipped), 'MoE layer')} {sorted(map(int, skipped))[:8]} kept their cut as it is: {first} "
            "(reap_report.json recovery.layers says why for each)")
    if spec.merge is not None:
        log(f"--merge {spec.merge}: {folded} pruned experts merged into {n_merged} kept experts "
            f"({len([layer for layer in merged.moe_layers if merged.merges(layer)])} of {len(merged.moe_layers)} "
            "layers); each merge kept only where it lowered the layer's output error on the sample")
    if spec.refit:
        log(f"--refit-router: router rows re-fit in {len(refit)} of {len(merged.moe_layers)} layers (the others kept "
            "their rows: no gain on the held-out part of the sample)")
    return merged, dict(recovery.router_rows)


def report_files(source: Path, out: Path, spec: Layout, stats, log) -> SideFiles:
    """The report's files of the pruned output (:mod:`reap.report`: the pictures and summary drawn while the shards
    are copied, the model card once they are verified), for :func:`reap.rewrite.surgery.rewrite`; any failure to
    write one fails the run."""
    from reap.report import publish_assets, publish_card

    cells = spec.num_layers * spec.num_experts  # the pictures and texts grow with layers x experts
    text = (64 << 10) + 400 * spec.num_layers
    return SideFiles(
        draw=lambda folder: publish_assets(folder, stats, log=log or (lambda _msg: None), strict=True),
        card=lambda folder, report, figures: publish_card(folder, report, source=source, figures=figures,
                                                          published_as=out, strict=True),
        sizes=(*[min(4 << 20, (256 << 10) + 200 * cells)] * 3, text, text))  # 3 pictures, summary, card


def _selection_notes(stats, spec: Layout, method: str, opts: PruneOptions, n_drop: int, log) -> dict[str, Any]:
    """What the report records (and the log says) about the choice beyond the scores: super experts (always;
    protected with --protect-super-experts) and the layers where greedy-rerouted fell back to weighted-ean."""
    from reap.selection.criteria import GREEDY_FALLBACK, greedy_fallback_layers
    from reap.selection.choose import check_super_fit, super_experts

    notes: dict[str, Any] = {}
    sup = super_experts(stats, strict=opts.protect_super)  # None: a stats file from before max_abs
    found = None if sup is None else {str(layer): [int(e) for e in sup[layer].nonzero().squeeze(1).tolist()]
                                      for layer in spec.moe_layers if bool(sup[layer].any())}
    notes["super_experts"] = found
    notes["protect_super_experts"] = bool(opts.protect_super)
    if opts.protect_super:
        check_super_fit(sup, spec.num_experts - n_drop, spec.moe_layers)
        log(f"--protect-super-experts: {sum(len(v) for v in found.values())} super experts (largest output magnitude "
            "above the 99.5th percentile and a tenth of the maximum over every expert of the first 3/4 of the layers, "
            "Su et al. 2025) are never pruned")
    if method == "greedy-rerouted":
        fallback = {layer: why for layer, why in greedy_fallback_layers(stats).items() if layer in spec.moe_layers}
        if fallback:
            notes["greedy_fallback"] = {"criterion": GREEDY_FALLBACK, "layers": {str(k): v for k, v in fallback.items()}}
            first = next(iter(fallback.values()))
            log(f"greedy-rerouted: {plural(len(fallback), 'MoE layer')} {sorted(fallback)[:8]} use {GREEDY_FALLBACK} "
                f"instead ({first.split('; ')[0]}); reap_report.json greedy_fallback says why for each")
    return notes


def check_stats(stats, spec: Layout, path) -> None:
    """A stats file must match the model and be complete (in every MoE layer, MTP modules included when kept)."""
    if stats.num_experts == spec.num_experts and spec.mtp_layers and stats.num_layers == spec.num_layers:
        raise UserError(f"stats file {path} has no rows for this model's {plural(spec.mtp_layers, 'MTP module')} "
                        f"(layers {spec.num_layers}..{spec.stat_layers - 1}); calibrate again with this version of "
                        "reap, or pass --drop-mtp to leave the MTP modules out of the pruned model")
    # --drop-mtp with a file that has MTP rows: the decoder layers' rows are the same either way (MTP runs after them)
    rows = stats.num_layers - int(stats.meta.get("mtp_layers") or 0) if not spec.mtp_layers else stats.num_layers
    if (rows, stats.num_experts) != (spec.stat_layers, spec.num_experts):
        raise UserError(f"stats file {path} is for {stats.num_layers} layers x {stats.num_experts} experts, the model has "
                        f"{spec.stat_layers} x {spec.num_experts}; calibrate this model with `reap calibrate`")
    missing = sorted(set(spec.moe_layers) - stats.completed)
    if missing:
        raise UserError(f"stats file {path} is incomplete (layers {missing[:5]}... missing); finish it with "
                        "`reap calibrate ... --resume`")
