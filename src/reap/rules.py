"""The ratio -> drop-count rule of a pruning: how many experts every layer loses at ``--ratio``.

A neutral module: ``reap prune`` (:mod:`reap.prune`) and ``reap inspect`` (:mod:`reap.summary`) both apply the
rule, so neither imports the other for it. Importing it costs nothing (only :mod:`reap.errors`); the floor of
E x ratio itself, :func:`reap.saliency.n_to_drop`, is imported (with torch) when the rule is applied.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from reap.errors import UserError, plural

if TYPE_CHECKING:
    from reap.arch import Layout


def experts_to_drop(spec: Layout, ratio: float, multiple_of: int = 1) -> int:
    """floor(E * ratio), after checking the ratio leaves enough experts (top-k; with expert groups, rounded
    down to a multiple of the group count so that every group loses the same number). With ``multiple_of`` N > 1
    the kept count E - floor(E * ratio) is rounded down to a multiple of N (``--multiple-of``); refused if that
    leaves fewer than the model needs or a count its expert groups cannot share equally."""
    from reap.saliency import n_to_drop

    if not isinstance(ratio, (int, float)) or math.isnan(ratio) or not 0 < ratio < 1:
        raise UserError(f"--ratio must be a number strictly between 0 and 1 (got {ratio}); e.g. --ratio 0.3")
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise UserError(f"--multiple-of must be a positive whole number (got {multiple_of!r}); e.g. --multiple-of 8")
    n_drop = n_to_drop(spec.num_experts, ratio)
    groups = spec.n_group
    if multiple_of > 1:
        kept = (spec.num_experts - n_drop) // multiple_of * multiple_of
        if groups > 1 and kept % groups:
            raise UserError(f"--multiple-of {multiple_of} keeps {kept} of {spec.num_experts} experts per layer, which "
                            f"the {groups} expert groups of {spec.family} cannot share equally; pass a --multiple-of "
                            f"that is a multiple of {groups}")
        if kept < spec.min_kept():
            raise UserError(f"--ratio {ratio} with --multiple-of {multiple_of} keeps {kept} of {spec.num_experts} "
                            f"experts per layer, fewer than the {spec.min_kept()} the model needs (top-{spec.top_k}); "
                            "pass a smaller --ratio or --multiple-of")
        n_drop = spec.num_experts - kept
    if n_drop == 0:
        raise UserError(
            f"--ratio {ratio} drops floor({spec.num_experts} x {ratio}) = 0 experts; use a ratio of at least "
            f"{1 / spec.num_experts:.4g}"
        )
    if groups > 1:
        n_drop -= n_drop % groups
        if n_drop == 0:
            raise UserError(
                f"--ratio {ratio} drops fewer experts than the {groups} expert groups of {spec.family}, and "
                f"every group must lose the same number; use a ratio of at least {groups / spec.num_experts:.4g}"
            )
    if spec.num_experts - n_drop < spec.min_kept():
        # the largest drop that keeps min_kept experts, as a ratio
        most = (spec.num_experts - spec.min_kept()) / spec.num_experts
        why = (f"fewer than the {spec.top_k} each token is routed to" if groups <= 1 else
               f"fewer than the {spec.min_kept()} that top-{spec.top_k} routing into {spec.topk_group} of "
               f"{groups} equal groups needs")
        raise UserError(f"--ratio {ratio} keeps {plural(spec.num_experts - n_drop, 'expert')}, {why}; use --ratio "
                        f"{most:.4g} or less")
    return n_drop
