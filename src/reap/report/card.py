"""The model card (``README.md``) of a pruned checkpoint.

:func:`model_card` writes the text from a ``reap_report.json``: front matter carried from the source's card, what
was pruned and how, sizes before and after, a ``reap eval`` result when given, the experts kept per layer, the
pictures beside it and the command that reproduces the pruning (:func:`reproduce_command`); for ``greedy-rerouted``
with the search's measured error beside it (``reap_stats.safetensors`` with ``greedy_error``), the output error per
layer at this cut, the knee and a suggested ratio (:mod:`reap.report.greedy`). :func:`write_model_card` reads the
inputs from disk and writes the file.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Any

from reap import __version__
from reap.io.checkpoint import hub_id
from reap.core.errors import UserError
from reap.core.names import CARD_NAME, FIGURES, REPORT_NAME, STATS_NAME
from reap.report.data import card_front_matter, checkpoint_sizes
from reap.io.staging import write_text


def _criterion_card(method: str) -> str:
    from reap.selection.criteria import CRITERIA

    return CRITERIA[method].card.rstrip(".") if method in CRITERIA else method


def _selection_rows(report: dict) -> list[str]:
    """Model-card rows for --multiple-of, super experts and greedy fallback layers (where the report has them)."""
    rows = []
    if report.get("multiple_of"):
        rows.append(f"| Kept count | rounded down to a multiple of {report['multiple_of']} (--multiple-of) |")
    sup = report.get("super_experts")
    if sup is not None:
        n = sum(len(v) for v in sup.values())
        state = "never pruned (--protect-super-experts)" if report.get("protect_super_experts") else "not protected"
        rows.append(f"| Super experts | {n} (largest output magnitude above the 99.5th percentile and a tenth of the "
                    f"largest of all experts' in the first 3/4 of the layers, Su et al. 2025), {state} |")
    fb = report.get("greedy_fallback")
    if fb:
        rows.append(f"| Greedy fallback | {fb['criterion']} in layers {', '.join(sorted(fb['layers'], key=int))} |")
    return rows


def _fmt_count(n: int | None) -> str:
    from reap.core.humanize import human_count

    return "-" if n is None else f"{human_count(n)} ({n:,})"


def _fmt_bytes(n: int | None) -> str:
    from reap.core.humanize import human_bytes

    return "-" if n is None else f"{human_bytes(n)} ({n:,} bytes)"


def _change(a: int | None, b: int | None) -> str:
    return f"-{100 * (1 - b / a):.1f}%" if a and b is not None else "-"


def reproduce_command(report: dict[str, Any], out_dir: str | Path | None = None) -> str:
    """The command that made this pruning: the recorded one when it was ``reap prune``, else rebuilt."""
    cmd = str(report.get("command") or "")
    if cmd.startswith("reap prune "):
        return cmd
    parts = ["reap", "prune", str(report.get("source", "MODEL")), "--out", str(out_dir or "OUT")]
    if report.get("keep_file"):
        parts += ["--keep", str(report["keep_file"])]
    else:
        parts += ["--ratio", f"{report.get('ratio')}", "--method", str(report.get("method", "reap"))]
        if report.get("method") == "random":
            parts += ["--seed", str(report.get("seed", 0))]
        cal = report.get("calibration") or {}
        data = cal.get("data") or {}
        if data.get("dataset"):
            parts += ["--dataset", str(data["dataset"])]
            if data.get("samples") is not None:
                parts += ["--samples", str(data["samples"])]
            if data.get("max_length") is not None:
                parts += ["--max-length", str(data["max_length"])]
            if data.get("shuffle"):
                parts += ["--shuffle", "--seed", str(data.get("seed", 0))]
            if data.get("pack"):
                parts.append("--pack")
            if data.get("text_field", "text") != "text":
                parts += ["--text-field", str(data["text_field"])]
            if cal.get("dtype"):
                parts += ["--dtype", str(cal["dtype"])]
        rec = report.get("recovery") or {}
        if rec.get("merge"):
            parts += ["--merge", str(rec["merge"])]
        if rec.get("refit_router"):
            parts.append("--refit-router")
    return shlex.join(parts)


def _pruned_ids(ids: list[int]) -> str:
    return ", ".join(map(str, ids)) if ids else "none"


def model_card(
    report: dict[str, Any],
    *,
    name: str | None = None,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
    figures: list[str] | tuple[str, ...] = (),
    source_front_matter: dict[str, Any] | None = None,
    out_dir: str | Path | None = None,
    greedy=None,
) -> str:
    """The README.md text for a pruned checkpoint (see :func:`write_model_card`); ``greedy``: the
    :class:`reap.report.greedy.GreedyAnalysis` of its cut (a section on the measured output error)."""
    source = str(report.get("source", ""))
    source_name = hub_id(source) or Path(source).name or "the source model"
    name = name or f"{Path(source).name or 'model'}-reap"
    method, ratio = report.get("method", "?"), report.get("ratio")
    E, K = report.get("num_experts"), report.get("kept_per_layer")
    layers = {int(k): v for k, v in (report.get("layers") or {}).items()}
    if K is None and layers:
        K = len(next(iter(layers.values()))["kept"])
    created = report.get("created") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    fm: dict[str, Any] = {}
    src_fm = source_front_matter or {}
    for key in ("license", "license_name", "license_link", "library_name", "pipeline_tag", "language"):
        if src_fm.get(key) is not None:
            fm[key] = src_fm[key]
    fm.setdefault("library_name", "transformers")
    if hub_id(source):
        fm["base_model"] = hub_id(source)
    fm["tags"] = ["moe", "expert-pruning", "reap"]
    lines = ["---"]
    for key, value in fm.items():
        lines.append(f"{key}: {json.dumps(value)}")
    lines += ["---", "", f"# {name}", ""]
    method_text = {
        "reap": "REAP (router-weighted expert activation pruning, "
                "[arXiv 2510.13999](https://arxiv.org/abs/2510.13999)): "
                "each expert scored by the mean over the calibration tokens routed to it of gate weight x "
                "output norm",
        "ean": "expert activation norm: each expert scored by the sum of its output norms over the calibration tokens",
        "frequency": "routing frequency: each expert scored by the number of calibration tokens routed to it",
        "weighted-frequency": "weighted frequency: each expert scored by the sum of its gate weights over the "
                              "calibration tokens",
        "random": f"random choice (seed {report.get('seed', 0)}), a baseline",
        "keep-file": f"an explicit list of kept experts ({report.get('keep_file', 'keep file')})",
    }.get(method) or _criterion_card(method)
    chosen_by = {"reap": "by REAP saliency", "ean": "by expert activation norm", "frequency": "by routing frequency",
                 "weighted-frequency": "by weighted routing frequency", "random": "at random (a baseline)",
                 "greedy-rerouted": "by a greedy search that removes, one at a time, the expert whose removal least "
                                    "changes the MoE layers' output with its tokens re-routed",
                 "keep-file": "from an explicit keep list"}.get(method, f"by {method}")
    lines += [
        f"This is **{source_name}** with {E - K if E and K else '?'} of its {E} routed experts removed from every "
        f"MoE layer by reap, chosen {chosen_by}. Nothing else was changed: the kept experts' "
        "weights are copied byte for byte, the router rows (and the correction bias) are sliced to match, "
        "`config.json` gets the new expert count, and the checkpoint loads in the same serving engines as the "
        "original.",
        "",
        "## Pruning",
        "",
        "| | |",
        "|---|---|",
        f"| Source model | `{source}` |",
        f"| Method | {method_text} |",
        *_selection_rows(report),
        f"| Ratio | {ratio if ratio is not None else '-'} |",
        f"| Experts per layer | {E} -> {K} (top-{report.get('top_k', '?')} routing unchanged) |",
    ]
    mtp = report.get("mtp") or {}
    if mtp.get("kept"):
        lines.append(f"| Multi-token prediction | kept: {mtp['modules']} MTP module{'s' if mtp['modules'] != 1 else ''} "
                     f"(layer{'s' if mtp['modules'] != 1 else ''} {', '.join(map(str, mtp['layers']))} below) pruned "
                     f"to {K} experts {chosen_by.replace('by ', 'by their own ', 1) if chosen_by.startswith('by ') else chosen_by}"
                     "; MTP speculative decoding works as before |")
    elif report.get("dropped_mtp_tensors"):
        lines.append(f"| Multi-token prediction | left out ({report['dropped_mtp_tensors']} tensors, `--drop-mtp`): "
                     "serve without MTP speculative decoding |")
    rec = report.get("recovery") or {}
    if rec.get("merge"):
        lines.append(f"| Merged experts | `--merge {rec['merge']}`: {rec.get('folded_experts', 0)} pruned experts merged "
                     f"into {rec.get('merged_experts', 0)} kept ones (neurons aligned; each merge kept only where it "
                     "lowered its layer's output error on the sample; sources and weights in reap_report.json) |")
    if rec.get("refit_router"):
        lines.append(f"| Router | `--refit-router`: kept rows re-fit in {len(rec.get('refit_layers') or [])} MoE layers "
                     "(the others: no gain on held-out sample tokens) |")
    cal = report.get("calibration") or {}
    if cal:
        data = cal.get("data") or {}
        opts = ", ".join(f"{k} {data[k]}" for k in ("samples", "max_length", "shuffle", "pack", "seed")
                         if data.get(k) not in (None, False))
        lines.append(f"| Calibration data | `{data.get('dataset', '?')}`" + (f" ({opts})" if opts else "") + " |")
        lines.append(f"| Calibration tokens | {cal.get('tokens', '?'):,} in {cal.get('samples', '?')} samples, "
                     f"{cal.get('dtype', '?')} |" if isinstance(cal.get("tokens"), int) else
                     f"| Calibration tokens | {cal.get('tokens', '?')} |")
    else:
        lines.append("| Calibration data | none (the choice does not use calibration) |")
    support = report.get("support") or {}
    if support and support.get("status") != "verified":
        checked = ((report.get("calibration") or {}).get("selfcheck") or {}).get("checked")
        lines.append(f"| Model type | {support.get('text', '')}" + ("; the run-time self-check passed"
                                                                     if checked else "") + " |")
    lines += [
        f"| Date | {created} |",
        f"| Tool | reap {report.get('version', __version__)} |",
        "",
        "## Size",
        "",
        "| | before | after | change |",
        "|---|---|---|---|",
    ]
    b_params = before.get("total_params") if before else None
    a_params = after.get("total_params") if after else None
    b_active = before.get("active_params") if before else None
    a_active = after.get("active_params") if after else None
    b_disk = (before or {}).get("disk_bytes", report.get("bytes_before"))
    a_disk = (after or {}).get("disk_bytes", report.get("bytes_after"))
    lines += [
        f"| Parameters | {_fmt_count(b_params)} | {_fmt_count(a_params)} | {_change(b_params, a_params)} |",
        f"| Active parameters per token | {_fmt_count(b_active)} | {_fmt_count(a_active)} | "
        f"{_change(b_active, a_active)} |",
        f"| Tensor bytes on disk | {_fmt_bytes(b_disk)} | {_fmt_bytes(a_disk)} | {_change(b_disk, a_disk)} |",
        "",
    ]
    if evaluation:
        lines += _evaluation_lines(evaluation)
    lines += [
        "## Experts kept per layer",
        "",
        f"Each MoE layer keeps {K} of its {E} expert{'s' if E != 1 else ''}, renumbered 0..{(K or 1) - 1} in their "
        "original order. "
        "The removed experts (original ids):",
        "",
        "| layer | kept | removed experts |",
        "|---|---|---|",
    ]
    for layer, v in sorted(layers.items()):
        lines.append(f"| {layer} | {len(v['kept'])} | {_pruned_ids(v['pruned'])} |")
    lines += ["", "<details><summary>Kept experts (original ids) per layer</summary>", "",
              "| layer | kept experts |", "|---|---|"]
    for layer, v in sorted(layers.items()):
        lines.append(f"| {layer} | {', '.join(map(str, v['kept']))} |")
    lines += ["", "</details>", ""]
    if greedy is not None:
        lines += _greedy_lines(greedy, K, E)
    if figures:
        captions = {
            FIGURES["heatmap"]: ("Each expert's position in the greedy removal order (per layer, relative to the "
                                 "last; dark: removed early); the removed experts are drawn in grey."
                                 if method == "greedy-rerouted" else
                                 "Saliency of every expert (per layer, relative to the layer's largest); "
                                 "the removed experts are drawn in grey."),
            FIGURES["curves"]: ("Per layer, the MoE output error the greedy search measured after each removal; the "
                                "dashed line is this cut, the dot the knee." if greedy is not None else
                                "Per layer, the experts' saliency sorted from high to low; the dashed line is the "
                                "cut."),
            FIGURES["scatter"]: "Routing frequency against REAP score; red: removed experts.",
        }
        lines += ["## Pictures", ""]
        for fig in figures:
            lines += [f"![{fig}]({fig})", "", captions.get(fig, ""), ""]
    lines += [
        "## Reproduce",
        "",
        "```bash",
        reproduce_command(report, out_dir),
        "```",
        "",
        f"`{REPORT_NAME}` holds the full record (kept and removed experts, every expert's score, the "
        "calibration settings)" + (f"; `{STATS_NAME}` the calibration statistics" if cal else "") + ".",
        "",
    ]
    return "\n".join(lines)


def _greedy_lines(g, K: int | None, E: int | None) -> list[str]:
    """The section on the greedy search's measured output error: per layer at this cut and at the knee."""
    from reap.report.greedy import pct, suggestion_lines

    chosen = E - K if E and K else None
    lines = ["## Output error per layer", "",
             "What the greedy search measured, per MoE layer: the output error `||y - y'||² / ||y||²` (y: the "
             "layer's output on the search's sample of calibration tokens; y': the same with the experts removed and "
             "their tokens re-routed by the model's own router) at this cut, and the knee of the layer's error curve "
             "(the number of removals past which each one costs more than the search's average removal).", "",
             "| layer | error at this cut | knee (experts removed) | error at the knee |", "|---|---|---|---|"]
    for r in g.layers:
        lines.append(f"| {r.layer} | {pct(r.cut_error)} | {r.knee if r.knee is not None else 'none'} | "
                     f"{pct(r.curve[r.knee]) if r.knee is not None else '-'} |")
    lines.append("")
    lines += [f"- {line[0].upper() + line[1:]}." for line in suggestion_lines(g, chosen)]
    if g.off_order:
        lines.append(f"- Layers {', '.join(map(str, g.off_order))}: the cut is not the search's own first removals, "
                     "so no error was measured for it.")
    return lines + [""]


def _greedy_of(out_dir: Path, report: dict[str, Any]):
    """The greedy analysis of a pruned directory's cut, from its stats file (None: not greedy-rerouted, no stats
    file, or one without the measured error)."""
    if report.get("method") != "greedy-rerouted" or not (out_dir / STATS_NAME).is_file():
        return None
    from reap.report.greedy import greedy_analysis
    from reap.calibrate.stats import ExpertStats

    layers = {int(k): list(v.get("pruned", [])) for k, v in (report.get("layers") or {}).items()}
    return greedy_analysis(ExpertStats.load(out_dir / STATS_NAME), layers, sorted(layers))


def _evaluation_lines(evaluation: dict[str, Any]) -> list[str]:
    """A table of ``reap eval`` results: a comparison (original/pruned) or one model's evaluation."""
    if "original" in evaluation and "pruned" in evaluation:
        a, b = evaluation["original"], evaluation["pruned"]
        rows = [("original", a), ("pruned", b)]
    else:
        a = b = evaluation
        rows = [("this model", evaluation)]
    lines = ["## Evaluation", "",
             f"Next-token loss on `{a.get('dataset', '?')}`: {a.get('tokens', '?')} tokens, windows of "
             f"{a.get('seq_len', '?')} tokens (`reap eval`).", "",
             "| model | loss | perplexity |", "|---|---|---|"]
    for label, r in rows:
        lines.append(f"| {label} | {r['loss']:.4f} | {r['perplexity']:.3f} |")
    if a is not b:
        lines.append(f"| change | {b['loss'] - a['loss']:+.4f} | x{b['perplexity'] / a['perplexity']:.4f} |")
    return lines + [""]


def write_model_card(
    out_dir: str | Path,
    report: dict[str, Any] | None = None,
    *,
    source: str | Path | None = None,
    evaluation: dict[str, Any] | None = None,
    figures: list[str] | tuple[str, ...] | None = None,
    published_as: str | Path | None = None,
) -> Path:
    """Write ``README.md`` into a pruned output directory.

    ``report`` defaults to the directory's ``reap_report.json``; ``source`` (default: the report's source)
    is read with :func:`reap.report.inspect.describe` for the sizes before, the directory itself for the sizes
    after (the report's byte counts when a checkpoint cannot be read). ``figures`` defaults to the pictures
    present in the directory; ``published_as`` is the final path when ``out_dir`` is a staging directory.
    """
    out_dir = Path(out_dir)
    if report is None:
        try:
            report = json.loads((out_dir / REPORT_NAME).read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{out_dir} has no readable {REPORT_NAME} ({err}); "
                            "pass a pruned output directory") from None
    src = source if source is not None else report.get("source")
    if figures is None:
        figures = [name for name in FIGURES.values() if (out_dir / name).is_file()]
    final = Path(published_as) if published_as is not None else out_dir
    text = model_card(
        report,
        name=final.resolve().name,
        before=checkpoint_sizes(src),
        after=checkpoint_sizes(out_dir),
        evaluation=evaluation,
        figures=figures,
        source_front_matter=card_front_matter(Path(src) / CARD_NAME) if src else None,
        out_dir=final,
        greedy=_greedy_of(out_dir, report),
    )
    return write_text(out_dir / CARD_NAME, text)
