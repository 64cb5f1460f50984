"""reap's experts implementation, registered with transformers' experts interface.

transformers' MoE blocks route with their own code (softmax, sigmoid, correction bias, groups, scaling, hash
tables...) and then call their experts module as ``experts(hidden_states, top_k_index, top_k_weights)``; the
module dispatches to the function registered under ``config._experts_implementation``. reap registers
:func:`reap_experts_forward` as ``"reap"``: it computes each expert only on the tokens routed to it (pairs sorted
by expert; one grouped matmul per projection on CUDA in 16-bit, else a loop over the experts that were hit),
with the module's own flags and gate (``has_gate``, ``has_bias``, ``is_transposed``, ``_apply_gate``,
``act_fn``, a post-expert norm), and, when an :class:`ExpertsProbe` is attached to the module, hands every
routed pair's weight (the one the model applies), output norm and largest output magnitude max_h |f_h| (both
before weighting) to its accumulator.

Padding: the probe's ``token_mask`` (real positions of the batch, flattened) restricts the work to real tokens;
padded rows get a zero output.

Legend: T tokens, K top-k, H hidden, I expert intermediate, E experts, N routed pairs (of real tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMPLEMENTATION = "reap"


@dataclass
class ExpertsProbe:
    """What the streamer attaches to an experts module for one layer: where statistics go, which rows are real."""

    accumulator: object | None = None  # reap.calibrate.stats.LayerAccumulator
    token_mask: torch.Tensor | None = None  # [T] bool
    grouped: bool | None = None  # None: grouped matmul where it is fast and exact enough (CUDA, 16-bit weights)
    # a list: record each call's (top_k_index, top_k_weights, hidden_states) and return zeros without running any expert (the
    # routing of a token sample, driven by reap.calibrate.greedy.RouterDriver)
    capture: list | None = None
    # a list: each call's statistics terms, (T of the call, token [N], expert [N], weight [N], output [N, H]), exactly
    # what the accumulator is given (the run-time self-check rebuilds the experts module's output from them)
    terms: list | None = None


def _grouped_mm_fn():
    """torch's grouped matmul (F.grouped_mm in torch >= 2.10, torch._grouped_mm before), or None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _linear(module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One expert's projection: x [t, in] with weight [out, in] ([in, out] when the module is transposed)."""
    y = x @ weight if module.is_transposed else F.linear(x, weight)
    return y + bias if bias is not None else y


def _grouped(module, x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor, bias: torch.Tensor | None,
             ids: torch.Tensor) -> torch.Tensor:
    """All experts' projection at once: x [N, in] sorted by expert, weight [E, out, in] (or [E, in, out])."""
    w = weight if module.is_transposed else weight.transpose(-2, -1)
    y = _grouped_mm_fn()(x.to(weight.dtype), w, offs=offs)
    return y + bias[ids] if bias is not None else y


def expert_outputs(module, xs: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor, grouped: bool) -> torch.Tensor:
    """xs [N, H] sorted by expert (ids [N], counts [E]) -> each pair's expert output [N, H], before weighting."""
    up_w = module.gate_up_proj if module.has_gate else module.up_proj
    up_b = (module.gate_up_proj_bias if module.has_gate else module.up_proj_bias) if module.has_bias else None
    down_b = module.down_proj_bias if module.has_bias else None

    def act(h: torch.Tensor) -> torch.Tensor:
        return module._apply_gate(h) if module.has_gate else module.act_fn(h)

    if grouped:
        offs = torch.cumsum(counts, 0, dtype=torch.int32)  # [E]
        h = act(_grouped(module, xs, up_w, offs, up_b, ids))  # [N, I]
        y = _grouped(module, h, module.down_proj, offs, down_b, ids)  # [N, H]
    else:
        y = None
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                seg = xs[start : start + n]  # [t_e, H]
                h = act(_linear(module, seg, up_w[e], up_b[e] if up_b is not None else None))  # [t_e, I]
                out = _linear(module, h, module.down_proj[e], down_b[e] if down_b is not None else None)
                if y is None:
                    y = out.new_empty(xs.shape[0], out.shape[-1])
                y[start : start + n] = out
                start += n
        if y is None:
            y = xs.new_zeros(0, xs.shape[-1])
    if getattr(module, "has_post_expert_norm", False):
        y = module.post_expert_norm(y)
    return y


def _record(probe: ExpertsProbe | None, T: int, token: torch.Tensor, ids: torch.Tensor, gate: torch.Tensor,
            y: torch.Tensor) -> None:
    """Hand the routed pairs' statistics to the probe's accumulator (and, during a self-check, their terms)."""
    if probe is None:
        return
    if probe.accumulator is not None:
        # ||f_j(x)|| in float32 (on GPU without an fp32 copy of y); max_h |f_j(x)_h| exact in y's own dtype
        norms = torch.linalg.vector_norm(y, dim=-1, dtype=torch.float32) if y.is_cuda else y.float().norm(dim=-1)
        peaks = torch.linalg.vector_norm(y, ord=float("inf"), dim=-1).float()
        probe.accumulator.add(ids, gate, norms, peaks)
    if probe.terms is not None:
        probe.terms.append((T, token.detach(), ids.detach(), gate.detach(), y.detach()))


def routed(index: torch.Tensor, weights: torch.Tensor, E: int) -> torch.Tensor:
    """[T*K] bool: which (token, slot) pairs are routed to an expert (see :func:`routed_pairs`)."""
    return (index.reshape(-1) < E) & (weights.reshape(-1) != 0)


def routed_pairs(index: torch.Tensor, weights: torch.Tensor, E: int) -> torch.Tensor | None:
    """Positions (in ``index.reshape(-1)``) of the pairs that are routed to an expert, or None when all are.

    Not routed: an id >= E (a slot that is not an expert: transformers' eager experts skip it) and a weight of exactly
    0 (a zero-computation expert or skip class mapped onto a real expert with weight 0, as LongCat-Flash and ZAYA
    do): such a pair adds nothing to the output and is not traffic of that expert."""
    valid = routed(index, weights, E)  # [T*K]
    if bool(valid.all()):
        return None
    return valid.nonzero().squeeze(1)


def reap_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts module's forward: hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K] -> [T, H]."""
    probe: ExpertsProbe | None = getattr(self, "_reap_probe", None)
    if probe is not None and probe.capture is not None:
        probe.capture.append((top_k_index.detach().clone(), top_k_weights.detach().clone(), hidden_states.detach()))
        return torch.zeros_like(hidden_states)
    T, H = hidden_states.shape
    K = top_k_index.shape[-1]
    E = self.num_experts
    x, index, weights = hidden_states, top_k_index, top_k_weights
    rows = None
    mask = probe.token_mask if probe is not None else None
    if mask is not None and mask.numel() == T and not bool(mask.all()):
        rows = mask.nonzero().squeeze(1)  # [T'] the real tokens
        x, index, weights = x[rows], index[rows], weights[rows]
    flat, w = index.reshape(-1), weights.reshape(-1)  # [T'*K]
    pairs = routed_pairs(index, weights, E)  # None: every pair is routed
    if pairs is not None:
        flat, w = flat[pairs], w[pairs]  # [N]
    counts = torch.bincount(flat, minlength=E)  # [E]
    order = torch.sort(flat, stable=True)[1]  # [N]
    ids = flat[order]
    slot = pairs[order] if pairs is not None else order  # [N] position among the T'*K pairs
    token = slot // K  # [N]
    gate = w[order]  # [N]
    fn = _grouped_mm_fn()
    grouped = probe.grouped if probe is not None and probe.grouped is not None else (
        fn is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16))
    y = expert_outputs(self, x[token], ids, counts, grouped and fn is not None)  # [N, H]
    _record(probe, T, rows[token] if rows is not None else token, ids, gate, y)
    if y.is_cuda:
        # un-sort and sum each token's K weighted outputs in float32, as transformers' grouped_mm path does:
        # deterministic, and faster on GPU than a 16-bit index_add_ (atomics)
        if pairs is None:
            inv = torch.empty_like(order)
            inv[order] = torch.arange(order.numel(), device=order.device)
            out = (y[inv] * weights.reshape(-1, 1)).view(-1, K, y.shape[-1]).sum(dim=1).to(hidden_states.dtype)
        else:  # pairs that are not routed add nothing
            weighted = y * gate[:, None]  # [N, H] in the dtype of the path above (float32 for float32 weights)
            every = weighted.new_zeros(index.numel(), y.shape[-1])  # [T'*K, H]
            every[slot] = weighted
            out = every.view(-1, K, y.shape[-1]).sum(dim=1).to(hidden_states.dtype)
    else:  # one pass in expert order, the summation order of transformers' eager experts
        out = torch.zeros(x.shape[0], y.shape[-1], dtype=hidden_states.dtype, device=x.device)
        out.index_add_(0, token, (y * gate[:, None]).to(hidden_states.dtype))
    if rows is None:
        return out
    full = torch.zeros(T, out.shape[-1], dtype=out.dtype, device=out.device)
    full[rows] = out
    return full


# -- experts modules that wrap the dispatched projections -------------------------------------------------------
def dispatch_forward(module):
    """The forward ``@use_experts_implementation`` installed on the module's class or a base class (the one that
    dispatches to the registered implementation), or None."""
    for cls in type(module).__mro__:
        fn = cls.__dict__.get("forward")
        code = getattr(fn, "__code__", None)
        if code is not None and hasattr(fn, "__wrapped__") and code.co_filename.replace("\\", "/").endswith(
                "integrations/moe.py"):
            return fn
    return None


def is_wrapped(module) -> bool:
    """The experts module's own class overrides the dispatching forward and calls it inside (ERGO: each route its own
    row with weight 1, a per-expert RMSNorm and the real routing weights applied outside the dispatch). reap then
    takes each pair's output and weight at the module the MoE block calls (:func:`wrapped_experts_forward`), not
    inside it, where it would see weight 1 and the output before the norm."""
    fn = dispatch_forward(module)
    return fn is not None and type(module).forward is not fn


def pair_outputs(module, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each row's expert output before weighting, through the module the MoE block calls: x [N, H], ids [N] ->
    [N, H] = the module's own forward with one route per row and weight 1 (a wrapped module's norms included).
    The module must be linear in its weights and treat rows independently, which the run-time self-check verifies."""
    probe = getattr(module, "_reap_probe", None)
    module._reap_probe = None  # the inner dispatch records nothing
    try:
        return type(module).forward(module, x, ids[:, None], torch.ones(ids.shape[0], 1, dtype=x.dtype,
                                                                          device=x.device))
    finally:
        module._reap_probe = probe


def wrapped_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """The instance forward of a wrapped experts module (:func:`is_wrapped`): every routed pair's output f (the
    module's own forward, one route per row with weight 1), the statistics from f and the routing weight the block
    applies, and the output sum of g x f per token. hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]."""
    probe: ExpertsProbe | None = getattr(self, "_reap_probe", None)
    if probe is not None and probe.capture is not None:
        probe.capture.append((top_k_index.detach().clone(), top_k_weights.detach().clone(), hidden_states.detach()))
        return torch.zeros_like(hidden_states)
    T, K = top_k_index.shape
    mask = probe.token_mask if probe is not None else None
    valid = routed(top_k_index, top_k_weights, self.num_experts)  # [T*K]
    if mask is not None and mask.numel() == T:
        valid &= mask.repeat_interleave(K)
    slot = valid.nonzero().squeeze(1)  # [N]
    token, ids, gate = slot // K, top_k_index.reshape(-1)[slot], top_k_weights.reshape(-1)[slot]
    y = pair_outputs(self, hidden_states[token], ids)  # [N, H]
    _record(probe, T, token, ids, gate, y)
    out = torch.zeros(T, y.shape[-1], dtype=torch.float32, device=y.device)
    out.index_add_(0, token, y.float() * gate.float()[:, None])
    return out.to(hidden_states.dtype)


def register() -> None:
    """Make ``"reap"`` an experts implementation transformers knows (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION, reap_experts_forward)


def use_reap_experts(model) -> list:
    """Switch every experts module of ``model`` to reap's implementation; returns those modules."""
    from reap.model.model_side import is_experts_module

    register()
    modules = [m for m in model.modules() if is_experts_module(m)]
    for m in modules:  # what transformers would run (the run-time self-check compares reap's with it)
        m._reap_reference = transformers_implementation(m)
    model.set_experts_implementation(IMPLEMENTATION)
    for m in modules:  # sub-configs transformers did not switch (a text model inside a wrapper, say)
        if m.config._experts_implementation != IMPLEMENTATION:
            m.config._experts_implementation_internal = IMPLEMENTATION
        if is_wrapped(m):
            m.forward = wrapped_experts_forward.__get__(m)
    return modules


def transformers_implementation(module) -> str:
    """The experts implementation transformers runs for ``module`` unless told otherwise ("eager" where unset)."""
    name = getattr(module.config, "_experts_implementation", None)
    return name if name and name != IMPLEMENTATION else "eager"


def reference_forward(module, hidden_states, top_k_index, top_k_weights, implementation: str | None = None):
    """transformers' own forward of the experts module (its class's forward, the dispatch to ``implementation``,
    by default the one it had before reap's), with no probe attached."""
    impl = implementation or getattr(module, "_reap_reference", "eager")
    config, probe = module.config, getattr(module, "_reap_probe", None)
    before = getattr(config, "_experts_implementation_internal", None)
    config._experts_implementation_internal = impl
    module._reap_probe = None
    try:
        return type(module).forward(module, hidden_states, top_k_index, top_k_weights)
    finally:
        config._experts_implementation_internal = before
        module._reap_probe = probe
