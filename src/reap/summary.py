"""``reap inspect``: what a checkpoint is, and what it becomes after pruning at a ratio.

Everything comes from ``config.json`` and the shard headers; no weight is read. Parameter counts skip
quantization scales (``*_scale_inv``); "active" counts the non-expert parameters (the whole router and any shared
experts included) plus top-k experts' worth. Experts outside the pruned layers (a multi-token-prediction layer past
``num_hidden_layers``, as GLM-4.5's ``model.layers.92``) are kept whole by pruning and counted so.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from reap.arch import MoESpec, detect, human_count
from reap.checkpoint import Checkpoint


def _is_scale(name: str) -> bool:
    return name.endswith(("_scale_inv", "_scale", ".scales", "_scales"))


def describe(ckpt: Checkpoint, ratio: float | None = None) -> dict[str, Any]:
    """Family, sizes, parameter counts and disk size, before and (with ratio) after pruning."""
    from reap.prune import experts_to_drop, moe_layers

    spec: MoESpec = detect(ckpt.config)
    layers = moe_layers(ckpt, spec)
    regex = spec.family.expert_regex()
    router_names = {spec.router_name(layer) for layer in layers}
    router_names |= {spec.router_bias_name(layer) for layer in layers if spec.router_bias_name(layer)}
    router_names |= {spec.router_logit_bias_name(layer) for layer in layers if spec.router_logit_bias_name(layer)}
    # experts and router rows scale with the expert count; every router row is used by every token
    experts = {"params": 0, "bytes": 0}
    router = {"params": 0, "bytes": 0}
    fixed = {"params": 0, "bytes": 0}
    unpruned = {"params": 0, "bytes": 0}  # experts of layers that pruning leaves whole (MTP layers)
    pruned_layers = set(layers)
    dtypes: Counter[str] = Counter()
    for name, info in ckpt.infos.items():
        m = regex.match(name)
        if m:
            bucket = experts if int(m["layer"]) in pruned_layers else unpruned
        elif spec.family.is_fused_expert(name):  # fused [E, ...] tensors (gpt-oss)
            bucket = experts
        else:
            bucket = router if name in router_names else fixed
        bucket["bytes"] += info.nbytes
        if not _is_scale(name):
            # MXFP4 blocks (uint8) hold two FP4 parameters per byte
            numel = info.numel * 2 if name.endswith("_blocks") and info.dtype == "U8" else info.numel
            bucket["params"] += numel
            dtypes["FP4" if numel != info.numel else info.dtype] += numel
    E, K = spec.num_experts, spec.top_k
    quant = ckpt.config.get("quantization_config") or {}

    def sizes(n: int) -> dict[str, Any]:
        # integer arithmetic: every layer holds E equal experts and E router rows, so these divide exactly
        total = fixed["params"] + unpruned["params"] + (experts["params"] + router["params"]) * n // E
        active = fixed["params"] + router["params"] * n // E + (experts["params"] + unpruned["params"]) * K // E
        disk = fixed["bytes"] + unpruned["bytes"] + (experts["bytes"] + router["bytes"]) * n // E
        return {"experts_per_layer": n, "total_params": total, "active_params": active, "disk_bytes": disk}

    info: dict[str, Any] = {
        "model": str(ckpt.path),
        "family": spec.family.name,
        "layers": spec.num_layers,
        "moe_layers": len(layers),
        "experts": E,
        "top_k": K,
        "hidden_size": spec.hidden_size,
        "expert_intermediate_size": spec.expert_intermediate,
        "routing": spec.routing.describe(spec.family),
        "dtypes": dict(dtypes.most_common()),
        "quantization": {k: quant[k] for k in ("quant_method", "fmt", "weight_block_size") if k in quant} or None,
        "shards": len(ckpt.shards),
        "before": sizes(E),
    }
    if ratio is not None:
        drop = experts_to_drop(spec, ratio)
        info["ratio"] = ratio
        info["after"] = sizes(E - drop)
    return info


def format_description(info: dict[str, Any]) -> str:
    """The human-readable form of :func:`describe`."""
    gib = 1 << 30
    lines = [
        f"model       {info['model']}",
        f"family      {info['family']} ({info['moe_layers']}/{info['layers']} layers with experts)",
        f"experts     {info['experts']} per layer, top-{info['top_k']}, routing {info['routing']}",
        f"sizes       hidden {info['hidden_size']}, expert intermediate {info['expert_intermediate_size']}",
        "dtypes      " + ", ".join(f"{k} {human_count(v)}" for k, v in info["dtypes"].items()),
        f"quantized   {info['quantization'] or 'no'}",
        f"shards      {info['shards']}",
    ]

    def row(label: str, s: dict[str, Any]) -> str:
        return (f"{label:<11} {s['experts_per_layer']} experts/layer, {human_count(s['total_params'])} params "
                f"({human_count(s['active_params'])} active), {s['disk_bytes'] / gib:.2f} GiB on disk")

    lines.append(row("now", info["before"]))
    if "after" in info:
        b, a = info["before"], info["after"]
        lines.append(row(f"ratio {info['ratio']:g}", a))
        lines.append(f"{'':<11} {human_count(b['total_params'])} -> {human_count(a['total_params'])} params "
                     f"({100 * (1 - a['total_params'] / b['total_params']):.1f}% fewer), "
                     f"{b['disk_bytes'] / gib:.2f} -> {a['disk_bytes'] / gib:.2f} GiB")
    return "\n".join(lines)
