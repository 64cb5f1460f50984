"""What the greedy re-routing search measured, for the report: per layer the MoE output error after each removal,
its knee, the error at the cut, and a suggested ratio.

The default criterion (``greedy-rerouted``) scores an expert by its position in the greedy removal order, so its
scores are a ramp and say nothing about how much a cut costs. What the search also measured, and a stats file
records as ``greedy_error`` (:meth:`reap.calibrate.stats.ExpertStats.greedy_curve`), is the layer's output error after each
removal step: e(n) = sum_t ||y_t - y'_t||^2 / sum_t ||y_t||^2 on the search's token sample, with the first n experts
of the order removed and their tokens re-routed by the model's own router. :func:`knee` finds where that curve
starts to climb fast; :func:`greedy_analysis` gathers the curves, knees and cut errors of a report, and the knee of
the layers' mean curve, which gives the suggested ratio (every layer drops the same count).

Stats files written before the error was recorded have no curves: :func:`greedy_analysis` returns None and the
report shows the removal order instead, with a note (:data:`NO_CURVE_NOTE`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

#: the smallest bend (the largest gap between the curve and its chord, both scaled to [0, 1]) called a knee
MIN_BEND = 0.1
#: said where the greedy-rerouted report has no measured error (a stats file from an older reap)
NO_CURVE_NOTE = ("this stats file has no greedy error curve (written by an older reap): shown is each expert's "
                 "position in the greedy removal order; recalibrate with this reap to see the output error per "
                 "removal and the knee")
#: what the error numbers are, in one line
ERROR_DEFINITION = ("output error = ||y - y'||^2 / ||y||^2, y the MoE layer's output on the greedy search's token "
                    "sample, y' the same with the experts removed and their tokens re-routed by the model's router")


def knee(curve: Sequence[float], min_bend: float = MIN_BEND) -> int | None:
    """The knee of an error curve (``curve[n]``: the error with n experts removed, n = 0..N): the n after which the
    error starts to climb fast, or None when the curve has no bend (straight, or steepest at the start).

    Kneedle's rule: with n and the error both scaled to [0, 1] over the curve, the knee is the point farthest below
    the straight line from the first point to the last (largest n/N - (e(n) - e(0)) / (e(N) - e(0))); a gap
    under ``min_bend`` is no knee. On a convex curve that is where a removal starts to cost more than the average
    removal of the whole curve, (e(N) - e(0)) / N; a flat curve that turns steep has its knee at the last flat point.
    """
    n_last = len(curve) - 1
    if n_last < 2:
        return None
    first, last = float(curve[0]), float(curve[-1])
    span = last - first
    if not (math.isfinite(span) and span > 0):
        return None
    gaps = [n / n_last - (float(e) - first) / span for n, e in enumerate(curve)]
    best = max(range(len(gaps)), key=lambda n: (gaps[n], -n))  # the first of equal gaps
    return best if gaps[best] >= min_bend else None


def ratio_for(n_drop: int, num_experts: int) -> float:
    """The shortest decimal ratio ``reap prune --ratio`` turns into exactly ``n_drop`` of ``num_experts``
    (floor(E x ratio) = n_drop)."""
    from reap.selection.choose import n_to_drop

    for digits in range(2, 10):
        scale = 10 ** digits
        r = math.ceil(n_drop * scale / num_experts) / scale
        if 0 < r < 1 and n_to_drop(num_experts, r) == n_drop:
            return r
    return n_drop / num_experts


@dataclass
class LayerErrors:
    """One layer's measured curve (``curve[n]``: the error with the first n of its greedy order removed)."""

    layer: int
    curve: list[float]
    knee: int | None
    cut: int | None = None  # experts the report's cut removes from this layer (None: no cut)
    cut_error: float | None = None  # the error at the cut, where the cut is the search's own first ``cut`` removals

    @property
    def steps(self) -> int:
        return len(self.curve) - 1


@dataclass
class GreedyAnalysis:
    """The greedy error of every layer that has one, and what they suggest."""

    num_experts: int
    layers: list[LayerErrors]
    mean_curve: list[float]  # the layers' mean error per count removed (over the steps every layer has)
    knee: int | None  # of the mean curve: experts to remove per layer
    no_curve: list[int] = field(default_factory=list)  # completed layers without a curve (fallback criterion)
    off_order: list[int] = field(default_factory=list)  # layers whose cut is not the search's first removals

    @property
    def suggested_ratio(self) -> float | None:
        return ratio_for(self.knee, self.num_experts) if self.knee else None

    def at(self, n: int) -> float | None:
        """The mean error with ``n`` experts removed from every layer (None past the searched steps)."""
        return self.mean_curve[n] if 0 <= n < len(self.mean_curve) else None


def greedy_analysis(stats, pruned: dict[int, list[int]] | None = None,
                    layers: Sequence[int] | None = None) -> GreedyAnalysis | None:
    """The measured error curves of ``stats`` (an :class:`reap.calibrate.stats.ExpertStats`) for ``layers`` (default: its
    completed layers), with the cut of ``pruned`` (layer -> pruned ids); None without any curve (an older file)."""
    if stats is None or not getattr(stats, "has_greedy_error", False):
        return None
    pruned = pruned or {}
    layers = sorted(stats.completed) if layers is None else list(layers)
    rows, no_curve, off_order = [], [], []
    for layer in layers:
        curve = stats.greedy_curve(layer)
        if curve is None:
            no_curve.append(layer)
            continue
        row = LayerErrors(layer, curve, knee(curve))
        if layer in pruned:
            ids = set(pruned[layer])
            row.cut = len(ids)
            order = stats.greedy_order(layer) or []
            if row.cut <= row.steps and ids == set(order[: row.cut]):
                row.cut_error = curve[row.cut]
            elif ids:
                off_order.append(layer)
        rows.append(row)
    if not rows:
        return None
    steps = min(r.steps for r in rows)
    mean = [sum(r.curve[n] for r in rows) / len(rows) for n in range(steps + 1)]
    return GreedyAnalysis(stats.num_experts, rows, mean, knee(mean), no_curve, off_order)


def pct(x: float | None, digits: int = 2) -> str:
    """An error as a percentage (``-`` for None)."""
    if x is None or not math.isfinite(x):
        return "-"
    if 0 < x * 100 < 10 ** -digits:
        return f"{x * 100:.1e}%"
    return f"{x * 100:.{digits}f}%"


def suggestion_lines(g: GreedyAnalysis, chosen: int | None = None) -> list[str]:
    """Sentences on the knee and the suggested ratio (``chosen``: the experts the report's cut removes per layer)."""
    E = g.num_experts
    knees = [r.knee for r in g.layers if r.knee is not None]
    lines = []
    if g.knee:
        lines.append(f"knee of the mean curve: {g.knee} of {E} experts removed per layer (mean output error "
                     f"{pct(g.at(g.knee))}); past it each removal costs more than the search's average "
                     f"removal: suggested --ratio "
                     f"{g.suggested_ratio:g} or lower")
    else:
        lines.append("the mean error curve has no knee (it rises steadily or is steepest at the start): "
                     "no ratio stands out; choose by the error you accept")
    if knees:
        lo = min(g.layers, key=lambda r: (r.knee is None, r.knee if r.knee is not None else 0))
        none = len(g.layers) - len(knees)
        lines.append(f"layer knees: {min(knees)} to {max(knees)} experts removed (earliest: layer {lo.layer})"
                     + (f"; {none} of {len(g.layers)} layers have none" if none else ""))
    if chosen is not None:
        mean = g.at(chosen)
        worst = max((r for r in g.layers if r.cut_error is not None), key=lambda r: r.cut_error, default=None)
        where = ("before the knee" if g.knee and chosen < g.knee else "at the knee" if g.knee == chosen
                 else "past the knee" if g.knee else "")
        lines.append(f"this cut removes {chosen} per layer{' (' + where + ')' if where else ''}: mean output error "
                     f"{pct(mean)}" + (f", worst layer {worst.layer} at {pct(worst.cut_error)}" if worst else ""))
    return lines
