"""Verify: a written checkpoint read back and checked against the plan it was written from.

:func:`verify` runs on the staging folder before it is published: the index against the shard headers, the
layout derived again from the output (K experts everywhere, every count key K, quantization companions shaped
like their values), the plan's own rules (:func:`reap.selection.plan.check_plan`, on the plan), the quantization config's
module lists, expert-id tables, multi-token-prediction modules. A failure is a bug in reap, never a user error:
RuntimeError, and nothing is published.
"""

from __future__ import annotations

import json
from pathlib import Path

from reap.model.arch import Layout
from reap.io.checkpoint import CONFIG_NAME, INDEX_NAME, Checkpoint, read_header
from reap.model.derive import derive
from reap.core.errors import UserError
from reap.selection.plan import ExpertPlan, Routing, check_plan


def verify(path: Path, spec: Layout, plan: ExpertPlan, mtp_dropped: bool = False) -> None:
    """Check a written checkpoint: index == shard headers; the layout transformers' model gives it, derived again
    from the output itself, has K experts everywhere (every per-expert index 0..K-1 present, every expert axis of
    length K, config count keys K) and every quantized tensor its format's companions, shaped like its values
    (:func:`reap.formats.companion_problem`, run by the derivation); the plan's rules hold
    (:func:`reap.selection.plan.check_plan`: groups equal, K >= top-k, ...); expert-id tables name kept
    experts only; the quantization config's module lists name experts below K; no MTP module left when one was
    dropped.

    A failure here is a bug in reap, not a user error: it raises RuntimeError and nothing is published.
    """
    index = json.loads((path / INDEX_NAME).read_text())
    weight_map: dict[str, str] = index["weight_map"]
    total = 0
    for shard in set(weight_map.values()):
        header, _ = read_header(path / shard)
        names = {n for n in header if n != "__metadata__"}
        listed = {n for n, s in weight_map.items() if s == shard}
        if names != listed:
            raise RuntimeError(f"verify: {shard} holds {sorted(names ^ listed)[:3]} not matching the index")
        total += sum(header[n]["data_offsets"][1] - header[n]["data_offsets"][0] for n in names)
    if total != index["metadata"]["total_size"]:
        raise RuntimeError(f"verify: index total_size {index['metadata']['total_size']} != {total} bytes in shards")
    check_plan(plan, Routing.of(spec), spec.moe_layers, where="verify", error=RuntimeError)
    k = plan.kept_per_layer
    try:
        out = derive(Checkpoint(path))
    except UserError as err:
        raise RuntimeError(f"verify: the output does not read back as a {spec.family} checkpoint: {err}") from None
    if out.num_experts != k or out.moe_layers != spec.moe_layers:
        raise RuntimeError(f"verify: the output has {out.num_experts} experts in layers {out.moe_layers}, expected "
                           f"{k} in {spec.moe_layers}")
    left = out.stored("mtp")
    if mtp_dropped and (left or any(json.loads((path / CONFIG_NAME).read_text()).get(key) for key in spec.mtp_keys)):
        raise RuntimeError(f"verify: multi-token-prediction tensors {left[:3]} or config keys {spec.mtp_keys} left")
    from reap.formats import HF_QUANT_CONFIG, quantization_section
    from reap.formats.modules import named_experts

    for where, quant in (("config.json", quantization_section(json.loads((path / CONFIG_NAME).read_text()))),
                         (HF_QUANT_CONFIG, json.loads((path / HF_QUANT_CONFIG).read_text())
                          if (path / HF_QUANT_CONFIG).is_file() else None)):
        beyond = [(entry, e) for entry, e in named_experts(quant) if e >= k]
        if beyond:
            raise RuntimeError(f"verify: {where} names expert {beyond[0][1]} ({beyond[0][0]!r}) of {k}")
    tables = out.stored("ids")
    if tables:
        written = Checkpoint(path)
        for name in tables:
            table = written.integers(name)
            if table.size and (table.min() < 0 or table.max() >= k):
                raise RuntimeError(f"verify: {name} names expert {int(table.max())} of {k}")
