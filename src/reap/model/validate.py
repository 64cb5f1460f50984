"""Validation of the checkpoint against transformers' model, before any byte is written (the shard headers and the
shards together are checked as they are read: :mod:`reap.io.headers`).

* :func:`check_layout` (with the :class:`reap.model.arch.Layout`): per-expert tensors of one kind have one shape and
  dtype across the experts of a layer; every decoder layer's stored tensors fit transformers' model built from
  ``config.json`` (a dry run of transformers' own loader on meta tensors: its renamings, merges and transposes,
  nothing read or allocated; layers whose stored and model shapes repeat are checked once); every router row
  and correction bias is finite (these are read: a few MB per layer).

The expert count on disk against config.json (more experts stored than the config says, or fewer) is checked
by :func:`reap.model.disk_side.map_checkpoint` as it gives every stored tensor its role. Every failure is a
:class:`reap.core.errors.UserError` naming the tensor and the shard.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any

from reap.core.errors import UserError
from reap.io.headers import torch_dtypes

if TYPE_CHECKING:
    import torch

    from reap.model.arch import Layout
    from reap.io.checkpoint import Checkpoint

# -- the checkpoint against transformers' model ---------------------------------------------------------------
def derive_checked(ckpt: "Checkpoint", with_model: bool = False, keep_mtp: bool = True):
    """:func:`reap.model.derive.derive` plus :func:`check_layout`: the layout of a checkpoint that passed every check (and
    with ``with_model`` transformers' meta model it was derived from: ``(layout, model)``). ``keep_mtp``: as in
    :func:`reap.model.derive.derive` (False: multi-token-prediction modules are left out of the pruned output)."""
    from reap.model.derive import derive_with_model

    layout, model = derive_with_model(ckpt, keep_mtp)
    check_layout(ckpt, layout, model)
    return (layout, model) if with_model else layout


def check_layout(ckpt: "Checkpoint", layout: "Layout", model) -> None:
    """Expert tensors equal across experts, every layer loadable by transformers' model ``model`` (the meta model
    the layout was derived from), routers and correction biases finite."""
    _experts_alike(ckpt, layout)
    _dry_run(ckpt, layout, model)
    _routers_finite(ckpt, layout)


def _experts_alike(ckpt: "Checkpoint", layout: "Layout") -> None:
    """Per-expert tensors (``experts.{e}.w1``): one shape and dtype per kind and layer, across its experts."""
    first: dict[tuple, tuple[str, tuple, str]] = {}
    for name, role in layout.roles.items():
        if role.kind != "expert" or role.span is None:
            continue
        s, e = role.span
        kind = (role.layer, name[:s] + "*" + name[e:])
        info = ckpt.infos[name]
        seen = first.setdefault(kind, (name, info.shape, info.dtype))
        if (info.shape, info.dtype) != seen[1:]:
            raise UserError(f"{name} in {info.shard} is {info.dtype}{list(info.shape)} but {seen[0]} (the same tensor "
                            f"of another expert) is {seen[2]}{list(seen[1])}; every expert of a layer has the same "
                            "shapes: the shard is damaged or from another model, re-download it")


def _layer_of(layout: "Layout", target: str) -> int | None:
    prefix = layout.layers_path + "."
    if target.startswith(prefix):
        head = target[len(prefix):].partition(".")[0]
        return int(head) if head.isdigit() else None
    return None


def _dry_run(ckpt: "Checkpoint", layout: "Layout", model) -> None:
    """Every group of stored tensors (the part outside the decoder layers, each layer) loaded into transformers'
    model by its own loader on meta tensors: conversion failures, shape mismatches and tensors it does not expect
    are the checkpoint not matching its config.json. Layers whose stored tensors and model tensors have the same
    names (layer index aside) and shapes give the same answer and are loaded once."""
    import torch

    DTYPES = torch_dtypes()
    from reap.formats import dequantize, group_parts

    groups: dict[Any, list[str]] = {}
    for name, role in layout.roles.items():
        if role.model is None or role.kind == "mtp":
            continue  # never loaded by transformers (rotary buffers stored by old releases, MTP modules)
        groups.setdefault(_layer_of(layout, role.model), []).append(name)
    model_shapes: dict[Any, list] = {}
    for key, t in model.state_dict().items():
        model_shapes.setdefault(_layer_of(layout, key), []).append((key, tuple(t.shape)))
    done: set = set()
    aliases = {layout.mtp_layer_prefix(k): f"{layout.mtp_disk_layers}{layout.num_layers + k}."  # mtp.layers.{k}.
               for k in range(layout.mtp_layers) if layout.mtp_layer_prefix(k) != f"{layout.mtp_disk_layers}{layout.num_layers + k}."}
    for layer, names in sorted(groups.items(), key=lambda kv: (kv[0] is not None, kv[0] or 0)):
        if layer is not None:
            strip = re.compile(re.escape(f"{layout.layers_path}.{layer}."))
            signature = (tuple(sorted((strip.sub("L.", n, count=1), ckpt.infos[n].shape, ckpt.infos[n].dtype)
                                      for n in names)),
                         tuple(sorted((strip.sub("L.", k, count=1), s) for k, s in model_shapes.get(layer, []))))
            if signature in done:
                continue
            done.add(signature)
        state = {}
        for base, parts in group_parts(names, layout.format).items():
            stored = {}
            for part, n in parts.items():
                info = ckpt.infos[n]
                dtype = DTYPES.get(info.dtype)
                if dtype is None:  # a dtype torch cannot hold: transformers could not load it either
                    raise UserError(f"{n} in {info.shard} is stored as {info.dtype}, which torch cannot load; the "
                                    "checkpoint cannot be read by transformers")
                if part == "shape":  # a logical-shape companion (compressed-tensors weight_shape) holds values the
                    continue  # dequantizer would read; without it the packed width gives the shape
                stored[part] = torch.empty(info.shape, dtype=dtype, device="meta")
            try:
                state[base] = (dequantize(stored, layout.format, torch.float32, ckpt.config, base)
                               if "scale" in stored else stored["values"])
            except UserError:
                raise
            except Exception as err:  # noqa: BLE001 - a companion that does not fit its values
                info = ckpt.infos[parts["values"]] if "values" in parts else ckpt.infos[next(iter(parts.values()))]
                raise UserError(f"{base} in {info.shard}: its stored parts do not fit together "
                                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); the "
                                "shard is damaged or from another model") from None
        state = {next((main + key[len(own):] for own, main in aliases.items() if key.startswith(own)), key): t
                 for key, t in state.items()}  # MTP decoder layers stored apart, spelled as transformers' layer n
        _load_meta(ckpt, layout, model, state, layer)


def _load_meta(ckpt: "Checkpoint", layout: "Layout", model, state: dict, layer: int | None) -> None:
    import torch
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers logs what this function reports itself
    try:
        info, _ = convert_and_load_state_dict_in_model(
            model, state, LoadStateDictConfig(weight_mapping=get_model_conversion_mapping(model),
                                              device_map={"": torch.device("meta")}, dtype=torch.float32,
                                              dtype_plan=model._get_dtype_plan(torch.float32)))
    except Exception:  # noqa: BLE001 - a conversion that needs real data: this dry run cannot tell, the loader will
        return
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()

    what = "the tensors outside the decoder layers" if layer is None else f"layer {layer}"

    def stored(target: str) -> str:
        names = sorted(n for n, r in layout.roles.items() if r.model == target)
        if not names:
            return f"the stored tensors of {what}"
        return f"{names[0]} in {ckpt.infos[names[0]].shard}" + (f" (and {len(names) - 1} more)" if len(names) > 1
                                                                 else "")

    fix = "the checkpoint does not match its config.json (is one of them from another model or version?)"
    if info.conversion_errors:
        target, err = next(iter(sorted(info.conversion_errors.items())))
        text = str(err).strip().splitlines()
        raise UserError(f"{stored(target)}: transformers cannot build its {target} from it ({text[-1] if text else err}); "
                        f"{fix}")
    if info.mismatched_keys:
        target, got, want = sorted(info.mismatched_keys, key=str)[0]
        raise UserError(f"{stored(target)}: it gives transformers' {target} the shape {list(got)}, where config.json "
                        f"makes it {list(want)}; {fix}")
    if info.unexpected_keys:
        name = sorted(info.unexpected_keys)[0]
        shard = ckpt.infos[name].shard if name in ckpt.infos else "its shard"
        raise UserError(f"{name} in {shard} loads into no tensor of transformers' {type(model).__name__}; {fix}")
    if layer is not None:
        absent = sorted(k for k in info.missing_keys if k.startswith(f"{layout.layers_path}.{layer}."))
        if absent and layer >= layout.num_layers:  # a multi-token-prediction module's decoder layer
            k = layer - layout.num_layers
            raise UserError(f"MTP module {k} ({layout.mtp_layer_prefix(k)}*): the checkpoint has no tensor for its "
                            f"decoder layer's {absent[0][len(f'{layout.layers_path}.{layer}.'):]}, so it cannot be "
                            "calibrated; pass --drop-mtp to leave the MTP module out of the pruned model")
        if absent:
            raise UserError(f"layer {layer}: the checkpoint has no tensor for transformers' {absent[0]}; a shard is "
                            "missing or the checkpoint does not match its config.json")


def _routers_finite(ckpt: "Checkpoint", layout: "Layout") -> None:
    """Router rows and correction biases (every floating tensor of part ``router``) hold finite values only."""
    import torch

    for name, role in layout.roles.items():
        if role.part != "router" or role.kind not in ("rows", "expert"):
            continue
        info = ckpt.infos[name]
        if not info.dtype.startswith(("F", "BF")) or info.numel == 0:
            continue
        t = _read(ckpt, info).float()
        bad = ~torch.isfinite(t)
        if bad.any():
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            index = [int(i) for i in bad.nonzero()[0].tolist()]
            axis = role.axis if role.kind == "rows" and role.axis is not None else None
            expert = f", expert {index[axis]}" if axis is not None and axis < len(index) else ""
            kinds = " and ".join(f"{n} {k}" for n, k in ((nan, "NaN"), (inf, "infinite")) if n)
            raise UserError(f"{name} in {info.shard} holds {kinds} value(s) (first at index {index}{expert}); a "
                            "router with non-finite values routes nothing sensibly: the shard is damaged, re-download "
                            "it")


def _read(ckpt: "Checkpoint", info) -> "torch.Tensor":
    """One stored tensor, read with plain reads (no memory map of a shard that may be hundreds of GB)."""
    import torch

    DTYPES = torch_dtypes()

    with open(ckpt.path / info.shard, "rb") as f:
        data = bytearray(os.pread(f.fileno(), info.nbytes, info.start))
    if len(data) != info.nbytes:
        raise UserError(f"{ckpt.path / info.shard} ended early while reading {info.name}; re-download that shard")
    raw = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return raw.view(DTYPES[info.dtype]).reshape(info.shape)
