"""The instrumented MoE step used during calibration (and evaluation).

Routes exactly as the family's modeling code (via :func:`reap.arch.route`), computes each expert only on
the tokens routed to it (pairs sorted by expert; one grouped matmul per projection where the backend has
one, else a loop over the experts that were hit), and hands each (token, expert) pair's gate weight and
output norm to a :class:`reap.saliency.LayerAccumulator`. Shared experts (DeepSeek-V3, GLM-4.5, Qwen3-Next), when
the family has them, are transformers' own module, run on every token and added to the routed output, scaled per
token by sigmoid(shared_gate(x)) where the family gates them (Qwen3-Next); they are not tracked.

Legend: T tokens, E experts, K top-k, H hidden, I expert intermediate, N = T*K routed pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reap.arch import Family, Routing, route


def _grouped_mm_fn():
    """torch's grouped matmul (F.grouped_mm in torch >= 2.10, torch._grouped_mm before), or None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class RoutedMoE(nn.Module):
    """Drop-in replacement for a decoder layer's MoE block: [B, S, H] -> [B, S, H]."""

    def __init__(
        self,
        family: Family,
        top_k: int,
        router: torch.Tensor,  # [E, H]
        bias: torch.Tensor | None,  # [E]
        w_gate: torch.Tensor,  # [E, I, H]
        w_up: torch.Tensor,  # [E, I, H]
        w_down: torch.Tensor,  # [E, H, I]
        act: str = "silu",
        grouped: bool | None = None,
        routing: Routing | None = None,  # this checkpoint's routing numbers (MoESpec.routing); None = family defaults
        shared: nn.Module | None = None,  # shared experts (transformers' own module), added to the routed output
        shared_gate: nn.Module | None = None,  # [H] -> [1]: the shared output is scaled by sigmoid(shared_gate(x))
    ):
        super().__init__()
        from transformers.activations import ACT2FN

        self.family, self.top_k, self.routing = family, top_k, routing
        self.shared, self.shared_gate = shared, shared_gate
        self.router, self.bias = router, bias
        self.logit_bias: torch.Tensor | None = None  # [E], a router bias of its own added to the logits (gpt-oss)
        self.w_gate, self.w_up, self.w_down = w_gate, w_up, w_down
        self.act = ACT2FN[act]
        self.num_experts = router.shape[0]
        fn = _grouped_mm_fn()
        if grouped is None:  # grouped matmul where it is fast and exact enough: CUDA, 16-bit weights
            grouped = fn is not None and w_gate.is_cuda and w_gate.dtype == torch.bfloat16
        self.grouped = bool(grouped and fn is not None)
        self.accumulator = None  # set by the streamer: a LayerAccumulator, or None to only compute
        self.token_mask: torch.Tensor | None = None  # [B*S] bool: which positions are real tokens

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [T, H]
        out = torch.zeros_like(x)
        if self.token_mask is not None:
            rows = self.token_mask.nonzero().squeeze(1)
            out[rows] = self._moe(x[rows])
        else:
            out = self._moe(x)
        return out.reshape(shape)

    def _moe(self, x: torch.Tensor) -> torch.Tensor:
        T, H = x.shape
        K, E = self.top_k, self.num_experts
        logits = F.linear(x.to(self.router.dtype), self.router, self.logit_bias)  # [T, E]
        weights, chosen = route(logits, self.bias, K, self.family, self.routing)  # [T, K] each
        flat_expert = chosen.reshape(-1)  # [N]
        expert_sorted, order = torch.sort(flat_expert, stable=True)  # [N]
        token_sorted = order // K  # [N]
        gate_sorted = weights.reshape(-1)[order]  # [N] float32
        counts = torch.bincount(flat_expert, minlength=E)  # [E]
        xs = x[token_sorted]  # [N, H]
        y = self._experts(xs, counts)  # [N, H]
        if self.accumulator is not None:
            # [N]  ||f_j(x)||, in float32 (on GPU without an fp32 copy of y)
            norms = torch.linalg.vector_norm(y, dim=-1, dtype=torch.float32) if y.is_cuda else y.float().norm(dim=-1)
            self.accumulator.add(expert_sorted, gate_sorted, norms)
        if y.is_cuda:
            # combine by un-sorting and summing each token's K outputs in float32: deterministic, and faster on
            # GPU than a 16-bit index_add_ (atomics)
            inv = torch.empty_like(order)
            inv[order] = torch.arange(order.numel(), device=order.device)
            out = (y[inv].view(T, K, H) * weights.unsqueeze(-1)).sum(dim=1).to(x.dtype)  # [T, H]
        else:  # CPU: one pass in expert order, the same summation order as transformers' eager experts
            out = torch.zeros_like(x)
            out.index_add_(0, token_sorted, (y * gate_sorted[:, None]).to(x.dtype))
        if self.shared is not None:  # shared experts see every token (DeepSeek-V3: routed + shared, in that order)
            shared = self.shared(x)  # [T, H]
            if self.shared_gate is not None:  # Qwen3-Next: sigmoid(gate(x)) [T, 1] x shared, then routed + that
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            out = out + shared
        return out

    def _experts(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs [N, H] sorted by expert, counts [E] -> each expert's output on its rows, [N, H]."""
        if self.grouped:
            fn = _grouped_mm_fn()
            offs = torch.cumsum(counts, 0, dtype=torch.int32)  # [E]
            xs = xs.to(self.w_gate.dtype)
            g = fn(xs, self.w_gate.transpose(-2, -1), offs=offs)  # [N, I]
            u = fn(xs, self.w_up.transpose(-2, -1), offs=offs)
            return fn(self.act(g) * u, self.w_down.transpose(-2, -1), offs=offs)  # [N, H]
        y = torch.empty(xs.shape[0], self.w_down.shape[1], dtype=xs.dtype, device=xs.device)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                seg = xs[start : start + n]  # [t_e, H]
                h = self.act(F.linear(seg, self.w_gate[e])) * F.linear(seg, self.w_up[e])  # [t_e, I]
                y[start : start + n] = F.linear(h, self.w_down[e])
                start += n
        return y


class FusedClampedSwiGLUMoE(RoutedMoE):
    """gpt-oss's MoE block (GptOssMLP): a router with a bias of its own, top-k on the logits, softmax over the
    chosen K (:func:`reap.arch.route`); fused expert weights with biases and a clamped GLU, computed only on the
    routed tokens. Returns ``(hidden, None)``, as GptOssDecoderLayer unpacks ``(hidden, router_scores)``.

    Per expert e on its rows x [t_e, H]: gate_up = x @ W_gu[e] + b_gu[e] [t_e, 2I]; gate, up = gate_up[:, ::2],
    gate_up[:, 1::2]; gate = min(gate, limit); up = clamp(up, -limit, limit); f(x) = ((up + 1) * gate *
    sigmoid(alpha * gate)) @ W_d[e] + b_d[e] [t_e, H]. Statistics as :class:`RoutedMoE` (||f(x)|| includes b_d).
    """

    def __init__(
        self,
        family: Family,
        top_k: int,
        router: torch.Tensor,  # [E, H]
        logit_bias: torch.Tensor | None,  # [E], added to the router logits
        w_gate_up: torch.Tensor,  # [E, H, 2I]
        b_gate_up: torch.Tensor,  # [E, 2I]
        w_down: torch.Tensor,  # [E, I, H]
        b_down: torch.Tensor,  # [E, H]
        alpha: float = 1.702,
        limit: float = 7.0,
        grouped: bool | None = None,
        routing: Routing | None = None,
    ):
        fn = _grouped_mm_fn()
        if grouped is None:
            grouped = fn is not None and w_gate_up.is_cuda and w_gate_up.dtype == torch.bfloat16
        # the parent keeps the router and the bookkeeping; its gate/up/down slots hold the fused tensors
        super().__init__(family, top_k, router, None, w_gate_up, w_gate_up, w_down, grouped=grouped, routing=routing)
        self.logit_bias = logit_bias
        self.w_gate_up, self.b_gate_up, self.b_down = w_gate_up, b_gate_up, b_down
        self.alpha, self.limit = float(alpha), float(limit)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return super().forward(hidden_states), None

    def _glu(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def _experts(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs [N, H] sorted by expert, counts [E] -> each expert's output on its rows, [N, H]."""
        if self.grouped:
            fn = _grouped_mm_fn()
            offs = torch.cumsum(counts, 0, dtype=torch.int32)  # [E]
            ids = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)  # [N]
            xs = xs.to(self.w_gate_up.dtype)
            gu = fn(xs, self.w_gate_up, offs=offs) + self.b_gate_up[ids]  # [N, 2I]
            return fn(self._glu(gu), self.w_down, offs=offs) + self.b_down[ids]  # [N, H]
        y = torch.empty(xs.shape[0], self.w_down.shape[2], dtype=xs.dtype, device=xs.device)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                seg = xs[start : start + n]  # [t_e, H]
                h = self._glu(seg @ self.w_gate_up[e] + self.b_gate_up[e])  # [t_e, I]
                y[start : start + n] = h @ self.w_down[e] + self.b_down[e]
                start += n
        return y
