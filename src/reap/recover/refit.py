"""The router re-fit: the kept experts' router rows fitted so that the pruned (or merged) layer's output matches the
unpruned layer's on the sample.

The block's own forward does the routing (its softmax or sigmoid, correction bias, groups, renormalization and
scaling), with the router weight replaced by the fitted rows of the kept experts (the other row tensors sliced to
the kept experts, as :class:`reap.calibrate.greedy.RouterDriver` does): the routing weights are differentiable in
the rows, the selection (top-k) stays the model's own. The loss is sum_t ||y0_t - sum_k w_tk f_k(x_t)||^2 over the
fitted tokens (y0 the unpruned experts' output, f the kept experts' outputs with their merged weights), minimized
with Adam from the stored rows; the held-out tokens choose the step kept, and rows that are not better there than
the stored ones are not written (:attr:`RouterFit.improved`). A correction bias (DeepSeek-V3, MiniMax-M2) only
selects, it carries no gradient: it is kept as stored.

Legend: S sampled tokens, K top-k, K' kept experts, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from reap.recover.sample import LayerSample, driver_routing, pair_outputs, pruned_block
from reap.stream.experts import routed


#: bytes of kept experts' outputs the fit holds ([S, K', H] float32): fewer tokens where K' x H is large
REFIT_BYTES = 1 << 30


@dataclass
class RouterFit:
    """The outcome: ``rows`` [K', H] float32 (the fitted rows, or the stored ones where not improved), the relative
    error on the fitted and held-out tokens before and after, the steps run."""

    rows: Tensor
    improved: bool
    before: tuple[float, float]
    after: tuple[float, float]
    steps: int


def router_leaf(driver, router_name: str, block_path: str):
    """(owner module, leaf name) of the block's router weight (``router_name``, a model tensor name)."""
    rel = router_name[len(block_path) + 1:]
    owner_path, _, leaf = rel.rpartition(".")
    return (driver.block.get_submodule(owner_path) if owner_path else driver.block), leaf


def fit(sample: LayerSample, leaf: tuple, steps: int = 200, tokens: int = 4096, lr: float = 0.05) -> RouterFit:
    """Fit the kept rows of the router weight ``leaf`` ((owner, name)) on ``sample`` (at most ``tokens`` of it, fewer
    where every kept expert's output on them, [S, K', H] float32, would pass :data:`REFIT_BYTES`). ``lr``: Adam's step relative to the rows'
    root mean square. Leaves ``sample`` routed with the rows returned."""
    driver, xs = sample.driver, sample.xs
    kept = torch.as_tensor(sample.kept, device=xs.device)
    owner, name = leaf
    stored = (owner._parameters.get(name) if name in owner._parameters else owner._buffers[name]).detach()
    E = driver.E
    slots = stored[E:].float()  # rows after the experts (not fitted)
    rows0 = sample.rows if sample.rows is not None else stored[kept].float()  # merged rows, maybe
    H = sample.y0.shape[-1]
    S = min(xs.shape[0], tokens, max(64, REFIT_BYTES // max(1, kept.numel() * H * 4)))  # [S, K', H] float32 held
    pick = torch.linspace(0, xs.shape[0] - 1, S, device=xs.device).round().long().unique()  # [S] spread
    with torch.inference_mode(False):  # tensors autograd may save (calibration runs in inference mode)
        x, xe, y0, held = (t.clone() for t in (xs[pick], sample.xe[pick], sample.y0[pick], sample.held[pick]))
    slot_of = torch.full((E,), -1, dtype=torch.long, device=xs.device)
    slot_of[kept] = torch.arange(kept.numel(), device=xs.device)
    with torch.no_grad():  # every kept expert on every fitted token [S, K', H]
        outs = torch.stack([pair_outputs(driver.experts, sample.weights, xe,
                                         torch.full((xe.shape[0],), int(e), device=xs.device)) for e in sample.kept], 1)
    ref = (y0.double() ** 2).sum(-1)

    def errors(rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with pruned_block(driver, kept, leaf, torch.cat([rows, slots])) as calls:
            driver.block(x[None])
        (idx, w), = calls
        ok = routed(idx, w, kept.numel())  # ids are the pruned block's 0..K'-1
        f = outs[torch.arange(idx.shape[0], device=xs.device)[:, None], idx.clamp_max(kept.numel() - 1)]  # [S, K, H]
        y = (f * (w.float() * ok.view(idx.shape))[..., None]).sum(1)
        return ((y0 - y) ** 2).sum(-1), idx, w

    def rel(err: Tensor) -> tuple[float, float]:
        return (float(err[~held].double().sum() / ref[~held].sum().clamp_min(1e-30)),
                float(err[held].double().sum() / ref[held].sum().clamp_min(1e-30)))

    with torch.no_grad():
        before = rel(errors(rows0)[0])
    best, best_rows, ran = before, rows0, 0
    with torch.inference_mode(False), torch.enable_grad():
        master = rows0.clone().requires_grad_(True)
        opt = torch.optim.Adam([master], lr=lr * float(rows0.pow(2).mean().sqrt().clamp_min(1e-8)))
        slots = slots.clone()
        outs = outs.clone()
        for step in range(steps):
            opt.zero_grad()
            err = errors(master)[0]
            loss = err[~held].sum() / ref[~held].sum().clamp_min(1e-30).float()
            loss.backward()
            opt.step()
            ran = step + 1
            if ran % 10 == 0 or ran == steps:
                with torch.no_grad():
                    now = rel(errors(master)[0])
                if now[1] < best[1]:
                    best, best_rows = now, master.detach().clone()
    improved = best[1] < before[1]
    rows = best_rows if improved else rows0
    with torch.no_grad():
        full_idx, full_w = driver_routing(driver, kept, leaf, torch.cat([rows, slots]), xs)
    sample.set_routing(full_idx, full_w)
    return RouterFit(rows, improved, before, best if improved else before, ran)
