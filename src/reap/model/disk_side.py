"""The disk side of a :class:`reap.model.arch.Layout`: every stored tensor of a checkpoint with its :class:`reap.model.arch.Role`.

:func:`map_checkpoint` applies transformers' conversion mapping for the model (renamings, per-expert tensors merged
into fused ones, transposes) to every stored name, quantization companions grouped with their values by
:mod:`reap.formats`, and so tells for each stored tensor: one expert's tensor (where its index sits in the name),
a tensor holding every expert along an axis (:func:`disk_axis`: the model's expert axis through the conversion's
operations), a companion of fused experts (sliced, rewritten or copied: :func:`_companion_role`), an expert-id
table, a multi-token-prediction tensor transformers never loads, or anything else. It checks on the way that every
expert is stored, that every expert tensor of the model is loaded from something, and that quantization companions
are complete.

:func:`mtp_modules` finds the multi-token-prediction modules stored beside the decoder layers (their style among
:data:`reap.model.arch.MTP_STYLES`, their count, how stored names spell the main layers).

Legend: E experts.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING

from reap.model.arch import MTP_STYLES, Layout, MtpStyle, Role
from reap.core.errors import UserError
from reap.formats import checkpoint_format, companion_problem, group_parts

if TYPE_CHECKING:
    from reap.io.checkpoint import Checkpoint


def _conversions(model):
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return transforms, renamings, converters


def disk_axis(ops, axis: int, name: str) -> int:
    """The expert axis of a stored tensor that transformers' conversion ``ops`` turn into a model tensor with the
    expert axis ``axis`` (ops that work on other dimensions keep it; a transpose may move it)."""
    for op in reversed(ops):
        kind = type(op).__name__
        if kind == "Transpose":
            d0, d1 = op.dim0, op.dim1
            axis = d1 if axis == d0 else d0 if axis == d1 else axis
        elif kind in ("Concatenate", "Interleave", "Chunk", "Split") and getattr(op, "dim", None) != axis:
            continue
        else:
            raise UserError(f"{name}: transformers converts it with {kind} across the expert axis, which reap "
                            "cannot undo byte for byte; this model's disk layout is not supported")
    return axis


def _expert_span(pattern: str, name: str) -> tuple[int, int] | None:
    """Where the ``*`` of a per-expert source pattern (``.experts.*.w1.weight``) matched in ``name``."""
    regex = pattern.replace("*.", r"(\d+)\.").replace("*", r"(\d+)")
    m = re.search(regex, name)
    return m.span(1) if m else None


def map_checkpoint(layout: Layout, model, ckpt: "Checkpoint") -> Layout:
    """``layout`` with a :class:`Role` for every stored tensor of ``ckpt`` (shapes checked against the model)."""
    from transformers.core_model_loading import MergeModulelist, rename_source_key

    fmt = checkpoint_format(ckpt.config, ckpt.path)
    _, renamings, converters = _conversions(model)
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta = model.state_dict()
    buffers = {n for n, _ in model.named_buffers()}
    owner = {n: m for m in layout.moe.values() for n in m.tensors}
    ids = {n: m for m in layout.moe.values() for n in m.id_tables}
    layer_re = re.compile(re.escape(layout.layers_path) + r"\.(\d+)\.")
    E = layout.num_experts
    roles: dict[str, Role] = {}
    seen: dict[str, set[int]] = {}  # model tensor -> expert indices found per-expert on disk
    aliases = {}  # MTP decoder layers stored apart (mtp.layers.{k}.) -> the main layers' spelling of layer n
    for k in range(layout.mtp_layers):
        own, main = layout.mtp_layer_prefix(k), f"{layout.mtp_disk_layers}{layout.num_layers + k}."
        if own != main:
            aliases[own] = main
    mtp_own = tuple(layout.mtp_prefix(k) for k in range(layout.mtp_layers))
    for base, parts in group_parts(list(ckpt.infos), fmt).items():
        source = next((main + base[len(own):] for own, main in aliases.items() if base.startswith(own)), base)
        target, pattern = rename_source_key(source, renamings, converters, model.base_model_prefix, meta)
        if target not in meta and base in meta:
            target, pattern = base, None
        if target in owner:
            moe = owner[target]
            part = "experts" if target.startswith(moe.experts + ".") else "router"
            ops = by_pattern[pattern].operations if pattern is not None else []
            if any(isinstance(op, MergeModulelist) for op in ops):
                span = _expert_span(pattern, source)
                if span is None:
                    raise UserError(f"{base}: cannot find its expert index in transformers' pattern {pattern!r}")
                shift = len(base) - len(source)  # where an aliased (MTP) name is longer or shorter
                span = (span[0] + shift, span[1] + shift)
                expert = int(base[span[0]:span[1]])
                if not 0 <= expert < E:
                    raise UserError(f"{base} is expert {expert}, but config.json says {E} experts; the "
                                    "checkpoint and its config.json disagree")
                seen.setdefault(target, set()).add(expert)
                role = Role("expert", moe.index, expert, span, part=part, model=target)
            else:
                axis = disk_axis(ops, moe.tensors[target], base)
                extra = moe.extra.get(target, 0)
                role = Role("rows", moe.index, axis=axis, part=part, model=target, extra=extra)
                for kind, stored in parts.items():
                    companion = _companion_role(kind, ckpt.infos[stored], ckpt.infos[parts["values"]].shape, axis,
                                                E + extra, role)
                    if companion is None:
                        shape = ckpt.infos[stored].shape
                        slots = f"{E} experts" + (f" + {extra} other slots" if extra else "")
                        raise UserError(f"{stored} has shape {list(shape)}: expected {slots} along dimension "
                                        f"{axis} (it loads into transformers' {target}); the checkpoint and its "
                                        "config.json disagree")
                    roles[stored] = companion
        elif target in ids:
            role = Role("ids", ids[target].index, part="router", model=target)
        elif target in meta:
            role = Role("other", model=target)
        elif mtp_own and base.startswith(mtp_own):  # an MTP module's own projection and norms: kept as they are
            role = Role("other")
        else:
            m = layer_re.match(target)
            if (m and int(m[1]) >= layout.num_layers) or target.startswith("mtp.") or ".mtp." in target:
                # a buffer if the decoder layers hold a buffer of the same name (a correction bias)
                tail = "." + ".".join(target.split(".")[-2:])
                role = Role("mtp", model=target, buffer=any(b.endswith(tail) for b in buffers))
            else:
                inside = next((mo for mo in layout.moe.values() if target.startswith(mo.block + ".")), None)
                if inside is not None and not target.endswith("inv_freq"):
                    raise UserError(f"{base} lies in the MoE block of layer {inside.index} but transformers' "
                                    f"{layout.model_class} has no tensor {target}; reap would not know how to prune "
                                    "it (is config.json from another version of the model?)")
                role = Role("other", model=None)
        if role.model in buffers:
            role = replace(role, buffer=True)
        problem = companion_problem(fmt, base, {k: ckpt.infos[n] for k, n in parts.items()})
        if problem is not None:
            raise UserError(f"{problem}: the checkpoint is incomplete or does not match its quantization config "
                            f"({fmt.name})")
        for stored in parts.values():
            if role.kind == "rows" and stored in roles:  # a companion of fused experts: its own role, set above
                roles[stored] = replace(roles[stored], buffer=role.buffer or roles[stored].buffer)
            else:
                roles[stored] = role
    for target, found in seen.items():
        if len(found) != E:
            missing = sorted(set(range(E)) - found)
            raise UserError(f"the checkpoint holds {len(found)} of the {E} experts of {target} (missing e.g. expert "
                            f"{missing[0]}); a shard is missing or the index is from another download")
    loaded = {r.model for r in roles.values() if r.model}
    for moe in layout.moe.values():
        absent = [n for n in moe.tensors if n not in loaded]
        if absent:
            raise UserError(f"layer {moe.index}: no stored tensor loads into transformers' {absent[0]}: the checkpoint "
                            f"does not match its config.json (model_type {layout.family!r}) or is incomplete")
    return replace(layout, roles=roles, format=fmt)


def _companion_role(kind: str, info, values_shape: tuple[int, ...], axis: int, E: int, rows: Role) -> Role | None:
    """The role of one stored part of fused experts (``rows``: the values' role): sliced along ``axis`` like the
    values when it has the E experts there; a ``weight_shape`` holding E at ``axis`` has that value rewritten
    (``shape``); one scale shared by every expert (a per-tensor or global scale, an activation scale) is copied as it
    is (``other``, still loaded with its layer). None: it does not fit the experts."""
    from dataclasses import replace

    shape = tuple(info.shape)
    if len(shape) > axis and shape[axis] == E and not (kind == "shape" and len(shape) == 1):
        return rows
    if kind == "shape" and shape == (len(values_shape),):
        return replace(rows, kind="shape")
    if kind != "values" and (all(d == 1 for d in shape) or (len(shape) > axis and shape[axis] == 1)):
        return replace(rows, kind="other", axis=None)
    return None


def mtp_modules(layout: Layout, names) -> tuple[MtpStyle | None, int, str]:
    """(style, count, stored prefix of the main layers) of the MTP modules stored beside the decoder layers: a
    style's projection present for module 0, modules counted while their projection and decoder layer are there."""
    disk = ""
    for name in names:
        m = re.match(r"^(.*\.)(\d+)\.", name)
        if m and "layers." in m[1] and int(m[2]) < layout.num_layers:
            disk = m[1]
            break
    for style in MTP_STYLES:
        probe = replace(layout, mtp_style=style, mtp_disk_layers=disk)
        count = 0  # a module counts while its projection and its decoder layer are stored (Qwen3-Next's own
        while (f"{probe.mtp_prefix(count)}{style.proj}.weight" in names  # prefix is the same for every module)
               and any(n.startswith(probe.mtp_layer_prefix(count)) for n in names)):
            count += 1
        if count:
            return style, count, disk
    return None, 0, disk
