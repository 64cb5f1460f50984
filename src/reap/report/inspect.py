"""``reap inspect``: what a checkpoint is, and what it becomes after pruning at a ratio.

Everything comes from ``config.json``, the shard headers and transformers' meta-device model (the layout of
:mod:`reap.model.arch`); the checkpoint is validated as ``prune`` validates it (:mod:`reap.model.validate`: the same errors),
which reads only the routers. Parameters are counted as transformers counts them: quantization scales and buffers
(correction biases, hash tables) hold none, an MXFP4 byte holds two. "Active" counts the non-expert parameters
(the whole router and any shared experts included) plus top-k experts' worth, the embedding and LM-head tables
included; model cards usually leave those tables out (MiniMax-M2: "10B active"), which
``active_params_no_embeddings`` does. Multi-token-prediction modules (which transformers never loads) are counted
before pruning and left out after; the reduction says how much of it they are.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from reap.core.humanize import human_bytes, human_count
from reap.io.checkpoint import Checkpoint
from reap.model.families import support
from reap.formats import stored_params
from reap.selection.plan import Routing
from reap.selection.choose import experts_to_drop


def describe(ckpt: Checkpoint, ratio: float | None = None, keep_mtp: bool = True) -> dict[str, Any]:
    """Family, sizes, parameter counts and disk size, before and (with ratio) after pruning. Multi-token-prediction
    modules are pruned like every layer (``keep_mtp=False``: left out, as ``--drop-mtp`` does); they count in the
    totals and on disk, never in the active (per-token) parameters, as the model cards count them."""
    from reap.model.validate import derive_checked

    spec, model = derive_checked(ckpt, with_model=True, keep_mtp=keep_mtp)
    mtp_prefixes = tuple({p for k in range(spec.mtp_layers) for p in (spec.mtp_prefix(k), spec.mtp_layer_prefix(k))})
    tables = {f"{path}.{name}" for module in (model.get_input_embeddings(), model.get_output_embeddings())
              if module is not None for path, m in model.named_modules() if m is module
              for name, _ in module.named_parameters()}
    # experts and router rows scale with the expert count; every router row is used by every token
    experts = {"params": 0, "bytes": 0}
    router = {"params": 0, "bytes": 0}
    fixed = {"params": 0, "bytes": 0}
    embeddings = 0  # parameters of the embedding and LM-head tables (in fixed)
    mtp = {"params": 0, "bytes": 0, "tensors": 0}  # multi-token-prediction modules left out (--drop-mtp)
    # kept multi-token-prediction modules: their experts and router rows (pruned), the rest of them (kept whole)
    mtp_scaled, mtp_fixed = {"params": 0, "bytes": 0, "tensors": 0}, {"params": 0, "bytes": 0, "tensors": 0}
    dtypes: Counter[str] = Counter()
    for name, info in ckpt.infos.items():
        role = spec.roles[name]
        kept_mtp = bool(mtp_prefixes) and name.startswith(mtp_prefixes)
        if role.kind == "mtp":
            bucket = mtp
            mtp["tensors"] += 1
        elif kept_mtp:
            bucket = mtp_scaled if role.kind in ("expert", "rows") else mtp_fixed
            bucket["tensors"] += 1
        elif role.kind in ("expert", "rows"):
            bucket = experts if role.part == "experts" else router
        else:  # everything else, expert-id tables included (their size does not follow the expert count)
            bucket = fixed
        bucket["bytes"] += info.nbytes
        numel = 0 if role.buffer else stored_params(name, info.dtype, info.numel, spec.format)
        if numel:
            bucket["params"] += numel
            dtypes["FP4" if numel != info.numel else info.dtype] += numel
            if role.kind == "other" and role.model in tables:
                embeddings += numel
    E, K = spec.num_experts, spec.top_k
    quant = ckpt.config.get("quantization_config") or {}

    def sizes(n: int) -> dict[str, Any]:
        # integer arithmetic: every layer holds E equal experts and E router rows, so these divide exactly; the
        # MTP modules are on disk only before pruning and never in the per-token (active) count of the model
        extra = mtp if n == E else {"params": 0, "bytes": 0}
        total = (fixed["params"] + extra["params"] + mtp_fixed["params"]
                 + (experts["params"] + router["params"] + mtp_scaled["params"]) * n // E)
        active = fixed["params"] + router["params"] * n // E + experts["params"] * K // E
        disk = (fixed["bytes"] + extra["bytes"] + mtp_fixed["bytes"]
                + (experts["bytes"] + router["bytes"] + mtp_scaled["bytes"]) * n // E)
        return {"experts_per_layer": n, "total_params": total, "active_params": active,
                "active_params_no_embeddings": active - embeddings, "disk_bytes": disk}

    info: dict[str, Any] = {
        "model": str(ckpt.path),
        "family": spec.family,
        "transformers": spec.model_class,
        "layers": spec.num_layers,
        "moe_layers": len([m for m in spec.moe if m < spec.num_layers]),
        "experts": E,
        "top_k": K,
        "hidden_size": spec.hidden_size,
        "expert_intermediate_size": spec.expert_intermediate,
        "routing": spec.routing(),
        "count_keys": [".".join(p) for p in spec.count_keys],
        "dtypes": dict(dtypes.most_common()),
        "quantization": {k: quant[k] for k in ("quant_method", "fmt", "weight_block_size") if k in quant} or None,
        "shards": len(ckpt.shards),
        "mtp": ({"kept": False, "tensors": mtp["tensors"], "params": mtp["params"]} if mtp["tensors"] else
                {"kept": True, "modules": spec.mtp_layers, "layers": list(range(spec.num_layers, spec.stat_layers)),
                 "tensors": mtp_scaled["tensors"] + mtp_fixed["tensors"],
                 "params": mtp_scaled["params"] + mtp_fixed["params"]} if spec.mtp_layers else None),
        "before": sizes(E),
        "support": support(spec.model_type),
    }
    if ratio is not None:
        drop = experts_to_drop(Routing.of(spec), ratio)
        info["ratio"] = ratio
        info["after"] = sizes(E - drop)
    return info


def format_description(info: dict[str, Any]) -> str:
    """The human-readable form of :func:`describe` (sizes in KiB/MiB/GiB/TiB as they come)."""
    lines = [
        f"model       {info['model']}",
        f"family      {info['family']} as transformers' {info['transformers']} ({info['moe_layers']}/{info['layers']} "
        "layers with experts)",
        f"experts     {info['experts']} per layer ({', '.join(info['count_keys'])}), routing {info['routing']}",
        f"sizes       hidden {info['hidden_size']}, expert intermediate {info['expert_intermediate_size']}",
        "dtypes      " + ", ".join(f"{k} {human_count(v)}" for k, v in info["dtypes"].items()),
        f"quantized   {info['quantization'] or 'no'}",
        f"shards      {info['shards']}",
        f"support     {info['support']['text']}",
    ]
    m = info.get("mtp")
    if m and m.get("kept"):
        lines.append(f"mtp         {m['modules']} multi-token-prediction module{'s' if m['modules'] != 1 else ''} "
                     f"(stats layer{'s' if m['modules'] != 1 else ''} {', '.join(map(str, m['layers']))}), "
                     f"{human_count(m['params'])} params: calibrated and pruned like every layer, so MTP speculative "
                     "decoding keeps working (--drop-mtp leaves them out); not in the active count")
    elif m:
        lines.append(f"mtp         {m['tensors']} tensors, {human_count(m['params'])} params of multi-token prediction "
                     "(left out by pruning with --drop-mtp)")

    def row(label: str, s: dict[str, Any]) -> str:
        return (f"{label:<11} {s['experts_per_layer']} experts/layer, {human_count(s['total_params'])} params "
                f"({human_count(s['active_params'])} active, {human_count(s['active_params_no_embeddings'])} without "
                f"the embedding and LM-head tables), {human_bytes(s['disk_bytes'])} on disk")

    lines.append(row("now", info["before"]))
    if "after" in info:
        b, a = info["before"], info["after"]
        lines.append(row(f"ratio {info['ratio']:g}", a))
        mtp = (info.get("mtp") or {}).get("params", 0) if not (info.get("mtp") or {}).get("kept") else 0
        of_which = (f", {100 * mtp / b['total_params']:.1f} points of it the multi-token-prediction module left out"
                    if mtp else "")
        lines.append(f"{'':<11} {human_count(b['total_params'])} -> {human_count(a['total_params'])} params "
                     f"({100 * (1 - a['total_params'] / b['total_params']):.1f}% fewer{of_which}), "
                     f"{human_bytes(b['disk_bytes'])} -> {human_bytes(a['disk_bytes'])}")
    return "\n".join(lines)
