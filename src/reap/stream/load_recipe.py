"""Loading a decoder layer without transformers' generic loader: a recipe learned from its own load of a layer like it.

transformers' loader (``convert_and_load_state_dict_in_model``) renames every stored tensor, matches it against
its conversion mapping's patterns and deep-copies a converter per tensor: for a layer of 256 experts that is
~0.1-0.3 s of Python per layer, run on the prefetch thread while the previous layer computes, and the compute
thread, which launches its kernels under the same GIL, runs several times slower meanwhile. The layers of a model
are alike, so reap lets transformers load the first layer of each kind and learns from what it did:

* :func:`learn`: for every parameter (and stored buffer) of the loaded layer, which of the layer's tensors it was
  made from and how, out of a few candidates (the tensor itself, transposed or reshaped; per-expert tensors
  stacked in expert order, several such stacks concatenated, maybe transposed: what transformers'
  ``MergeModulelist``/``Concatenate``/``Transpose`` do), each candidate checked *bit for bit* against what
  transformers loaded. A parameter no candidate reproduces makes the layer kind keep transformers' loader.
* :meth:`Recipe.apply`: the next layer of that kind (the same tensor names but for the layer index, the same
  shapes and dtypes) is built by the recipe: a handful of tensor operations, no per-tensor Python beyond a dict
  lookup.

So transformers stays the authority on what a checkpoint's tensors mean (its conversion mapping and dtype plan);
reap only repeats, for each further layer, what it was seen to do for the first. ``REAP_LOADER=transformers``
in the environment switches the recipes off (every layer through transformers' loader).

Legend: E experts.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from dataclasses import dataclass

import torch

#: the environment variable that, set to ``transformers``, loads every layer with transformers' own loader
ENV = "REAP_LOADER"


def enabled() -> bool:
    return os.environ.get(ENV, "").strip().lower() != "transformers"


def normalize(name: str, layer: int) -> str:
    """``name`` with its layer index (its first path component equal to ``layer``) written ``#``."""
    return re.sub(rf"(^|\.){layer}(\.|$)", r"\1#\2", name, count=1)


def normalized(state: dict[str, torch.Tensor], layer: int) -> dict[str, str]:
    """Layer ``layer``'s tensor names, normalized (:func:`normalize`) -> as they are in ``state``."""
    return {normalize(k, layer): k for k in state}


def signature(state: dict[str, torch.Tensor], names: dict[str, str]) -> tuple:
    """What makes two layers alike for a recipe: tensor names (``names``: :func:`normalized`), shapes and dtypes."""
    return tuple(sorted((n, tuple(state[k].shape), state[k].dtype) for n, k in names.items()))


@dataclass(frozen=True)
class Step:
    """How one model tensor (``target``, relative to its layer) is made from the layer's tensors ``sources``
    (normalized names; per expert group, in expert order)."""

    target: str
    buffer: bool
    dtype: torch.dtype
    shape: tuple[int, ...]
    sources: tuple[tuple[str, ...], ...]  # one tuple per group (a group: one tensor, or one projection's experts)
    stack: bool  # each group is stacked along a new dim 0 (per-expert tensors)
    cat: int | None  # the groups are concatenated along this dim (None: one group)
    transpose: bool  # the result's last two dims are swapped
    reshape: bool  # the result is reshaped to ``shape``
    contiguous: bool = True  # as transformers left it (a transposed view stays one)

    def build(self, tensors: list[list[torch.Tensor]]) -> torch.Tensor:
        """The model tensor from the source tensors, grouped as ``sources``."""
        parts = [torch.stack([t.to(self.dtype) for t in g]) if self.stack else g[0].to(self.dtype) for g in tensors]
        out = torch.cat(parts, dim=self.cat) if self.cat is not None else parts[0]
        if self.transpose:
            out = out.transpose(-2, -1)
        if self.reshape:
            out = out.reshape(self.shape)
        return out.contiguous() if self.contiguous else out


def _shape(step: Step, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    """The shape ``step`` builds from tensors of these (normalized name -> shape) shapes, before any reshape;
    None where it cannot run."""
    parts = []
    for g in step.sources:
        s = [shapes[n] for n in g]
        if step.stack:
            if len(set(s)) != 1:
                return None
            parts.append((len(g), *s[0]))
        else:
            parts.append(s[0])
    shape = parts[0]
    if step.cat is not None:
        d = step.cat
        if len({len(s) for s in parts}) != 1 or d >= len(shape) or len({s[:d] + s[d + 1:] for s in parts}) != 1:
            return None
        shape = shape[:d] + (sum(s[d] for s in parts),) + shape[d + 1:]
    if step.transpose:
        if len(shape) < 2:
            return None
        shape = shape[:-2] + (shape[-1], shape[-2])
    return shape


def _candidates(target: str, buffer: bool, want: torch.Tensor, groups: list[tuple[str, ...]], stack: bool,
                shapes: dict[str, tuple[int, ...]]) -> list[Step]:
    """The recipes that build a tensor of ``want``'s shape from ``groups`` (normalized names); reshaping ones
    only where none builds that shape as it is."""
    orders = list(itertools.permutations(groups)) if len(groups) <= 3 else [tuple(groups)]
    cats = [None] if len(groups) == 1 else list(range(want.dim()))
    exact, reshaped = [], []
    for order, cat, transpose in itertools.product(orders, cats, (False, True)):
        step = Step(target, buffer, want.dtype, tuple(want.shape), tuple(order), stack, cat, transpose, False)
        if transpose and 1 in (_shape(dataclasses.replace(step, transpose=False), shapes) or (1,))[-2:]:
            continue  # swapping a dim of size 1 only reshapes: the same tensor as a reshaping candidate's
        shape = _shape(step, shapes)
        if shape == tuple(want.shape):
            exact.append(step)
        elif shape is not None and torch.Size(shape).numel() == want.numel():
            reshaped.append(Step(target, buffer, want.dtype, tuple(want.shape), tuple(order), stack, cat, transpose,
                                 True))
    return exact or reshaped


@dataclass(frozen=True)
class Recipe:
    """How transformers loaded one kind of layer: a :class:`Step` per model tensor."""

    steps: tuple[Step, ...]

    def apply(self, module: torch.nn.Module, state: dict[str, torch.Tensor], names: dict[str, str]) -> None:
        """Build every model tensor of decoder layer ``module`` from its tensors ``state`` (``names``: their
        :func:`normalized` names)."""
        for step in self.steps:
            built = step.build([[state[names[n]] for n in g] for g in step.sources])
            owner_path, _, leaf = step.target.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            if step.buffer:
                owner._buffers[leaf] = built
            else:
                owner._parameters[leaf] = torch.nn.Parameter(built, requires_grad=False)


def learn(module: torch.nn.Module, prefix: str, state: dict[str, torch.Tensor], targets: dict[str, tuple],
          layer: int) -> tuple[Recipe | None, str]:
    """The recipe of decoder layer ``module`` (model path ``prefix``, ending in a dot), just loaded by transformers
    from ``state``, or None with the reason. ``targets``: for each key of ``state``, (the model tensor it loads
    into, its expert index or None, its name with the expert index written ``*`` or None), from the checkpoint's
    layout. A recipe is kept only where exactly one candidate reproduces each tensor: where several do (a tensor of
    zeros, say), which one transformers did is not known, and the layer kind keeps transformers' loader."""
    loaded = {n: (t, False) for n, t in module.named_parameters() if t.device.type != "meta"}
    by_target: dict[str, list[str]] = {}
    for key in state:
        target = targets.get(key, (None,))[0]
        if target is None or not target.startswith(prefix):
            return None, f"{key} loads into no tensor of this layer"
        by_target.setdefault(target[len(prefix):], []).append(key)
    for rel in by_target:
        if rel not in loaded:
            owner_path, _, leaf = rel.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            if owner._buffers.get(leaf) is None or owner._buffers[leaf].device.type == "meta":
                return None, f"transformers loaded nothing into {rel}"
            loaded[rel] = (owner._buffers[leaf], True)
    names = normalized(state, layer)
    norm = {k: n for n, k in names.items()}
    shapes = {n: tuple(state[k].shape) for n, k in names.items()}
    steps = []
    for rel, keys in sorted(by_target.items()):
        want, buffer = loaded[rel]
        info = [targets[k] for k in keys]
        stack = len(keys) > 1 and all(e[1] is not None for e in info)
        if stack:
            groups_by: dict[str, list[tuple[int, str]]] = {}
            for k, (_, expert, group) in zip(keys, info):
                groups_by.setdefault(group, []).append((expert, norm[k]))
            groups = [tuple(n for _, n in sorted(v)) for _, v in sorted(groups_by.items())]
        else:
            groups = [(norm[k],) for k in sorted(keys)]
        hits = []
        for step in _candidates(rel, buffer, want, groups, stack, shapes):
            built = step.build([[state[names[n]] for n in g] for g in step.sources])
            if built.dtype == want.dtype and torch.equal(built, want):
                hits.append(step)
            del built
        hits = [dataclasses.replace(h, contiguous=want.is_contiguous()) for h in hits]
        if len(hits) != 1:
            return None, (f"no recipe reproduces transformers' {rel} from {len(keys)} tensor(s)" if not hits else
                          f"{len(hits)} recipes reproduce transformers' {rel} (its values cannot tell them apart)")
        steps.append(hits[0])
    return Recipe(tuple(steps)), ""
