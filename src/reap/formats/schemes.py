"""The quantization a checkpoint declares, read from ``config.json`` / ``hf_quant_config.json`` into what
dequantization needs: per module, the weight scheme (bits, integer or float, strategy, group or block size,
symmetric).

compressed-tensors: ``quantization_config.config_groups`` (each with ``targets``, ``weights`` and optionally its own
``format``) and ``ignore``. A module's scheme is the group whose ``re:`` or exact-name target matches it, else the
group that targets a class (``Linear``): that is how compressed-tensors applies them (class targets cover every
linear layer the regexes do not single out).

ModelOpt: ``hf_quant_config.json`` ``{"quantization": {"quant_algo": "NVFP4", "group_size": 16,
"exclude_modules": [...]}}`` or the same fields in ``config.json`` ``quantization_config`` (``quant_method:
modelopt``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from reap.core.errors import UserError

#: compressed-tensors formats reap reads, by what they store
CT_FORMATS = {
    "pack-quantized": "INT2/INT4/INT8 packed in int32 weight_packed, weight_scale per group/channel/tensor, "
                      "weight_zero_point if asymmetric, weight_shape",
    "float-quantized": "FP8 weight with weight_scale per tensor/channel/group/block",
    "int-quantized": "INT8 weight with weight_scale per tensor/channel/group",
    "naive-quantized": "FP8 or INT8 weight with weight_scale",
    "nvfp4-pack-quantized": "FP4 pairs in uint8 weight_packed, FP8 weight_scale per 16, weight_global_scale",
    "dense": "unquantized weights",
}
CT_UNSUPPORTED = {
    "sparse-bitmask": "2:4 / bitmask sparse weights (compressed indices that reap would have to re-encode)",
    "sparse-24-bitmask": "2:4 / bitmask sparse weights (compressed indices that reap would have to re-encode)",
    "marlin-24": "Marlin 2:4 kernels' tiled layout",
    "mxfp4-pack-quantized": "not yet implemented",
    "mxfp6-pack-quantized": "not yet implemented",
    "mxfp8-quantized": "not yet implemented",
}
MODELOPT_ALGOS = {"NVFP4": "FP4 pairs in uint8 weight, FP8 weight_scale per 16, float32 weight_scale_2",
                  "FP8": "FP8 weight with a float32 per-tensor weight_scale"}


@dataclass(frozen=True)
class WeightScheme:
    """How one module's weight is quantized."""

    kind: str  # "int" or "float"
    bits: int
    strategy: str  # tensor | channel | group | block | tensor_group
    group: int | None = None
    block: tuple[int, int] | None = None
    symmetric: bool = True
    format: str = ""  # compressed-tensors format of its group


@dataclass(frozen=True)
class _Group:
    name: str
    scheme: WeightScheme | None
    regexes: tuple[str, ...]
    names: tuple[str, ...]
    classes: tuple[str, ...]


@dataclass(frozen=True)
class Quantization:
    """A checkpoint's parsed quantization: the producer (``compressed-tensors`` or ``modelopt``) and its schemes."""

    method: str
    algo: str = ""  # modelopt quant_algo
    group_size: int = 16  # modelopt NVFP4 group
    groups: tuple[_Group, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def scheme(self, module: str, kind: str | None = None) -> WeightScheme | None:
        """The weight scheme of ``module`` (a stored base name minus ``.weight``): the group naming it, else the
        one targeting a class; among groups of ``kind`` ("int"/"float") when given."""
        candidates = [g for g in self.groups if g.scheme is not None and (kind is None or g.scheme.kind == kind)]
        for g in candidates:
            if module in g.names or any(re.match(r, module) for r in g.regexes):
                return g.scheme
        for g in candidates:
            if g.classes:
                return g.scheme
        return candidates[0].scheme if len(candidates) == 1 else None


def _weights_scheme(weights: dict[str, Any] | None, fmt: str, where: str) -> WeightScheme | None:
    if not weights:
        return None
    kind, bits = str(weights.get("type", "int")), int(weights.get("num_bits", 8))
    strategy = str(weights.get("strategy") or ("group" if weights.get("group_size") else "tensor"))
    group = weights.get("group_size")
    block = weights.get("block_structure")
    if weights.get("actorder") not in (None, False, "static", "weight"):
        raise UserError(f"{where}: weights use activation ordering {weights.get('actorder')!r} (a g_idx permutation "
                        "of the columns), which reap does not read; reap reads compressed-tensors schemes without "
                        "actorder or with actorder 'static'/'weight'")
    if kind == "int" and fmt == "pack-quantized" and 32 % bits:
        raise UserError(f"{where}: {bits}-bit integers straddle int32 words; reap reads pack-quantized 2, 4 and "
                        "8-bit weights")
    if strategy not in ("tensor", "channel", "group", "block", "tensor_group"):
        raise UserError(f"{where}: weight strategy {strategy!r} is not one reap reads (tensor, channel, group, "
                        "block, tensor_group)")
    if strategy in ("group", "tensor_group") and not group:
        raise UserError(f"{where}: a {strategy} strategy without group_size; the quantization_config is incomplete")
    if strategy == "block" and not (isinstance(block, (list, tuple)) and len(block) == 2):
        raise UserError(f"{where}: a block strategy without a two-number block_structure; the quantization_config "
                        "is incomplete")
    return WeightScheme(kind, bits, strategy, int(group) if group else None,
                        (int(block[0]), int(block[1])) if strategy == "block" else None,
                        bool(weights.get("symmetric", True)), fmt)


def parse_compressed_tensors(quant: dict[str, Any]) -> Quantization:
    """``quantization_config`` of a compressed-tensors checkpoint -> :class:`Quantization`; UserError for what reap
    cannot read (sparsity, transforms, a format it does not know), naming what it reads."""
    from reap.formats import supported

    known = supported()
    status = quant.get("quantization_status", "compressed")
    if (quant.get("sparsity_config") or {}).get("format") not in (None, "dense"):
        raise UserError(f"config.json declares compressed-tensors sparsity "
                        f"{quant['sparsity_config'].get('format')!r}, which reap cannot read; reap reads {known}")
    if quant.get("transform_config"):
        raise UserError("config.json declares compressed-tensors transforms (rotations applied to the weights), "
                        f"which reap cannot undo for calibration; reap reads {known}")
    default = str(quant.get("format") or "dense")
    groups = []
    for name, group in (quant.get("config_groups") or {}).items():
        fmt = str(group.get("format") or default)
        if status != "compressed" and fmt != "dense":
            fmt = "dense"  # frozen / calibrated checkpoints hold the weights unpacked
        where = f"compressed-tensors config group {name!r} (format {fmt!r})"
        if fmt in CT_UNSUPPORTED or fmt not in CT_FORMATS:
            why = CT_UNSUPPORTED.get(fmt, "a format reap does not know")
            raise UserError(f"config.json declares compressed-tensors format {fmt!r} ({why}), which reap cannot read; "
                            f"reap reads {known}")
        scheme = _weights_scheme(group.get("weights"), fmt, where) if fmt != "dense" else None
        targets = [str(t) for t in group.get("targets") or ()]
        groups.append(_Group(name, scheme, tuple(t[3:] for t in targets if t.startswith("re:")),
                             tuple(t for t in targets if not t.startswith("re:") and "." in t),
                             tuple(t for t in targets if not t.startswith("re:") and "." not in t)))
    return Quantization("compressed-tensors", groups=tuple(groups), raw=quant)


def parse_modelopt(details: dict[str, Any]) -> Quantization:
    """The ``quantization`` section of ``hf_quant_config.json`` (or ``config.json``'s modelopt
    ``quantization_config``) -> :class:`Quantization`."""
    algo = str(details.get("quant_algo") or "")
    if algo not in MODELOPT_ALGOS:
        from reap.formats import supported

        raise UserError(f"the checkpoint declares ModelOpt quant_algo {algo or None!r}, which reap cannot read; reap "
                        f"reads {supported()}")
    group = int(details.get("group_size") or 16)
    scheme = (WeightScheme("float", 4, "tensor_group", group, format="modelopt-nvfp4") if algo == "NVFP4"
              else WeightScheme("float", 8, "tensor", format="modelopt-fp8"))
    return Quantization("modelopt", algo=algo, group_size=group,
                        groups=(_Group("modelopt", scheme, (), (), ("Linear",)),), raw=details)
