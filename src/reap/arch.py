"""The family table: how each Mixture-of-Experts family lays out its experts on disk and how it routes.

One :class:`Family` entry per model family, as data: the on-disk tensor names of the router, its
correction bias and the per-expert tensors (companion tensors such as FP8 ``.weight_scale_inv`` are
found by the same pattern), the ``config.json`` keys that hold the expert count and top-k, and the
routing function. :func:`detect` reads ``config.json`` and returns a :class:`MoESpec` (the family plus
this checkpoint's numbers). Adding a family means adding one entry to :data:`FAMILIES`.

Shapes (legend: T tokens, E experts, K top-k, H hidden): router logits [T, E]; chosen experts and their
weights [T, K].
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from reap.errors import UserError


@dataclass(frozen=True)
class Family:
    """One MoE family's on-disk names, config keys and routing. Name templates use ``{layer}``/``{expert}``."""

    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    moe_prefix: str  # the MoE block of layer {layer}
    expert_prefix: str  # one expert's tensors start with this (then e.g. "w1.weight", "w1.weight_scale_inv")
    router_weight: str
    router_bias: str | None  # e_score_correction_bias-like tensor, sliced with the router rows
    # transformers' names for the expert projections -> on-disk names (gate and up are fused as gate_up_proj)
    projections: dict[str, str] = field(default_factory=dict)
    num_experts_keys: tuple[str, ...] = ("num_local_experts", "num_experts", "n_routed_experts")
    top_k_keys: tuple[str, ...] = ("num_experts_per_tok", "moe_topk", "top_k")
    num_layers_keys: tuple[str, ...] = ("num_hidden_layers",)
    expert_intermediate_keys: tuple[str, ...] = ("moe_intermediate_size", "intermediate_size")
    scoring: str = "softmax"  # "softmax" | "sigmoid"
    renormalize: bool = True  # divide the chosen K weights by their sum
    # attribute of transformers' decoder layer that holds the MoE block (replaced during calibration)
    moe_module: str = "mlp"
    # non-expert names the layer streamer needs (transformers' parameter names below these prefixes match disk)
    layer_prefix: str = "model.layers.{layer}."
    embed_weight: str = "model.embed_tokens.weight"
    final_norm_weight: str = "model.norm.weight"
    lm_head_weight: str = "lm_head.weight"
    hidden_act_key: str = "hidden_act"

    def expert_regex(self) -> re.Pattern[str]:
        """Matches every tensor of one expert: groups ``layer``, ``expert`` and ``rest`` (e.g. ``w1.weight``)."""
        pattern = re.escape(self.expert_prefix)
        pattern = pattern.replace(re.escape("{layer}"), r"(?P<layer>\d+)")
        pattern = pattern.replace(re.escape("{expert}"), r"(?P<expert>\d+)")
        return re.compile("^" + pattern + r"(?P<rest>.+)$")


MINIMAX_M2 = Family(
    name="minimax_m2",
    model_types=("minimax_m2",),
    architectures=("MiniMaxM2ForCausalLM",),
    moe_prefix="model.layers.{layer}.block_sparse_moe.",
    expert_prefix="model.layers.{layer}.block_sparse_moe.experts.{expert}.",
    router_weight="model.layers.{layer}.block_sparse_moe.gate.weight",
    router_bias="model.layers.{layer}.block_sparse_moe.e_score_correction_bias",
    projections={"gate": "w1", "up": "w3", "down": "w2"},
    num_experts_keys=("num_local_experts",),
    top_k_keys=("num_experts_per_tok",),
    expert_intermediate_keys=("intermediate_size",),
    scoring="sigmoid",
    renormalize=True,
)

#: Every supported family. To add one, append an entry here (and a test with a tiny checkpoint).
FAMILIES: tuple[Family, ...] = (MINIMAX_M2,)


def _first_key(config: dict[str, Any], keys: tuple[str, ...]) -> tuple[str, Any] | None:
    for key in keys:
        if config.get(key) is not None:
            return key, config[key]
    return None


@dataclass(frozen=True)
class MoESpec:
    """A family plus this checkpoint's numbers (from ``config.json``)."""

    family: Family
    num_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    expert_intermediate: int
    num_experts_key: str

    def router_name(self, layer: int) -> str:
        return self.family.router_weight.format(layer=layer)

    def router_bias_name(self, layer: int) -> str | None:
        bias = self.family.router_bias
        return bias.format(layer=layer) if bias else None

    def expert_name(self, layer: int, expert: int, rest: str) -> str:
        return self.family.expert_prefix.format(layer=layer, expert=expert) + rest

    def projection_name(self, layer: int, expert: int, proj: str) -> str:
        """On-disk weight of one expert projection: proj is "gate", "up" or "down"."""
        return self.expert_name(layer, expert, self.family.projections[proj] + ".weight")

    def min_kept(self) -> int:
        return self.top_k


def detect(config: dict[str, Any]) -> MoESpec:
    """Find the family entry for ``config.json`` and read its expert count, top-k and sizes."""
    model_type = config.get("model_type")
    archs = tuple(config.get("architectures") or ())
    # model_type decides (it is what transformers builds the model from); architectures only when it is absent
    if model_type:
        family = next((f for f in FAMILIES if model_type in f.model_types), None)
    else:
        family = next((f for f in FAMILIES if any(a in f.architectures for a in archs)), None)
    if family is None:
        known = ", ".join(f.name for f in FAMILIES)
        raise UserError(
            f"unsupported model family (model_type={model_type!r}, architectures={list(archs)}): reap supports "
            f"{known}; support for a new family is one entry in FAMILIES in src/reap/arch.py"
        )
    found = {}
    for what, keys in (
        ("expert count", family.num_experts_keys),
        ("top-k", family.top_k_keys),
        ("layer count", family.num_layers_keys),
        ("expert intermediate size", family.expert_intermediate_keys),
        ("hidden size", ("hidden_size",)),
    ):
        hit = _first_key(config, keys)
        if hit is None or not isinstance(hit[1], int) or isinstance(hit[1], bool) or hit[1] <= 0:
            raise UserError(
                f"config.json has no valid {what} for family {family.name}: expected a positive integer under "
                f"one of {list(keys)}; fix config.json or the {family.name} entry in src/reap/arch.py"
            )
        found[what] = hit
    num_experts = found["expert count"][1]
    top_k = found["top-k"][1]
    if top_k > num_experts:
        raise UserError(f"config.json says top-k {top_k} > {num_experts} experts; the checkpoint config is broken")
    return MoESpec(
        family=family,
        num_layers=found["layer count"][1],
        num_experts=num_experts,
        top_k=top_k,
        hidden_size=found["hidden size"][1],
        expert_intermediate=found["expert intermediate size"][1],
        num_experts_key=found["expert count"][0],
    )


def route(
    logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, family: Family
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing exactly as the family's modeling code does it.

    logits [T, E] (router output in the router's dtype) -> (weights [T, K] float32, chosen [T, K] int64).
    The weights are what the model multiplies each chosen expert's output by.
    """
    if family.scoring == "sigmoid":
        scores = torch.sigmoid(logits.float())  # [T, E]
    elif family.scoring == "softmax":
        scores = torch.softmax(logits.float(), dim=-1)
    else:  # pragma: no cover - table error
        raise ValueError(f"unknown scoring {family.scoring!r} in family {family.name}")
    choice = scores + bias.float() if bias is not None else scores
    _, chosen = torch.topk(choice, top_k, dim=-1, sorted=False)  # [T, K]
    weights = scores.gather(1, chosen)
    if family.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, chosen


def human_count(n: float) -> str:
    """12_300_000_000 -> '12.3B'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.3g}{unit}" if value < 100 else f"{math.floor(value + 0.5)}{unit}"
    return str(int(n))


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover
