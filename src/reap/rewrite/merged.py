"""Merged experts and re-fit router rows, written in the checkpoint's own format (the rewrite's part of recovery).

A merged output expert (:class:`reap.selection.plan.OutputExpert` with several sources) is computed from the stored
tensors of its sources, tensor by tensor as the checkpoint stores them: each source's tensor dequantized to
float32 (:func:`reap.formats.dequantize`), its intermediate neurons permuted as the plan says (the axis whose
length is the experts' intermediate size; a down projection's bias has none), weighted and summed, then stored as
the source was: cast to its dtype (bf16 / fp16 / fp32), or quantized by the format's own ``quantize`` (FP8 block
weights get fresh block scales). A format without one is refused before anything is written
(:func:`check_recovery`). Re-fit router rows replace the kept rows of the router weight, cast to its stored dtype;
the slots after the experts stay as stored.

Legend: E experts, K' kept experts, H hidden, I expert intermediate.
"""

from __future__ import annotations

import threading
from typing import Any

from reap.core.errors import UserError
from reap.io.writer import Entry
from reap.model.arch import Layout
from reap.selection.plan import ExpertPlan

FLOAT_DTYPES = ("BF16", "F16", "F32")


def _torch_dtype(name: str):
    import torch

    return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F8_E4M3": torch.float8_e4m3fn,
            "F8_E5M2": torch.float8_e5m2}[name]


def _bytes(t) -> bytes:
    import torch

    t = t.detach().contiguous().cpu()
    return t.view(torch.uint8).numpy().tobytes() if t.element_size() else b""


def check_recovery(ckpt, spec: Layout, plan: ExpertPlan, router_rows: dict[int, Any]) -> None:
    """UserError (one line) where the merges or router rows of ``plan`` cannot be written in this checkpoint's
    format, before anything is written."""
    merging = [layer for layer in plan.moe_layers if plan.merges(layer)]
    if merging and spec.format is not None and spec.format.parts and spec.format.quantize is None:
        raise UserError(f"--merge writes merged experts as bf16/fp16/fp32 or FP8 block weights (fp8-block); this "
                        f"checkpoint is {spec.format.name}, which reap cannot quantize: prune without --merge")
    for name, role in spec.roles.items():
        if role.layer in merging and role.kind == "rows" and role.part == "experts" and \
                ckpt.infos[name].dtype not in FLOAT_DTYPES:
            raise UserError(f"--merge: {name} holds every expert of layer {role.layer} in one {ckpt.infos[name].dtype} "
                            "tensor; reap merges such fused experts in bf16/fp16/fp32 only: prune without --merge")
        if role.layer in router_rows and role.kind == "rows" and role.model == spec.moe[role.layer].router \
                and ckpt.infos[name].dtype not in FLOAT_DTYPES:
            raise UserError(f"--refit-router: the router weight {name} is stored as {ckpt.infos[name].dtype}; reap "
                            "writes re-fit rows in bf16/fp16/fp32 only: prune without --refit-router")


def neuron_index(shape: tuple[int, ...], intermediate: int, columns, perm, down: bool, bias: bool, name: str,
                 preferred: int | None = None):
    """(axis, index) that moves a source expert's neuron ``perm[n]`` to ``n`` in one of its stored tensors (``shape``,
    one expert's), or None for a tensor without intermediate neurons (a down projection's bias). The axis is the one
    whose length is the intermediate size I; else, for a fused gate/up tensor, the one of length c x I, its columns
    by neuron as the module reads them (``columns`` [I, c], :func:`reap.recover.weights.neurons`). Where two axes
    qualify (a square tensor), ``preferred`` (the module's own axis, for a tensor stored as the module holds it)
    decides."""
    import torch

    if down and bias:
        return None
    perm = torch.as_tensor(perm, dtype=torch.long)
    axes = [i for i, n in enumerate(shape) if n == intermediate]
    if len(axes) > 1 and preferred in axes:
        axes = [preferred]
    if len(axes) == 1:
        return axes[0], perm
    if not axes and columns is not None and not down:
        wide = [i for i, n in enumerate(shape) if n == columns.numel()]
        if len(wide) > 1 and preferred in wide:
            wide = [preferred]
        if len(wide) == 1:
            of_column = torch.empty(columns.numel(), dtype=torch.long)
            role = torch.empty_like(of_column)
            of_column[columns.reshape(-1)] = torch.arange(columns.shape[0]).repeat_interleave(columns.shape[1])
            role[columns.reshape(-1)] = torch.arange(columns.shape[1]).repeat(columns.shape[0])
            return wide[0], columns[perm[of_column], role]
    raise UserError(f"--merge: cannot tell the intermediate axis of {name} (one expert's shape {list(shape)}, "
                    f"experts' intermediate size {intermediate}); prune without --merge")


class MergedTensor:
    """One stored base tensor (its values and companions) of one merged output expert, computed on first use."""

    def __init__(self, ckpt, spec: Layout, sources: list[tuple[dict[str, str], float, tuple | None]], down: bool,
                 bias: bool, columns=None):
        self.ckpt, self.spec, self.sources, self.down, self.bias = ckpt, spec, sources, down, bias
        self.columns = columns
        self._parts: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def part(self, name: str) -> bytes:
        with self._lock:
            if self._parts is None:
                self._parts = self._compute()
            return _bytes(self._parts[name])

    def _compute(self) -> dict[str, Any]:
        import torch

        from reap.formats import dequantize

        fmt, total = self.spec.format, None
        first = self.sources[0][0]
        for parts, weight, perm in self.sources:
            t = dequantize({p: self.ckpt.tensor(n) for p, n in parts.items()}, fmt, torch.float32, self.ckpt.config,
                           parts["values"])
            if perm is not None:
                at = neuron_index(tuple(t.shape), self.spec.expert_intermediate, self.columns, perm, self.down,
                                  self.bias, parts["values"])
                if at is not None:
                    t = t.index_select(*at)
            total = weight * t if total is None else total + weight * t
        stored = {p: self.ckpt.infos[n] for p, n in first.items()}
        if "scale" not in stored:
            out = {first["values"]: total.to(_torch_dtype(stored["values"].dtype))}
        else:
            q = fmt.quantize(fmt, total, self.ckpt.config)
            out = {first[p]: q[p] for p in stored if p in q}
        for p, info in stored.items():
            got = out.get(first[p])
            if got is None or tuple(got.shape) != tuple(info.shape) or \
                    _torch_dtype(info.dtype) != got.dtype:
                raise UserError(f"--merge: the merged {p} of {first['values']} does not come out as stored "
                                f"({info.dtype} {list(info.shape)}); prune without --merge")
        return out


class Recovered:
    """The entries of one rewrite's merged experts and re-fit router rows (``router_rows``: layer -> [K', H])."""

    def __init__(self, ckpt, spec: Layout, plan: ExpertPlan, router_rows: dict[int, Any],
                 columns: dict[int, tuple[Any, bool]]):
        from reap.formats import group_parts

        self.ckpt, self.spec, self.plan, self.router_rows, self.columns = ckpt, spec, plan, router_rows, columns
        self.merges = {layer: plan.merges(layer) for layer in plan.moe_layers}
        self.out_of = {layer: {out.anchor: i for i, out in m.items()} for layer, m in self.merges.items()}
        fmt = spec.format
        self.group = {}  # stored name -> (base name, part)
        names = [n for n, r in spec.roles.items() if r.kind == "expert" and self.out_of.get(r.layer)]
        for base, parts in group_parts(names, fmt).items():
            for part, name in parts.items():
                self.group[name] = (base, part, parts)
        self._cache: dict[tuple[int, str], MergedTensor] = {}

    def expert_entry(self, info, role, new_name: str) -> Entry | None:
        """The entry of a merged expert's stored tensor (``info``, of the anchor), or None for a copy."""
        out_index = self.out_of.get(role.layer, {}).get(role.expert)
        if out_index is None:
            return None
        out = self.merges[role.layer][out_index]
        base, part, parts = self.group[info.name]
        s, e = role.span
        key = (role.layer, base)
        if key not in self._cache:
            sources = []
            for j, (src, weight) in enumerate(out.sources):
                named = {p: n[:s] + str(src) + n[e:] for p, n in parts.items()}
                missing = [n for n in named.values() if n not in self.ckpt.infos]
                if missing:
                    raise UserError(f"--merge: expert {src} of layer {role.layer} has no {missing[0]}; prune without "
                                    "--merge")
                sources.append((named, weight, out.permutation(j)))
            model = (role.model or "").rsplit(".", 1)[-1]
            self._cache[key] = MergedTensor(self.ckpt, self.spec, sources, "down" in model, model.endswith("bias"),
                                            self.columns.get(role.layer, (None, False))[0])
        merged = self._cache[key]
        return Entry(new_name, info.dtype, info.shape, info.nbytes, fetch=lambda: merged.part(info.name))

    def fused_entry(self, info, role) -> Entry | None:
        """A tensor holding every expert of a layer with merges (dense only: :func:`check_recovery`): its kept
        experts, the merged ones computed, or None where the layer has no merge."""
        merges = self.merges.get(role.layer)
        if not merges or role.part != "experts":
            return None
        outs = self.plan.layers[role.layer]
        model = (role.model or "").rsplit(".", 1)[-1]
        down, bias = "down" in model, model.endswith("bias")
        columns, transposed = self.columns.get(role.layer, (None, False))
        # the module's own neuron axis of one expert's tensor ([O, H] / [H, I], or transposed)
        preferred = (0 if transposed else 1) if down else (1 if transposed else 0)

        def fetch() -> bytes:
            import torch

            stored = self.ckpt.tensor(info.name)
            parts = []
            for out in outs:
                if out.is_copy:
                    parts.append(stored.select(role.axis, out.anchor))
                    continue
                total = None
                for j, (src, weight) in enumerate(out.sources):
                    t = stored.select(role.axis, src).float()
                    perm = out.permutation(j)
                    at = None if perm is None else neuron_index(tuple(t.shape), self.spec.expert_intermediate,
                                                                columns, perm, down, bias, info.name, preferred)
                    if at is not None:
                        t = t.index_select(*at)
                    total = weight * t if total is None else total + weight * t
                parts.append(total.to(stored.dtype))
            new = torch.stack(parts, role.axis)
            if role.extra:
                new = torch.cat([new, stored.narrow(role.axis, self.spec.num_experts, role.extra)], role.axis)
            return _bytes(new)

        shape = list(info.shape)
        shape[role.axis] = len(outs) + role.extra
        return Entry(info.name, info.dtype, tuple(shape), info.nbytes // info.shape[role.axis] * shape[role.axis],
                     fetch=fetch)

    def router_entry(self, info, role) -> Entry | None:
        """The router weight with the re-fit rows of its layer, or None where it has none."""
        rows = self.router_rows.get(role.layer)
        if rows is None or role.model != self.spec.moe[role.layer].router:
            return None
        kept = self.plan.kept(role.layer)

        def fetch() -> bytes:
            import torch

            stored = self.ckpt.tensor(info.name)
            extra = stored.narrow(role.axis, self.spec.num_experts, role.extra) if role.extra else None
            new = rows.to(stored.dtype).movedim(0, role.axis) if role.axis else rows.to(stored.dtype)
            if new.shape[role.axis] != len(kept):
                raise AssertionError(f"{info.name}: {new.shape[role.axis]} re-fit rows for {len(kept)} kept experts")
            return _bytes(torch.cat([new, extra], role.axis) if extra is not None else new)

        shape = list(info.shape)
        shape[role.axis] = len(kept) + role.extra
        nbytes = info.nbytes // info.shape[role.axis] * shape[role.axis]
        return Entry(info.name, info.dtype, tuple(shape), nbytes, fetch=fetch)
