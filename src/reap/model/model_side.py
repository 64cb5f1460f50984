"""The model side of a :class:`reap.model.arch.Layout`: the MoE structure read off transformers' meta model.

:func:`derive_model` builds transformers' model for ``config.json`` on the meta device (:func:`reap.model.arch.build_model`)
and finds on it:

* the decoder stack (the ``layers`` ModuleList that holds the most experts modules) and, per layer, the experts
  module (:func:`is_experts_module`: transformers' standard experts interface) and its parent, the MoE block;
* the *count keys* and the expert axis: the model is built again with each ``config.json`` entry equal to the
  expert count doubled (aliases of one config attribute together, nested ``text_config`` included); the entries
  that double the experts modules' count are the count keys, and every tensor whose shape follows along one
  dimension is an expert tensor along it (router rows, correction biases, fused experts and their biases);
  integer tensors of an MoE block that do not follow it are expert-id tables;
* the router's ``[E, H]`` weight, top-k and groups (:data:`reap.model.arch.TOP_K_ATTRS` and its siblings, on the block,
  its children or the text config), the experts' intermediate size, the MTP count keys present.

The disk side (which stored tensor loads into which of these) is :mod:`reap.model.disk_side`.

Legend: E experts, H hidden.
"""

from __future__ import annotations

import copy
from typing import Any

from reap.model.arch import (MTP_KEYS, N_GROUP_ATTRS, TOP_K_ATTRS, TOPK_GROUP_ATTRS, Layout, MoELayer, build_config,
                       build_model, model_class)
from reap.core.errors import UserError


def is_experts_module(module) -> bool:
    """A module on transformers' standard experts interface (``@use_experts_implementation`` sets these)."""
    return all(hasattr(module, a) for a in ("has_gate", "is_transposed", "num_experts"))


def _experts_by_layer(model) -> tuple[str, dict[int, str]]:
    """(path of the decoder stack, {layer: experts module path}) for the stack that holds the most MoE layers."""
    import torch

    stacks: dict[str, dict[int, str]] = {}
    lists = {name for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)}
    for name, module in model.named_modules():
        if not is_experts_module(module):
            continue
        parts = name.split(".")
        for i in range(len(parts) - 1, 0, -1):
            if parts[i].isdigit() and ".".join(parts[:i]) in lists:
                stacks.setdefault(".".join(parts[:i]), {}).setdefault(int(parts[i]), [])
                stacks[".".join(parts[:i])][int(parts[i])].append(name)
                break
    if not stacks:
        if type(model)._can_set_experts_implementation():  # the family has experts, this config builds none
            n = getattr(model.config.get_text_config(), "num_hidden_layers", "?")
            raise UserError(f"no decoder layer of this checkpoint has experts: config.json makes all {n} layers of "
                            f"{type(model).__name__} dense (e.g. first_k_dense_replace >= num_hidden_layers), so "
                            "there is nothing to prune")
        text = model.config.get_text_config()
        if not any("expert" in k and isinstance(v, int) and not isinstance(v, bool) and v > 1
                   for k, v in text.to_dict().items()):
            raise UserError(f"a dense model ({type(model).__name__}, model_type {model.config.model_type!r}): no "
                            "experts to prune; reap prunes Mixture-of-Experts models")
        raise UserError(f"transformers' {type(model).__name__} has no experts module on its standard experts "
                        "interface (@use_experts_implementation), so reap cannot stream or prune it; such models "
                        "are listed as not supported by `reap inspect --families`")
    path = max(stacks, key=lambda p: (len(stacks[p]), p.endswith("language_model.layers")))
    layers = stacks[path]
    many = {i: names for i, names in layers.items() if len(names) > 1}
    if many:
        i, names = next(iter(many.items()))
        raise UserError(f"layer {i} has {len(names)} experts modules ({', '.join(names)}); reap prunes one MoE "
                        "block per decoder layer")
    return path, {i: names[0] for i, names in layers.items()}


def _count_candidates(config: dict[str, Any], num_experts: int) -> list[tuple[str, ...]]:
    """config.json key paths (top level and one nested object, e.g. text_config) whose value is the expert count."""
    out = []
    for key, value in config.items():
        if isinstance(value, int) and not isinstance(value, bool) and value == num_experts:
            out.append((key,))
        elif isinstance(value, dict):
            out += [(key, k) for k, v in value.items()
                    if isinstance(v, int) and not isinstance(v, bool) and v == num_experts]
    return out


def _alias_groups(cfg, paths: list[tuple[str, ...]]) -> list[list[tuple[str, ...]]]:
    """Candidate key paths grouped by the config attribute they set (``attribute_map`` aliases: Qwen3-MoE's
    ``num_local_experts`` is ``num_experts``), so that aliases are probed together."""
    groups: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
    for path in paths:
        owner = cfg if len(path) == 1 else getattr(cfg, path[0], None)
        attr = getattr(type(owner), "attribute_map", {}).get(path[-1], path[-1]) if owner is not None else path[-1]
        groups.setdefault((*path[:-1], attr), []).append(path)
    return list(groups.values())


def _set_paths(config: dict[str, Any], paths: list[tuple[str, ...]], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(config)
    for path in paths:
        node = out
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return out


def _shapes(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _attr(modules, names: tuple[str, ...]) -> int | None:
    for module in modules:
        for name in names:
            value = getattr(module, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def derive_model(config: dict[str, Any], cls=None):
    """(Layout without roles, meta model, its config): the MoE structure of the model ``config.json`` describes
    (as transformers' class ``cls``; by default the one its ``architectures`` names, else the causal LM)."""
    cfg = build_config(config)
    cls = cls or model_class(cfg, config)
    model = build_model(cfg, cls)
    layers_path, experts = _experts_by_layer(model)
    modules = dict(model.named_modules())
    counts = {modules[p].num_experts for p in experts.values()}
    if len(counts) != 1:
        raise UserError(f"the MoE layers have different expert counts ({sorted(counts)}); reap prunes models with "
                        "one expert count")
    E = counts.pop()
    shapes = _shapes(model)
    count_keys, axes, extra = [], {}, {}
    for paths in _alias_groups(cfg, _count_candidates(config, E)):
        try:
            probe = build_model(build_config(_set_paths(config, paths, 2 * E)), cls)
        except Exception:  # noqa: BLE001 - a key that cannot double is not the expert count
            continue
        probe_modules = dict(probe.named_modules())
        if not all(getattr(probe_modules.get(p), "num_experts", None) == 2 * E for p in experts.values()):
            continue
        count_keys += paths
        for name, shape in _shapes(probe).items():
            before = shapes.get(name)
            if before is None or before == shape:
                continue
            dims = [d for d in range(len(shape)) if len(before) == len(shape) and before[d] != shape[d]]
            # E experts along one axis, maybe followed by slots that are not experts (E + X -> 2E + X)
            if len(dims) != 1 or shape[dims[0]] - before[dims[0]] != E or before[dims[0]] < E:
                raise UserError(f"transformers' tensor {name} changes from {list(before)} to {list(shape)} when the "
                                f"expert count doubles; reap only slices tensors along one expert axis")
            axes[name] = dims[0]
            if before[dims[0]] > E:
                extra[name] = before[dims[0]] - E
    if not count_keys:
        raise UserError(f"no config.json entry holds the expert count {E} that transformers' {type(cfg).__name__} "
                        "builds the experts with (a default: the count is missing); add the checkpoint's expert count "
                        "to config.json under the key its model card names")
    moe = {}
    text_cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    meta = model.state_dict()
    for layer, path in sorted(experts.items()):
        block = path.rpartition(".")[0]
        tensors = {n: a for n, a in axes.items() if n.startswith(block + ".")}
        outside = [n for n in axes if n.startswith(f"{layers_path}.{layer}.") and n not in tensors]
        if outside:
            raise UserError(f"layer {layer}: {outside[0]} follows the expert count but is outside the MoE block "
                            f"{block}; reap does not know how to prune it")
        ids = tuple(n for n, t in meta.items() if n.startswith(block + ".") and n not in tensors
                    and not t.is_floating_point())
        router = next((n for n in tensors if not n.startswith(path + ".") and len(shapes[n]) == 2
                       and tensors[n] == 0 and shapes[n][1] == text_cfg.hidden_size), None)
        if any(n.startswith(path + ".") for n in tensors if n in extra):
            name = next(n for n in tensors if n in extra and n.startswith(path + "."))
            raise UserError(f"transformers' experts tensor {name} holds {extra[name]} slots beyond the {E} experts; "
                            "reap prunes experts modules that hold the experts only")
        moe[layer] = MoELayer(layer, block, path, tensors, ids, router, {n: x for n, x in extra.items() if n in tensors})
    stray = [n for n in axes if not any(n in m.tensors for m in moe.values())]
    if stray:
        raise UserError(f"{stray[0]} follows the expert count but lies outside every decoder layer's MoE block; "
                        "reap does not know which layer's choice applies to it")
    first = moe[min(moe)]
    block_modules = [modules[first.block], *modules[first.block].children()]
    top_k = _attr(block_modules, TOP_K_ATTRS) or _attr([text_cfg], TOP_K_ATTRS)
    if top_k is None:
        raise UserError(f"cannot tell top-k from transformers' {type(modules[first.block]).__name__} (no attribute "
                        f"{'/'.join(TOP_K_ATTRS)}); add the attribute name to TOP_K_ATTRS in src/reap/model/arch.py")
    n_group = _attr(block_modules, N_GROUP_ATTRS) or _attr([text_cfg], N_GROUP_ATTRS) or 1
    topk_group = _attr(block_modules, TOPK_GROUP_ATTRS) or _attr([text_cfg], TOPK_GROUP_ATTRS) or 1
    experts_mod = modules[first.experts]
    intermediate = getattr(experts_mod, "intermediate_dim", None) or getattr(experts_mod, "intermediate_size", 0)
    down = getattr(experts_mod, "down_proj", None)
    if not intermediate and getattr(down, "dim", lambda: 0)() == 3:  # [E, H, I], or [E, I, H] when transposed
        intermediate = down.shape[-2] if experts_mod.is_transposed else down.shape[-1]
    # the decoder layers transformers builds (LongCat-Flash's num_hidden_layers counts two sublayers per layer)
    built = len(model.get_submodule(layers_path))
    num_layers = min(getattr(text_cfg, "num_hidden_layers", None) or built, built)
    layout = Layout(
        family=str(config.get("model_type")), model_type=cfg.model_type, model_class=cls.__name__,
        layers_path=layers_path, num_layers=int(num_layers), num_experts=E, top_k=int(top_k),
        hidden_size=int(text_cfg.hidden_size), count_keys=tuple(count_keys), moe=moe,
        n_group=n_group if n_group > 1 else 1, topk_group=topk_group if n_group > 1 else 1,
        expert_intermediate=int(intermediate or 0),
        mtp_keys=tuple(k for k in MTP_KEYS if isinstance(config.get(k), int) and config.get(k)),
    )
    return layout, model, cfg
