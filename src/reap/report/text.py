"""The text summary of a report (``reap_summary.txt``, which ``reap report`` also prints).

Per layer: experts kept, the share of the saliency kept, the margin at the cut, never-routed experts and, with
statistics, how far other criteria would prune the same experts; then the averages and the Spearman correlation
of routing frequency and REAP score.
"""

from __future__ import annotations

import math

from reap import __version__
from reap.report.data import ReportData, spearman


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
    head = f"{'layer':>5} {'kept':>5} {'saliency kept':>13} {'min kept/max pruned':>19} {'never routed':>12}"
    head += "".join(f" {'same as ' + m:>{max(13, len(m) + 8)}}" for m in others)
    lines += ["", head]
    shares, agree = [], {m: [] for m in others}
    for layer in data.layers:
        s = data.scores[layer] if data.scores is not None else None
        pruned = data.pruned.get(layer, [])
        row = f"{layer:>5} {data.num_experts - len(set(pruned)):>5}"
        if s is not None and pruned and float(s.sum()) > 0:
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
                from reap.selection import choose_experts, plan_from_scores

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
