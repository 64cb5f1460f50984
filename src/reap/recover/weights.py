"""One expert's weights as transformers holds them, their intermediate neurons, alignment and the merge formula.

An experts module on transformers' experts interface holds every expert's up projection (``gate_up_proj`` with a
gate, else ``up_proj``: [E, O, H], or [E, H, O] where ``is_transposed``), its ``down_proj`` ([E, H, I] or
[E, I, H]) and maybe their biases. Which of the O up-projection columns feed which intermediate neuron is the
module's own ``_apply_gate`` (the gate and up halves concatenated, or interleaved as gpt-oss stores them):
:func:`neurons` reads it off the module by perturbing one column at a time, so no layout is assumed.

Two experts compute the same function under any permutation of their intermediate neurons, so before averaging a
source expert into an anchor its neurons are matched to the anchor's (:func:`align`: the assignment that maximizes
the summed cosine similarity of each neuron's weights, gate, up and down together, as M-SMoE and HC-SMoE do;
``scipy.optimize.linear_sum_assignment``). :func:`merged` is the formula: sum_j a_j P_j(W_j) with the weights a_j
summing to 1 and P_j the source's permutation; :func:`forward` runs one expert from such a dict.

Legend: E experts, H hidden, I expert intermediate, O up-projection outputs (I, or 2I with a gate), R rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Neurons:
    """The up projection's output columns by intermediate neuron: ``of_column`` [O] the neuron each column feeds,
    ``columns`` [I, c] each neuron's columns in column order (c = 2 with a gate, 1 without), ``role`` [O] a
    column's place among its neuron's columns."""

    of_column: Tensor
    columns: Tensor
    role: Tensor

    @property
    def size(self) -> int:
        return int(self.columns.shape[0])

    def column_order(self, perm: Tensor) -> Tensor:
        """[O]: for each up-projection column of the merged expert, the source column it takes when the source's
        neuron ``perm[n]`` goes to neuron ``n``."""
        return self.columns[perm.to(self.columns.device)[self.of_column], self.role]


def neurons(experts) -> Neurons:
    """Read which intermediate neuron each up-projection column feeds off the module's own gate
    (``_apply_gate``; the activation alone without a gate). ValueError where a column feeds several neurons or
    neurons have different numbers of columns."""
    up = experts.gate_up_proj if experts.has_gate else experts.up_proj
    O = up.shape[-1] if experts.is_transposed else up.shape[-2]
    act = experts._apply_gate if experts.has_gate else experts.act_fn
    with torch.no_grad():
        base = torch.full((1, O), 0.5, dtype=torch.float32, device=up.device)
        h = base + 0.25 * torch.eye(O, dtype=torch.float32, device=up.device)  # [O, O] one column moved per row
        diff = (act(h) - act(base)).abs()  # [O, I]
    if diff.dim() != 2:
        raise ValueError(f"{type(experts).__name__}'s gate returned shape {list(diff.shape)}")
    I = diff.shape[1]
    moved = diff > 1e-6 * diff.amax().clamp_min(1e-30)
    if not bool((moved.sum(1) == 1).all()):
        raise ValueError(f"{type(experts).__name__}: an up-projection column feeds more or fewer than one neuron")
    of_column = diff.argmax(1)  # [O]
    counts = torch.bincount(of_column, minlength=I)
    if int(counts.min()) != int(counts.max()) or O != I * int(counts[0]):
        raise ValueError(f"{type(experts).__name__}: its {I} intermediate neurons take different numbers of the "
                         f"{O} up-projection columns")
    columns = torch.argsort(of_column * O + torch.arange(O, device=of_column.device)).view(I, -1)  # [I, c]
    role = torch.empty_like(of_column)
    role[columns.reshape(-1)] = torch.arange(columns.shape[1], device=of_column.device).repeat(I)
    return Neurons(of_column.cpu(), columns.cpu(), role.cpu())


def expert_weights(experts, e: int) -> dict[str, Tensor]:
    """Expert ``e``'s tensors (views of the module's), float32: ``up`` [O, H] (or [H, O] transposed), ``down``
    [H, I] (or [I, H]), and ``up_bias`` [O] / ``down_bias`` [H] where the module has biases."""
    up = experts.gate_up_proj if experts.has_gate else experts.up_proj
    out = {"up": up[e].detach().float(), "down": experts.down_proj[e].detach().float()}
    if getattr(experts, "has_bias", False):
        out["up_bias"] = (experts.gate_up_proj_bias if experts.has_gate else experts.up_proj_bias)[e].detach().float()
        out["down_bias"] = experts.down_proj_bias[e].detach().float()
    return out


def neuron_axes(transposed: bool) -> dict[str, int | None]:
    """The axis of each tensor of :func:`expert_weights` along which its intermediate neurons lie (None: none)."""
    return {"up": 1 if transposed else 0, "down": 0 if transposed else 1, "up_bias": 0, "down_bias": None}


def features(w: dict[str, Tensor], cells: Neurons, transposed: bool) -> Tensor:
    """[I, (c + 1) H]: each intermediate neuron's weights (its up-projection columns, then its down column)."""
    up = w["up"].T if transposed else w["up"]  # [O, H]
    down = w["down"] if transposed else w["down"].T  # [I, H]
    parts = [up[cells.columns[:, j].to(up.device)] for j in range(cells.columns.shape[1])] + [down]
    return torch.cat(parts, dim=1)


def align(anchor: Tensor, source: Tensor) -> Tensor:
    """perm [I] (long): ``perm[n]`` is the source neuron matched to the anchor's neuron ``n``, maximizing the sum of
    the cosine similarities of matched neurons' features (:func:`features`)."""
    from scipy.optimize import linear_sum_assignment

    sim = F.normalize(anchor.double(), dim=1) @ F.normalize(source.double(), dim=1).T  # [I, I]
    rows, cols = linear_sum_assignment(sim.cpu().numpy(), maximize=True)
    perm = torch.empty(anchor.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return perm


def permuted(w: dict[str, Tensor], perm: Tensor, cells: Neurons, transposed: bool) -> dict[str, Tensor]:
    """The same expert with its neuron ``perm[n]`` moved to ``n`` (it computes the same function)."""
    axes = neuron_axes(transposed)
    cols = cells.column_order(perm)
    out = {}
    for name, t in w.items():
        axis = axes[name]
        if axis is None:
            out[name] = t
        else:
            idx = (perm if name == "down" else cols).to(t.device)
            out[name] = t.index_select(axis, idx)
    return out


def merged(parts: list[tuple[dict[str, Tensor], float]]) -> dict[str, Tensor]:
    """The merge formula: sum_j a_j W_j over (aligned) experts' tensors ``parts`` [(weights, a_j)], float32; the
    a_j are used as given (the methods make them sum to 1)."""
    out = {}
    for w, a in parts:
        for name, t in w.items():
            out[name] = out[name] + a * t if name in out else a * t
    return out


def forward(experts, w: dict[str, Tensor], x: Tensor) -> Tensor:
    """One expert with weights ``w`` (as :func:`expert_weights`) on rows x [R, H] -> [R, H], float32, the module's
    own gate, activation and post-expert norm."""
    x = x.float()
    h = x @ w["up"] if experts.is_transposed else F.linear(x, w["up"])
    if "up_bias" in w:
        h = h + w["up_bias"]
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
    y = h @ w["down"] if experts.is_transposed else F.linear(h, w["down"])
    if "down_bias" in w:
        y = y + w["down_bias"]
    if getattr(experts, "has_post_expert_norm", False):
        y = experts.post_expert_norm(y.to(experts.down_proj.dtype)).float()
    return y
