"""The run-time self-check: before any statistic is trusted, reap's reading of a layer's experts is compared with
transformers' own code, on the first batch of every kind of MoE layer.

A model type reap was never run on (a newer transformers than its support matrix) may hide its experts behind more
than the standard experts interface: ERGO's experts class calls the dispatched projections one route per row with
weight 1 and applies a per-expert RMSNorm and the real routing weights outside them. reap's implementation then gives
the right output while its statistics see g = 1 and f before the norm. So two checks, on up to ``max_rows`` real
tokens of the batch, against the experts module the MoE block calls, run as transformers runs it:

(a) **output**: what reap's experts give the block == transformers' own implementation (the one it had before reap
    registered its own) on the same inputs;
(b) **statistics' terms**: the pairs handed to the statistics are exactly the block's routed pairs on real tokens
    (expert id < E, weight != 0), and over each token's pairs the sum of g x f(x), with g and f as the statistics got
    them, rebuilds transformers' output.

A mismatch stops the run in one line (:class:`reap.core.errors.UserError`) naming the model type, the layer and what
differs. :attr:`SelfCheck.results` holds what was checked (the calibration's metadata and the report show it).

Legend: T tokens of the checked call, K top-k, H hidden, N routed pairs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from reap.core.errors import UserError

#: relative error (Frobenius, over the checked rows) allowed between two computations of the experts' output
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
TOLERANCE_16BIT = 3e-2


@dataclass
class _Armed:
    """One layer's check in progress: the experts module's calls during the checked batch and the terms of each."""

    layer: int
    kind: tuple
    experts: torch.nn.Module
    calls: list = field(default_factory=list)  # (args, kwargs, output, terms start, terms end)
    hooks: list = field(default_factory=list)


class SelfCheck:
    """Checks (a) and (b) of the module docstring once per kind of MoE layer (the classes of its MoE block and
    experts module). :meth:`arm` before the layer's first batch, :meth:`finish` after it."""

    def __init__(self, model_type: str, max_rows: int = 512):
        self.model_type = model_type
        self.max_rows = max_rows
        self.kinds: set = set()
        self.results: list[dict] = []  # one per checked layer: layer, kind, output and terms errors, rows
        self.seconds = 0.0

    def arm(self, layer: int, block, experts) -> _Armed | None:
        """Start checking ``layer`` on its next batch, or None where a layer of its kind was checked already."""
        kind = (type(block).__name__, type(experts).__name__)
        if kind in self.kinds:
            return None
        armed = _Armed(layer, kind, experts)
        probe = experts._reap_probe
        probe.terms = []

        def pre(mod, args, kwargs):
            armed.calls.append([args, kwargs, None, len(probe.terms), None])

        def post(mod, args, kwargs, output):
            armed.calls[-1][2], armed.calls[-1][4] = output, len(probe.terms)

        armed.hooks = [experts.register_forward_pre_hook(pre, with_kwargs=True),
                       experts.register_forward_hook(post, with_kwargs=True)]
        return armed

    def disarm(self, armed: _Armed | None) -> None:
        if armed is None:
            return
        for h in armed.hooks:
            h.remove()
        armed.hooks = []
        probe = getattr(armed.experts, "_reap_probe", None)
        if probe is not None:
            probe.terms = None

    @torch.inference_mode()
    def finish(self, armed: _Armed | None, token_mask: torch.Tensor | None) -> None:
        """Compare the checked batch's calls with transformers' own (``token_mask``: the batch's real rows [T], or
        None); raise UserError on a mismatch."""
        if armed is None:
            return
        t0 = time.perf_counter()
        terms = armed.experts._reap_probe.terms
        self.disarm(armed)
        if not armed.calls:
            self._fail(armed, "the MoE block never called its experts module on the checked batch")
        worst_a = worst_b = 0.0
        rows_checked = 0
        for args, kwargs, output, start, end in armed.calls:
            x, index, weights = (list(args) + [kwargs.get(k) for k in ("hidden_states", "top_k_index",
                                                                         "top_k_weights")][len(args):])[:3]
            a, b, n = self._compare(armed, x, index, weights, output, terms[start:end], token_mask)
            worst_a, worst_b, rows_checked = max(worst_a, a), max(worst_b, b), rows_checked + n
        self.kinds.add(armed.kind)
        self.seconds += time.perf_counter() - t0
        self.results.append({"layer": armed.layer, "kind": "/".join(armed.kind), "rows": rows_checked,
                             "output_error": worst_a, "terms_error": worst_b})

    def _compare(self, armed: _Armed, x, index, weights, output, terms: list, token_mask) -> tuple[float, float, int]:
        """(relative output error (a), relative rebuild error (b), rows checked) of one call of the experts."""
        T, K = index.shape
        E = armed.experts.num_experts
        real = token_mask if token_mask is not None and token_mask.numel() == T else torch.ones(T, dtype=torch.bool,
                                                                                                 device=x.device)
        rows = real.nonzero().squeeze(1)[: self.max_rows]  # [R] the real rows checked
        # (b), first half: the pairs the statistics got are the block's routed pairs on real tokens
        if any(t[0] != T for t in terms):
            self._fail(armed, f"the statistics were taken from a call over {terms[0][0]} rows while the MoE block "
                              f"called its experts with {T} tokens (the experts module calls the dispatched experts "
                              "with rows of its own)")
        routed = ((index < E) & (weights != 0) & real[:, None]).reshape(-1)
        want = (torch.arange(T * K, device=index.device) // K * E + index.reshape(-1).clamp(0, E - 1))[routed]
        token = torch.cat([t[1] for t in terms]) if terms else index.new_zeros(0)
        ids = torch.cat([t[2] for t in terms]) if terms else index.new_zeros(0)
        got = token.to(index.device) * E + ids.to(index.device)
        if got.numel() != want.numel() or not torch.equal(torch.sort(got)[0], torch.sort(want)[0]):
            self._fail(armed, f"the statistics counted {got.numel()} (token, expert) pairs where the MoE block routed "
                              f"{want.numel()} on real tokens (expert id < {E}, weight != 0)")
        # (a): reap's output == transformers' own implementation on the same inputs
        from reap.stream.experts import reference_forward

        ref = reference_forward(armed.experts, x[rows], index[rows], weights[rows]).float()  # [R, H]
        mine = output[rows].float()
        err_a = _relative(mine, ref)
        # (b), second half: sum over each token's pairs of g x f rebuilds it
        pos = torch.full((T,), -1, dtype=torch.long, device=x.device)
        pos[rows] = torch.arange(rows.numel(), device=x.device)
        rebuilt = torch.zeros(rows.numel(), ref.shape[-1], dtype=torch.float64, device=x.device)
        for _, tok, _, gate, y in terms:
            p = pos[tok.to(x.device)]
            keep = p >= 0
            rebuilt.index_add_(0, p[keep], y[keep].double() * gate[keep].double()[:, None])
        err_b = _relative(rebuilt.float(), ref)
        tol = TOLERANCE.get(x.dtype, TOLERANCE_16BIT)
        impl = getattr(armed.experts, "_reap_reference", "eager")
        if not err_a <= tol:
            self._fail(armed, f"reap's experts output differs from transformers' {impl!r} implementation by "
                              f"{err_a:.2e} (relative; allowed {tol:g})")
        if not err_b <= tol:
            self._fail(armed, f"the statistics' terms (sum of routing weight x expert output over each token's pairs) "
                              f"differ from the experts module's output by {err_b:.2e} (relative; allowed {tol:g}): "
                              "the weight or the output reap records is not the one the model applies")
        return err_a, err_b, int(rows.numel())

    def _fail(self, armed: _Armed, what: str):
        raise UserError(f"run-time self-check failed for model type {self.model_type!r}, layer {armed.layer} "
                        f"({type(armed.experts).__name__}): {what}; reap stops before trusting its statistics "
                        "(the model type needs support in reap: please report this line)")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (0 where both are 0)."""
    den = float(b.double().norm())
    num = float((a.double() - b.double()).norm())
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))
