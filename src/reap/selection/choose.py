"""Selection: an :class:`reap.selection.plan.ExpertPlan` from a ratio and a criterion's scores, or from a keep file.

* :func:`experts_to_drop` is the one ratio -> count rule: floor(E x ratio) (:func:`n_to_drop`), rounded down so
  that every expert group loses the same number, or (``--multiple-of N``) the kept count rounded down to a
  multiple of N; refused, with a UserError that says what to pass instead, where it drops nothing or keeps fewer
  than the router needs (:meth:`reap.selection.plan.Routing.min_kept`).
* :func:`choose_experts` drops a layer's lowest scores (ties: the higher index first); :func:`plan_from_scores`
  does it per layer, per expert group when the model has groups, into a plan.
* :func:`read_keep_file` reads ``{"<layer>": [kept ids]}`` into a plan.
* :func:`super_experts` finds the super experts as Su et al. define them: the experts whose largest output
  magnitude (max |f_h|, ``max_abs``) is an outlier of the whole model's per-expert maxima (above their 99.5th
  percentile and a tenth of their maximum), in the first three quarters of the decoder layers; :func:`protect`
  raises their scores so that no cut reaches them.
* :func:`select` puts these together for a stats file (the criteria study, the tests).

Every plan made here passes :func:`reap.selection.plan.check_plan` (a keep file that does not is a UserError; a plan built
from scores that does not is a bug). torch is imported only where scores are handled: ``reap prune --keep`` and
``reap inspect --ratio`` use the rules without it.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

from reap.core.errors import UserError, plural
from reap.selection.plan import ExpertPlan, Routing, check_plan, layer_list

if TYPE_CHECKING:
    from torch import Tensor

SUPER_QUANTILE = 0.995  # an expert is "super" if its max |f_h| exceeds this quantile of the model's expert maxima,
SUPER_FRACTION = 0.1  # ... and this fraction of the largest of them,
SUPER_DEPTH = 0.75  # ... in a decoder layer below round(0.75 x the decoder layers) (the authors' include_layers)


# -- how many --------------------------------------------------------------------------------------------------
def n_to_drop(num_experts: int, ratio: float) -> int:
    """floor(num_experts * ratio), robust to float representation (256*0.3 -> 76, 100*0.29 -> 29).

    The ratio is read through its shortest decimal repr (an exact Fraction), and a small epsilon absorbs
    values such as 0.29999999999999999 that come out of arithmetic.
    """
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and 0.0 <= ratio < 1.0):
        raise UserError(f"prune ratio must be a number in [0, 1), got {ratio!r}; e.g. --ratio 0.5")
    exact = Fraction(repr(float(ratio))) * num_experts
    return int(math.floor(exact + Fraction(1, 10**9)))


def experts_to_drop(routing: Routing, ratio: float, multiple_of: int = 1) -> int:
    """floor(E * ratio), after checking the ratio leaves enough experts (the router's minimum; with expert groups,
    rounded down to a multiple of the group count so that every group loses the same number). With ``multiple_of``
    N > 1 the kept count E - floor(E * ratio) is rounded down to a multiple of N (``--multiple-of``); refused if
    that leaves fewer than the model needs or a count its expert groups cannot share equally."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or math.isnan(ratio) or not 0 < ratio < 1:
        raise UserError(f"--ratio must be a number strictly between 0 and 1 (got {ratio}); e.g. --ratio 0.3")
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise UserError(f"--multiple-of must be a positive whole number (got {multiple_of!r}); e.g. --multiple-of 8")
    e, groups, least = routing.num_experts, routing.n_group, routing.min_kept()
    n_drop = n_to_drop(e, ratio)
    if multiple_of > 1:
        kept = (e - n_drop) // multiple_of * multiple_of
        if groups > 1 and kept % groups:
            raise UserError(f"--multiple-of {multiple_of} keeps {kept} of {e} experts per layer, which the {groups} "
                            f"expert groups of {routing.family} cannot share equally; pass a --multiple-of that is a "
                            f"multiple of {groups}")
        if kept < least:
            raise UserError(f"--ratio {ratio} with --multiple-of {multiple_of} keeps {kept} of {e} experts per layer, "
                            f"fewer than the {least} the model needs (top-{routing.top_k}); pass a smaller --ratio or "
                            "--multiple-of")
        n_drop = e - kept
    if n_drop == 0:
        raise UserError(f"--ratio {ratio} drops floor({e} x {ratio}) = 0 experts; use a ratio of at least {1 / e:.4g}")
    if groups > 1:
        n_drop -= n_drop % groups
        if n_drop == 0:
            raise UserError(f"--ratio {ratio} drops fewer experts than the {groups} expert groups of {routing.family}, "
                            f"and every group must lose the same number; use a ratio of at least {groups / e:.4g}")
    if e - n_drop < least:
        most = (e - least) / e  # the largest drop that keeps min_kept experts, as a ratio
        raise UserError(f"--ratio {ratio} keeps {plural(e - n_drop, 'expert')}, fewer than {routing.needs()}; use "
                        f"--ratio {most:.4g} or less")
    return n_drop


# -- which -----------------------------------------------------------------------------------------------------
def choose_experts(scores: Tensor, n_drop: int) -> tuple[list[int], list[int]]:
    """Split experts into (kept, pruned), both sorted ascending, dropping the ``n_drop`` lowest scores.

    Experts are ranked by (score descending, index ascending) and the first E - n_drop are kept, so among
    equal scores the higher index is pruned first. NaN scores raise ValueError.
    """
    import torch

    s = scores.detach().reshape(-1).to("cpu", torch.float64)  # [E]
    num_experts = s.numel()
    if torch.isnan(s).any():
        raise ValueError("expert scores contain NaN")
    if not 0 <= n_drop < max(num_experts, 1):
        raise ValueError(f"n_drop must be in [0, {num_experts}), got {n_drop}")
    vals = s.tolist()
    order = sorted(range(num_experts), key=lambda i: (-vals[i], i))
    keep_n = num_experts - n_drop
    return sorted(order[:keep_n]), sorted(order[keep_n:])


def plan_from_scores(scores: Tensor, routing: Routing, layers: list[int], n_drop: int, method: str = "",
                     multiple_of: int = 1) -> ExpertPlan:
    """scores [L, E] -> per layer, the experts left after dropping the n_drop lowest (ties to the lower index).

    With expert groups (``routing.n_group`` > 1: contiguous, equally sized) each group drops n_drop / n_group of
    its own lowest, so the groups stay equally sized and, renumbered in original order, contiguous.
    """
    groups = routing.n_group
    if groups <= 1:
        keep = {layer: choose_experts(scores[layer], n_drop)[0] for layer in layers}
    else:
        if n_drop % groups or scores.shape[1] % groups:
            raise ValueError(f"{n_drop} dropped of {scores.shape[1]} experts cannot be split over {groups} groups")
        size, per_group = scores.shape[1] // groups, n_drop // groups
        keep = {layer: [g * size + e for g in range(groups)
                        for e in choose_experts(scores[layer, g * size : (g + 1) * size], per_group)[0]]
                for layer in layers}
    plan = ExpertPlan.keeping(routing.num_experts, keep, method)
    return check_plan(plan, routing, layers, multiple_of=multiple_of, where=f"the {method or 'scored'} plan",
                      error=RuntimeError)


def read_keep_file(path: str | Path, routing: Routing, layers: list[int]) -> ExpertPlan:
    """A ``{"<layer>": [kept expert ids]}`` JSON file as a plan, checked against the model (UserError)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"keep file {path} does not exist; pass a JSON file {{\"<layer>\": [expert ids]}}") from None
    except IsADirectoryError:
        raise UserError(f"keep file {path} is a directory; pass a JSON file {{\"<layer>\": [expert ids]}}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"keep file {path} is not valid JSON ({err}); it must look like {{\"0\": [0, 3, 5]}}") from None
    if not isinstance(data, dict):
        raise UserError(f"keep file {path} must be a JSON object {{\"<layer>\": [kept expert ids]}}")
    keep: dict[int, list[int]] = {}
    for key, ids in data.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise UserError(f"keep file {path} names layer {key!r}, which is not an MoE layer of the model "
                            f"({layer_list(layers)})")
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise UserError(f"keep file {path}: layer {key} must map to a list of integer expert ids")
        keep[int(key)] = ids
    # sorted (surgery keeps the original order); ids out of range or repeated are still there for check_plan
    return check_plan(ExpertPlan.keeping(routing.num_experts, keep, "keep-file"), routing, layers,
                      where=f"keep file {path}")


# -- super experts ---------------------------------------------------------------------------------------------
def super_experts(stats, layers=None, *, strict: bool = True) -> Tensor | None:
    """bool [L, E]: the super experts, as Su et al. define them ("Unveiling Super Experts in Mixture-of-Experts
    Large Language Models", 2025, Eq. 6; the authors' profiling code, ZunhaiSu/Super-Experts-Profilling).

    a[l, e] = the largest magnitude of any output element of expert e in layer l over the calibration tokens
    routed to it: max over routed x and h of |f_e(x)_h|, f before the routing weight (the down_proj output; with a
    post-expert norm, after it), ``ExpertStats.max_abs``; 0 for an expert never routed. A = {a[l, e] : l in L, every
    e} is ONE set across the model (not per layer: a layer's own 99.5th percentile of E maxima always lies below
    its largest, which would make the top expert of every layer "super"). Expert e of a layer l in L is super iff

        a[l, e] > P99.5(A)  and  a[l, e] > max(A) / 10

    with P99.5 by linear interpolation (torch.quantile, numpy.percentile), computed exactly at selection time from
    the [L, E] maxima (no histogram: the definition's percentile is over these L x E maxima, not over activation
    values). L, the layers that form the massive activations (experts in the final layers can have outliers of
    their own that form none): as the authors' code (``include_layers=0.75``), the decoder layers below
    round(0.75 x their count) (Python's round, as theirs) that routed tokens (dense layers and MTP modules left out),
    or ``layers`` where given. A model without
    a heavy tail still gets about 0.5% of the experts of L (at least its largest); the max / 10 condition is what
    leaves only the real outliers where there are some.

    ``stats``: an :class:`reap.calibrate.stats.ExpertStats` (``max_abs``; a file written before it was recorded is
    a one-line UserError saying to recalibrate, or, with ``strict=False``, None) or an [L, E] table of a itself.
    (CerebrasResearch/reap's ``get_super_expert_indices`` reads the same two thresholds over all layers' signed
    maxima and then drops the last quarter of the layers; the authors' profiling hook takes |output[0]|, the first
    row of each down_proj call. reap takes every routed row, magnitudes, and the authors' choice of layers.)
    """
    import torch

    if isinstance(stats, torch.Tensor):
        a, rows = stats.to(torch.float64), stats.shape[0]
    else:
        if "max_abs" in stats.missing:
            if not strict:
                return None
            stats.require(("max_abs",), "--protect-super-experts", instead="leave out --protect-super-experts")
        a = stats.max_abs.to(torch.float64)
        rows = stats.num_layers - int((getattr(stats, "meta", None) or {}).get("mtp_layers") or 0)
    if layers is None:
        layers = range(round(SUPER_DEPTH * rows))
    pool = [layer for layer in layers if 0 <= layer < a.shape[0] and bool((a[layer] > 0).any())]  # routed MoE layers
    protected = torch.zeros(a.shape, dtype=torch.bool)
    if not pool:
        return protected
    values = a[pool]  # [|L|, E]
    top = values.max()
    threshold = torch.maximum(torch.quantile(values.reshape(-1), SUPER_QUANTILE), SUPER_FRACTION * top)
    protected[pool] = values > threshold
    return protected


def check_super_fit(protected: Tensor, keep: int, layers=None) -> None:
    """UserError where a layer (of ``layers``; default: every row) has more super experts (``protected`` [L, E])
    than the ``keep`` experts it keeps."""
    rows = protected if layers is None else protected[list(layers)]
    most = int(rows.sum(1).max()) if rows.numel() else 0
    if most > keep:
        raise UserError(f"{most} super experts in a layer but only {keep} kept; pass a smaller --ratio or leave out "
                        "--protect-super-experts")


def protect(scores: Tensor, protected: Tensor) -> Tensor:
    """Scores with every protected expert raised above all unprotected ones of its layer (order among the
    protected kept): a lowest-score cut never reaches them while it can drop an unprotected expert."""
    import torch

    s = scores.to(torch.float64).clone()
    if protected.any():
        span = (s.max(dim=1, keepdim=True).values - s.min(dim=1, keepdim=True).values).clamp_min(1.0)  # [L, 1]
        lift = s.max(dim=1, keepdim=True).values + span + 1.0
        s = torch.where(protected, s - s.min(dim=1, keepdim=True).values + lift, s)
    return s


def select(stats, criterion: str, ratio: float, *, routing: Routing | None = None, top_k: int = 1,
           multiple_of: int = 1, protect_super: bool = False, seed: int = 0) -> ExpertPlan:
    """The plan of a stats file's completed layers under ``criterion`` (a name in reap.selection.criteria.CRITERIA).

    The count is :func:`experts_to_drop` (``routing``: the model's; default: ``top_k`` and no groups); with
    ``protect_super`` the :func:`super_experts` are never pruned (UserError if a layer has more of them than it
    keeps).
    """
    routing = routing or Routing("model", stats.num_experts, top_k)
    scores, protected = scores_for(stats, criterion, protect_super=protect_super, seed=seed)
    n_drop = experts_to_drop(routing, ratio, multiple_of)
    if protect_super:
        check_super_fit(protected, routing.num_experts - n_drop)
    return plan_from_scores(scores, routing, sorted(stats.completed), n_drop, criterion, multiple_of)


def scores_for(stats, criterion: str, *, protect_super: bool = False, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(scores [L, E] with protection applied, protected [L, E] bool) for ``criterion`` on ``stats``."""
    import torch

    scores = stats.scores(criterion, seed)
    protected = torch.zeros_like(scores, dtype=torch.bool)
    if protect_super:
        protected = super_experts(stats)  # a stats file without max_abs: one line, recalibrate
        scores = protect(scores, protected)
    return scores, protected
