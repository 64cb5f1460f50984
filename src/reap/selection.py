"""How many experts each layer keeps, and which: ``--multiple-of`` rounding and super-expert protection.

Pure functions on counts and score tables (no model, no I/O), for the CLI to wire in:

* :func:`kept_count` turns ``--ratio`` into the number of experts every layer keeps, optionally rounded
  down to a multiple of N (``--multiple-of N``: kernels and tensor-parallel shards often want expert counts
  divisible by 8, 16, ...). It refuses, with a UserError, a count below top-k or one that expert groups
  (DeepSeek-V3 ``n_group``) cannot share equally.
* :func:`super_experts` finds the experts whose largest output norm is an outlier in their layer ("super
  experts": max ||f|| > max(99.5th percentile, max / 10) of the layer's per-expert maxima); :func:`protect`
  makes sure they are never pruned.
* :func:`select` chooses kept/pruned experts per layer from a criterion, a ratio and these options.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reap.errors import UserError
from reap.saliency import choose_experts, n_to_drop

SUPER_QUANTILE = 0.995  # an expert is "super" if its max norm exceeds this quantile of the layer's maxima ...
SUPER_FRACTION = 0.1  # ... and this fraction of the layer's largest max norm


def kept_count(num_experts: int, ratio: float, top_k: int, multiple_of: int = 1, n_group: int = 1) -> int:
    """Experts each layer keeps: E - floor(E * ratio), rounded down to a multiple of ``multiple_of``.

    UserError if ``multiple_of`` is not a positive integer, if the result is below ``top_k`` (a token must
    still find top-k experts), or if ``n_group`` > 1 groups cannot each keep the same number (the result is
    not a multiple of ``n_group``). Without ``multiple_of`` and with groups, the drop count is rounded down to
    a multiple of ``n_group`` (reap's existing group rule), so the kept count is always a multiple of it.
    """
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise UserError(f"--multiple-of must be a positive whole number, got {multiple_of!r}; e.g. --multiple-of 8")
    if n_group < 1 or num_experts % n_group:
        raise ValueError(f"n_group {n_group} does not divide {num_experts} experts")
    n_drop = n_to_drop(num_experts, ratio)
    if multiple_of == 1:
        n_drop -= n_drop % n_group  # each group drops the same count
        kept = num_experts - n_drop
    else:
        kept = (num_experts - n_drop) // multiple_of * multiple_of
        if n_group > 1 and kept % n_group:
            raise UserError(
                f"--multiple-of {multiple_of} keeps {kept} of {num_experts} experts per layer, which the model's "
                f"{n_group} expert groups cannot share equally; pass a --multiple-of that is a multiple of {n_group}"
            )
    if kept < top_k:
        rounding = f" after rounding down to a multiple of {multiple_of}" if multiple_of > 1 else ""
        raise UserError(
            f"--ratio {ratio} keeps {kept} of {num_experts} experts per layer{rounding}, fewer than the {top_k} "
            "each token is routed to; pass a smaller --ratio" + (" or a smaller --multiple-of" if multiple_of > 1 else "")
        )
    return kept


def super_experts(max_norm: Tensor) -> Tensor:
    """bool [L, E]: experts whose max output norm exceeds max(99.5th percentile, max / 10) of their layer.

    ``max_norm`` is [L, E] (``ExpertStats.max_norm``); the percentile is over the layer's E per-expert maxima
    (linear interpolation, as torch.quantile). Layers with no routed tokens have none.
    """
    m = max_norm.to(torch.float64)
    q = torch.quantile(m, SUPER_QUANTILE, dim=1, keepdim=True)  # [L, 1]
    top = m.max(dim=1, keepdim=True).values  # [L, 1]
    thr = torch.maximum(q, SUPER_FRACTION * top)
    return (m > thr) & (top > 0)


def protect(scores: Tensor, protected: Tensor) -> Tensor:
    """Scores with every protected expert raised above all unprotected ones of its layer (order among the
    protected kept): a lowest-score cut never reaches them while it can drop an unprotected expert."""
    s = scores.to(torch.float64).clone()
    if protected.any():
        span = (s.max(dim=1, keepdim=True).values - s.min(dim=1, keepdim=True).values).clamp_min(1.0)  # [L, 1]
        lift = s.max(dim=1, keepdim=True).values + span + 1.0
        s = torch.where(protected, s - s.min(dim=1, keepdim=True).values + lift, s)
    return s


def select(stats, criterion: str, ratio: float, *, top_k: int = 1, multiple_of: int = 1,
           protect_super: bool = False, seed: int = 0) -> dict[int, tuple[list[int], list[int]]]:
    """Per completed layer: (kept, pruned) expert ids under ``criterion`` (a name in reap.criteria.CRITERIA).

    The kept count is :func:`kept_count`; with ``protect_super`` the :func:`super_experts` are never pruned
    (UserError if a layer has more of them than it keeps). No expert groups here: prune.py's group-aware
    selection takes the scores from :func:`scores_for` instead.
    """
    scores, protected = scores_for(stats, criterion, protect_super=protect_super, seed=seed)
    keep = kept_count(stats.num_experts, ratio, top_k, multiple_of)
    if protect_super and int(protected.sum(1).max()) > keep:
        raise UserError(f"{int(protected.sum(1).max())} super experts in a layer but only {keep} kept; "
                        "pass a smaller --ratio or leave out super-expert protection")
    return {layer: choose_experts(scores[layer], stats.num_experts - keep) for layer in sorted(stats.completed)}


def scores_for(stats, criterion: str, *, protect_super: bool = False, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(scores [L, E] with protection applied, protected [L, E] bool) for ``criterion`` on ``stats``."""
    scores = stats.scores(criterion, seed)
    protected = torch.zeros_like(scores, dtype=torch.bool)
    if protect_super:
        stats.require(("max_norm",), "super-expert protection")
        protected = super_experts(stats.max_norm)
        scores = protect(scores, protected)
    return scores, protected
