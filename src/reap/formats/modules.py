"""The module lists of a quantization config after pruning: entries naming expert indices renumbered or dropped.

Quantization configs name modules: compressed-tensors ``ignore`` and ``config_groups.*.targets`` (``re:`` regexes
or exact names), ModelOpt ``exclude_modules`` (``*`` wildcards) and ``quantized_layers`` (a dict keyed by module
name), transformers' ``modules_to_not_convert`` (a regex from a module boundary, or a suffix). A list is rewritten
so that it selects, in the pruned checkpoint, exactly the modules it selected in the original (kept experts under
their new index): an entry that selects the same modules either way (``lm_head``, ``re:.*self_attn.*``) stays; one
naming an expert index (``model.layers.3.mlp.experts.17.down_proj``, or ``layers.*`` for every layer) is renumbered
per layer, expanded where the layers disagree, and dropped where the expert is pruned. Whatever cannot be
rewritten so (a regex over expert indices) is a UserError naming the entry. The result is checked module by
module: never left pointing at a different expert.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from typing import Any

from reap.core.errors import UserError

Matcher = Callable[[str, str], bool]  # (entry, module name) -> selected


def match_compressed_tensors(entry: str, name: str) -> bool:
    """compressed-tensors ``match_name``: ``re:`` + ``re.match``, else the exact name (class names never match a
    module name)."""
    return re.match(entry[3:], name) is not None if entry.startswith("re:") else entry == name


def match_wildcard(entry: str, name: str) -> bool:
    """ModelOpt ``exclude_modules``: shell wildcards over the whole name."""
    return fnmatch.fnmatchcase(name, entry)


def match_transformers(entry: str, name: str) -> bool:
    """transformers' ``should_convert_module``: a regex from the start up to a module boundary, or a suffix."""
    try:
        return re.match(rf"(?:{entry})(?:(?<=\.)|(?=\.|$))", name) is not None or name.endswith(entry)
    except re.error:
        return name.endswith(entry)


#: quantization-config keys that list modules, and how each is matched
LIST_KEYS: dict[str, Matcher] = {"ignore": match_compressed_tensors, "targets": match_compressed_tensors,
                                 "exclude_modules": match_wildcard, "modules_to_not_convert": match_transformers}
_EXPERT = re.compile(r"(experts(?:\\?\.))(\d+)(?=\\?\.|\$|$)")
_LAYER = re.compile(r"(layers(?:\\?\.))(\d+|\*)(?=\\?\.)")


def _selected(entries, matcher: Matcher, name: str) -> bool:
    return any(matcher(e, name) for e in entries)


def rewrite_entries(entries: list[str], matcher: Matcher, renames: dict[str, str | None],
                    new_id: dict[int, dict[int, int]], where: str) -> list[str]:
    """``entries`` for the pruned checkpoint. ``renames``: every module of the original -> its name after pruning
    (None: left out); ``new_id``: layer -> {kept original expert id: new id}."""
    expert_modules = [(old, new) for old, new in renames.items() if new != old]
    out: list[str] = []
    for entry in entries:
        if not isinstance(entry, str):
            out.append(entry)
            continue
        if all(matcher(entry, old) == matcher(entry, new) for old, new in expert_modules if new is not None) and \
                not _EXPERT.search(entry):
            out.append(entry)  # selects the same modules before and after
            continue
        out.extend(_renumbered(entry, new_id, where))
    kept = [(old, new) for old, new in renames.items() if new is not None]
    wrong = next((old for old, new in kept if _selected(entries, matcher, old) != _selected(out, matcher, new)), None)
    if wrong is not None:
        raise UserError(f"{where} lists {entries!r}; after pruning no list of entries reap can write selects the same "
                        f"modules (e.g. {wrong}, now {renames[wrong]}): rewrite the entries that name expert indices "
                        "as exact module names or drop them, then prune again")
    return out


def _renumbered(entry: str, new_id: dict[int, dict[int, int]], where: str) -> list[str]:
    """An entry naming one expert index, for the pruned checkpoint: per layer it names (one, or every MoE layer for
    ``layers.*``) the kept expert's new index; nothing where it is pruned."""
    experts, layers = list(_EXPERT.finditer(entry)), list(_LAYER.finditer(entry))
    if len(experts) != 1 or len(layers) > 1 or (layers and layers[0].end() > experts[0].start()):
        raise UserError(f"{where} entry {entry!r} selects experts by a pattern reap cannot renumber; name the "
                        "experts by exact module names (or drop the entry), then prune again")
    e = experts[0]
    old = int(e[2])
    if not layers:
        ids = {m.get(old) for m in new_id.values()}
        if len(ids) != 1:
            raise UserError(f"{where} entry {entry!r} names expert {old} of every layer, whose new index differs by "
                            "layer; add the layer to the entry (model.layers.N....), then prune again")
        new = ids.pop()
        return [] if new is None else [entry[: e.start(2)] + str(new) + entry[e.end(2):]]
    layer = layers[0]
    targets = sorted(new_id) if layer[2] == "*" else [int(layer[2])]
    if layer[2] == "*" and len({new_id[t].get(old) for t in targets}) == 1:  # the same in every layer: one entry
        new = new_id[targets[0]].get(old)
        return [] if new is None else [entry[: e.start(2)] + str(new) + entry[e.end(2):]]
    out = []
    for lay in targets:
        if lay not in new_id:  # a layer pruning leaves whole (dense, or not an MoE layer)
            out.append(entry if layer[2] != "*" else entry[: layer.start(2)] + str(lay) + entry[layer.end(2):])
            continue
        new = new_id[lay].get(old)
        if new is None:
            continue
        text = entry[: e.start(2)] + str(new) + entry[e.end(2):]
        out.append(text[: layer.start(2)] + str(lay) + text[layer.end(2):])
    return list(dict.fromkeys(out))


def rewrite_quantization(quant: dict[str, Any], renames: dict[str, str | None], new_id: dict[int, dict[int, int]],
                         where: str = "quantization_config") -> dict[str, Any]:
    """A quantization config (a ``config.json`` ``quantization_config`` or ``hf_quant_config.json``'s
    ``quantization``) with every module list and ``quantized_layers`` rewritten for the pruned checkpoint."""
    out = dict(quant)
    for key, value in quant.items():
        if key in LIST_KEYS and isinstance(value, list):
            out[key] = rewrite_entries(value, LIST_KEYS[key], renames, new_id, f"{where}.{key}")
        elif key == "quantized_layers" and isinstance(value, dict):
            layers = {}
            for name, cfg in value.items():
                new = renames.get(name, name)
                if new is not None:
                    layers[new] = cfg
            out[key] = layers
        elif key in ("config_groups", "quantization", "sparsity_config") and isinstance(value, dict):
            out[key] = {k: rewrite_quantization(v, renames, new_id, f"{where}.{key}.{k}") if isinstance(v, dict) else v
                        for k, v in value.items()} if key == "config_groups" else \
                rewrite_quantization(value, renames, new_id, f"{where}.{key}")
    return out


def named_experts(quant: Any) -> list[tuple[str, int]]:
    """(entry, expert index) for every module-list entry or ``quantized_layers`` key naming an expert index."""
    found: list[tuple[str, int]] = []
    if isinstance(quant, dict):
        for key, value in quant.items():
            if key in LIST_KEYS and isinstance(value, list):
                found += [(e, int(m[2])) for e in value if isinstance(e, str) for m in _EXPERT.finditer(e)]
            elif key == "quantized_layers" and isinstance(value, dict):
                found += [(k, int(m[2])) for k in value for m in _EXPERT.finditer(k)]
            elif isinstance(value, dict):
                found += named_experts(value)
    return found
