"""The merge methods (``--merge METHOD``): a registry, one object each carrying its own proposal function.

The criterion has already chosen which experts stay (the *anchors*). A method proposes, for each pruned expert, the
kept experts it may be merged into (best first) and the mass its weights carry in a merge (its traffic or its REAP
saliency). It does not decide: :class:`reap.recover.observer.Recovery` merges a proposal only where it lowers the
layer's output error on the sample (:mod:`reap.recover.sample`), trying the candidates in order.

* ``fold`` (M-SMoE / HC-SMoE style): pruned experts in order of their score, each offered to the ``FOLD_CANDIDATES``
  kept experts whose outputs on the sample are most similar (cosine); weighted by traffic (routed tokens).
* ``ream`` (REAM, arXiv 2604.04356: groups around REAP-scored centroids): the kept experts, highest score first,
  each take up to ceil(E / K') - 1 of the pruned experts most similar to it by gated output (router probability x
  output), not yet taken; each pruned expert is offered to its group's centroid only; weighted by REAP saliency.

Legend: E experts, K' kept experts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from reap.core.errors import UserError

#: how many kept experts ``fold`` offers each pruned expert to
FOLD_CANDIDATES = 4


@dataclass(frozen=True)
class Proposals:
    """What a method is given for one layer: ``scores`` [E] (the criterion's; higher stays), ``kept`` and ``pruned``
    expert ids, ``similarity`` [E, E] (cosine of the experts' outputs on the sample), ``gated`` [E, E] (the same of
    router probability x output)."""

    scores: Tensor
    kept: list[int]
    pruned: list[int]
    similarity: Tensor
    gated: Tensor


@dataclass(frozen=True)
class MergeMethod:
    name: str
    description: str
    mass: str  # the statistic (a LayerAccumulator field) a merge weighs each expert by
    propose: Callable[[Proposals], list[tuple[int, list[int]]]]  # [(pruned expert, candidate kept experts)]


def _by_score(ids: list[int], scores: Tensor) -> list[int]:
    return sorted(ids, key=lambda e: (-float(scores[e]), e))


def _fold(p: Proposals) -> list[tuple[int, list[int]]]:
    kept = torch.as_tensor(p.kept)
    out = []
    for d in _by_score(p.pruned, p.scores):
        sim = p.similarity[d, kept]
        order = torch.argsort(-sim, stable=True)[:FOLD_CANDIDATES]
        out.append((d, [int(kept[i]) for i in order]))
    return out


def _ream(p: Proposals) -> list[tuple[int, list[int]]]:
    cap = math.ceil((len(p.kept) + len(p.pruned)) / len(p.kept)) - 1  # members beside the centroid
    free = set(p.pruned)
    out = []
    for c in _by_score(p.kept, p.scores):
        if not free or cap <= 0:
            break
        cand = sorted(free, key=lambda d: (-float(p.gated[c, d]), d))[:cap]
        for d in cand:
            free.discard(d)
            out.append((d, [c]))
    return out


MERGE_METHODS: dict[str, MergeMethod] = {m.name: m for m in (
    MergeMethod("fold", "each pruned expert folded into the most similar kept expert where that lowers the layer's "
                "output error on the sample, weighted by traffic, neurons aligned first", "count", _fold),
    MergeMethod("ream", "REAM: groups of the most similar pruned experts (gated outputs) around each kept expert, "
                "highest score first, merged weighted by REAP saliency where that lowers the output error", "reap_sum",
                _ream),
)}


def get_merge_method(name: str) -> MergeMethod:
    if name not in MERGE_METHODS:
        raise UserError(f"unknown --merge {name!r}; choose one of: {', '.join(MERGE_METHODS)} (or add an entry to "
                        "reap.recover.methods.MERGE_METHODS)")
    return MERGE_METHODS[name]
