"""Selection and surgery: which experts stay, and the rewritten checkpoint.

``keep_from_scores`` / ``read_keep_file`` turn a ratio + scores or a keep file into per-layer keep lists;
``rewrite`` streams the checkpoint shard by shard into a temporary directory beside the target, each stored
tensor treated by its role in the layout (:mod:`reap.arch`): kept expert tensors are copied byte for byte
(quantized values and scales included) and renumbered 0..K-1 in original order, tensors holding every expert
(router rows, correction biases, fused experts) are sliced along their expert axis (dtype kept), expert-id tables
renumbered, every other tensor copied unchanged; the index and ``config.json`` (the expert-count keys only) are
rebuilt, other files copied, ``reap_report.json`` written; the result is verified and only then renamed into
place.
"""

from __future__ import annotations

import copy
import json
import shlex
import os
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reap import __version__
from reap.arch import Layout, derive, human_bytes
from reap.checkpoint import (
    CONFIG_NAME,
    INDEX_NAME,
    BackgroundSync,
    Checkpoint,
    Entry,
    atomic_directory,
    check_output_dir,
    other_files,
    read_header,
    write_json,
    write_safetensors,
)
from reap.errors import UserError, plural
from reap.names import CARD_NAME, GENERATED, REPORT_NAME, STATS_NAME  # the last two: never copied from a source
from reap.options import PruneOptions
from reap.progress import Progress
from reap.rules import experts_to_drop
from reap.staging import OutputLock, check_complete, check_free_space, clean_stale, estimate_bytes

if TYPE_CHECKING:  # torch is imported only where scores are computed: copying with --keep never needs it
    import torch

Keep = dict[int, list[int]]  # layer -> kept original expert ids, ascending


def keep_from_scores(scores: torch.Tensor, layers: list[int], n_drop: int, n_group: int = 1) -> Keep:
    """scores [L, E] -> per layer, the experts left after dropping the n_drop lowest (ties to the lower index).

    With ``n_group`` > 1 (contiguous, equally sized expert groups) each group drops n_drop / n_group of its own
    lowest, so the groups stay equally sized and, renumbered in original order, contiguous.
    """
    from reap.saliency import choose_experts

    if n_group <= 1:
        return {layer: choose_experts(scores[layer], n_drop)[0] for layer in layers}
    if n_drop % n_group or scores.shape[1] % n_group:
        raise ValueError(f"{n_drop} dropped of {scores.shape[1]} experts cannot be split over {n_group} groups")
    size, per_group = scores.shape[1] // n_group, n_drop // n_group
    keep: Keep = {}
    for layer in layers:
        keep[layer] = [g * size + e for g in range(n_group)
                       for e in choose_experts(scores[layer, g * size : (g + 1) * size], per_group)[0]]
    return keep


def read_keep_file(path: str | Path, spec: Layout, layers: list[int]) -> Keep:
    """A ``{"<layer>": [kept expert ids]}`` JSON file, checked against the model."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"keep file {path} does not exist; pass a JSON file {{\"<layer>\": [expert ids]}}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"keep file {path} is not valid JSON ({err}); it must look like {{\"0\": [0, 3, 5]}}") from None
    if not isinstance(data, dict):
        raise UserError(f"keep file {path} must be a JSON object {{\"<layer>\": [kept expert ids]}}")
    keep: Keep = {}
    for key, ids in data.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) in layers):
            raise UserError(f"keep file {path} names layer {key!r}, which is not an MoE layer of the model (0..{spec.stat_layers - 1})")
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise UserError(f"keep file {path}: layer {key} must map to a list of integer expert ids")
        bad = [i for i in ids if not 0 <= i < spec.num_experts]
        if bad:
            raise UserError(f"keep file {path}: layer {key} names expert {bad[0]}, but the model has experts 0..{spec.num_experts - 1}")
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise UserError(f"keep file {path}: layer {key} lists expert {dup} more than once")
        if len(ids) < spec.min_kept():
            need = (f"top-k {spec.top_k}" if spec.n_group <= 1 else
                    f"the {spec.min_kept()} that top-k {spec.top_k} in {spec.topk_group} of "
                    f"{spec.n_group} equal groups needs")
            raise UserError(f"keep file {path}: layer {key} keeps {plural(len(ids), 'expert')}, fewer than {need}")
        groups = spec.n_group
        if groups > 1:
            size = spec.num_experts // groups
            per = [sum(1 for i in ids if i // size == g) for g in range(groups)]
            if len(set(per)) != 1:
                raise UserError(
                    f"keep file {path}: layer {key} keeps {per} experts from the {groups} expert groups of "
                    f"{size}; {spec.family} routes by equally sized groups, so keep the same number from each")
        keep[int(key)] = sorted(ids)
    missing = [layer for layer in layers if layer not in keep]
    if missing:
        raise UserError(f"keep file {path} has no entry for layer(s) {missing[:8]}; give the kept experts of every MoE layer")
    counts = {len(v) for v in keep.values()}
    if len(counts) != 1:
        raise UserError(
            f"keep file {path} keeps different numbers of experts per layer ({sorted(counts)}); "
            f"{spec.family} stores one expert count in config.json, so keep the same number in every layer"
        )
    return keep


@dataclass(frozen=True)
class SurgeryResult:
    out: Path
    kept_per_layer: int
    bytes_written: int
    seconds: float
    dropped_mtp: int = 0  # multi-token-prediction tensors left out


def pruned_config(config: dict[str, Any], spec: Layout, k: int, mtp_dropped: bool,
                  keep: Keep | None = None) -> dict[str, Any]:
    """config.json after pruning: every key path holding the expert count set to k (and, when the
    multi-token-prediction modules were left out, their count keys to 0); with ``keep``, the module lists of the
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
    if keep is not None and quant is not None:
        renames, new_id = module_renames(spec, keep, mtp_dropped)
        rewritten = rewrite_quantization(quant, renames, new_id)
        quant.clear()
        quant.update(rewritten)
    return out


def pruned_hf_quant_config(data: dict[str, Any], spec: Layout, keep: Keep, mtp_dropped: bool) -> dict[str, Any]:
    """ModelOpt's ``hf_quant_config.json`` after pruning: ``exclude_modules`` and ``quantized_layers`` entries
    naming expert indices renumbered or dropped."""
    from reap.formats.modules import rewrite_quantization

    renames, new_id = module_renames(spec, keep, mtp_dropped)
    return rewrite_quantization(data, renames, new_id, "hf_quant_config.json")


def module_renames(spec: Layout, keep: Keep, mtp_dropped: bool) -> tuple[dict[str, str | None], Keep]:
    """(every module of the checkpoint -> its name after pruning, None where it is left out; layer -> {kept
    original expert id: new id}). A module is a stored base name without its last component (``.weight``)."""
    from reap.formats import group_parts

    new_id = {layer: {old: new for new, old in enumerate(ids)} for layer, ids in keep.items()}
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
    keep: Keep,
    out: Path,
    report: dict[str, Any],
    progress: bool = True,
    stats=None,
    fsync: bool = True,
    id_remap: dict[int, list[int]] | None = None,
    overwrite: bool = True,
    log=None,
) -> SurgeryResult:
    """Write the pruned checkpoint to ``out`` (checked beforehand with checkpoint.check_output_dir).

    First the free space is checked (everything it will write against what the file system has free). Everything but
    the shards is written first (index, config, report, other files); the pictures are drawn on a thread while the
    shards are copied, and each finished shard is flushed to disk on another (``fsync=False`` leaves flushing to the
    OS, as ``cp`` does). Every side file is written and flushed, a failure of any fails the run; the staging folder is
    verified (the checkpoint, and no file short or empty) before it is renamed into place (``overwrite=False``: only
    if the target is still absent or empty then).
    """
    log = log or (lambda _msg: None)
    start = time.perf_counter()
    plan, removed_params, mtp = plan_shards(ckpt, spec, keep, id_remap or {})
    names = output_shard_names(ckpt.shards, plan)
    written = sum(e.nbytes for entries in plan.values() for e in entries)
    k = len(next(iter(keep.values())))
    total = ckpt.total_bytes
    from reap.formats import HF_QUANT_CONFIG
    from reap.report import publish_assets, publish_card

    # the configs first: a module list that cannot be renumbered is an error before anything is written
    new_config = pruned_config(ckpt.config, spec, k, bool(mtp), keep)
    hf_quant = pruned_hf_quant_config(json.loads((ckpt.path / HF_QUANT_CONFIG).read_text()), spec, keep, bool(mtp)) \
        if (ckpt.path / HF_QUANT_CONFIG).is_file() else None
    skip = {INDEX_NAME, CONFIG_NAME, REPORT_NAME, STATS_NAME, *GENERATED, *ckpt.shards}
    if hf_quant is not None:  # ModelOpt's module lists, renumbered like config.json's
        skip.add(HF_QUANT_CONFIG)
    others = other_files(ckpt.path, skip)
    copied = {rel: src.stat().st_size for src in others  # the source's model card is replaced by the new one
              if (rel := src.relative_to(ckpt.path).as_posix()) != CARD_NAME}
    cells = spec.num_layers * spec.num_experts  # the pictures and texts grow with layers x experts
    side = [len(json.dumps(report)) * 2 + (64 << 10), *[min(2 << 20, (64 << 10) + 200 * cells)] * 3,
            (64 << 10) + 400 * spec.num_layers, (64 << 10) + 400 * spec.num_layers]  # report, 3 pictures, summary, card
    need = estimate_bytes([e.nbytes for entries in plan.values() for e in entries] + list(copied.values()) + side
                          + [(ckpt.path / INDEX_NAME).stat().st_size if (ckpt.path / INDEX_NAME).is_file() else 0,
                             (ckpt.path / CONFIG_NAME).stat().st_size, stats_bytes(spec) if stats is not None else 0])
    need += sum(len(entries) * 160 for entries in plan.values())  # shard headers
    check_free_space(out.parent, need, f"the pruned checkpoint ({len(plan)} shards, {human_bytes(written)} of tensors)")
    with atomic_directory(out, durable=fsync, overwrite=overwrite) as tmp, BackgroundSync(enabled=fsync) as syncer:
        index_meta = dict(json.loads((ckpt.path / INDEX_NAME).read_text()).get("metadata") or {}) if (ckpt.path / INDEX_NAME).is_file() else {}
        index_meta["total_size"] = written
        if isinstance(index_meta.get("total_parameters"), int):
            index_meta["total_parameters"] -= removed_params
        weight_map = {e.name: names[shard] for shard, entries in plan.items() for e in entries}
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
                assets.extend(publish_assets(tmp, stats, log=log, strict=True))
            except BaseException as err:  # noqa: BLE001 - re-raised in the main thread below
                failed.append(err)

        drawer = threading.Thread(target=draw, name="reap-report", daemon=True)
        drawer.start()
        try:
            bar = Progress(total, "rewrite", unit="MiB", scale=1 << 20, enabled=progress, log=log)
            for shard in ckpt.shards:
                if plan[shard]:
                    write_safetensors(tmp / names[shard], plan[shard], ckpt.shard_metadata(shard), fsync=False)
                    syncer.submit(tmp / names[shard])
                bar.update(sum(i.nbytes for i in ckpt.shard_tensors(shard)))
            bar.close()
        finally:
            drawer.join()  # before the staging folder can be removed on an error
        if failed:
            raise failed[0]
        if progress:
            log("verifying the output, writing the model card" + (", flushing to disk" if fsync else ""))
        verify(tmp, spec, keep, mtp_dropped=bool(mtp))
        publish_card(tmp, report, source=ckpt.path, figures=[p.name for p in assets if p.suffix == ".png"],
                     published_as=out, strict=True)
        syncer.submit_tree(tmp)  # the small files and the folders; the shards are already (being) flushed
        syncer.wait()
        check_complete(tmp, copied)
    return SurgeryResult(out, k, written, time.perf_counter() - start, mtp)


def stats_bytes(spec: Layout) -> int:
    """About the size of a stats file of this model (five float64 [L, E] tables and a header)."""
    return 5 * 8 * spec.num_layers * spec.num_experts + (64 << 10)


_SHARD_NAME = re.compile(r"^(?P<stem>.*)-(?P<index>\d+)-of-(?P<count>\d+)(?P<ext>\.safetensors)$")


def output_shard_names(shards: list[str], plan: dict[str, list[Entry]]) -> dict[str, str]:
    """Output file name of each input shard. The same names, unless a shard is left out entirely (it held only
    multi-token-prediction tensors): then shards named ``stem-NNNNN-of-MMMMM`` are renumbered without the gap, from
    the input's first number (zero-based releases stay zero-based), ``-of-`` the new count."""
    kept = [s for s in shards if plan.get(s)]
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


def plan_shards(ckpt: Checkpoint, spec: Layout, keep: Keep,
                id_remap: dict[int, list[int]]) -> tuple[dict[str, list[Entry]], int, int]:
    """What each output shard holds, in the input's order, by each stored tensor's role (:class:`reap.arch.Role`):
    a kept expert's tensors renamed to its new index, tensors holding every expert (router rows, correction
    biases, fused experts, quantization companions included) sliced along their expert axis from the stored bytes,
    expert-id tables renumbered (``id_remap``: layer -> new id of each old id), multi-token-prediction tensors
    left out, everything else as it is. Also the number of parameters removed (for the index's
    ``total_parameters``: parameters, not buffers or scales) and of MTP tensors left out."""
    from reap.formats import stored_params

    new_id = {layer: {old: new for new, old in enumerate(ids)} for layer, ids in keep.items()}
    plan: dict[str, list[Entry]] = {}
    removed = mtp = 0
    for shard in ckpt.shards:
        entries = plan.setdefault(shard, [])
        for info in ckpt.shard_tensors(shard):
            role = spec.roles.get(info.name)
            params = 0 if role is None or role.buffer else stored_params(info.name, info.dtype, info.numel, spec.format)
            if role is None or role.kind == "other" or (role.layer is not None and role.layer not in keep):
                entries.append(Entry.copy_of(info, ckpt.path))
            elif role.kind == "mtp":
                mtp += 1
                removed += params
            elif role.kind == "expert":
                ids = new_id[role.layer]
                if role.expert in ids:
                    s, e = role.span
                    entries.append(Entry.copy_of(info, ckpt.path, info.name[:s] + str(ids[role.expert]) + info.name[e:]))
                else:
                    removed += params
            elif role.kind == "rows":
                rows = keep[role.layer]
                removed += params - params * len(rows) // spec.num_experts
                entries.append(Entry.rows_of(info, ckpt.path, rows, axis=role.axis))
            elif role.kind == "ids":
                entries.append(_remapped_ids(ckpt, info, id_remap.get(role.layer)))
            elif role.kind == "shape":  # a fused weight's weight_shape: its expert count becomes K
                entries.append(_reshaped(ckpt, info, role.axis, spec.num_experts, len(keep[role.layer])))
            else:  # pragma: no cover - a role kind added to arch.Role without surgery for it
                raise AssertionError(f"no surgery for role {role.kind}")
    return plan, removed, mtp


def _remapped_ids(ckpt: Checkpoint, info, remap: list[int] | None) -> Entry:
    """An expert-id table (DeepSeek-V4's token -> expert hash routing) with every id replaced by ``remap[id]``."""
    import numpy as np

    if remap is None:  # pragma: no cover - prune_model computes a remap for every layer with a table
        raise AssertionError(f"{info.name}: no id remapping for its layer")

    def fetch() -> bytes:
        table = _id_table(ckpt, info)
        if table.size and (table.min() < 0 or table.max() >= len(remap)):
            raise UserError(f"{info.name} names expert {int(table.max())}, but the layer has {len(remap)}")
        return np.asarray(remap, dtype=table.dtype)[table].tobytes()

    return Entry(info.name, info.dtype, info.shape, info.nbytes, fetch=fetch)


def _reshaped(ckpt: Checkpoint, info, axis: int, n: int, k: int) -> Entry:
    """A compressed-tensors ``weight_shape`` of fused experts with the expert count at ``axis`` (``n``) set to ``k``."""
    import numpy as np

    def fetch() -> bytes:
        shape = _id_table(ckpt, info).copy()
        if shape[axis] != n:
            raise UserError(f"{info.name} says {int(shape[axis])} experts along dimension {axis}, the layer has {n}")
        shape[axis] = k
        return np.ascontiguousarray(shape).tobytes()

    return Entry(info.name, info.dtype, info.shape, info.nbytes, fetch=fetch)


def _id_table(ckpt: Checkpoint, info):
    """An integer tensor's values (numpy, flat), read from its stored bytes."""
    import numpy as np

    dtype = {"I64": np.int64, "I32": np.int32, "I16": np.int16, "U8": np.uint8, "I8": np.int8}.get(info.dtype)
    if dtype is None:
        raise UserError(f"{info.name} is an expert-id table stored as {info.dtype}; reap renumbers integer tables")
    with open(ckpt.path / info.shard, "rb") as f:
        f.seek(info.start)
        return np.frombuffer(f.read(info.nbytes), dtype=dtype)


def id_remap(ckpt: Checkpoint, spec: Layout, keep: Keep) -> dict[int, list[int]]:
    """For layers with an expert-id table (hash routing): old id -> new id. A kept expert gets its new index; a
    pruned one the new index of the kept expert whose router row is most similar (cosine), so the tokens hashed to
    it go to the expert the learned router places nearest. A token whose row then names one kept expert twice
    sends that expert both shares of its weight, as the router gathers a weight per named expert."""
    import torch

    from reap.formats import dequantize, group_parts

    out: dict[int, list[int]] = {}
    for layer, moe in spec.moe.items():
        if not moe.id_tables or layer not in keep:
            continue
        kept = keep[layer]
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


def verify(path: Path, spec: Layout, keep: Keep, mtp_dropped: bool = False) -> None:
    """Check a written checkpoint: index == shard headers; the layout transformers' model gives it, derived again
    from the output itself, has K experts everywhere (every per-expert index 0..K-1 present, every expert axis of
    length K, config count keys K) and every quantized tensor its format's companions, shaped like its values
    (:func:`reap.formats.companion_problem`, run by the derivation); groups equal; expert-id tables name kept
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
    k = len(next(iter(keep.values())))
    if any(len(ids) != k for ids in keep.values()):
        raise RuntimeError("verify: layers keep different numbers of experts")
    if k < spec.min_kept():
        raise RuntimeError(f"verify: {k} experts kept < {spec.min_kept()} (top-k {spec.top_k})")
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
    if spec.n_group > 1:
        if k % spec.n_group:
            raise RuntimeError(f"verify: {k} experts do not split into {spec.n_group} equal groups")
        size = spec.num_experts // spec.n_group
        for layer, kept in keep.items():
            if len({sum(1 for e in kept if e // size == g) for g in range(spec.n_group)}) != 1:
                raise RuntimeError(f"verify: layer {layer} keeps unequal numbers of experts per group")
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
            table = _id_table(written, written.infos[name])
            if table.size and (table.min() < 0 or table.max() >= k):
                raise RuntimeError(f"verify: {name} names expert {int(table.max())} of {k}")


def base_report(ckpt: Checkpoint, spec: Layout, method: str, ratio: float | None, keep: Keep,
                scores: torch.Tensor | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``reap_report.json`` content (the surgery adds sizes)."""
    layers = {}
    for layer, ids in sorted(keep.items()):
        kept = set(ids)
        entry: dict[str, Any] = {"kept": ids, "pruned": [e for e in range(spec.num_experts) if e not in kept]}
        if scores is not None:
            entry["saliency"] = [float(x) for x in scores[layer].tolist()]
        layers[str(layer)] = entry
    return {
        "tool": "reap",
        "version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": shlex.join(["reap", *sys.argv[1:]]),
        "source": str(ckpt.path),
        "family": spec.family,
        "method": method,
        "ratio": ratio,
        "num_experts": spec.num_experts,
        "top_k": spec.top_k,
        **(extra or {}),
        "layers": layers,
    }


# -- the whole job -----------------------------------------------------------------------------------
def prune_model(opts: PruneOptions, log=print) -> SurgeryResult | None:
    """Check everything, choose the experts (keep file, random, stats file or calibration), rewrite.

    Under torchrun every rank calibrates its share and only rank 0 writes; other ranks return None. Rank 0 holds
    the target's lock (reap.staging.OutputLock) from the check of --out to the rename, and removes the staging
    folders that interrupted runs left beside it.
    """
    from reap.validate import derive_checked

    ckpt = Checkpoint(opts.model)
    spec = derive_checked(ckpt, keep_mtp=not opts.drop_mtp)
    out = check_output_dir(opts.out, [ckpt.path], opts.overwrite)
    if int(os.environ.get("RANK", "0")) != 0:
        return _prune_checked(opts, ckpt, spec, out, log)
    with OutputLock(out, log).acquire():
        out = check_output_dir(out, [ckpt.path], opts.overwrite)  # again: a run that held the lock may have finished
        clean_stale(out, log)
        return _prune_checked(opts, ckpt, spec, out, log)


def _prune_checked(opts: PruneOptions, ckpt: Checkpoint, spec: Layout, out: Path, log) -> SurgeryResult | None:
    layers = spec.moe_layers
    if (opts.keep_file is None) == (opts.ratio is None):
        raise UserError("pass either --ratio R (choose experts by --method) or --keep KEEP.json, not both or neither")
    stats, scores, extra = None, None, {}
    if opts.keep_file is None:
        from reap.criteria import get_criterion

        criterion = get_criterion(opts.method)  # UserError naming the known criteria
    if opts.keep_file is not None and (opts.multiple_of != 1 or opts.protect_super):
        raise UserError("--multiple-of and --protect-super-experts choose among scored experts; --keep names the "
                        "experts itself: drop them or pass --ratio")
    unused = [flag for flag, given in (("--stats", opts.stats is not None), ("--dataset", opts.calibration is not None))
              if given and (opts.keep_file is not None or not criterion.needs_data)]
    if unused:
        why = "--keep names the experts itself" if opts.keep_file is not None else f"--method {opts.method} uses no data"
        raise UserError(f"{' and '.join(unused)} would be ignored: {why}; drop it or choose a saliency --method")
    if opts.keep_file is not None:
        keep, method = read_keep_file(opts.keep_file, spec, layers), "keep-file"
        extra["keep_file"] = str(opts.keep_file)
    else:
        from reap.saliency import ExpertStats  # torch: not needed to copy with a keep file

        n_drop = experts_to_drop(spec, opts.ratio, opts.multiple_of)
        if opts.multiple_of > 1:
            plain = spec.num_experts - experts_to_drop(spec, opts.ratio)
            log(f"--multiple-of {opts.multiple_of}: keeping {spec.num_experts - n_drop} of {spec.num_experts} experts "
                f"per layer (--ratio {opts.ratio} alone keeps {plain})")
            extra["multiple_of"] = opts.multiple_of
        method = opts.method
        if not criterion.needs_data:
            if opts.protect_super:
                raise UserError(f"--protect-super-experts needs calibration statistics; --method {method} has none")
            scores = ExpertStats(spec.stat_layers, spec.num_experts).scores(method, opts.seed)
            extra["seed"] = opts.seed
        else:
            if opts.stats is not None and opts.calibration is not None:
                raise UserError("pass either --stats STATS or --dataset DATA, not both")
            if opts.stats is not None:
                stats = ExpertStats.load(opts.stats)
                check_stats(stats, spec, opts.stats)
                from reap.calibrate import check_thin, thin_data

                check_thin(thin_data(stats, spec), opts.strict, log)
                scores = stats.scores(method)  # before any other work: an old stats file fails here, in one line
            elif opts.calibration is not None:
                from dataclasses import replace

                from reap.calibrate import calibrate

                cal = opts.calibration
                if method != "greedy-rerouted":  # the search's order is read by that criterion only
                    cal = replace(cal, engine=replace(cal.engine, greedy_tokens=0))
                stats, summary = calibrate(replace(cal, model=str(ckpt.path), out=None,
                                                   strict=opts.strict or cal.strict, drop_mtp=opts.drop_mtp), ckpt,
                                           log=log, layout=spec)
                log(f"calibrated {summary['tokens']} tokens in {summary['seconds']:.1f}s")
            else:
                raise UserError(f"--method {method} needs calibration: pass --dataset DATA (e.g. a .jsonl file) "
                                "or --stats STATS from `reap calibrate`; or use --method random")
            scores = stats.scores(method)
            extra["calibration"] = stats.meta
            extra.update(_selection_notes(stats, spec, method, opts, n_drop, log))
            if opts.protect_super:
                from reap.selection import protect, super_experts

                scores = protect(scores, super_experts(stats.max_norm))
        keep = keep_from_scores(scores, layers, n_drop, spec.n_group)
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    if opts.recipe is not None:
        extra["options"] = opts.recipe
    if spec.mtp_layers:  # multi-token-prediction modules: stats rows / report layers num_layers.. (reap.mtp)
        extra["mtp"] = {"kept": True, "modules": spec.mtp_layers, "layers": list(range(spec.num_layers,
                                                                                        spec.stat_layers))}
    report = base_report(ckpt, spec, method, opts.ratio, keep, scores, extra)
    k = len(next(iter(keep.values())))
    log(f"pruning {ckpt.name}: {spec.num_experts} -> {k} experts in {plural(len(layers), 'MoE layer')} ({method}) "
        f"-> {out}")
    remap = id_remap(ckpt, spec, keep)
    if remap:
        report["id_remap"] = {str(layer): ids for layer, ids in remap.items()}
        log(f"expert-id tables (hash routing) in {len(remap)} layers renumbered; a pruned expert's tokens go to the "
            "kept expert with the most similar router row (reap_report.json id_remap)")
    result = rewrite(ckpt, spec, keep, out, report, progress=opts.progress, stats=stats, fsync=opts.fsync,
                     id_remap=remap, overwrite=opts.overwrite, log=log)
    if spec.mtp_layers:
        rows = ", ".join(map(str, range(spec.num_layers, spec.stat_layers)))
        by = "by their own saliency" if stats is not None else f"by {method}"
        log(f"kept {plural(spec.mtp_layers, 'multi-token-prediction module')} (report layer"
            f"{'s' if spec.mtp_layers > 1 else ''} {rows}), pruned to {k} experts {by} like every layer: MTP "
            "speculative decoding still works (--drop-mtp leaves them out)")
    if result.dropped_mtp:
        keys = list(spec.mtp_keys)
        log(f"left out the multi-token-prediction module ({result.dropped_mtp} tensors"
            + (f"; config {', '.join(keys)} set to 0" if keys else "") + "): its experts would not match the pruned "
            "expert count; serve without MTP speculative decoding" + (" (--drop-mtp)" if opts.drop_mtp else ""))
    return result


def _selection_notes(stats, spec: Layout, method: str, opts: PruneOptions, n_drop: int, log) -> dict[str, Any]:
    """What the report records (and the log says) about the choice beyond the scores: super experts (always;
    protected with --protect-super-experts) and the layers where greedy-rerouted fell back to weighted-ean."""
    from reap.criteria import GREEDY_FALLBACK, greedy_fallback_layers
    from reap.selection import super_experts

    notes: dict[str, Any] = {}
    sup = super_experts(stats.max_norm)
    found = {str(layer): [int(e) for e in sup[layer].nonzero().squeeze(1).tolist()] for layer in spec.moe_layers
             if bool(sup[layer].any())}
    notes["super_experts"] = found
    notes["protect_super_experts"] = bool(opts.protect_super)
    if opts.protect_super:
        most = max((len(v) for v in found.values()), default=0)
        if most > spec.num_experts - n_drop:
            raise UserError(f"{most} super experts in a layer but only {spec.num_experts - n_drop} kept; pass a "
                            "smaller --ratio or leave out --protect-super-experts")
        log(f"--protect-super-experts: {sum(len(v) for v in found.values())} super experts (max ||f|| above "
            "max(99.5th percentile, max/10) of their layer) are never pruned")
    if method == "greedy-rerouted":
        fallback = {layer: why for layer, why in greedy_fallback_layers(stats).items() if layer in spec.moe_layers}
        if fallback:
            notes["greedy_fallback"] = {"criterion": GREEDY_FALLBACK, "layers": {str(k): v for k, v in fallback.items()}}
            first = next(iter(fallback.values()))
            log(f"greedy-rerouted: {plural(len(fallback), 'MoE layer')} {sorted(fallback)[:8]} use {GREEDY_FALLBACK} "
                f"instead ({first.split('; ')[0]}); reap_report.json greedy_fallback says why for each")
    return notes


def check_stats(stats, spec: Layout, path) -> None:
    """A stats file must match the model and be complete (in every MoE layer, MTP modules included when kept)."""
    if stats.num_experts == spec.num_experts and spec.mtp_layers and stats.num_layers == spec.num_layers:
        raise UserError(f"stats file {path} has no rows for this model's {plural(spec.mtp_layers, 'MTP module')} "
                        f"(layers {spec.num_layers}..{spec.stat_layers - 1}); calibrate again with this version of "
                        "reap, or pass --drop-mtp to leave the MTP modules out of the pruned model")
    # --drop-mtp with a file that has MTP rows: the decoder layers' rows are the same either way (MTP runs after them)
    rows = stats.num_layers - int(stats.meta.get("mtp_layers") or 0) if not spec.mtp_layers else stats.num_layers
    if (rows, stats.num_experts) != (spec.stat_layers, spec.num_experts):
        raise UserError(f"stats file {path} is for {stats.num_layers} layers x {stats.num_experts} experts, the model has "
                        f"{spec.stat_layers} x {spec.num_experts}; calibrate this model with `reap calibrate`")
    missing = sorted(set(spec.moe_layers) - stats.completed)
    if missing:
        raise UserError(f"stats file {path} is incomplete (layers {missing[:5]}... missing); finish it with "
                        "`reap calibrate ... --resume`")
