"""The greedy re-routing order's algorithms: the token sample they run on, the removal order with its measured error.

:class:`TokenSample` keeps a strided sample of a layer's MoE inputs; :func:`greedy_rerouted_order` (routing from
tables of weights and choice scores) and :func:`greedy_routed_order` (routing asked of the model itself at every
step, as :mod:`reap.calibrate.greedy` does) return a :class:`GreedyOrder`, the order with the relative output error
after each removal, which :meth:`reap.calibrate.stats.ExpertStats.set_layer` stores. :class:`OutputCache` holds the
expert outputs :func:`greedy_routed_order` needs, C per token, computing the others when a step needs them through
:class:`PairOutputs` (reap's experts on (token, expert) pairs);
:func:`greedy_sample_tokens` and :func:`greedy_cache_slots` size the sample and the cache to a memory budget.

Legend: T (or S) sampled tokens, E experts, K top-k, H hidden, C cached slots per token, R rows (tokens) of a step.
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


# -- the routed search: the model's own routing at every step, expert outputs held C per token ------------------------
class OutputCache:
    """The expert outputs :func:`greedy_routed_order` needs, C per sampled token: ``values`` [S, C, H] (the model's
    dtype) and the expert each slot holds, ``slots`` [S, C] (int64).

    Filled from ``ids`` [S, C] (each token's initial slot experts, distinct per token: its top-C under the model's
    routing) with calls of ``compute(rows [N], experts [N]) -> [N, H]`` (the outputs f_expert(x_row) before weighting,
    one grouped call; it sorts by expert itself) of at most ``chunk`` pairs each. :meth:`ensure` then computes, in one
    call, the pairs a removal step needs that no slot holds, into slots whose expert was removed (first) or is no
    longer among the token's wanted experts. ``computed``: pairs computed in all; ``calls``: calls of ``compute``.
    """

    def __init__(self, compute, ids: Tensor, num_experts: int, chunk: int | None = None):
        s, c = ids.shape
        self.compute, self.num_experts = compute, num_experts
        self.slots = ids.to(torch.long).clone()  # [S, C]
        self.computed = self.calls = 0
        rows = torch.arange(s, device=ids.device).repeat_interleave(c)  # [S*C] token of each pair, row-major
        flat, values = self.slots.reshape(-1), None
        step = max(1, chunk or flat.numel())
        for lo in range(0, flat.numel(), step):
            y = self._run(rows[lo : lo + step], flat[lo : lo + step])  # [n, H]
            if values is None:
                values = y.new_empty(s * c, y.shape[-1])
            values[lo : lo + step] = y
        self.values = values.view(s, c, -1)  # [S, C, H]

    def _run(self, rows: Tensor, experts: Tensor) -> Tensor:
        self.calls, self.computed = self.calls + 1, self.computed + rows.numel()
        return self.compute(rows, experts)

    def ensure(self, rows: Tensor, ids: Tensor, removed: Tensor) -> None:
        """Hold every pair (rows[r], ids[r, m]): rows [R], ids [R, M] (distinct per row, M <= C), removed bool [E]."""
        sl = self.slots[rows]  # [R, C]
        held = sl[:, None, :] == ids[:, :, None]  # [R, M, C]
        missing = ~held.any(-1)  # [R, M]
        need = missing.any(1).nonzero().squeeze(1)  # [R'] rows with a pair to compute
        if not need.numel():
            return
        sl, held, missing, ids, c = sl[need], held[need], missing[need], ids[need], sl.shape[1]
        # a row's free slots (not wanted), those of removed experts first, then the lower slot; there are at least as
        # many as its missing pairs (C >= M); the n-th missing pair goes to the n-th free slot
        kind = torch.where(held.any(1), 2, torch.where(removed[sl], 0, 1))  # [R', C]
        free = torch.argsort(kind * c + torch.arange(c, device=sl.device), dim=1)  # [R', C]
        r, m = missing.nonzero(as_tuple=True)  # [N] the missing pairs
        nth = (missing.cumsum(1) - 1)[r, m]  # [N]
        slot = free[r, nth]  # [N]
        token, expert = rows[need][r], ids[r, m]  # [N]
        y = self._run(token, expert)  # [N, H]
        self.values[token, slot] = y.to(self.values.dtype)
        self.slots[token, slot] = expert

    def take(self, rows: Tensor, ids: Tensor, out: Tensor | None = None) -> Tensor:
        """The held outputs of (rows[r], ids[r, m]): [R, M, H] (every pair held: :meth:`ensure` first), written into
        ``out`` ([R*M, H] of the cache's dtype) where given."""
        pos = (self.slots[rows][:, None, :] == ids[:, :, None]).to(torch.long).argmax(-1)  # [R, M] slot of each
        return _gather(self.values, rows, pos, out)


class ExpertsFailed(Exception):
    """The experts module could not be run on (token, expert) pairs of the sample (its first line of error)."""


class PairOutputs:
    """``(rows [N], experts [N]) -> [N, H]``: the expert outputs f_expert(xe[row]) before weighting, through reap's
    experts implementation (:func:`reap.stream.experts.expert_outputs`, one grouped matmul per projection where the
    layer's own forward uses one: CUDA, 16-bit) or, for a wrapped experts module, its own forward
    (:func:`reap.stream.experts.pair_outputs`), with the pairs sorted by expert; ``xe`` [S, H] the experts' input on
    the sample. ``bar``: a progress bar to advance per call (the cache's fill), or None."""

    def __init__(self, experts, xe: torch.Tensor, num_experts: int, bar=None):
        from reap.stream.experts import _grouped_mm_fn, is_wrapped

        self.experts, self.xe, self.E, self.bar = experts, xe, num_experts, bar
        self.wrapped = is_wrapped(experts)
        probe = getattr(experts, "_reap_probe", None)
        want = probe.grouped if probe is not None else None
        self.grouped = _grouped_mm_fn() is not None and (want if want is not None else (
            xe.is_cuda and xe.dtype in (torch.bfloat16, torch.float16)))

    def __call__(self, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        from reap.stream.experts import expert_outputs, pair_outputs

        if self.bar is not None and self.bar.n < self.bar.total:
            self.bar.update()
        order = torch.argsort(ids, stable=True)  # [N] by expert
        ids_s = ids[order]
        x = self.xe[rows[order]]  # [N, H]
        try:
            y = pair_outputs(self.experts, x, ids_s) if self.wrapped else \
                expert_outputs(self.experts, x, ids_s, torch.bincount(ids_s, minlength=self.E), self.grouped)
        except torch.OutOfMemoryError:  # the run's memory (--greedy-memory): reported as such (reap.calibrate.run)
            raise
        except (RuntimeError, ValueError, TypeError) as err:
            raise ExpertsFailed(str(err).splitlines()[0] if str(err) else type(err).__name__) from err
        out = torch.empty_like(y)
        out[order] = y
        return out


class _FullOutputs:
    """Every expert's output on the sample, [S, E, H], behind :class:`OutputCache`'s methods: every pair held."""

    def __init__(self, outputs: Tensor):
        self.values, self.num_experts = outputs, outputs.shape[1]

    def ensure(self, rows: Tensor, ids: Tensor, removed: Tensor) -> None:  # every pair is held
        pass

    def take(self, rows: Tensor, ids: Tensor, out: Tensor | None = None) -> Tensor:
        return _gather(self.values, rows, ids, out)


def _gather(values: Tensor, rows: Tensor, pos: Tensor, out: Tensor | None) -> Tensor:
    """values [S, P, H] at (rows[r], pos[r, m]) -> [R, M, H], into ``out`` [R*M, H] where given (a buffer used again
    spares the CPU fresh pages)."""
    s, p, h = values.shape
    flat = (rows[:, None] * p + pos).reshape(-1)  # [R*M]
    got = torch.index_select(values.reshape(s * p, h), 0, flat, out=out) if out is not None else \
        values.reshape(s * p, h)[flat]
    return got.view(*pos.shape, h)


def greedy_routed_order(route, outputs, top_k: int, n_steps: int | None = None, renormalize: bool = True,
                        chunk: int | None = None) -> GreedyOrder:
    """:func:`greedy_rerouted_order` with the routing asked of the model itself at every step.

    ``route(removed, rows)`` (``removed`` bool [E], ``rows`` long [R] sample positions) returns (ids [R, K+1],
    weights [R, K+1]) for those tokens: the first K columns the token's top-k with the removed experts gone, the
    last its next choice, the weights as the model computes them for those K+1 (with ``renormalize`` the MoE
    output is sum w_i f_i / sum w_i over the chosen, else sum w_i f_i). ``outputs``: the expert outputs on the S
    sample tokens, an :class:`OutputCache` (C >= K+1 per token; the pairs a step needs that it lacks are computed
    then, one call per step) or every expert's output, a tensor [S, E, H]. Each step removes the expert whose
    removal (its tokens moving to their next choice) least increases sum_t ||y_unpruned - y||^2; ties to the lower
    id. After a removal only the tokens that had the removed expert among their K+1 are routed and costed again
    (routing is per token). Without renormalization the weights of a step's candidates are those of the step's
    routing (a softmax over the kept experts that loses one more changes its normalizer slightly; that change is
    ignored). ``chunk``: tokens costed at once (their [chunk, K+1, H] float64 outputs). Returns a
    :class:`GreedyOrder`: the order, with the relative error after each step (the sum of the steps' costs over
    sum_t ||y_unpruned||^2) in ``errors``.
    """
    cache = outputs if isinstance(outputs, OutputCache) else _FullOutputs(outputs)
    s, e, h = cache.values.shape[0], cache.num_experts, cache.values.shape[-1]
    n_steps = _greedy_steps(e, top_k, n_steps)
    k = top_k
    if isinstance(cache, OutputCache) and cache.slots.shape[1] < k + 1:
        raise ValueError(f"the output cache holds {cache.slots.shape[1]} experts per token, fewer than top-k + 1 = "
                         f"{k + 1}")
    chunk = chunk or max(1, (1 << 28) // ((k + 2) * h * 8))  # float64 [chunk, K+2, H] within ~256 MiB
    dev = cache.values.device
    removed = torch.zeros(e, dtype=torch.bool, device=dev)
    every = torch.arange(s, device=dev)
    ids, w = route(removed, every)
    ids, w = ids.to(dev), w.to(dev, torch.float64)  # [S, K+1] the current routing
    cache.ensure(every, ids, removed)
    y0 = torch.empty(s, h, dtype=torch.float64, device=dev)  # the unpruned outputs
    work = torch.empty(min(chunk, s), k + 2, h, dtype=torch.float64, device=dev)  # a chunk's outputs and y0
    source = cache.values.new_empty(min(chunk, s) * (k + 1), h)  # the same gathered in the cache's dtype
    contrib = torch.empty(s, k, dtype=torch.float64, device=dev)  # [S, K] error change if position i is removed

    def update(rows: Tensor, first: bool = False) -> None:
        # removing position i of a token's top-k moves its weight to the next choice n (position K): the output moves
        # by d_i = v_i / W_i, v_i = sum_m c_im f_m over the K+1 outputs (renormalized: v_i = w_n (f_n - y) -
        # w_i (f_i - y), W_i = W - w_i + w_n, sum_m c_im = 0; else v_i = w_n f_n - w_i f_i, W_i = 1), and the squared
        # error ||e - d_i||^2 (e = y0 - y, the current error) by ||d_i||^2 - 2 <e, d_i>: all from the dot products of
        # the K+1 outputs and y0 ([t, K+2, K+2], one read of them in float64). With sum c = 0, ||v||^2 comes from the
        # squared distances of the outputs (-1/2 c^T D c), exact where W_i is tiny (a token's dominant expert removed)
        for lo in range(0, rows.numel(), chunk):
            r_ = rows[lo : lo + chunk]
            t = r_.numel()
            wr = w[r_]  # [t, K+1]
            wk, wn = wr[:, :k], wr[:, k:]  # [t, K], [t, 1]
            big_w = wk.sum(1, keepdim=True) if renormalize else torch.ones_like(wn)  # [t, 1]
            buf = work[:t]  # [t, K+2, H]: the K+1 outputs, then y0
            buf[:, : k + 1] = cache.take(r_, ids[r_], out=source[: t * (k + 1)])
            if first:
                y0[r_] = torch.bmm(wk[:, None], buf[:, :k]).squeeze(1) / big_w
            buf[:, k + 1] = y0[r_]
            dots = torch.bmm(buf, buf.transpose(1, 2))  # [t, K+2, K+2]
            f, a = dots[:, : k + 1, : k + 1], dots[:, : k + 1, k + 1]  # <f_a, f_b> [t, K+1, K+1], <f_a, y0> [t, K+1]
            ey = a - torch.bmm(f[:, :, :k], wk[..., None]).squeeze(-1) / big_w  # [t, K+1] <e, f_a>
            c, eye = torch.zeros_like(f[:, :k]), torch.arange(k, device=dev)  # c [t, K, K+1]: the coefficients c_im
            c[:, :, k] = wn
            if renormalize:
                wi = big_w - wk + wn  # [t, K]
                c[:, :, :k] = -((wn - wk) / big_w)[..., None] * wk[:, None]  # -(w_n - w_i) w_m / W
                c[:, eye, eye] = -wk * wi / big_w  # -w_i - (w_n - w_i) w_i / W
                diag = f.diagonal(dim1=1, dim2=2)  # [t, K+1]
                quad = -0.5 * (torch.bmm(c, diag[:, :, None] + diag[:, None, :] - 2 * f) * c).sum(-1)  # [t, K]
            else:
                wi = big_w
                c[:, eye, eye] = -wk
                quad = (torch.bmm(c, f) * c).sum(-1)
            contrib[r_] = quad / wi ** 2 - 2 * (c * ey[:, None]).sum(-1) / wi

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
            cache.ensure(hit, ids[hit], removed)
            update(hit)
    return GreedyOrder(order, _relative_errors(increases, reference))


# -- sizing to --greedy-memory ---------------------------------------------------------------------------------------
def greedy_sample_tokens(num_experts: int, hidden: int, elem_bytes: int, max_tokens: int, memory_bytes: float,
                         top_k: int) -> int:
    """How many tokens a layer's greedy sample holds: at most ``max_tokens``, and the search's memory with the
    smallest cache, K+1 outputs per token (:func:`reap.stream.hidden.greedy_peak_bytes`: the sample, the cache
    [S, K+1, H] of ``elem_bytes``, the float64 arrays and the work chunks), within ``memory_bytes``."""
    from reap.stream.hidden import greedy_token_bytes, greedy_work_limit

    room = memory_bytes - greedy_work_limit(memory_bytes)
    fit = int(room // greedy_token_bytes(min(top_k + 1, num_experts), hidden, elem_bytes, top_k))
    return max(0, min(int(max_tokens), fit))


def greedy_cache_slots(num_experts: int, hidden: int, elem_bytes: int, tokens: int, memory_bytes: float,
                       top_k: int) -> int:
    """C, the expert outputs cached per sampled token: K+1 (what every step reads), up to 2(K+1) (at most E) where
    ``tokens`` leave room in ``memory_bytes``. Deeper slots hold each token's next choices before a removal needs
    them, which saves the early steps' expert calls (each reads the weights of most experts left)."""
    from reap.stream.hidden import greedy_token_bytes, greedy_work_limit

    least = min(top_k + 1, num_experts)
    most = max(least, min(num_experts, 2 * (top_k + 1)))
    if tokens <= 0:
        return most
    room = (memory_bytes - greedy_work_limit(memory_bytes)) // tokens - greedy_token_bytes(least, hidden, elem_bytes,
                                                                                           top_k)
    return int(max(least, min(most, least + room // (hidden * elem_bytes + 8))))
