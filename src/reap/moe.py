"""reap's experts implementation, registered with transformers' experts interface.

transformers' MoE blocks route with their own code (softmax, sigmoid, correction bias, groups, scaling, hash
tables...) and then call their experts module as ``experts(hidden_states, top_k_index, top_k_weights)``; the
module dispatches to the function registered under ``config._experts_implementation``. reap registers
:func:`reap_experts_forward` as ``"reap"``: it computes each expert only on the tokens routed to it (pairs sorted
by expert; one grouped matmul per projection on CUDA in 16-bit, else a loop over the experts that were hit),
with the module's own flags and gate (``has_gate``, ``has_bias``, ``is_transposed``, ``_apply_gate``,
``act_fn``, a post-expert norm), and, when an :class:`ExpertsProbe` is attached to the module, hands every
routed pair's weight (the one the model applies) and output norm (before weighting) to its accumulator.

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

    accumulator: object | None = None  # reap.saliency.LayerAccumulator
    token_mask: torch.Tensor | None = None  # [T] bool
    grouped: bool | None = None  # None: grouped matmul where it is fast and exact enough (CUDA, 16-bit weights)


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


def reap_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts module's forward: hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K] -> [T, H]."""
    probe: ExpertsProbe | None = getattr(self, "_reap_probe", None)
    T, H = hidden_states.shape
    K = top_k_index.shape[-1]
    E = self.num_experts
    x, index, weights = hidden_states, top_k_index, top_k_weights
    rows = None
    mask = probe.token_mask if probe is not None else None
    if mask is not None and mask.numel() == T and not bool(mask.all()):
        rows = mask.nonzero().squeeze(1)  # [T'] the real tokens
        x, index, weights = x[rows], index[rows], weights[rows]
    flat = index.reshape(-1)  # [N]
    counts = torch.bincount(flat, minlength=E)  # [E]
    if counts.numel() != E:
        raise RuntimeError(f"the router chose expert {int(flat.max())} of {E}")
    order = torch.sort(flat, stable=True)[1]  # [N]
    ids = flat[order]
    token = order // K  # [N]
    gate = weights.reshape(-1)[order]  # [N]
    fn = _grouped_mm_fn()
    grouped = probe.grouped if probe is not None and probe.grouped is not None else (
        fn is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16))
    y = expert_outputs(self, x[token], ids, counts, grouped and fn is not None)  # [N, H]
    if probe is not None and probe.accumulator is not None:
        # ||f_j(x)|| in float32 (on GPU without an fp32 copy of y)
        norms = torch.linalg.vector_norm(y, dim=-1, dtype=torch.float32) if y.is_cuda else y.float().norm(dim=-1)
        probe.accumulator.add(ids, gate, norms)
    if y.is_cuda:
        # un-sort and sum each token's K weighted outputs in float32, as transformers' grouped_mm path does:
        # deterministic, and faster on GPU than a 16-bit index_add_ (atomics)
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel(), device=order.device)
        out = (y[inv] * weights.reshape(-1, 1)).view(-1, K, y.shape[-1]).sum(dim=1).to(hidden_states.dtype)
    else:  # one pass in expert order, the summation order of transformers' eager experts
        out = torch.zeros(x.shape[0], y.shape[-1], dtype=hidden_states.dtype, device=x.device)
        out.index_add_(0, token, (y * gate[:, None]).to(hidden_states.dtype))
    if rows is None:
        return out
    full = torch.zeros(T, out.shape[-1], dtype=out.dtype, device=out.device)
    full[rows] = out
    return full


def register() -> None:
    """Make ``"reap"`` an experts implementation transformers knows (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION, reap_experts_forward)


def use_reap_experts(model) -> list:
    """Switch every experts module of ``model`` to reap's implementation; returns those modules."""
    from reap.arch import is_experts_module

    register()
    model.set_experts_implementation(IMPLEMENTATION)
    modules = [m for m in model.modules() if is_experts_module(m)]
    for m in modules:  # sub-configs transformers did not switch (a text model inside a wrapper, say)
        if m.config._experts_implementation != IMPLEMENTATION:
            m.config._experts_implementation_internal = IMPLEMENTATION
    return modules
