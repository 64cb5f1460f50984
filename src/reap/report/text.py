"""The text summary of a report (``reap_summary.txt``, which ``reap report`` also prints).

Per layer: experts kept, the share of the saliency kept, the margin at the cut, never-routed experts and, with
statistics, how far other criteria would prune the same experts; then the averages and the Spearman correlation
of routing frequency and REAP score. For ``greedy-rerouted`` (whose scores are positions in a removal order, so
their share and margin say nothing) the columns are instead what the greedy search measured
(:mod:`reap.report.greedy`): the MoE output error at the cut, the knee of the layer's error curve and the error
there; then a table of the error by experts removed and the suggested ratio.
"""

from __future__ import annotations

import math

from reap import __version__
from reap.report.data import ReportData, spearman
from reap.report.greedy import ERROR_DEFINITION, NO_CURVE_NOTE, greedy_analysis, pct, suggestion_lines

GREEDY = "greedy-rerouted"
#: the ratios at which the text summary tabulates the greedy error (those the search reached)
TABLE_RATIOS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)


def _common_cut(data: ReportData) -> int | None:
    """The experts every layer's cut removes, when it is the same count in every layer."""
    counts = {len(set(v)) for v in data.pruned.values()}
    return counts.pop() if len(counts) == 1 else None


def _error_table(g) -> list[str]:
    """The greedy error of every layer at a few ratios (columns: experts removed)."""
    E = g.num_experts
    ns = sorted({n for r in TABLE_RATIOS if 0 < (n := int(E * r)) <= g.layers[0].steps})
    if not ns:
        return []
    lines = ["", "output error per layer by experts removed, n (ratio), in the greedy order:",
             f"{'layer':>5}" + "".join(f" {f'{n} ({n / E:.3g})':>12}" for n in ns)]
    for row in g.layers:
        lines.append(f"{row.layer:>5}" + "".join(f" {pct(row.curve[n] if n <= row.steps else None):>12}" for n in ns))
    lines.append(f"{'mean':>5}" + "".join(f" {pct(g.at(n)):>12}" for n in ns))
    return lines + [f"({ERROR_DEFINITION})"]


def summary_text(data: ReportData) -> str:
    """Per layer: experts kept, share of the saliency kept, the margin at the cut, never-routed experts, and
    how far other criteria agree with the choice."""
    lines = [f"reap {__version__} report: {data.title}"]
    if data.source:
        lines.append(f"source       {data.source}")
    meta = (data.stats.meta if data.stats is not None else None) or (data.report or {}).get("calibration")
    if meta:
        d = meta.get("data") or {}
        lines.append(f"calibration  {d.get('dataset', '?')}: {meta.get('samples', '?')} samples, "
                     f"{meta.get('tokens', '?')} tokens (max length {d.get('max_length')}), {meta.get('dtype', '?')}")
    lines.append(f"layers       {data.num_layers}, {data.num_experts} experts each")
    others = ("frequency", "ean", "reap") if data.stats is not None else ()
    others = tuple(m for m in others if m != data.method)
    greedy = data.method == GREEDY  # scores are ranks: show what the search measured instead of shares of them
    g = greedy_analysis(data.stats, data.pruned, data.layers) if greedy else None
    per_layer = {row.layer: row for row in g.layers} if g is not None else {}
    if greedy:  # without the measured error (an older stats file) no score column: ranks share nothing
        head = f"{'layer':>5} {'kept':>5}" + (f" {'error at cut':>12} {'knee (removed)':>14} {'error at knee':>13}"
                                              if g is not None else "")
    else:
        head = f"{'layer':>5} {'kept':>5} {'saliency kept':>13} {'min kept/max pruned':>19}"
    head += f" {'never routed':>12}"
    head += "".join(f" {'same as ' + m:>{max(13, len(m) + 8)}}" for m in others)
    lines += ["", head]
    shares, agree = [], {m: [] for m in others}
    for layer in data.layers:
        s = data.scores[layer] if data.scores is not None else None
        pruned = data.pruned.get(layer, [])
        row = f"{layer:>5} {data.num_experts - len(set(pruned)):>5}"
        if greedy:
            if g is not None:
                r = per_layer.get(layer)
                knee_at = r.knee if r is not None else None
                row += (f" {pct(r.cut_error if r else None):>12} {knee_at if knee_at is not None else '-':>14}"
                        f" {pct(r.curve[knee_at] if knee_at is not None else None):>13}")
        elif s is not None and pruned and float(s.sum()) > 0:
            kept_mask = s.new_ones(data.num_experts).bool()
            kept_mask[pruned] = False
            share = float(s[kept_mask].sum() / s.sum())
            shares.append(share)
            lo, hi = float(s[kept_mask].min()), float(s[~kept_mask].max())
            row += f" {100 * share:>12.1f}% {lo / hi if hi > 0 else float('inf'):>19.3f}"
        else:
            row += f" {'-':>13} {'-':>19}"
        never = int((data.stats.count[layer] == 0).sum()) if data.stats is not None else None
        row += f" {never if never is not None else '-':>12}"
        for m in others:
            width = max(13, len(m) + 8)
            if pruned:
                from reap.report.data import routing_of  # others are only there with statistics (and torch)
                from reap.selection.choose import choose_experts, plan_from_scores

                scores = data.stats.scores(m)
                try:  # the same cut as this one's (per expert group where the model has groups)
                    theirs = set(plan_from_scores(scores, routing_of(data.stats), [layer], len(pruned),
                                                  m).pruned(layer))
                except (ValueError, RuntimeError):  # a keep file's cut no scored plan makes (groups uneven)
                    theirs = set(choose_experts(scores[layer], len(pruned))[1])
                overlap = len(theirs & set(pruned)) / len(pruned)
                agree[m].append(overlap)
                row += f" {100 * overlap:>{width - 1}.0f}%"
            else:
                row += f" {'-':>{width}}"
        lines.append(row)
    if greedy:
        lines += _greedy_lines(data, g)
    lines.append("")
    if shares:
        lines.append(f"saliency kept: {100 * sum(shares) / len(shares):.1f}% on average (min "
                     f"{100 * min(shares):.1f}%) of each layer's total {data.method} score")
    for m, values in agree.items():
        if values:
            lines.append(f"{m} would prune {100 * sum(values) / len(values):.0f}% of the same experts")
    if data.stats is not None:
        freq = data.stats.scores("frequency")
        reap = data.stats.scores("reap")
        rho = [spearman(freq[layer], reap[layer]) for layer in sorted(data.stats.completed)]
        rho = [r for r in rho if not math.isnan(r)]
        if rho:
            lines.append(f"Spearman(frequency, REAP) per layer: mean {sum(rho) / len(rho):.2f}, "
                         f"min {min(rho):.2f}, max {max(rho):.2f}")
    return "\n".join(lines).rstrip() + "\n"


def _layers(ids: list[int]) -> str:
    return f"layer{'s' if len(ids) != 1 else ''} {', '.join(map(str, ids))}"


def _greedy_lines(data: ReportData, g) -> list[str]:
    """The greedy search's error table, knee and suggested ratio (or why they are not there)."""
    if g is None:
        if data.stats is None:
            return ["", "no statistics beside this report: the greedy search's output error per removal is not shown"]
        return ["", f"note: {NO_CURVE_NOTE}"]
    lines = _error_table(g) + [""] + suggestion_lines(g, _common_cut(data) if data.pruned else None)
    if g.off_order:
        lines.append(f"{_layers(g.off_order)}: the cut is not the greedy search's own first removals (a protected "
                     "expert), so no error was measured for it ('-')")
    if g.no_curve:
        lines.append(f"{_layers(g.no_curve)}: no greedy order (weighted-ean stands in), so no error curve")
    return lines
