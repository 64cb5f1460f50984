"""The objective every recovery step is judged by: the MoE layer's output error on a sample of its inputs.

:class:`LayerSample` holds, for S sampled tokens of one layer, the unpruned experts' output y0 (what the experts
module returns: sum of g x f over each token's routed experts, routed by the block's own router) and, for the pruned
layer (the kept experts' router rows only, routed again by the same router), each routed pair's expert output under
the kept experts' current weights (merged or not). Changing one kept expert's weights changes only the rows routed
to it, so a proposal's cost is computed on those rows: :meth:`LayerSample.delta`. Every fifth token is held out:
no decision uses it, and the observer reports (and guards with) the error there.

Legend: S sampled tokens, K top-k, H hidden, E experts, R rows.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

from reap.recover.weights import expert_weights, forward
from reap.stream.experts import ExpertsProbe, routed

#: every HELD_OUT-th sampled token is held out of every decision
HELD_OUT = 5


def pair_outputs(experts, weights: dict[int, dict[str, Tensor]], x: Tensor, ids: Tensor) -> Tensor:
    """x [R, H], ids [R] (expert ids, keys of ``weights``) -> [R, H] float32, each row through its expert."""
    H = experts.down_proj.shape[-1] if experts.is_transposed else experts.down_proj.shape[-2]
    out = torch.zeros(x.shape[0], H, dtype=torch.float32, device=x.device)
    for e in torch.unique(ids).tolist():
        rows = (ids == e).nonzero().squeeze(1)
        out[rows] = forward(experts, weights[e], x[rows])
    return out


@contextmanager
def pruned_block(driver, kept: Tensor, router_leaf: tuple, rows: Tensor):
    """The block of ``driver`` (a :class:`reap.calibrate.greedy.RouterDriver`) pruned to the ``kept`` experts
    (:meth:`~reap.calibrate.greedy.RouterDriver.pruned`), its router weight (``router_leaf``: (owner, leaf)) given by
    ``rows`` [K' (+ slots), H] (any tensor, gradient included); yields a list the (ids, weights) of each call of the
    experts module go to, undetached (the experts themselves are not run)."""
    copies, calls = [], []
    try:
        if torch.is_grad_enabled():  # the router's other tensors, loaded in inference mode: normal copies for autograd
            skip = {id(m) for m in driver.experts.modules()}
            for owner in driver.block.modules():
                if id(owner) in skip:
                    continue
                for table in (owner._parameters, owner._buffers):
                    for leaf, t in list(table.items()):
                        if t is not None and t.is_inference():
                            copies.append((table, leaf, t))
                            with torch.inference_mode(False):
                                c = t.detach().clone()
                            table[leaf] = torch.nn.Parameter(c, requires_grad=False) if table is owner._parameters else c
        with driver.pruned(kept, replace={router_leaf: rows}):
            before = getattr(driver.experts, "_reap_probe", None)
            driver.experts._reap_probe = ExpertsProbe(capture=[])

            def pre(mod, args, kwargs):  # experts(hidden_states, top_k_index, top_k_weights), by position or name
                given = dict(zip(("hidden_states", "top_k_index", "top_k_weights"), args), **kwargs)
                calls.append((given["top_k_index"], given["top_k_weights"]))

            hook = driver.experts.register_forward_pre_hook(pre, with_kwargs=True)
            try:
                yield calls
            finally:
                hook.remove()
                driver.experts._reap_probe = before
    finally:
        for table, leaf, t in reversed(copies):
            table[leaf] = t


def driver_routing(driver, kept: Tensor, leaf: tuple, rows: Tensor, xs: Tensor) -> tuple[Tensor, Tensor]:
    """The pruned block's routing of xs [S, H] with router rows ``rows``: (ids [S, K] original numbering, w)."""
    with torch.no_grad(), pruned_block(driver, kept, leaf, rows) as calls:
        driver.block(xs[None])
    (idx, w), = calls
    return kept.to(idx.device)[idx.clamp_max(kept.numel() - 1)], w.detach()


class LayerSample:
    """One layer's sample: ``driver`` (:class:`reap.calibrate.greedy.RouterDriver` of the block), ``experts`` (its
    experts module, weights on the device), ``xs`` [S, H] the block's sampled inputs, ``removed`` bool [E] the
    pruned experts."""

    def __init__(self, driver, experts, xs: Tensor, removed: Tensor):
        self.driver, self.experts, self.xs = driver, experts, xs
        E = driver.E
        ids0, w0 = driver(xs)  # [S, K] the unpruned routing
        self.xe = driver.inputs.reshape(xs.shape[0], -1)  # what the block hands its experts
        every = {e: expert_weights(experts, e) for e in torch.unique(ids0[ids0 < E]).tolist()}
        self.y0 = self._combine(ids0, w0, every)  # [S, H] float32
        self.held = torch.arange(xs.shape[0], device=xs.device) % HELD_OUT == HELD_OUT - 1  # [S]
        self.removed = removed.to(torch.bool)
        self.kept = (~self.removed).nonzero().squeeze(1).tolist()
        self.weights: dict[int, dict[str, Tensor]] = {e: expert_weights(experts, e) for e in self.kept}
        self.leaf, self.rows, self.slots = None, None, None  # the router weight, once :meth:`use_router` is called
        self.rows_changed = False  # a proposal accepted with router rows of its own
        self.set_routing(*driver(xs, self.removed))

    def _combine(self, ids: Tensor, w: Tensor, weights: dict[int, dict[str, Tensor]]) -> Tensor:
        """sum_k w[:, k] f_{ids[:, k]}(x) [S, H] over the routed pairs (float32)."""
        S, K = ids.shape
        ok = routed(ids, w, self.driver.E).view(S, K)
        tok, slot = ok.nonzero(as_tuple=True)
        f = pair_outputs(self.experts, weights, self.xe[tok], ids[tok, slot])
        y = torch.zeros(S, f.shape[-1], dtype=torch.float32, device=self.xs.device)
        return y.index_add_(0, tok, f * w[tok, slot].float()[:, None])

    def set_routing(self, ids: Tensor, w: Tensor) -> None:
        """The pruned block's routing of the sample (ids [S, K] in the original numbering, weights [S, K]); every
        pair's output is computed again under the kept experts' current weights."""
        S, K = ids.shape
        self.ids, self.w = ids, w.float()
        self.ok = routed(ids, w, self.driver.E).view(S, K)  # [S, K] pairs routed to an expert
        self.pairs = torch.zeros(S, K, self.y0.shape[-1], dtype=torch.float32, device=self.xs.device)
        tok, slot = self.ok.nonzero(as_tuple=True)
        self.pairs[tok, slot] = pair_outputs(self.experts, self.weights, self.xe[tok], ids[tok, slot])
        self.err = self._errors(torch.arange(S, device=self.xs.device), self.pairs)  # [S]

    def _errors(self, rows: Tensor, pairs: Tensor) -> Tensor:
        y = (pairs * (self.w[rows] * self.ok[rows])[..., None]).sum(1)
        return ((self.y0[rows] - y) ** 2).sum(-1).double()

    def use_router(self, leaf: tuple) -> None:
        """Let proposals change router rows: ``leaf`` (owner, name) is the block's router weight [E (+ slots), H]."""
        owner, name = leaf
        stored = (owner._parameters.get(name) if name in owner._parameters else owner._buffers[name]).detach()
        kept = torch.as_tensor(self.kept, device=stored.device)
        self.leaf, self.rows, self.slots = leaf, stored[kept].float(), stored[self.driver.E:].float()

    def delta(self, expert: int, weights: dict[str, Tensor], row: Tensor | None = None) -> tuple[float, float, tuple]:
        """(change of the fitted error, change of the held-out error, what :meth:`accept` needs) if kept expert
        ``expert`` had ``weights`` (and, with ``row``, that router row [H]: every token routed again)."""
        if row is not None:
            return self._delta_routed(expert, weights, row)
        hit = (self.ids == expert) & self.ok  # [S, K]
        rows = hit.any(1).nonzero().squeeze(1)
        pairs = self.pairs[rows].clone()
        r_tok, r_slot = hit[rows].nonzero(as_tuple=True)
        pairs[r_tok, r_slot] = forward(self.experts, weights, self.xe[rows[r_tok]])
        err = self._errors(rows, pairs)
        d = err - self.err[rows]
        held = self.held[rows]
        return float(d[~held].sum()), float(d[held].sum()), (expert, weights, rows, pairs, err)

    def _delta_routed(self, expert: int, weights: dict[str, Tensor], row: Tensor):
        rows = self.rows.clone()
        rows[self.kept.index(expert)] = row
        kept = torch.as_tensor(self.kept, device=self.xs.device)
        ids, w = driver_routing(self.driver, kept, self.leaf, torch.cat([rows, self.slots]), self.xs)
        S, K = ids.shape
        ok = routed(ids, w, self.driver.E).view(S, K)
        pairs = self.pairs.clone()
        redo = ok & ((ids != self.ids) | (ids == expert))  # [S, K] pairs whose output changes
        tok, slot = redo.nonzero(as_tuple=True)
        table = {**self.weights, expert: weights}
        pairs[tok, slot] = pair_outputs(self.experts, table, self.xe[tok], ids[tok, slot])
        y = (pairs * (w.float() * ok)[..., None]).sum(1)
        err = ((self.y0 - y) ** 2).sum(-1).double()
        d = err - self.err
        return float(d[~self.held].sum()), float(d[self.held].sum()), (expert, weights, None, pairs, err,
                                                                      (rows, ids, w.float(), ok))

    def accept(self, change: tuple) -> None:
        expert, weights, rows, pairs, err = change[:5]
        self.weights[expert] = weights
        if len(change) > 5:  # routed again with new router rows
            self.rows, self.ids, self.w, self.ok = change[5]
            self.pairs, self.err = pairs, err
            self.rows_changed = True
            return
        self.pairs[rows], self.err[rows] = pairs, err

    def totals(self) -> tuple[float, float]:
        """(fitted, held-out) error, relative to the unpruned outputs' energy on the same tokens."""
        ref = (self.y0.double() ** 2).sum(-1)
        fit, held = ~self.held, self.held
        return (float(self.err[fit].sum() / ref[fit].sum().clamp_min(1e-30)),
                float(self.err[held].sum() / ref[held].sum().clamp_min(1e-30)))
