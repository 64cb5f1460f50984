"""The family table: how each Mixture-of-Experts family lays out its experts on disk and how it routes.

One :class:`Family` entry per model family, as data: the on-disk tensor names of the router, its
correction bias and the per-expert tensors (companion tensors such as FP8 ``.weight_scale_inv`` are
found by the same pattern), the ``config.json`` keys that hold the expert count and top-k, and the
routing as data: scoring (softmax or sigmoid), correction bias, renormalization and scaling (each a
default plus the config key that overrides it), group-limited routing, shared experts (and the sigmoid gate some
families put on them). :func:`detect`
reads ``config.json`` and returns a :class:`MoESpec` (the family plus this checkpoint's numbers, its
:class:`Routing` included); :func:`route` routes exactly as the family's modeling code in transformers.
Adding a family means adding one entry to :data:`FAMILIES`.

Shapes (legend: T tokens, E experts, K top-k, H hidden): router logits [T, E]; chosen experts and their
weights [T, K].
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported in route(): detecting a family (reap inspect, prune --keep) needs no torch
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
    renormalize: bool = True  # divide the chosen K weights by their sum (the default when renormalize_key is absent)
    renormalize_key: str | None = None  # config key that switches renormalization (e.g. "norm_topk_prob")
    renormalize_eps: float = 0.0  # added to the sum before dividing (DeepSeek-V3: 1e-20)
    scaling: float = 1.0  # the chosen weights are multiplied by this (the default when scaling_key is absent)
    scaling_key: str | None = None  # config key of that factor (e.g. "routed_scaling_factor")
    # group-limited routing (DeepSeek-V3): experts form n_group contiguous groups; a token picks topk_group groups
    # by the sum of each group's best `group_score_top` choice scores, then its top-k experts inside them
    group_keys: tuple[str, ...] = ()  # config keys of the group count; () = no groups
    topk_group_keys: tuple[str, ...] = ()
    group_defaults: tuple[int, int] = (1, 1)  # (n_group, topk_group) when the keys are absent
    group_score_top: int = 2
    router_float32: bool = False  # the router always runs in float32 (else in the compute dtype, or float32 if stored so)
    weights_in_logits_dtype: bool = False  # the chosen weights are rounded to the logits' dtype (Qwen3-MoE)
    # sub-module of transformers' MoE block (same name on disk under moe_prefix) added to the routed output, never pruned
    shared_experts: str | None = None
    # sub-module (a Linear H -> 1) whose sigmoid scales the shared experts' output per token (Qwen3-Next), never pruned
    shared_expert_gate: str | None = None
    # the transformers model_type the layers are built with, when config.json's model_type is not one transformers
    # knows (Kimi-K2 says "kimi_k2" and is DeepSeek-V3 in transformers); None = config.json's model_type
    transformers_model_type: str | None = None
    # multi-token-prediction (MTP) modules stored beside the decoder layers (DeepSeek-V3's model.layers.61, GLM-4.5's
    # model.layers.92, Qwen3-Next's mtp.*): transformers never loads them, and their experts would no longer match
    # the pruned expert count, so the output drops them and sets these config keys to 0
    mtp_keys: tuple[str, ...] = ()
    mtp_prefix: str | None = None  # where they live; None = the layers numbered from num_hidden_layers on
    # attribute of transformers' decoder layer that holds the MoE block (replaced during calibration)
    moe_module: str = "mlp"
    # non-expert names the layer streamer needs (transformers' parameter names below these prefixes match disk)
    layer_prefix: str = "model.layers.{layer}."
    embed_weight: str = "model.embed_tokens.weight"
    final_norm_weight: str = "model.norm.weight"
    lm_head_weight: str = "lm_head.weight"
    hidden_act_key: str = "hidden_act"
    # fused experts (gpt-oss): one tensor per projection and layer, the experts along dim 0. Maps "gate_up",
    # "gate_up_bias", "down", "down_bias" -> the on-disk name under moe_prefix. Every tensor whose name starts with
    # one of these (MXFP4 "_blocks"/"_scales" companions included) is sliced along dim 0 by the surgery.
    # {} = one set of tensors per expert (expert_prefix/projections).
    fused_experts: dict[str, str] = field(default_factory=dict)
    router_logit_bias: str | None = None  # a bias of the router linear itself (a parameter), sliced with its rows
    # the expert function: "glu" = down(act(gate(x)) * up(x)); "clamped_swiglu" = gpt-oss's biased, clamped GLU
    # (gate and up interleaved in gate_up; gate <= limit, |up| <= limit; (up + 1) * gate * sigmoid(alpha * gate))
    expert_fn: str = "glu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0  # the default when swiglu_limit_key is absent
    swiglu_limit_key: str | None = None
    attn_implementation: str = "sdpa"  # the attention the layer streamer asks transformers for

    def fused_names(self, layer: int) -> dict[str, str]:
        """The fused expert tensors of layer ``layer`` (full on-disk names; bf16/fp32 spelling)."""
        prefix = self.moe_prefix.format(layer=layer)
        return {k: prefix + v for k, v in self.fused_experts.items()}

    def is_fused_expert(self, name: str) -> bool:
        """Whether ``name`` is (a companion of) a fused expert tensor of some layer."""
        if not self.fused_experts:
            return False
        m = re.match(r"^" + re.escape(self.moe_prefix).replace(re.escape("{layer}"), r"\d+") + r"(.+)$", name)
        return m is not None and any(m[1].startswith(v) for v in self.fused_experts.values())

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

QWEN3_MOE = Family(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    architectures=("Qwen3MoeForCausalLM",),
    moe_prefix="model.layers.{layer}.mlp.",
    expert_prefix="model.layers.{layer}.mlp.experts.{expert}.",
    router_weight="model.layers.{layer}.mlp.gate.weight",
    router_bias=None,
    projections={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    # released configs say num_experts; transformers 5 writes num_local_experts (its attribute_map alias)
    num_experts_keys=("num_experts", "num_local_experts"),
    top_k_keys=("num_experts_per_tok",),
    expert_intermediate_keys=("moe_intermediate_size",),
    scoring="softmax",
    renormalize=False,  # Qwen3MoeConfig's default for norm_topk_prob
    renormalize_key="norm_topk_prob",
    weights_in_logits_dtype=True,
)

MIXTRAL = Family(
    name="mixtral",
    model_types=("mixtral",),
    architectures=("MixtralForCausalLM",),
    moe_prefix="model.layers.{layer}.block_sparse_moe.",
    expert_prefix="model.layers.{layer}.block_sparse_moe.experts.{expert}.",
    router_weight="model.layers.{layer}.block_sparse_moe.gate.weight",
    router_bias=None,
    projections={"gate": "w1", "up": "w3", "down": "w2"},
    num_experts_keys=("num_local_experts",),
    top_k_keys=("num_experts_per_tok",),
    expert_intermediate_keys=("intermediate_size",),
    scoring="softmax",
    renormalize=True,
)

DEEPSEEK_V3 = Family(
    name="deepseek_v3",
    model_types=("deepseek_v3",),
    architectures=("DeepseekV3ForCausalLM",),
    moe_prefix="model.layers.{layer}.mlp.",
    expert_prefix="model.layers.{layer}.mlp.experts.{expert}.",
    router_weight="model.layers.{layer}.mlp.gate.weight",
    router_bias="model.layers.{layer}.mlp.gate.e_score_correction_bias",
    projections={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    num_experts_keys=("n_routed_experts",),
    top_k_keys=("num_experts_per_tok",),
    expert_intermediate_keys=("moe_intermediate_size",),
    scoring="sigmoid",
    renormalize=True,  # DeepseekV3Config's defaults
    renormalize_key="norm_topk_prob",
    renormalize_eps=1e-20,
    scaling=2.5,
    scaling_key="routed_scaling_factor",
    group_keys=("n_group",),
    topk_group_keys=("topk_group",),
    group_defaults=(8, 4),
    router_float32=True,
    shared_experts="shared_experts",
    mtp_keys=("num_nextn_predict_layers",),
)

# Kimi-K2 (Moonshot): DeepSeek-V3's architecture and tensor names under model_type "kimi_k2" (its config class is remote
# code); its config.json sets n_group/topk_group 1 and routed_scaling_factor itself. Built with transformers' DeepSeek-V3.
KIMI_K2 = replace(DEEPSEEK_V3, name="kimi_k2", model_types=("kimi_k2",), architectures=(),
                  transformers_model_type="deepseek_v3")

GLM4_MOE = Family(
    name="glm4_moe",  # GLM-4.5, GLM-4.5-Air, GLM-4.6 (Glm4MoeForCausalLM)
    model_types=("glm4_moe",),
    architectures=("Glm4MoeForCausalLM",),
    moe_prefix="model.layers.{layer}.mlp.",
    expert_prefix="model.layers.{layer}.mlp.experts.{expert}.",
    router_weight="model.layers.{layer}.mlp.gate.weight",
    router_bias="model.layers.{layer}.mlp.gate.e_score_correction_bias",
    projections={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    # the released configs say n_routed_experts; transformers' alias num_local_experts is rewritten too if present
    num_experts_keys=("n_routed_experts", "num_local_experts"),
    top_k_keys=("num_experts_per_tok",),
    expert_intermediate_keys=("moe_intermediate_size",),
    scoring="sigmoid",
    renormalize=True,  # Glm4MoeConfig's defaults (the releases set routed_scaling_factor 2.5, n_group 1)
    renormalize_key="norm_topk_prob",
    renormalize_eps=1e-20,
    scaling=1.0,
    scaling_key="routed_scaling_factor",
    group_keys=("n_group",),
    topk_group_keys=("topk_group",),
    group_defaults=(1, 1),
    router_float32=True,
    shared_experts="shared_experts",
    mtp_keys=("num_nextn_predict_layers",),  # GLM-4.5: model.layers.92
)

QWEN3_NEXT = Family(
    name="qwen3_next",  # Qwen3-Next-80B-A3B (hybrid Gated DeltaNet / gated full attention layers)
    model_types=("qwen3_next",),
    architectures=("Qwen3NextForCausalLM",),
    moe_prefix="model.layers.{layer}.mlp.",
    expert_prefix="model.layers.{layer}.mlp.experts.{expert}.",
    router_weight="model.layers.{layer}.mlp.gate.weight",
    router_bias=None,
    projections={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    num_experts_keys=("num_experts",),  # Qwen3NextConfig has no num_local_experts alias
    top_k_keys=("num_experts_per_tok",),
    expert_intermediate_keys=("moe_intermediate_size",),
    scoring="softmax",
    renormalize=True,  # Qwen3NextConfig's default for norm_topk_prob
    renormalize_key="norm_topk_prob",
    weights_in_logits_dtype=True,
    shared_experts="shared_expert",
    shared_expert_gate="shared_expert_gate",
    mtp_keys=("mtp_num_hidden_layers",),
    mtp_prefix="mtp.",
)

GPT_OSS = Family(
    name="gpt_oss",
    model_types=("gpt_oss",),
    architectures=("GptOssForCausalLM",),
    moe_prefix="model.layers.{layer}.mlp.",
    expert_prefix="model.layers.{layer}.mlp.experts.{expert}.",  # never on disk: the experts are fused
    router_weight="model.layers.{layer}.mlp.router.weight",
    router_bias=None,
    router_logit_bias="model.layers.{layer}.mlp.router.bias",
    # [E, H, 2I] (gate/up interleaved in the last dim), [E, 2I], [E, I, H], [E, H]; the released MXFP4 checkpoints
    # store gate_up_proj_blocks [E, 2I, H/32, 16] + gate_up_proj_scales [E, 2I, H/32] (uint8) instead
    fused_experts={"gate_up": "experts.gate_up_proj", "gate_up_bias": "experts.gate_up_proj_bias",
                   "down": "experts.down_proj", "down_bias": "experts.down_proj_bias"},
    # GptOssConfig's attribute_map makes num_experts an alias of num_local_experts; experts_per_token is top-k
    num_experts_keys=("num_local_experts", "num_experts"),
    top_k_keys=("num_experts_per_tok", "experts_per_token"),
    expert_intermediate_keys=("intermediate_size",),
    scoring="topk_softmax",  # logits = x W^T + b; top-k on the logits; softmax over the K chosen logits
    renormalize=True,
    weights_in_logits_dtype=True,  # GptOssTopKRouter's softmax runs in the logits' dtype
    expert_fn="clamped_swiglu",
    swiglu_limit_key="swiglu_limit",
    attn_implementation="eager",  # GptOss has no sdpa path (attention sinks)
)

#: Every supported family. To add one, append an entry here (and a test with a tiny checkpoint).
FAMILIES: tuple[Family, ...] = (MINIMAX_M2, QWEN3_MOE, MIXTRAL, DEEPSEEK_V3, KIMI_K2, GLM4_MOE, QWEN3_NEXT,
                                 GPT_OSS)


def _first_key(config: dict[str, Any], keys: tuple[str, ...]) -> tuple[str, Any] | None:
    for key in keys:
        if config.get(key) is not None:
            return key, config[key]
    return None


@dataclass(frozen=True)
class Routing:
    """This checkpoint's routing numbers (the family's defaults, overridden by ``config.json``)."""

    renormalize: bool = True
    scaling: float = 1.0
    n_group: int = 1  # contiguous, equally sized expert groups
    topk_group: int = 1  # groups a token may route into (group-limited routing when n_group > 1)

    def describe(self, family: "Family") -> str:
        if family.scoring == "topk_softmax":
            return "softmax over the top-k logits" + (" (router bias)" if family.router_logit_bias else "")
        text = family.scoring + (" + correction bias" if family.router_bias else "")
        if self.n_group > 1:
            text += f", top-{self.topk_group} of {self.n_group} groups"
        text += ", top-k renormalized" if self.renormalize else ", top-k not renormalized"
        if self.scaling != 1.0:
            text += f", scaled x{self.scaling:g}"
        return text


@dataclass(frozen=True)
class MoESpec:
    """A family plus this checkpoint's numbers (from ``config.json``)."""

    family: Family
    num_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    expert_intermediate: int
    num_experts_key: str  # the first expert-count key present in config.json
    num_experts_keys: tuple[str, ...] = ()  # every expert-count key present (all are rewritten)
    routing: Routing = Routing()

    def router_name(self, layer: int) -> str:
        return self.family.router_weight.format(layer=layer)

    def router_bias_name(self, layer: int) -> str | None:
        bias = self.family.router_bias
        return bias.format(layer=layer) if bias else None

    def is_mtp(self, name: str) -> bool:
        """Whether tensor ``name`` belongs to a multi-token-prediction module (see ``Family.mtp_keys``)."""
        fam = self.family
        if not fam.mtp_keys:
            return False
        if fam.mtp_prefix is not None:
            return name.startswith(fam.mtp_prefix)
        head, _, tail = fam.layer_prefix.partition("{layer}")
        if not name.startswith(head):
            return False
        index = name[len(head):].partition(tail)[0]
        return index.isdigit() and int(index) >= self.num_layers

    def router_logit_bias_name(self, layer: int) -> str | None:
        bias = self.family.router_logit_bias
        return bias.format(layer=layer) if bias else None

    def expert_name(self, layer: int, expert: int, rest: str) -> str:
        return self.family.expert_prefix.format(layer=layer, expert=expert) + rest

    def projection_name(self, layer: int, expert: int, proj: str) -> str:
        """On-disk weight of one expert projection: proj is "gate", "up" or "down"."""
        return self.expert_name(layer, expert, self.family.projections[proj] + ".weight")

    def min_kept(self) -> int:
        """The fewest experts a layer may keep: top-k, and with groups enough in the allowed groups for top-k
        (and at least ``group_score_top`` per group, which the group score needs)."""
        r = self.routing
        if r.n_group <= 1:
            return self.top_k
        per_group = max(-(-self.top_k // r.topk_group), self.family.group_score_top)
        return per_group * r.n_group


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
    present = tuple(k for k in family.num_experts_keys if config.get(k) is not None)
    if any(config[k] != num_experts for k in present):
        raise UserError(f"config.json gives different expert counts under {list(present)} "
                        f"({[config[k] for k in present]}); the checkpoint config is broken")
    routing = _routing(config, family, num_experts, top_k)
    return MoESpec(
        family=family,
        num_layers=found["layer count"][1],
        num_experts=num_experts,
        top_k=top_k,
        hidden_size=found["hidden size"][1],
        expert_intermediate=found["expert intermediate size"][1],
        num_experts_key=found["expert count"][0],
        num_experts_keys=present,
        routing=routing,
    )


def _routing(config: dict[str, Any], family: Family, num_experts: int, top_k: int) -> Routing:
    renormalize = family.renormalize
    if family.renormalize_key and config.get(family.renormalize_key) is not None:
        renormalize = bool(config[family.renormalize_key])
    scaling = family.scaling
    if family.scaling_key and config.get(family.scaling_key) is not None:
        scaling = config[family.scaling_key]
        if not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
            raise UserError(f"config.json {family.scaling_key} must be a number (got {scaling!r})")
        scaling = float(scaling)
    n_group, topk_group = family.group_defaults if family.group_keys else (1, 1)
    for what, keys in (("group count", family.group_keys), ("groups per token", family.topk_group_keys)):
        hit = _first_key(config, keys)
        if hit is None:
            continue
        if not isinstance(hit[1], int) or isinstance(hit[1], bool) or hit[1] <= 0:
            raise UserError(f"config.json {hit[0]} must be a positive integer (the {what}), got {hit[1]!r}")
        if what == "group count":
            n_group = hit[1]
        else:
            topk_group = hit[1]
    if n_group > 1:
        if num_experts % n_group:
            raise UserError(f"config.json says {num_experts} experts in {n_group} groups, which do not divide "
                            "evenly; the checkpoint config is broken")
        if not 1 <= topk_group <= n_group:
            raise UserError(f"config.json says top-{topk_group} of {n_group} expert groups; the checkpoint config is broken")
    return Routing(renormalize=renormalize, scaling=scaling, n_group=n_group, topk_group=topk_group)


def route(
    logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, family: Family, routing: Routing | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing exactly as the family's modeling code does it.

    logits [T, E] (router output in the router's dtype) -> (weights [T, K] float32, chosen [T, K] int64).
    The weights are what the model multiplies each chosen expert's output by. ``routing`` holds this
    checkpoint's numbers (``MoESpec.routing``); without it, the family's defaults and no groups.
    """
    import torch

    routing = routing or Routing(renormalize=family.renormalize, scaling=family.scaling)
    if family.scoring == "topk_softmax":  # gpt-oss: choose by the logits, softmax over the chosen K only
        return _route_topk_softmax(logits, bias, top_k, family, routing)
    if family.scoring == "sigmoid":
        scores = torch.sigmoid(logits.float())  # [T, E]
    elif family.scoring == "softmax":
        scores = torch.softmax(logits.float(), dim=-1)
    else:  # pragma: no cover - table error
        raise ValueError(f"unknown scoring {family.scoring!r} in family {family.name}")
    choice = scores + bias.float() if bias is not None else scores
    if routing.n_group > 1:  # group-limited: only experts of the topk_group best groups can be chosen
        T, E = choice.shape
        G = routing.n_group
        group_scores = choice.view(T, G, E // G).topk(family.group_score_top, dim=-1)[0].sum(dim=-1)  # [T, G]
        group_idx = torch.topk(group_scores, k=routing.topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)  # [T, G]
        score_mask = group_mask.unsqueeze(-1).expand(T, G, E // G).reshape(T, E)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    _, chosen = torch.topk(choice, top_k, dim=-1, sorted=False)  # [T, K]
    weights = scores.gather(1, chosen)
    if routing.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + family.renormalize_eps)
    if routing.scaling != 1.0:
        weights = weights * routing.scaling
    if family.weights_in_logits_dtype:
        weights = weights.to(logits.dtype).float()
    return weights, chosen


def _route_topk_softmax(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, family: Family,
                        routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """GptOssTopKRouter: top-k of the logits (the router's own bias is already in them), softmax over those K
    (== softmax over all E, renormalized over the chosen K). A correction bias, if any, only shifts the choice."""
    import torch

    choice = logits.float() + bias.float() if bias is not None else logits.float()
    _, chosen = torch.topk(choice, top_k, dim=-1)  # [T, K]
    weights = torch.softmax(logits.float().gather(1, chosen), dim=-1)
    if routing.scaling != 1.0:
        weights = weights * routing.scaling
    if family.weights_in_logits_dtype:
        weights = weights.to(logits.dtype).float()
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
