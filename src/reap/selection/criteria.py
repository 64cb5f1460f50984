"""The registry of expert-saliency criteria: one :class:`Criterion` per name.

A criterion turns per-layer, per-expert statistics (:class:`reap.calibrate.stats.ExpertStats`, float64 [L, E] tables
summed over the routed (token x, expert j) pairs of the calibration data) into scores [L, E]; higher means
more important, the lowest scores of a layer are pruned. Notation: for expert j of a layer, n_j = tokens
routed to j (``count``), g = the routing weight the model applies to f_j(x) (``gate_sum`` = sum g),
||f|| = the L2 norm of j's output (``ean_sum`` = sum ||f||, ``ean_sq_sum`` = sum ||f||^2, ``max_norm`` =
max ||f||), ``reap_sum`` = sum g ||f||. Experts never routed (n_j = 0) score 0 under every criterion except
``random``.

Each entry says which fields it needs (:meth:`Criterion.scores` raises a UserError naming the missing ones for
an old stats file), whether it needs calibration data at all, and the sentence a model card prints for it.
``METHODS`` is the tuple of names, in registry order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from reap.core.errors import UserError


def _mean(total: Tensor, count: Tensor) -> Tensor:
    """total / count where count > 0, else 0 (float64)."""
    return torch.where(count > 0, total / count.clamp_min(1.0), torch.zeros((), dtype=total.dtype))


@dataclass(frozen=True)
class Criterion:
    """One way of scoring experts.

    ``fn(stats, seed)`` returns float64 scores [L, E]; ``needs`` lists the ExpertStats fields it reads;
    ``card`` is the model-card description (one sentence, Markdown); ``needs_data`` is False only for
    criteria that ignore the statistics (``random``).
    """

    name: str
    needs: tuple[str, ...]
    fn: Callable[..., Tensor]
    card: str
    needs_data: bool = True
    zero_unrouted: bool = True  # never-routed experts score 0 (False: the criterion ranks them itself)

    def scores(self, stats, seed: int = 0) -> Tensor:
        """Scores [L, E] float64 from ``stats``; UserError if a needed field is missing from it."""
        if self.needs_data:
            stats.require(self.needs, f"criterion {self.name!r}")
        out = self.fn(stats, seed).to(torch.float64)
        if self.needs_data and self.zero_unrouted:  # never-routed experts score 0 (also guards 0/0 in ratios)
            out = torch.where(stats.count > 0, out, torch.zeros((), dtype=torch.float64))
        return out


def _random(stats, seed: int) -> Tensor:
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.rand(stats.num_layers, stats.num_experts, generator=gen, dtype=torch.float64)


#: the criterion ``reap prune`` uses unless ``--method`` says otherwise (docs/criteria.md: why)
DEFAULT = "greedy-rerouted"
#: what greedy-rerouted uses in a layer without a greedy order (group-limited or hash routing, a router reap cannot
#: drive with experts removed): the best statistic-based criterion of the study
GREEDY_FALLBACK = "weighted-ean"


def greedy_fallback_layers(stats) -> dict[int, str]:
    """Completed layers without a greedy order, and why (the calibration's note, where it left one)."""
    notes = (stats.meta.get("greedy") or {}).get("fallback") or {}
    return {layer: notes.get(str(layer), "no greedy order computed for this layer")
            for layer in sorted(stats.completed) if bool(torch.isnan(stats.greedy_rank[layer]).any())}


def _greedy(stats, _seed) -> Tensor:
    """Position in the greedy removal order (0: removed first; higher: kept longer); layers without an order use
    weighted-ean, scaled into [0, E) so that the layer's scores read alike."""
    if "greedy_rank" in stats.missing:
        where = f"stats file {stats.source}" if stats.source else "these statistics"
        raise UserError(f"criterion 'greedy-rerouted' (the default) needs the greedy re-routing order, which {where} "
                        f"lack{'s' if stats.source else ''} (made by an older reap or with --greedy-tokens 0); recalibrate with this reap "
                        "(`reap calibrate MODEL --dataset DATA --out STATS`), or pass --method weighted-ean or "
                        "--method reap")
    out = stats.greedy_rank.clone()
    for layer in greedy_fallback_layers(stats):
        s = stats.reap_sum[layer]
        top = float(s.max())
        out[layer] = (s / top * (stats.num_experts - 1)) if top > 0 else torch.zeros_like(s)
    return out


def reap_prior_scores(stats, strength: float = 1.0) -> Tensor:
    """``reap-prior``: sum g||f|| / (n_j + strength * n_bar), n_bar = the layer's mean tokens per expert.

    The REAP mean with a prior of ``strength * n_bar`` pseudo-tokens of score 0: experts routed about as often
    as the average keep (nearly) their REAP order, rarely routed ones are pulled towards 0 in proportion to how
    little evidence and how little traffic they have. ``strength`` 0 is REAP; a large strength ranks by the sum.
    """
    n_bar = stats.count.sum(1, keepdim=True) / stats.num_experts  # [L, 1]
    return stats.reap_sum / (stats.count + strength * n_bar).clamp_min(1e-300)


_ENTRIES = (
    Criterion("reap", ("count", "reap_sum"), lambda s, _: _mean(s.reap_sum, s.count),
              "REAP (arXiv 2510.13999): the mean over the tokens routed to an expert of its routing weight times the "
              "L2 norm of its output, mean of g(x)·‖f(x)‖."),
    Criterion("ean", ("ean_sum",), lambda s, _: s.ean_sum.clone(),
              "EAN: the sum over routed tokens of the L2 norm of the expert's output, Σ‖f(x)‖."),
    Criterion("frequency", ("count",), lambda s, _: s.count.clone(),
              "frequency: the number of calibration tokens routed to the expert."),
    Criterion("weighted-frequency", ("gate_sum",), lambda s, _: s.gate_sum.clone(),
              "weighted frequency: the sum over routed tokens of the expert's routing weight, Σ g(x)."),
    Criterion("random", (), _random, "random: uniform random scores from a seeded generator (a baseline; no data).",
              needs_data=False),
    Criterion("weighted-ean", ("reap_sum",), lambda s, _: s.reap_sum.clone(),
              "weighted EAN: the sum (not the mean) over routed tokens of routing weight times output norm, "
              "Σ g(x)·‖f(x)‖."),
    Criterion("ean-mean", ("count", "ean_sum"), lambda s, _: _mean(s.ean_sum, s.count),
              "mean EAN: the mean over routed tokens of the L2 norm of the expert's output."),
    Criterion("ean-sq", ("ean_sq_sum",), lambda s, _: s.ean_sq_sum.clone(),
              "EAN of squared norms: the sum over routed tokens of the squared L2 norm of the expert's output, "
              "Σ‖f(x)‖²."),
    Criterion("max-activation", ("max_norm",), lambda s, _: s.max_norm.clone(),
              "max activation: the largest L2 norm of the expert's output over the calibration tokens."),
    Criterion("reap-prior", ("count", "reap_sum"), lambda s, _: reap_prior_scores(s),
              "REAP with a frequency prior: Σ g(x)·‖f(x)‖ / (n + n̄), the REAP mean shrunk towards 0 by one "
              "layer-average expert's worth of tokens (n̄), so rarely routed experts need more evidence."),
    Criterion("greedy-rerouted", (), _greedy, zero_unrouted=False, card=
              "greedy re-routing search: experts removed one at a time, each time the one whose removal (its tokens "
              "re-routed to their next choice) least increases the squared error of the MoE layer's output against "
              "the unpruned layer on a sample of calibration tokens (the model's own router re-run with the removed experts' "
              "rows sliced out at every step)."),
)

CRITERIA: dict[str, Criterion] = {c.name: c for c in _ENTRIES}
METHODS = tuple(CRITERIA)


def get_criterion(name: str) -> Criterion:
    """The criterion called ``name``; UserError listing the known names otherwise."""
    try:
        return CRITERIA[name]
    except KeyError:
        raise UserError(f"unknown --method {name!r}; choose one of: {', '.join(METHODS)}") from None
