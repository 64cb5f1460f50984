"""Surgery: the pruned checkpoint, written from an expert plan shard by shard.

:func:`rewrite` streams the checkpoint into a temporary directory beside the target, each stored tensor treated by
its role in the layout (:mod:`reap.model.arch`, :func:`shard_contents`): kept expert tensors are copied byte for byte
(quantized values and scales included) and renumbered 0..K-1 in the plan's order, tensors holding every expert
(router rows, correction biases, fused experts) are sliced along their expert axis from the stored bytes (dtype
kept), expert-id tables renumbered (:func:`id_remap`), every other tensor copied unchanged. The index and
``config.json`` (the expert-count keys, and the quantization config's module lists: :func:`pruned_config`) are
rebuilt, other files copied, ``reap_report.json`` written (its ``files``: every file of the output), the report's
pictures, summary and model card written by the job's callbacks (:class:`SideFiles`: the rewrite imports nothing of
:mod:`reap.report`); the result is checked (:func:`reap.rewrite.verify.verify`) and only then renamed into place.

The copy itself moves byte ranges, never tensors. torch comes in only through :func:`id_remap` (hash-routed
layers) and through verify, which derives the output's layout from transformers' meta model.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reap.model.arch import Layout
from reap.core.humanize import human_bytes
from reap.io.checkpoint import CONFIG_NAME, INDEX_NAME, Checkpoint
from reap.core.errors import UserError
from reap.core.names import CARD_NAME, GENERATED, REPORT_NAME, STATS_NAME  # the last two: never copied from a source
from reap.selection.plan import ExpertPlan
from reap.core.progress import Progress
from reap.io.outputs import output_files
from reap.io.staging import atomic_directory, check_complete, check_free_space, estimate_bytes
from reap.rewrite.verify import verify
from reap.io.writer import BackgroundSync, Entry, other_files, write_json, write_safetensors


@dataclass(frozen=True)
class SideFiles:
    """The files an output holds beside the checkpoint that the job writes (the report's pictures, summary and model
    card), as callbacks into the staging folder:

    * ``draw(folder)``: what reads only the folder's ``reap_report.json`` (the pictures and the summary), run on a
      thread while the shards are copied; returns the paths it wrote;
    * ``card(folder, report, figures)``: what reads the finished shards (the model card; ``figures``: the names of
      the pictures ``draw`` wrote), run after the checkpoint is verified, before it is published;
    * ``sizes``: about how many bytes each of these files takes, for the free-space check.

    Either callback raising fails the run: nothing is published.
    """

    draw: Callable[[Path], list[Path]]
    card: Callable[[Path, dict[str, Any], list[str]], Any]
    sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class SurgeryResult:
    out: Path
    kept_per_layer: int
    bytes_written: int
    seconds: float
    dropped_mtp: int = 0  # multi-token-prediction tensors left out


def pruned_config(config: dict[str, Any], spec: Layout, k: int, mtp_dropped: bool,
                  plan: ExpertPlan | None = None) -> dict[str, Any]:
    """config.json after pruning: every key path holding the expert count set to k (and, when the
    multi-token-prediction modules were left out, their count keys to 0); with ``plan``, the module lists of the
    quantization config that name expert indices renumbered or dropped (:mod:`reap.formats.modules`); nothing else
    changes."""
    from reap.formats import quantization_section
    from reap.formats.modules import rewrite_quantization

    out = copy.deepcopy(config)
    for path in spec.count_keys:
        node = out
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = k
    if mtp_dropped:
        out.update({key: 0 for key in spec.mtp_keys})
    quant = quantization_section(out)
    if plan is not None and quant is not None:
        renames, new_id = module_renames(spec, plan, mtp_dropped)
        rewritten = rewrite_quantization(quant, renames, new_id)
        quant.clear()
        quant.update(rewritten)
    return out


def pruned_hf_quant_config(data: dict[str, Any], spec: Layout, plan: ExpertPlan, mtp_dropped: bool) -> dict[str, Any]:
    """ModelOpt's ``hf_quant_config.json`` after pruning: ``exclude_modules`` and ``quantized_layers`` entries
    naming expert indices renumbered or dropped."""
    from reap.formats.modules import rewrite_quantization

    renames, new_id = module_renames(spec, plan, mtp_dropped)
    return rewrite_quantization(data, renames, new_id, "hf_quant_config.json")


def module_renames(spec: Layout, plan: ExpertPlan, mtp_dropped: bool) -> tuple[dict[str, str | None], dict[int, dict[int, int]]]:
    """(every module of the checkpoint -> its name after pruning, None where it is left out; layer -> {kept
    original expert id: new id}). A module is a stored base name without its last component (``.weight``)."""
    from reap.formats import group_parts

    new_id = plan.new_ids()
    renames: dict[str, str | None] = {}
    for base, parts in group_parts(list(spec.roles), spec.format).items():
        role = spec.roles[parts["values"]]
        new: str | None = base
        if role.kind == "mtp" and mtp_dropped:
            new = None
        elif role.kind == "expert" and role.layer in new_id:
            s, e = role.span
            index = new_id[role.layer].get(role.expert)
            new = None if index is None else base[:s] + str(index) + base[e:]
        module = base.rpartition(".")[0] or base
        renames[module] = new.rpartition(".")[0] or new if new is not None else None
    return renames, new_id


def rewrite(
    ckpt: Checkpoint,
    spec: Layout,
    plan: ExpertPlan,
    out: Path,
    report: dict[str, Any],
    progress: bool = True,
    stats=None,
    fsync: bool = True,
    id_remap: dict[int, list[int]] | None = None,
    overwrite: bool = True,
    log=None,
    side_files: SideFiles | None = None,
    router_rows: dict[int, Any] | None = None,
    neuron_columns: dict[int, Any] | None = None,
) -> SurgeryResult:
    """Write the pruned checkpoint to ``out`` (checked beforehand with :func:`reap.io.outputs.check_output_dir`).

    First the free space is checked (everything it will write against what the file system has free). Everything but
    the shards is written first (index, config, report, other files); ``side_files.draw`` (the pictures) runs on a
    thread while the shards are copied, ``side_files.card`` (the model card) after the verification, and each
    finished shard is flushed to disk on another thread (``fsync=False`` leaves flushing to the OS, as ``cp`` does).
    Every side file is written and flushed, a failure of any fails the run; the staging folder is verified (the
    checkpoint, and no file short or empty) before it is renamed into place (``overwrite=False``: only if the target
    is still absent or empty then; ``overwrite=True``: also if it is still a previous reap output,
    :func:`reap.io.outputs.foreign_entries`). ``reap_report.json`` is written again last, its ``files`` listing every
    file of the output: what a later ``--overwrite`` may delete. Merged experts of the plan and ``router_rows``
    (layer -> re-fit router rows [K', H]) are computed from the stored tensors and written in the checkpoint's format
    (:mod:`reap.rewrite.merged`; ``neuron_columns``: layer -> (which up-projection columns feed each neuron, whether
    the experts module is transposed), for experts stored fused).
    """
    log = log or (lambda _msg: None)
    start = time.perf_counter()
    recovered = None
    if router_rows or any(plan.merges(layer) for layer in plan.moe_layers):
        from reap.rewrite.merged import Recovered, check_recovery

        check_recovery(ckpt, spec, plan, router_rows or {})
        recovered = Recovered(ckpt, spec, plan, router_rows or {}, neuron_columns or {})
    contents, removed_params, mtp = shard_contents(ckpt, spec, plan, id_remap or {}, recovered)
    names = output_shard_names(ckpt.shards, contents)
    written = sum(e.nbytes for entries in contents.values() for e in entries)
    k = plan.kept_per_layer
    total = ckpt.total_bytes
    from reap.formats import HF_QUANT_CONFIG

    # the configs first: a module list that cannot be renumbered is an error before anything is written
    new_config = pruned_config(ckpt.config, spec, k, bool(mtp), plan)
    hf_quant = pruned_hf_quant_config(json.loads((ckpt.path / HF_QUANT_CONFIG).read_text()), spec, plan, bool(mtp)) \
        if (ckpt.path / HF_QUANT_CONFIG).is_file() else None
    skip = {INDEX_NAME, CONFIG_NAME, REPORT_NAME, STATS_NAME, *GENERATED, *ckpt.shards}
    if hf_quant is not None:  # ModelOpt's module lists, renumbered like config.json's
        skip.add(HF_QUANT_CONFIG)
    others = other_files(ckpt.path, skip)
    copied = {rel: src.stat().st_size for src in others  # the source's model card is replaced by the new one
              if (rel := src.relative_to(ckpt.path).as_posix()) != CARD_NAME}
    side = [len(json.dumps(report)) * 2 + (64 << 10), *(side_files.sizes if side_files is not None else ())]
    need = estimate_bytes([e.nbytes for entries in contents.values() for e in entries] + list(copied.values()) + side
                          + [(ckpt.path / INDEX_NAME).stat().st_size if (ckpt.path / INDEX_NAME).is_file() else 0,
                             (ckpt.path / CONFIG_NAME).stat().st_size, stats_bytes(spec) if stats is not None else 0])
    need += sum(len(entries) * 160 for entries in contents.values())  # shard headers
    check_free_space(out.parent, need, f"the pruned checkpoint ({len(contents)} shards, {human_bytes(written)} of tensors)")
    with atomic_directory(out, durable=fsync, overwrite=overwrite) as tmp, BackgroundSync(enabled=fsync) as syncer:
        index_meta = dict(json.loads((ckpt.path / INDEX_NAME).read_text()).get("metadata") or {}) if (ckpt.path / INDEX_NAME).is_file() else {}
        index_meta["total_size"] = written
        if isinstance(index_meta.get("total_parameters"), int):
            index_meta["total_parameters"] -= removed_params
        weight_map = {e.name: names[shard] for shard, entries in contents.items() for e in entries}
        write_json(tmp / INDEX_NAME, {"metadata": index_meta, "weight_map": weight_map})
        write_json(tmp / CONFIG_NAME, new_config)
        if hf_quant is not None:
            write_json(tmp / HF_QUANT_CONFIG, hf_quant)
        for src in others:
            dst = tmp / src.relative_to(ckpt.path)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        report = {**report, "kept_per_layer": k, "bytes_before": total, "bytes_after": written}
        if mtp:
            report["dropped_mtp_tensors"] = mtp
        write_json(tmp / REPORT_NAME, report)
        if stats is not None:
            stats.save(tmp / STATS_NAME)
        assets: list[Path] = []  # pictures + summary, drawn beside the copying (they read only the report)
        failed: list[BaseException] = []

        def draw() -> None:
            try:
                assets.extend(side_files.draw(tmp))
            except BaseException as err:  # noqa: BLE001 - re-raised in the main thread below
                failed.append(err)

        drawer = threading.Thread(target=draw, name="reap-report", daemon=True)
        if side_files is not None:
            drawer.start()
        try:
            bar = Progress(total, "rewrite", unit="MiB", scale=1 << 20, enabled=progress, log=log)
            for shard in ckpt.shards:
                if contents[shard]:
                    write_safetensors(tmp / names[shard], contents[shard], ckpt.shard_metadata(shard), fsync=False)
                    syncer.submit(tmp / names[shard])
                bar.update(sum(i.nbytes for i in ckpt.shard_tensors(shard)))
            bar.close()
        finally:
            if side_files is not None:
                drawer.join()  # before the staging folder can be removed on an error
        if failed:
            raise failed[0]
        if progress:
            log("verifying the output" + (", writing the model card" if side_files is not None else "")
                + (", flushing to disk" if fsync else ""))
        verify(tmp, spec, plan, mtp_dropped=bool(mtp))
        if side_files is not None:
            side_files.card(tmp, report, [p.name for p in assets if p.suffix == ".png"])
        # the report again, now naming every file of the output: what a later --overwrite may replace
        write_json(tmp / REPORT_NAME, {**report, "files": sorted({*output_files(tmp), REPORT_NAME})})
        syncer.submit_tree(tmp)  # the small files and the folders; the shards are already (being) flushed
        syncer.wait()
        check_complete(tmp, copied)
    return SurgeryResult(out, k, written, time.perf_counter() - start, mtp)


def stats_bytes(spec: Layout) -> int:
    """About the size of a stats file of this model (up to eight float64 [L, E] tables: six sums, the greedy order
    and its errors, and a header)."""
    return 8 * 8 * spec.num_layers * spec.num_experts + (64 << 10)


_SHARD_NAME = re.compile(r"^(?P<stem>.*)-(?P<index>\d+)-of-(?P<count>\d+)(?P<ext>\.safetensors)$")


def output_shard_names(shards: list[str], contents: dict[str, list[Entry]]) -> dict[str, str]:
    """Output file name of each input shard. The same names, unless a shard is left out entirely (it held only
    multi-token-prediction tensors): then shards named ``stem-NNNNN-of-MMMMM`` are renumbered without the gap, from
    the input's first number (zero-based releases stay zero-based), ``-of-`` the new count."""
    kept = [s for s in shards if contents.get(s)]
    parsed = [_SHARD_NAME.match(s) for s in shards]
    if len(kept) == len(shards) or not all(parsed) or len({(m["stem"], m["ext"]) for m in parsed}) != 1:
        return {s: s for s in shards}
    width = len(parsed[0]["index"])
    first = min(int(m["index"]) for m in parsed)
    stem, ext = parsed[0]["stem"], parsed[0]["ext"]
    count = len(kept)
    names = {s: s for s in shards}
    for i, s in enumerate(sorted(kept, key=lambda n: int(_SHARD_NAME.match(n)["index"]))):
        names[s] = f"{stem}-{first + i:0{width}d}-of-{count:0{width}d}{ext}"
    return names


def shard_contents(ckpt: Checkpoint, spec: Layout, plan: ExpertPlan, id_remap: dict[int, list[int]],
                   recovered=None) -> tuple[dict[str, list[Entry]], int, int]:
    """What each output shard holds, in the input's order, by each stored tensor's role (:class:`reap.model.arch.Role`):
    a kept expert's tensors renamed to its new index, tensors holding every expert (router rows, correction
    biases, fused experts, quantization companions included) sliced along their expert axis from the stored bytes,
    expert-id tables renumbered (``id_remap``: layer -> new id of each old id), multi-token-prediction tensors
    left out, everything else as it is. Also the number of parameters removed (for the index's
    ``total_parameters``: parameters, not buffers or scales) and of MTP tensors left out. ``recovered``
    (:class:`reap.rewrite.merged.Recovered`): merged experts and re-fit router rows computed instead of copied."""
    from reap.formats import stored_params

    new_id = plan.new_ids()
    contents: dict[str, list[Entry]] = {}
    removed = mtp = 0
    for shard in ckpt.shards:
        entries = contents.setdefault(shard, [])
        for info in ckpt.shard_tensors(shard):
            role = spec.roles.get(info.name)
            params = 0 if role is None or role.buffer else stored_params(info.name, info.dtype, info.numel, spec.format)
            if role is None or role.kind == "other" or (role.layer is not None and role.layer not in plan.layers):
                entries.append(Entry.copy_of(info, ckpt.path))
            elif role.kind == "mtp":
                mtp += 1
                removed += params
            elif role.kind == "expert":
                ids = new_id[role.layer]
                if role.expert in ids:
                    s, e = role.span
                    new_name = info.name[:s] + str(ids[role.expert]) + info.name[e:]
                    merged = recovered.expert_entry(info, role, new_name) if recovered is not None else None
                    entries.append(merged or Entry.copy_of(info, ckpt.path, new_name))
                else:
                    removed += params
            elif role.kind == "rows":
                # the kept experts, then the slots after the experts that are not experts (zero-computation
                # experts, a skip class, shared-expert gates), as they are
                rows = list(plan.kept(role.layer)) + list(range(spec.num_experts, spec.num_experts + role.extra))
                removed += params - params * len(rows) // (spec.num_experts + role.extra)
                new = None if recovered is None else \
                    (recovered.router_entry(info, role) or recovered.fused_entry(info, role))
                entries.append(new or Entry.rows_of(info, ckpt.path, rows, axis=role.axis))
            elif role.kind == "ids":
                entries.append(_remapped_ids(ckpt, info, id_remap.get(role.layer)))
            elif role.kind == "shape":  # a fused weight's weight_shape: its expert count becomes K
                entries.append(_reshaped(ckpt, info, role.axis, spec.num_experts, len(plan.layers[role.layer])))
            else:  # pragma: no cover - a role kind added to arch.Role without surgery for it
                raise AssertionError(f"no surgery for role {role.kind}")
    return contents, removed, mtp


def _remapped_ids(ckpt: Checkpoint, info, remap: list[int] | None) -> Entry:
    """An expert-id table (DeepSeek-V4's token -> expert hash routing) with every id replaced by ``remap[id]``."""
    import numpy as np

    if remap is None:  # pragma: no cover - reap.prune computes a remap for every layer with a table
        raise AssertionError(f"{info.name}: no id remapping for its layer")

    def fetch() -> bytes:
        table = ckpt.integers(info.name)
        if table.size and (table.min() < 0 or table.max() >= len(remap)):
            raise UserError(f"{info.name} names expert {int(table.max())}, but the layer has {len(remap)}")
        return np.asarray(remap, dtype=table.dtype)[table].tobytes()

    return Entry(info.name, info.dtype, info.shape, info.nbytes, fetch=fetch)


def _reshaped(ckpt: Checkpoint, info, axis: int, n: int, k: int) -> Entry:
    """A compressed-tensors ``weight_shape`` of fused experts with the expert count at ``axis`` (``n``) set to ``k``."""
    import numpy as np

    def fetch() -> bytes:
        shape = ckpt.integers(info.name).copy()
        if shape[axis] != n:
            raise UserError(f"{info.name} says {int(shape[axis])} experts along dimension {axis}, the layer has {n}")
        shape[axis] = k
        return np.ascontiguousarray(shape).tobytes()

    return Entry(info.name, info.dtype, info.shape, info.nbytes, fetch=fetch)


def id_remap(ckpt: Checkpoint, spec: Layout, plan: ExpertPlan) -> dict[int, list[int]]:
    """For layers with an expert-id table (hash routing): old id -> new id. A kept expert gets its new index; a
    pruned one the new index of the kept expert whose router row is most similar (cosine), so the tokens hashed to
    it go to the expert the learned router places nearest. A token whose row then names one kept expert twice
    sends that expert both shares of its weight, as the router gathers a weight per named expert."""
    import torch

    from reap.formats import dequantize, group_parts

    out: dict[int, list[int]] = {}
    for layer, moe in spec.moe.items():
        if not moe.id_tables or layer not in plan.layers:
            continue
        kept = plan.kept(layer)
        names = [n for n, r in spec.roles.items() if r.model == moe.router]
        if not names:
            raise UserError(f"layer {layer} routes by an expert-id table but has no router weight to pick substitutes "
                            "for pruned experts")
        (_, parts), = group_parts(names, spec.format).items()
        weight = dequantize({p: ckpt.tensor(n) for p, n in parts.items()}, spec.format, torch.float32, ckpt.config)
        weight = torch.nn.functional.normalize(weight.float(), dim=1)  # [E, H]
        sim = weight @ weight[kept].T  # [E, K]
        nearest = sim.argmax(dim=1).tolist()
        new = {old: i for i, old in enumerate(kept)}
        out[layer] = [new.get(e, nearest[e]) for e in range(spec.num_experts)]
    return out
