"""``reap inspect``: what a checkpoint is, and what it becomes after pruning at a ratio.

Everything comes from ``config.json`` and the shard headers; no weight is read. Parameter counts skip
quantization scales (``*_scale_inv``); "active" counts the non-expert parameters (the whole router and any shared
experts included) plus top-k experts' worth. Experts outside the pruned layers (a multi-token-prediction layer past
``num_hidden_layers``, as GLM-4.5's ``model.layers.92``) are kept whole by pruning and counted so.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from reap.arch import FAMILIES, Family, MoESpec, Routing, detect, human_count
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
    mtp = {"params": 0, "bytes": 0, "tensors": 0}  # multi-token-prediction modules: pruning leaves them out
    dtypes: Counter[str] = Counter()
    for name, info in ckpt.infos.items():
        if spec.is_mtp(name):
            bucket = mtp
            mtp["tensors"] += 1
        elif regex.match(name) or spec.family.is_fused_expert(name):  # fused [E, ...] tensors (gpt-oss) too
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
        # integer arithmetic: every layer holds E equal experts and E router rows, so these divide exactly; the
        # MTP modules are on disk only before pruning and never in the per-token (active) count of the model
        extra = mtp if n == E else {"params": 0, "bytes": 0}
        total = fixed["params"] + extra["params"] + (experts["params"] + router["params"]) * n // E
        active = fixed["params"] + router["params"] * n // E + experts["params"] * K // E
        disk = fixed["bytes"] + extra["bytes"] + (experts["bytes"] + router["bytes"]) * n // E
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
        "mtp": {"tensors": mtp["tensors"], "params": mtp["params"]} if mtp["tensors"] else None,
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
    if info.get("mtp"):
        lines.append(f"mtp         {info['mtp']['tensors']} tensors, {human_count(info['mtp']['params'])} params of "
                     "multi-token prediction (left out by pruning: their experts would not match)")

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


#: What was checked for each family (tests/test_families.py, tests/test_calibrate.py, benchmarks/family_gpu_check.py).
#: A family without an entry here fails tests/test_summary.py: say what was verified when adding one.
VERIFIED = {
    "minimax_m2": "layer == transformers' layer (fp32, bf16, FP8; CPU and H200); stats == hooked whole-model forward; "
                  "pruned == original with pruned experts masked; byte identity; trained mini-m2: REAP < frequency < "
                  "random in eval loss",
    "qwen3_moe": "layer == transformers' layer (fp32, bf16, FP8; CPU), dense layers; pruned == masked; H200 calibration "
                 "== CPU, eval == transformers",
    "mixtral": "layer == transformers' layer (fp32; CPU); pruned == masked; H200 calibration == CPU, eval == transformers",
    "deepseek_v3": "layer == transformers' layer (fp32, bf16, FP8; CPU), groups stay equal, shared experts kept, dense "
                   "first layers; pruned == masked; MTP layer left out; H200 calibration == CPU, eval == transformers",
    "kimi_k2": "built as DeepSeek-V3 (no remote code); layer == transformers' layer (fp32; CPU); pruned == masked; "
               "H200 calibration == CPU, eval == transformers; real tokenizer not tested",
    "glm4_moe": "layer == transformers' layer (fp32, bf16, FP8; CPU), groups, shared experts, dense first layers; "
                "pruned == masked; MTP layer left out; H200 calibration == CPU, eval == transformers",
    "qwen3_next": "layer == transformers' layer for linear and full attention (fp32, bf16, FP8; CPU), gated shared "
                  "expert kept; pruned == masked; mtp.* left out; H200 calibration == CPU, eval == transformers",
    "gpt_oss": "router bit for bit; layer == transformers' layer on sliding and full layers (fp32, bf16, MXFP4; CPU); "
               "MXFP4 dequantization == transformers'; pruned == masked (fp32, MXFP4); H200 calibration == CPU, eval == "
               "transformers",
}


def describe_families() -> list[dict[str, Any]]:
    """Every entry of the family table: how it is detected, where its experts live, how it routes, what was verified."""
    out = []
    for fam in FAMILIES:
        if fam.fused_experts:
            experts = "fused [E, ...] tensors " + ", ".join(fam.moe_prefix.format(layer="L") + v for v in fam.fused_experts.values())
        else:
            experts = (fam.expert_prefix.format(layer="L", expert="e") + "{" + ",".join(fam.projections.values()) + "}")
        routing = Routing(renormalize=fam.renormalize, scaling=fam.scaling,
                          n_group=fam.group_defaults[0] if fam.group_keys else 1,
                          topk_group=fam.group_defaults[1] if fam.group_keys else 1).describe(fam)
        extras = [f"shared experts {fam.shared_experts} (kept)"] if fam.shared_experts else []
        if fam.mtp_keys:
            extras.append(f"MTP module left out ({', '.join(fam.mtp_keys)} -> 0)")
        out.append({"family": fam.name, "model_types": list(fam.model_types), "architectures": list(fam.architectures),
                    "experts": experts, "router": fam.router_weight.format(layer="L"), "routing": routing,
                    "count_keys": list(fam.num_experts_keys), "notes": extras,
                    "verified": VERIFIED.get(fam.name, "")})
    return out


def format_families(rows: list[dict[str, Any]]) -> str:
    """The human-readable form of :func:`describe_families`."""
    lines = []
    for r in rows:
        detected = ", ".join(r["model_types"] + r["architectures"])
        lines += [f"{r['family']}  ({detected})",
                  f"  experts   {r['experts']}; router {r['router']}",
                  f"  routing   {r['routing']} (defaults; config.json overrides); count in {', '.join(r['count_keys'])}"]
        if r["notes"]:
            lines.append(f"  also      {'; '.join(r['notes'])}")
        lines.append(f"  verified  {r['verified']}")
    lines.append("A new family is one entry in FAMILIES in src/reap/arch.py (plus a tiny-checkpoint test).")
    return "\n".join(lines)
