"""The recovery observer: per MoE layer, while calibration has the layer on the device, choose its experts, merge
pruned ones into kept ones and re-fit the router, each step kept only where it lowers the layer's output error.

:class:`Recovery` is a :class:`reap.stream.observers.LayerObserver` the prune job hands calibration (after the
greedy search, whose order the default criterion reads). It keeps a strided sample of the MoE block's inputs
(``tokens`` of them), and after the layer's batches:

1. chooses the layer's kept experts exactly as the job will (the criterion's scores of this layer's statistics, the
   same rules: :func:`reap.selection.choose.plan_from_scores`);
2. with a merge method (:mod:`reap.recover.methods`), takes each proposal (a pruned expert and the kept experts it
   may join) where the merge, neurons aligned first (:mod:`reap.recover.weights`), lowers the sample error
   (:mod:`reap.recover.sample`); if the merges together raise the held-out error, the layer keeps none of them;
3. with ``refit``, fits the kept router rows (:mod:`reap.recover.refit`), written only where the held-out error
   falls.

:attr:`Recovery.layers` (layer -> output experts, merges included), :attr:`Recovery.router_rows` (layer -> fitted
rows) and :attr:`Recovery.records` (what happened, for the report) are what the job reads.

Legend: S sampled tokens, E experts, H hidden, I expert intermediate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from reap.recover import weights as W
from reap.recover.methods import Proposals, get_merge_method
from reap.recover.refit import fit, router_leaf
from reap.recover.sample import LayerSample, pair_outputs
from reap.selection.plan import OutputExpert, Routing
from reap.stream.observers import ObserverCost

#: bytes of expert outputs the similarity of a layer's experts is computed on (E x S' x H float32)
SIMILARITY_BYTES = 1 << 28


@dataclass(frozen=True)
class RecoverSpec:
    """What recovery does: ``merge`` (a name in :data:`reap.recover.methods.MERGE_METHODS`, or None), ``refit``,
    ``tokens`` (sample per layer), ``refit_steps``; and the selection the job makes: ``criterion``, ``routing``,
    ``n_drop``, ``multiple_of``, ``protect_super``, ``seed``."""

    merge: str | None
    refit: bool
    criterion: str
    routing: Routing
    n_drop: int
    multiple_of: int = 1
    protect_super: bool = False
    seed: int = 0
    tokens: int = 4096
    refit_steps: int = 200


@dataclass
class _Layer:
    streamer: Any
    layer: int
    module: Any
    moe: Any
    experts: Any
    accumulator: Any
    sample: Any
    hook: Any = None


@dataclass
class Recovery:
    """The observer (see the module docstring). After the run: ``layers`` (layer -> output experts, merges
    included), ``router_rows`` (layer -> rows [K', H] float32 to write), ``columns`` (what the rewrite needs for fused
    experts), ``records`` (per layer: kept, errors before and after, merges, re-fit, seconds, or why it was skipped)."""

    spec: RecoverSpec
    log: Any = print
    layers: dict[int, tuple[OutputExpert, ...]] = field(default_factory=dict)
    router_rows: dict[int, torch.Tensor] = field(default_factory=dict)
    # layer -> (up-projection columns by neuron [I, c], the module is transposed): for fused experts on disk
    columns: dict[int, tuple] = field(default_factory=dict)
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0

    # -- the observer protocol
    def cost(self, streamer, expert_params: float, flops: float, bandwidth: float) -> ObserverCost:
        """Its peak after a layer's batches: the sample's pair outputs [S, K, H] and references in float32, the
        similarity's expert outputs, the re-fit's kept outputs (bounded by their budgets). Its time is not
        estimated (docs/criteria.md has measurements)."""
        from reap.recover.refit import REFIT_BYTES

        layout = streamer.layout
        peak = self.spec.tokens * (layout.top_k + 3) * layout.hidden_size * 4 + SIMILARITY_BYTES
        peak += REFIT_BYTES if self.spec.refit else 0
        return ObserverCost(0.0, peak, {"recover_peak_bytes": peak})

    def start(self, streamer, layer: int, module, moe, experts, accumulator) -> _Layer | None:
        from reap.calibrate.greedy import sample_inputs
        from reap.calibrate.greedy_order import TokenSample
        from reap.stream.streamer import block_of

        if accumulator is None:
            return None
        size = self.spec.tokens
        sample = TokenSample(size, stride=max(1, -(-streamer.tokens // size)))
        state = _Layer(streamer, layer, module, moe, experts, accumulator, sample)
        state.hook = sample_inputs(block_of(streamer.layout, module, moe, layer), experts, sample)
        return state

    def close(self, state: _Layer) -> None:
        if state.hook is not None:
            state.hook.remove()
            state.hook = None

    def finish(self, state: _Layer) -> None:
        self.close(state)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                self._recover(state)
        finally:
            self.seconds += time.perf_counter() - t0
            state.sample = None

    # -- one layer
    def _kept(self, state: _Layer) -> tuple[list[int], torch.Tensor]:
        """The layer's kept experts as the job chooses them, and its scores [E]."""
        from reap.calibrate.stats import ExpertStats
        from reap.selection.choose import plan_from_scores, scores_for

        st, spec = state.streamer, self.spec
        rows = st.layout.stat_layers
        stats = ExpertStats(rows, st.layout.num_experts)
        stats.set_layer(state.layer, state.accumulator)
        scores, _ = scores_for(stats, spec.criterion, protect_super=spec.protect_super, seed=spec.seed)
        plan = plan_from_scores(scores, spec.routing, [state.layer], spec.n_drop, spec.criterion, spec.multiple_of)
        return plan.kept(state.layer), scores[state.layer]

    def _recover(self, state: _Layer) -> None:
        from reap.stream.experts import is_wrapped

        layer, moe, experts = state.layer, state.moe, state.experts
        kept, scores = self._kept(state)
        self.layers[layer] = tuple(OutputExpert.kept(e) for e in kept)
        record: dict[str, Any] = {"kept": kept}
        self.records[layer] = record
        why = ("its router has slots beyond the experts" if moe.extra else
               "it routes by expert-id tables (hash routing)" if moe.id_tables else
               f"its experts module ({type(experts).__name__}) wraps the dispatched projections" if is_wrapped(experts)
               else "no token was sampled" if state.sample.size == 0 else None)
        if why is not None:
            record["skipped"] = why
            return
        try:
            self._recover_layer(state, kept, scores, record)
        except torch.OutOfMemoryError:  # the run's memory: reported as such (reap.calibrate.run)
            raise
        except (ValueError, RuntimeError, TypeError, KeyError, IndexError) as err:  # a block reap cannot drive
            self.layers[layer] = tuple(OutputExpert.kept(e) for e in kept)
            self.router_rows.pop(layer, None)
            self.columns.pop(layer, None)
            record.clear()
            record.update({"kept": kept, "skipped": f"its MoE block cannot be driven ({str(err).splitlines()[0]})"})

    def _recover_layer(self, state: _Layer, kept: list[int], scores: torch.Tensor, record: dict) -> None:
        from reap.calibrate.greedy import RouterDriver
        from reap.stream.streamer import block_of

        st, layer, moe, experts = state.streamer, state.layer, state.moe, state.experts
        spec, E, K = self.spec, st.layout.num_experts, st.layout.top_k
        block = block_of(st.layout, state.module, moe, layer)
        driver = RouterDriver(block, experts, moe.tensors, moe.block, K, E, moe.extra)
        removed = torch.ones(E, dtype=torch.bool, device=st.device)
        removed[kept] = False
        t0 = time.perf_counter()
        sample = LayerSample(driver, experts, state.sample.rows, removed)
        if moe.router is not None:
            sample.use_router(router_leaf(driver, moe.router, moe.block))
        record["error_pruned"] = sample.totals()
        record["seconds"] = {"sample": round(time.perf_counter() - t0, 3)}
        if spec.merge is not None:
            t0 = time.perf_counter()
            merged = self._merge(state, sample, driver, kept, scores, record)
            if merged:
                self.layers[layer] = tuple(merged[k] for k in kept)
            record["seconds"]["merge"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        if spec.refit:
            if moe.router is None:
                record["refit"] = "no router weight"
            else:
                result = fit(sample, router_leaf(driver, moe.router, moe.block), steps=spec.refit_steps,
                             tokens=spec.tokens)
                record["refit"] = {"improved": result.improved, "before": result.before, "after": result.after,
                                   "steps": result.steps}
                if result.improved or sample.rows_changed:
                    self.router_rows[layer] = result.rows.cpu()
        elif sample.rows_changed:
            self.router_rows[layer] = sample.rows.cpu()
            record["seconds"]["refit"] = round(time.perf_counter() - t0, 3)
        record["error_final"] = sample.totals()

    def _merge(self, state: _Layer, sample: LayerSample, driver, kept: list[int], scores: torch.Tensor,
               record: dict) -> dict[int, OutputExpert] | None:
        method = get_merge_method(self.spec.merge)
        experts, E = state.experts, driver.E
        try:
            cells = W.neurons(experts)
        except ValueError as err:
            record["merge"] = f"not merged: {err}"
            return None
        transposed = bool(experts.is_transposed)
        self.columns[state.layer] = (cells.columns, transposed)
        pruned = [e for e in range(E) if e not in set(kept)]
        t0 = time.perf_counter()
        sim, gated = self._similarity(sample, driver, E)
        record.setdefault("seconds", {})["similarity"] = round(time.perf_counter() - t0, 3)
        proposals = method.propose(Proposals(scores.cpu(), kept, pruned, sim, gated))
        mass = getattr(state.accumulator, method.mass).double().cpu()
        base = {e: W.expert_weights(experts, e) for e in range(E)}
        feats: dict[int, torch.Tensor] = {}

        def feat(e):
            if e not in feats:
                feats[e] = W.features(base[e], cells, transposed)
            return feats[e]

        members: dict[int, list[tuple[int, float, torch.Tensor | None]]] = {k: [(k, float(mass[k]), None)] for k in kept}
        router = None  # every expert's stored router row [E, H], where the block has a router weight
        if sample.leaf is not None:
            owner, name = sample.leaf
            router = (owner._parameters.get(name) if name in owner._parameters else owner._buffers[name]).float()
        before = sample.totals()
        taken = []
        floor = 1e-9 * max(float(sample.err.sum()), 1e-30)  # a gain below rounding is no gain
        for d, cands in proposals:
            best = None
            if not mass[d] > 0:  # an expert the sample never routed to adds nothing to a merge
                continue
            for k in cands:
                if not mass[k] > 0:
                    continue
                perm = W.align(feat(k), feat(d))
                parts = members[k] + [(d, float(mass[d]), perm)]
                total = sum(m for _, m, _ in parts)
                if total <= 0:
                    continue
                merged = W.merged([(W.permuted(base[j], p, cells, transposed) if p is not None else base[j], m / total)
                                   for j, m, p in parts])
                # the merged expert keeps the anchor's router row, or takes the mass-weighted mean of its
                # sources' rows (so that the tokens of the merged-in experts may route to it): the better one
                rows = [None] if router is None else [None, sum(router[j] * (m / total) for j, m, _ in parts)]
                for row in rows:
                    fit_d, held_d, change = sample.delta(k, merged, row)
                    if fit_d < -floor and (best is None or fit_d < best[0]):
                        best = (fit_d, k, perm, change)
            if best is not None:
                sample.accept(best[3])
                members[best[1]].append((d, float(mass[d]), best[2]))
                taken.append((d, best[1]))
        after = sample.totals()
        if taken and after[1] > before[1]:  # the merges together raise the held-out error: none of them
            sample.weights = {k: W.expert_weights(experts, k) for k in kept}
            if sample.leaf is not None:
                sample.use_router(sample.leaf)
            sample.rows_changed = False
            sample.set_routing(*driver(sample.xs, sample.removed))
            record["merge"] = {"reverted": True, "proposed": len(taken), "error": after}
            return None
        record["merge"] = {"method": method.name, "merged": len(taken), "of": len(pruned), "error": after}
        out = {}
        for k in kept:
            parts = members[k]
            total = sum(m for _, m, _ in parts)
            if len(parts) == 1 or total <= 0:
                out[k] = OutputExpert.kept(k)
            else:
                out[k] = OutputExpert(tuple((j, m / total) for j, m, _ in parts),
                                      tuple(tuple(p.tolist()) if p is not None else None for _, _, p in parts))
        record["merges"] = {str(k): [[j, round(w, 6)] for j, w in o.sources] for k, o in out.items() if not o.is_copy}
        return out

    def _similarity(self, sample: LayerSample, driver, E: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[E, E] cosine similarity of the experts' outputs on up to S' sampled tokens, and of their gated outputs
        (router probability x output)."""
        H = sample.y0.shape[-1]
        n = max(8, min(sample.xs.shape[0], SIMILARITY_BYTES // max(1, E * H * 4)))
        xs, xe = sample.xs[:n], sample.xe[:n]
        every = {e: W.expert_weights(driver.experts, e) for e in range(E)}
        outs = torch.stack([pair_outputs(driver.experts, every, xe, torch.full((n,), e, device=xe.device))
                            for e in range(E)])  # [E, S', H]
        ids, w = driver(xs, None, E)  # every expert's routing weight [S', E]
        prob = torch.zeros(n, E, dtype=torch.float32, device=xs.device).scatter_(1, ids.clamp_max(E - 1), w.float())
        flat = torch.nn.functional.normalize(outs.reshape(E, -1), dim=1)
        gated = torch.nn.functional.normalize((outs * prob.T[..., None]).reshape(E, -1), dim=1)
        return (flat @ flat.T).cpu(), (gated @ gated.T).cpu()
