"""The expert plan: per MoE layer, which source expert each output expert is, and every rule a plan obeys.

An :class:`ExpertPlan` is the one object that passes from selection (:mod:`reap.selection.choose`: a ratio and a
criterion's scores, or a keep file) to surgery (:mod:`reap.rewrite.surgery`), verify (:mod:`reap.rewrite.verify`) and the report
(``reap_report.json``'s ``layers``): per layer, the output experts 0..K-1 in order, each an :class:`OutputExpert`
naming its source (a plain prune keeps one source with weight 1; a later expert merge may name several weighted
sources, which surgery refuses until it can write them).

:func:`check_plan` holds every rule a plan must obey, in one place: every MoE layer planned and no other, source
ids in range and not repeated, output experts in original order (so that expert groups stay contiguous), at least
the minimum the router needs (:meth:`Routing.min_kept`: top-k; with expert groups, enough in the allowed groups),
equally many from every expert group, the same count in every layer (config.json stores one), a multiple of
``--multiple-of``. A keep file failing it is the user's mistake (UserError); a plan reap built, or an output that
reads back otherwise, is a bug (RuntimeError).

No torch, no I/O: ``reap prune --keep`` builds and checks its plan without importing torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from reap.core.errors import UserError, plural

GROUP_SCORE_TOP = 2  # group-limited routers (DeepSeek-V3 style) score a group by its best two experts


@dataclass(frozen=True)
class Routing:
    """What the selection rules need of a model: its expert count, top-k and expert groups."""

    family: str  # for messages: "deepseek_v3"
    num_experts: int  # E per layer
    top_k: int
    n_group: int = 1  # equally sized, contiguous expert groups (DeepSeek-V3 n_group); 1: none
    topk_group: int = 1  # groups a token may route into

    @classmethod
    def of(cls, layout: Any) -> Routing:
        """From a :class:`reap.model.arch.Layout` (or anything with the same attributes)."""
        return cls(layout.family, layout.num_experts, layout.top_k, layout.n_group, layout.topk_group)

    def min_kept(self) -> int:
        """The fewest experts a layer may keep: top-k, and with groups enough in the allowed groups for top-k
        (and at least two per group, which the group score needs)."""
        if self.n_group <= 1:
            return self.top_k
        return max(-(-self.top_k // self.topk_group), GROUP_SCORE_TOP) * self.n_group

    def needs(self) -> str:
        """Why min_kept, in words: "the 8 each token is routed to"."""
        if self.n_group <= 1:
            return f"the {self.top_k} each token is routed to"
        return (f"the {self.min_kept()} that top-{self.top_k} routing into {self.topk_group} of {self.n_group} equal "
                "groups needs")

    def group_of(self, expert: int) -> int:
        return expert // (self.num_experts // self.n_group)


@dataclass(frozen=True)
class OutputExpert:
    """One expert of the pruned layer: (source expert id, weight) pairs, the first the *anchor* (the kept expert
    whose router row and place it takes). A kept expert is ``((id, 1.0),)``; a merge is sum_j weight_j x source_j
    with each source's intermediate neurons permuted by ``aligned[j]`` first (``aligned[j][n]``: the source neuron
    that goes to neuron n; None: as it is)."""

    sources: tuple[tuple[int, float], ...]
    aligned: tuple[tuple[int, ...] | None, ...] = ()

    @classmethod
    def kept(cls, expert: int) -> OutputExpert:
        return cls(((int(expert), 1.0),))

    @property
    def is_copy(self) -> bool:
        return len(self.sources) == 1 and self.sources[0][1] == 1.0

    @property
    def anchor(self) -> int:
        return self.sources[0][0]

    @property
    def source(self) -> int:
        """The one source expert (a copy); ValueError for a merge."""
        if not self.is_copy:
            raise ValueError(f"output expert merges {len(self.sources)} sources; it has no single source")
        return self.sources[0][0]

    def permutation(self, j: int) -> tuple[int, ...] | None:
        """Source ``j``'s (position in ``sources``) neuron permutation, or None."""
        return self.aligned[j] if j < len(self.aligned) else None


@dataclass(frozen=True)
class ExpertPlan:
    """Per MoE layer (MTP modules: layers num_layers..), the output experts 0..K-1 in order.

    ``method`` says how it was chosen (a criterion's name, "keep-file"); ``num_experts`` is E of the source.
    """

    num_experts: int
    layers: Mapping[int, tuple[OutputExpert, ...]]
    method: str = ""

    @classmethod
    def keeping(cls, num_experts: int, keep: Mapping[int, Iterable[int]], method: str = "") -> ExpertPlan:
        """The plan that keeps, per layer, the given source experts (in ascending order) and drops the rest."""
        return cls(num_experts, {int(layer): tuple(OutputExpert.kept(e) for e in sorted(ids))
                                 for layer, ids in sorted(keep.items())}, method)

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self.layers)

    @property
    def kept_per_layer(self) -> int:
        """K, the same in every layer (ValueError otherwise: check_plan refuses such a plan)."""
        counts = {len(v) for v in self.layers.values()}
        if len(counts) != 1:
            raise ValueError(f"layers keep different numbers of experts: {sorted(counts)}")
        return counts.pop()

    def kept(self, layer: int) -> list[int]:
        """The anchor (the source expert whose router row it keeps) of each output expert of ``layer``, in output
        order."""
        return [out.anchor for out in self.layers[layer]]

    def pruned(self, layer: int) -> list[int]:
        """Source experts of ``layer`` that are no output expert's anchor (merged into one, or dropped), ascending."""
        used = set(self.kept(layer))
        return [e for e in range(self.num_experts) if e not in used]

    def merges(self, layer: int) -> dict[int, OutputExpert]:
        """Output index -> output expert, for the output experts of ``layer`` that are merges."""
        return {i: out for i, out in enumerate(self.layers[layer]) if not out.is_copy}

    @property
    def keep(self) -> dict[int, list[int]]:
        """layer -> kept source ids in output order (what surgery copies); the keep file's content."""
        return {layer: self.kept(layer) for layer in self.moe_layers}

    def new_ids(self) -> dict[int, dict[int, int]]:
        """layer -> {source id: output id} of every kept expert."""
        return {layer: {old: new for new, old in enumerate(ids)} for layer, ids in self.keep.items()}

    def to_json(self) -> dict[str, list[int]]:
        """``{"<layer>": [kept ids]}``: a keep file that reproduces this plan (``reap prune --keep``)."""
        return {str(layer): ids for layer, ids in self.keep.items()}


def layer_list(layers: list[int]) -> str:
    """"0, 1, 2, 3, 4, 5, 6, 7..." for messages."""
    return ", ".join(map(str, layers[:8])) + ("..." if len(layers) > 8 else "")


def check_plan(plan: ExpertPlan, routing: Routing, layers: Iterable[int], *, multiple_of: int = 1,
               where: str = "plan", error: type[Exception] = UserError) -> ExpertPlan:
    """Every rule a plan obeys (see the module docstring); the first broken one raises ``error`` with ``where``
    ("keep file k.json", "verify") leading its message. Returns the plan."""
    layers = sorted(layers)
    if plan.num_experts != routing.num_experts:
        raise error(f"{where} is for {plan.num_experts} experts per layer; the model has {routing.num_experts}")
    for layer, outputs in sorted(plan.layers.items()):
        if layer not in layers:
            raise error(f"{where} names layer {layer!r}, which is not an MoE layer of the model "
                        f"({layer_list(layers)})")
        sources = [e for out in outputs for e, _ in out.sources]
        for out in outputs:  # a merge: its weights positive and summing to 1, each source in one output expert
            total = sum(w for _, w in out.sources)
            if not out.is_copy and (any(not w > 0 for _, w in out.sources) or abs(total - 1) > 1e-6):
                raise error(f"{where}: layer {layer} merges experts {[e for e, _ in out.sources]} with weights "
                            f"{[w for _, w in out.sources]}; they must be positive and sum to 1")
        if len(set(sources)) != len(sources):
            dup = next(i for i in sources if sources.count(i) > 1)
            raise error(f"{where}: layer {layer} lists expert {dup} more than once")
        ids = [out.anchor for out in outputs]
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < routing.num_experts]
        if bad:
            raise error(f"{where}: layer {layer} names expert {bad[0]}, but the model has experts "
                        f"0..{routing.num_experts - 1}")
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise error(f"{where}: layer {layer} lists expert {dup} more than once")
        if ids != sorted(ids):
            raise error(f"{where}: layer {layer} keeps its experts out of their original order {ids[:8]}")
        if len(ids) < routing.min_kept():
            raise error(f"{where}: layer {layer} keeps {plural(len(ids), 'expert')}, fewer than {routing.needs()}")
        if routing.n_group > 1:
            per = [sum(1 for i in ids if routing.group_of(i) == g) for g in range(routing.n_group)]
            if len(set(per)) != 1:
                raise error(f"{where}: layer {layer} keeps {per} experts from the {routing.n_group} expert groups of "
                            f"{routing.num_experts // routing.n_group}; {routing.family} routes by equally sized "
                            "groups, so keep the same number from each")
    missing = [layer for layer in layers if layer not in plan.layers]
    if missing:
        raise error(f"{where} has no entry for layer(s) {missing[:8]}; give the kept experts of every MoE layer")
    counts = sorted({len(v) for v in plan.layers.values()})
    if len(counts) != 1:
        raise error(f"{where} keeps different numbers of experts per layer ({counts}); {routing.family} stores one "
                    "expert count in config.json, so keep the same number in every layer")
    if multiple_of > 1 and counts[0] % multiple_of:
        raise error(f"{where} keeps {counts[0]} experts per layer, not a multiple of --multiple-of {multiple_of}")
    return plan
