"""``reap inspect``: what a checkpoint is, and what it becomes after pruning at a ratio.

Everything comes from ``config.json`` and the shard headers; no weight is read. Parameter counts skip
quantization scales (``*_scale_inv``); "active" counts the non-expert parameters plus top-k experts' worth.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from reap.arch import MoESpec, detect, human_count
from reap.checkpoint import Checkpoint


def _is_scale(name: str) -> bool:
    return name.endswith(("_scale_inv", "_scale", ".scales"))


def describe(ckpt: Checkpoint, ratio: float | None = None) -> dict[str, Any]:
    """Family, sizes, parameter counts and disk size, before and (with ratio) after pruning."""
    from reap.prune import experts_to_drop, moe_layers

    spec: MoESpec = detect(ckpt.config)
    layers = moe_layers(ckpt, spec)
    regex = spec.family.expert_regex()
    per_expert_names = {spec.router_name(layer) for layer in layers}
    per_expert_names |= {spec.router_bias_name(layer) for layer in layers if spec.router_bias_name(layer)}
    scaled = {"params": 0, "bytes": 0}  # tensors whose size scales with the expert count
    fixed = {"params": 0, "bytes": 0}
    dtypes: Counter[str] = Counter()
    for name, info in ckpt.infos.items():
        bucket = scaled if (regex.match(name) or name in per_expert_names) else fixed
        bucket["bytes"] += info.nbytes
        if not _is_scale(name):
            bucket["params"] += info.numel
            dtypes[info.dtype] += info.numel
    E, K = spec.num_experts, spec.top_k
    quant = ckpt.config.get("quantization_config") or {}

    def sizes(experts: int) -> dict[str, Any]:
        total = fixed["params"] + scaled["params"] * experts / E
        active = fixed["params"] + scaled["params"] * K / E
        disk = fixed["bytes"] + scaled["bytes"] * experts / E
        return {"experts_per_layer": experts, "total_params": int(total), "active_params": int(active),
                "disk_bytes": int(disk)}

    info: dict[str, Any] = {
        "model": str(ckpt.path),
        "family": spec.family.name,
        "layers": spec.num_layers,
        "moe_layers": len(layers),
        "experts": E,
        "top_k": K,
        "hidden_size": spec.hidden_size,
        "expert_intermediate_size": spec.expert_intermediate,
        "routing": f"{spec.family.scoring}" + (" + correction bias" if spec.family.router_bias else "")
                   + (", top-k renormalized" if spec.family.renormalize else ""),
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
