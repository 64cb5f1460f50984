"""The greedy re-routing order's algorithms: the token sample they run on, the removal order with its measured error.

:class:`TokenSample` keeps a strided sample of a layer's MoE inputs; :func:`greedy_rerouted_order` (routing from
tables of weights and choice scores) and :func:`greedy_routed_order` (routing asked of the model itself at every
step, as :mod:`reap.calibrate.greedy` does) return a :class:`GreedyOrder`, the order with the relative output error
after each removal, which :meth:`reap.calibrate.stats.ExpertStats.set_layer` stores. :func:`greedy_sample_tokens`
sizes the sample to a memory budget.

Legend: T (or S) sampled tokens, E experts, K top-k, H hidden.
"""

from __future__ import annotations

import torch
from torch import Tensor


# -- greedy selection with re-routing ------------------------------------------------------------------------
class TokenSample:
    """A deterministic sample of a layer's MoE inputs for :func:`greedy_rerouted_order`: every ``stride``-th
    real token in calibration order (token 0, stride, 2*stride, ...), at most ``max_tokens`` of them.

    The calibrator feeds each batch's real-token inputs with :meth:`add` ([T, H], in calibration order) and,
    after the layer, computes the routing weights, choice scores and all experts' outputs on :attr:`rows`.
    Choose ``stride = ceil(total tokens / max_tokens)`` to spread the sample over the whole calibration set.
    """

    def __init__(self, max_tokens: int, stride: int = 1):
        if max_tokens <= 0 or stride <= 0:
            raise ValueError(f"max_tokens and stride must be positive, got {max_tokens}, {stride}")
        self.max_tokens, self.stride = max_tokens, stride
        self.seen = 0  # tokens offered so far
        self._parts: list[Tensor] = []
        self.size = 0

    def add(self, x: Tensor) -> None:
        """Offer the next ``x.shape[0]`` tokens (rows of ``x`` [T, H]); the sampled ones are copied."""
        t = x.shape[0]
        first = (-self.seen) % self.stride  # offset of the first sampled row in this batch
        room = self.max_tokens - self.size
        rows = torch.arange(first, t, self.stride, device=x.device)[:room] if first < t and room > 0 else None
        if rows is not None and rows.numel():
            self._parts.append(x[rows].detach().clone())
            self.size += rows.numel()
        self.seen += t

    @property
    def rows(self) -> Tensor:
        """The sampled inputs [S, H] (S <= max_tokens)."""
        if not self._parts:
            raise ValueError("the token sample is empty")
        if len(self._parts) > 1:
            self._parts = [torch.cat(self._parts)]
        return self._parts[0]


class GreedyOrder(list):
    """A greedy removal order (a list of expert ids, first removed first) with what the search measured:
    ``errors[i]`` = sum_t ||y_t - y'_t||^2 / sum_t ||y_t||^2 on the sample after the first i + 1 removals (y the
    unpruned MoE output, y' with those experts removed and their tokens re-routed); the absolute sum_t ||y_t||^2
    where the unpruned outputs are all zero. :meth:`reap.calibrate.stats.ExpertStats.set_layer` stores it as
    ``greedy_error``."""

    def __init__(self, order=(), errors=()):
        super().__init__(order)
        self.errors: list[float] = [float(x) for x in errors]


def _relative_errors(increases: list[float], reference: float) -> list[float]:
    """The cumulative error after each step (the sum of the steps' increases, never below 0), relative to the
    unpruned outputs' energy ``reference`` (absolute where it is 0)."""
    out, total = [], 0.0
    scale = reference if reference > 0 else 1.0
    for inc in increases:
        total = max(0.0, total + inc)
        out.append(total / scale)
    return out


def _greedy_steps(e: int, top_k: int, n_steps: int | None) -> int:
    """The number of greedy removal steps (default E - top_k), checked against E and top-k."""
    if not 0 < top_k < e:
        raise ValueError(f"top_k must be in [1, {e}), got {top_k}")
    n_steps = e - top_k if n_steps is None else n_steps
    if not 0 <= n_steps <= e - top_k:
        raise ValueError(f"n_steps must be in [0, {e - top_k}], got {n_steps}")
    return n_steps


def greedy_rerouted_order(weights: Tensor, choice: Tensor, outputs: Tensor, top_k: int, n_steps: int | None = None,
                          chunk: int = 4096) -> GreedyOrder:
    """Experts of one layer in greedy removal order, minimizing the layer-output error with re-routing.

    Inputs, on a sample of T tokens (any device; computed in float64 a chunk of tokens at a time):

    * ``weights`` [T, E]: each expert's unnormalized routing weight w (softmax probability for Qwen3-MoE /
      Mixtral-style routers, sigmoid score for MiniMax-M2 / DeepSeek-V3, exp(logit) for gpt-oss);
    * ``choice`` [T, E]: the score the router's top-k picks by (w itself, or sigmoid + e_score_correction_bias);
    * ``outputs`` [T, E, H]: every expert's output f_e(x_t).

    The MoE output of a token with chosen set C is y_C = sum_{i in C} w_i f_i / sum_{i in C} w_i (the chosen
    weights renormalized, as every family with ``norm_topk_prob`` or a softmax over the top-k does; a constant
    scale such as ``routed_scaling_factor`` does not change the order). Pruning a set S re-routes each token to
    the top-k of ``choice`` among the remaining experts. Starting from S = {}, each step adds the expert j that
    minimizes sum_t ||y(x_t) - y_{S+j}(x_t)||^2 (the exact error of the pruned layer against the unpruned one;
    only tokens that had j among their current top-k change); ties go to the lower id. ``n_steps`` (default
    E - top_k) steps; the first n of the order are the n experts to prune, for every n <= n_steps. Returns a
    :class:`GreedyOrder`: the order, with the relative error after each step in ``errors``.
    Not for group-limited routing (DeepSeek-V3 ``n_group`` > 1), whose choice is not a plain top-k.
    """
    t, e = weights.shape
    if choice.shape != (t, e) or outputs.shape[:2] != (t, e):
        raise ValueError(f"weights {list(weights.shape)}, choice {list(choice.shape)} and outputs "
                         f"{list(outputs.shape)} must be [T, E], [T, E], [T, E, H]")
    n_steps = _greedy_steps(e, top_k, n_steps)
    k = top_k
    removed = torch.zeros(e, dtype=torch.bool, device=weights.device)
    y0 = [_mix(weights[lo : lo + chunk], choice[lo : lo + chunk], outputs[lo : lo + chunk], removed, k)[0]
          for lo in range(0, t, chunk)]  # the unpruned outputs, per chunk [t_c, H]
    reference = float(sum(float((y ** 2).sum()) for y in y0))
    order: list[int] = []
    increases: list[float] = []
    for _ in range(n_steps):
        cost = torch.zeros(e, dtype=torch.float64, device=weights.device)
        for c, lo in enumerate(range(0, t, chunk)):
            w, ch, f = weights[lo : lo + chunk], choice[lo : lo + chunk], outputs[lo : lo + chunk]
            y, wr, fr, idx = _mix(w, ch, f, removed, k)  # current outputs; top-(k+1) weights and outputs
            r = ((y0[c] - y) ** 2).sum(-1, keepdim=True)  # [t_c, 1] current squared error
            wk, fk = wr[:, :k], fr[:, :k]
            num = (wk[..., None] * fk).sum(1)  # [t_c, H]
            # remove position i of the top-k: its place goes to the next choice (position k)
            num_i = num[:, None] - wk[..., None] * fk + wr[:, k, None, None] * fr[:, k, None]  # [t_c, k, H]
            den_i = wk.sum(1, keepdim=True) - wk + wr[:, k, None]  # [t_c, k]
            err_i = ((y0[c][:, None] - num_i / den_i[..., None]) ** 2).sum(-1)  # [t_c, k]
            cost.index_add_(0, idx[:, :k].reshape(-1), (err_i - r).reshape(-1))
        cost[removed] = float("inf")
        j = int(torch.argmin(cost))  # first minimum: the lower id on ties
        removed[j] = True
        order.append(j)
        increases.append(float(cost[j]))
    return GreedyOrder(order, _relative_errors(increases, reference))


def _mix(w: Tensor, choice: Tensor, f: Tensor, removed: Tensor, k: int):
    """(y [t, H], top-(k+1) weights [t, k+1], their outputs [t, k+1, H], ids [t, k+1]) with ``removed`` experts
    never chosen, float64. At least k + 1 experts must remain (greedy_rerouted_order stops at E - k)."""
    ch = choice.masked_fill(removed, float("-inf")) if bool(removed.any()) else choice
    idx = torch.topk(ch, k + 1, dim=-1).indices  # [t, k+1] in the router's own dtype; sorted: next choice last
    wr = w.gather(1, idx).to(torch.float64)
    fr = f.gather(1, idx[..., None].expand(-1, -1, f.shape[-1])).to(torch.float64)  # [t, k+1, H]
    y = (wr[:, :k, None] * fr[:, :k]).sum(1) / wr[:, :k].sum(1, keepdim=True)
    return y, wr, fr, idx


def greedy_routed_order(route, outputs: Tensor, top_k: int, n_steps: int | None = None, renormalize: bool = True,
                        chunk: int | None = None) -> GreedyOrder:
    """:func:`greedy_rerouted_order` with the routing asked of the model itself at every step.

    ``route(removed, rows)`` (``removed`` bool [E], ``rows`` long [R] sample positions) returns (ids [R, K+1],
    weights [R, K+1]) for those tokens: the first K columns the token's top-k with the removed experts gone, the
    last its next choice, the weights as the model computes them for those K+1 (with ``renormalize`` the MoE
    output is sum w_i f_i / sum w_i over the chosen, else sum w_i f_i). ``outputs`` [S, E, H]: every expert's
    output on the S sample tokens. Each step removes the expert whose removal (its tokens moving to their next
    choice) least increases sum_t ||y_unpruned - y||^2; ties to the lower id. After a removal only the tokens
    that had the removed expert among their K+1 are routed and costed again (routing is per token). Without
    renormalization the weights of a step's candidates are those of the step's routing (a softmax over the kept
    experts that loses one more changes its normalizer slightly; that change is ignored). Returns a
    :class:`GreedyOrder`: the order, with the relative error after each step (the sum of the steps' costs over
    sum_t ||y_unpruned||^2) in ``errors``.
    """
    s, e, h = outputs.shape
    n_steps = _greedy_steps(e, top_k, n_steps)
    k = top_k
    chunk = chunk or max(1, (1 << 28) // ((k + 1) * h * 8))  # float64 [chunk, K+1, H] within ~256 MiB
    dev = outputs.device
    removed = torch.zeros(e, dtype=torch.bool, device=dev)
    every = torch.arange(s, device=dev)
    ids, w = route(removed, every)
    ids, w = ids.to(dev), w.to(dev, torch.float64)  # [S, K+1] the current routing
    y0 = torch.empty(s, h, dtype=torch.float64, device=dev)
    contrib = torch.empty(s, k, dtype=torch.float64, device=dev)  # [S, K] error change if position i is removed

    def update(rows: Tensor, first: bool = False) -> None:
        for lo in range(0, rows.numel(), chunk):
            r_ = rows[lo : lo + chunk]
            i, wr = ids[r_], w[r_]
            fr = outputs[r_].gather(1, i[..., None].expand(-1, -1, h)).to(torch.float64)  # [t, K+1, H]
            wk, fk = wr[:, :k], fr[:, :k]
            num = (wk[..., None] * fk).sum(1)  # [t, H]
            y = num / wk.sum(1, keepdim=True) if renormalize else num
            if first:
                y0[r_] = y
            ref = y0[r_]
            cur = ((ref - y) ** 2).sum(-1, keepdim=True)  # [t, 1]
            num_i = num[:, None] - wk[..., None] * fk + wr[:, k, None, None] * fr[:, k, None]  # [t, K, H]
            if renormalize:
                num_i = num_i / (wk.sum(1, keepdim=True) - wk + wr[:, k, None])[..., None]
            contrib[r_] = ((ref[:, None] - num_i) ** 2).sum(-1) - cur

    update(every, first=True)
    reference = float((y0 ** 2).sum())
    order: list[int] = []
    increases: list[float] = []
    for _ in range(n_steps):
        cost = torch.zeros(e, dtype=torch.float64, device=dev)
        cost.index_add_(0, ids[:, :k].reshape(-1), contrib.reshape(-1))
        cost[removed] = float("inf")
        j = int(torch.argmin(cost))
        removed[j] = True
        order.append(j)
        increases.append(float(cost[j]))  # the step's increase of sum_t ||y0 - y||^2 (exact with renormalization)
        hit = (ids == j).any(1).nonzero().squeeze(1)  # tokens whose top-k or next choice was j
        if hit.numel() and len(order) < n_steps:
            new_ids, new_w = route(removed, hit)
            ids[hit], w[hit] = new_ids.to(dev), new_w.to(dev, torch.float64)
            update(hit)
    return GreedyOrder(order, _relative_errors(increases, reference))


def greedy_sample_tokens(num_experts: int, hidden: int, elem_bytes: int, max_tokens: int, memory_bytes: float) -> int:
    """How many tokens a layer's greedy sample holds: at most ``max_tokens``, and every expert's output on them
    ([S, E, H] of ``elem_bytes``) within ``memory_bytes``."""
    return max(0, min(int(max_tokens), int(memory_bytes // max(1, num_experts * hidden * elem_bytes))))
