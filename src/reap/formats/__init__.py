"""Weight formats: how a logical tensor is stored, and how to get it back for compute.

A checkpoint stores each logical tensor (a *base*, named as transformers would name the unquantized weight on
disk) as one or more stored tensors: the base itself, or quantized values plus companions (scales, zero points,
shapes, global scales). A :class:`Format` says which stored names belong to a base (its *parts*), how many
parameters a stored tensor holds, and how to dequantize the parts on the compute device
(:mod:`reap.formats.kernels`, bit for bit the format's reference implementation). Surgery never dequantizes: it
slices every part of an expert with the same rule (see :mod:`reap.model.arch`), so quantized bytes and companions are
copied as stored; the module lists of the quantization config are renumbered (:mod:`reap.formats.modules`).

Formats known here (the registry :data:`FORMATS`, one object each, holding its own dequantization, packing and
companion checks as callables: nothing dispatches on a format's name), detected from ``config.json``
``quantization_config`` (or ``hf_quant_config.json``) by :func:`checkpoint_format`:

* ``dense``      bf16 / fp16 / fp32 tensors (every checkpoint has some: norms, embeddings);
* ``fp8-block``  ``quant_method: fp8``: ``X.weight`` float8_e4m3fn + ``X.weight_scale_inv`` float32, one scale per
                 block of ``weight_block_size`` (MiniMax-M2, DeepSeek-V3, Qwen3-FP8);
* ``mxfp4``      ``quant_method: mxfp4``: ``X_blocks`` uint8 [..., G, 16] (two FP4 e2m1 codes per byte) +
                 ``X_scales`` uint8 [..., G] (a power of two per group of 32); ``X`` itself is not stored (gpt-oss);
* ``compressed-tensors``  ``quant_method: compressed-tensors`` (llm-compressor, Kimi-K2-Thinking/K2.5/K2.6):
                 ``pack-quantized`` ``X.weight_packed`` int32 (32/b values of b bits per word) + ``X.weight_scale``
                 (per group / channel / tensor) + ``X.weight_zero_point`` (asymmetric, packed along rows) +
                 ``X.weight_shape``; ``float-quantized`` / ``int-quantized`` ``X.weight`` FP8 or INT8 +
                 ``X.weight_scale`` (tensor / channel / group / block) + ``X.input_scale``;
                 ``nvfp4-pack-quantized`` ``X.weight_packed`` uint8 + ``X.weight_scale`` FP8 per 16 +
                 ``X.weight_global_scale`` + ``X.input_global_scale``;
* ``modelopt``   NVIDIA ModelOpt (``hf_quant_config.json`` ``quant_algo: NVFP4`` or ``FP8``): ``X.weight`` uint8 FP4
                 pairs + ``X.weight_scale`` FP8 per 16 + ``X.weight_scale_2`` float32 + ``X.input_scale``; FP8:
                 ``X.weight`` FP8 + ``X.weight_scale`` + ``X.input_scale``.

Legend: O output features, I input features, E experts, G groups.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reap.core.errors import UserError
from reap.formats.kernels import (  # noqa: F401 - the public names of the package
    FP4_E2M1_VALUES,
    dequantize_blocks,
    dequantize_int_packed,
    dequantize_mxfp4,
    dequantize_nvfp4_ct,
    dequantize_nvfp4_modelopt,
    dequantize_scaled,
    quantize_blocks,
)
from reap.formats.schemes import CT_FORMATS, MODELOPT_ALGOS, Quantization, parse_compressed_tensors, parse_modelopt

if TYPE_CHECKING:
    import torch

FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
HF_QUANT_CONFIG = "hf_quant_config.json"  # ModelOpt's description of its checkpoints


@dataclass(frozen=True)
class Format:
    """One way of storing a logical tensor. ``parts`` maps a stored-name suffix to the base-name suffix it stands
    for and the part it holds ("values" for the quantized payload, else a companion): compressed-tensors stores
    ``X.weight_packed`` and ``X.input_scale`` for the base ``X.weight``, MXFP4 ``X_blocks`` for the base ``X``. A name
    no suffix matches is the values of its own base. ``quant`` is the checkpoint's parsed quantization config."""

    name: str
    parts: tuple[tuple[str, str, str], ...]  # (stored suffix, base suffix, part), longest stored suffix first
    description: str
    quant: Quantization | None = field(default=None, compare=False, hash=False, repr=False)
    #: ``dequant(fmt, parts, dtype, config, name)``: the logical tensor from its values and scale (and other
    #: companions); None for a format without scales (dense)
    dequant: Callable[..., torch.Tensor] | None = field(default=None, compare=False, hash=False, repr=False)
    #: ``packing(fmt, base, dtype)``: logical values per stored element of a values tensor (``base``: its base name
    #: when a suffix of the format named it, else None); None: one
    packing: Callable[[Format, str | None, str], int] | None = field(default=None, compare=False, hash=False,
                                                                      repr=False)
    #: ``companions(values)``: the parts a base with these values (a TensorInfo) needs beside them, before a zero
    #: point; None for a format without companions
    companions: Callable[[Any], tuple[str, ...]] | None = field(default=None, compare=False, hash=False, repr=False)
    #: ``scale_problem(fmt, base, parts, scheme, bad)``: what is wrong with the scale's (and its companions')
    #: shapes against the values, or None; ``bad(what)`` words the usual mismatch
    scale_problem: Callable[..., str | None] | None = field(default=None, compare=False, hash=False, repr=False)
    #: ``quantize(fmt, weight, config)``: {part: tensor} storing a float ``weight`` (a merged expert) as this format
    #: does; None where reap cannot write the format's values (merging into it is refused)
    quantize: Callable[..., dict[str, torch.Tensor]] | None = field(default=None, compare=False, hash=False,
                                                                     repr=False)

    def split(self, stored: str) -> tuple[str, str] | None:
        """``stored`` -> (base name, part) when it is a part of this format, else None."""
        for suffix, base_suffix, part in self.parts:
            if stored.endswith(suffix) and len(stored) > len(suffix):
                return stored[: -len(suffix)] + base_suffix, part
        return None

    def scheme(self, base: str, kind: str | None = None):
        """The weight scheme (:class:`reap.formats.schemes.WeightScheme`) of a base, from the quantization config."""
        if self.quant is None:
            return None
        return self.quant.scheme(base[: -len(".weight")] if base.endswith(".weight") else base, kind)


def describe_format(fmt: Format) -> dict[str, Any] | None:
    """What ``reap inspect`` can show of a checkpoint's quantization: the format and each weight scheme in words
    (``INT4 group 32 symmetric (pack-quantized)``); None for dense (a format without companions)."""
    if not fmt.parts:
        return None
    schemes = []
    for group in (fmt.quant.groups if fmt.quant is not None else ()):
        w = group.scheme
        if w is None:
            continue
        size = f" {w.group}" if w.strategy in ("group", "tensor_group") else f" {w.block[0]}x{w.block[1]}" \
            if w.block else ""
        kind = ("NVFP4" if (w.kind, w.bits) == ("float", 4) else f"FP{w.bits}" if w.kind == "float" else f"INT{w.bits}")
        schemes.append(f"{kind} {w.strategy.replace('_', '-')}{size}{'' if w.symmetric else ' asymmetric'} ({w.format})")
    return {"format": fmt.name, "schemes": schemes}


def _parts(*items: tuple[str, str, str]) -> tuple[tuple[str, str, str], ...]:
    return tuple(sorted(items, key=lambda p: -len(p[0])))


# -- each format's own behaviour (the callables its registry entry holds) -----------------------------------------
def _dequant_fp8_block(fmt: Format, parts: dict[str, torch.Tensor], dtype: torch.dtype, config: dict[str, Any],
                       name: str) -> torch.Tensor:
    import torch

    values = parts["values"]
    if values.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise UserError(f"{name}: a weight_scale_inv companion on a {values.dtype} tensor; the checkpoint is broken")
    block = (config.get("quantization_config") or {}).get("weight_block_size") or (128, 128)
    return dequantize_blocks(values, parts["scale"], dtype, (int(block[0]), int(block[1])))


def _quant_fp8_block(fmt: Format, weight: torch.Tensor, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    block = (config.get("quantization_config") or {}).get("weight_block_size") or (128, 128)
    values, scale = quantize_blocks(weight, (int(block[0]), int(block[1])))
    return {"values": values, "scale": scale}


def _dequant_mxfp4(fmt: Format, parts: dict[str, torch.Tensor], dtype: torch.dtype, config: dict[str, Any],
                   name: str) -> torch.Tensor:
    return dequantize_mxfp4(parts["values"], parts["scale"], dtype)


def _dequant_compressed_tensors(fmt: Format, parts: dict[str, torch.Tensor], dtype: torch.dtype,
                                config: dict[str, Any], name: str) -> torch.Tensor:
    import torch

    values, scale = parts["values"], parts["scale"]
    if "g_idx" in parts:
        raise UserError(f"{name}: a weight_g_idx (activation-order permutation) that reap does not read")
    if values.dtype == torch.int32:
        scheme = _need(fmt.scheme(name, "int"), name, "an integer")
        shape = tuple(int(v) for v in parts["shape"].tolist()) if "shape" in parts else None
        return dequantize_int_packed(values, scale, parts.get("zero_point"), shape, scheme.bits, scheme.strategy,
                                     scheme.group, dtype, name)
    if values.dtype == torch.uint8:
        if "global_scale" not in parts:
            raise UserError(f"{name}: uint8 weight_packed without weight_global_scale (MXFP4 compressed-tensors), "
                            f"which reap does not read; reap reads {fmt.description}")
        scheme = fmt.scheme(name, "float")
        return dequantize_nvfp4_ct(values, scale, parts["global_scale"], (scheme.group if scheme else None) or 16,
                                   dtype, name)
    kind = "int" if not values.dtype.is_floating_point else "float"
    scheme = _need(fmt.scheme(name, kind), name, "a " + kind)
    return dequantize_scaled(values, scale, parts.get("zero_point"), scheme.strategy, scheme.group, scheme.block,
                             dtype, name)


def _dequant_modelopt(fmt: Format, parts: dict[str, torch.Tensor], dtype: torch.dtype, config: dict[str, Any],
                      name: str) -> torch.Tensor:
    import torch

    values, scale = parts["values"], parts["scale"]
    if "pre_quant_scale" in parts:
        raise UserError(f"{name}: a pre_quant_scale (AWQ-style input scaling), which reap does not read")
    if values.dtype == torch.uint8:
        if "scale_2" not in parts:
            raise UserError(f"{name}: an NVFP4 weight without weight_scale_2; the checkpoint is incomplete")
        return dequantize_nvfp4_modelopt(values, scale, parts["scale_2"], fmt.quant.group_size, dtype, name)
    return (values.to(dtype) * scale.to(dtype)).to(dtype)  # ModelOpt FP8QTensor.dequantize


def _packing_mxfp4(fmt: Format, base: str | None, dtype: str) -> int:
    return 2 if base is not None and dtype == "U8" else 1


def _packing_compressed_tensors(fmt: Format, base: str | None, dtype: str) -> int:
    if base is not None:
        if dtype == "I32":
            scheme = fmt.scheme(base, "int")
            return 32 // (scheme.bits if scheme is not None else 4)
        if dtype == "U8":
            return 2
    return 1


def _packing_modelopt(fmt: Format, base: str | None, dtype: str) -> int:
    return 2 if dtype == "U8" and fmt.quant is not None and fmt.quant.algo == "NVFP4" else 1


def _companions_compressed_tensors(v) -> tuple[str, ...]:
    if v.name.endswith(".weight_packed"):
        return ("scale", "shape") if v.dtype == "I32" else ("scale", "global_scale")
    return ("scale",) if v.dtype in (*FP8_DTYPES, "I8") else ()


def _scales_mxfp4(fmt: Format, base: str, parts: dict[str, Any], scheme, bad) -> str | None:
    return bad("scales") if tuple(parts["scale"].shape) != tuple(parts["values"].shape)[:-1] else None


def _scales_fp8_block(fmt: Format, base: str, parts: dict[str, Any], scheme, bad) -> str | None:
    s, vshape = tuple(parts["scale"].shape), tuple(parts["values"].shape)
    return bad("scale") if len(s) != len(vshape) or s[:-2] != vshape[:-2] else None


def _scales_per_scheme(fmt: Format, base: str, parts: dict[str, Any], scheme, bad) -> str | None:
    """compressed-tensors and ModelOpt: by the weight scheme's strategy."""
    v, s = parts["values"], tuple(parts["scale"].shape)
    vshape = tuple(v.shape)
    have, lead = set(parts), vshape[:-2]
    if v.dtype == "U8":  # NVFP4 (compressed-tensors or ModelOpt): an FP8 scale per group of 16 values (8 bytes)
        group = (scheme.group if scheme is not None else None) or 16
        return bad("weight_scale") if s != (*vshape[:-1], vshape[-1] * 2 // group) else None
    if "shape" in have and tuple(parts["shape"].shape) != (len(vshape),):
        return f"{base}: weight_shape {list(parts['shape'].shape)} does not describe its {len(vshape)}-d values"
    strategy = scheme.strategy if scheme is not None else ""
    if strategy in ("group", "channel") and s[:-1] != vshape[:-1]:
        return bad("weight_scale")
    if "zero_point" in have and tuple(parts["zero_point"].shape)[:-2] != s[:-2]:
        return f"{base}: weight_zero_point {list(parts['zero_point'].shape)} does not fit its scale {list(s)}"
    if strategy == "block" and (len(s) != len(vshape) or s[:-2] != lead):
        return bad("weight_scale")
    return None


DENSE = Format("dense", (), "unquantized bf16/fp16/fp32")
FP8_BLOCK = Format("fp8-block", _parts(("_scale_inv", "", "scale")),
                   "FP8 e4m3 with one float32 scale per weight_block_size block (weight_scale_inv)",
                   dequant=_dequant_fp8_block, quantize=_quant_fp8_block, companions=lambda v: ("scale",) if v.dtype in FP8_DTYPES else (),
                   scale_problem=_scales_fp8_block)
MXFP4 = Format("mxfp4", _parts(("_blocks", "", "values"), ("_scales", "", "scale")),
               "MXFP4: FP4 e2m1 pairs in uint8 _blocks, a power-of-two _scales byte per 32 values",
               dequant=_dequant_mxfp4, packing=_packing_mxfp4,
               companions=lambda v: ("scale",) if v.name.endswith("_blocks") else (), scale_problem=_scales_mxfp4)
COMPRESSED_TENSORS = Format("compressed-tensors", _parts(
    (".weight_packed", ".weight", "values"), (".weight_scale", ".weight", "scale"),
    (".weight_zero_point", ".weight", "zero_point"), (".weight_shape", ".weight", "shape"),
    (".weight_global_scale", ".weight", "global_scale"), (".weight_g_idx", ".weight", "g_idx"),
    (".input_scale", ".weight", "input_scale"), (".input_zero_point", ".weight", "input_zero_point"),
    (".input_global_scale", ".weight", "input_global_scale"), (".output_scale", ".weight", "output_scale"),
    (".output_zero_point", ".weight", "output_zero_point")),
    "compressed-tensors: " + "; ".join(f"{k} ({v})" for k, v in CT_FORMATS.items() if k != "dense"),
    dequant=_dequant_compressed_tensors, packing=_packing_compressed_tensors,
    companions=_companions_compressed_tensors, scale_problem=_scales_per_scheme)
MODELOPT = Format("modelopt", _parts(
    (".weight_scale_2", ".weight", "scale_2"), (".weight_scale", ".weight", "scale"),
    (".input_scale", ".weight", "input_scale"), (".pre_quant_scale", ".weight", "pre_quant_scale")),
    "NVIDIA ModelOpt: " + "; ".join(f"{k} ({v})" for k, v in MODELOPT_ALGOS.items()),
    dequant=_dequant_modelopt, packing=_packing_modelopt,
    companions=lambda v: ("scale", "scale_2") if v.dtype == "U8" else ("scale",) if v.dtype in FP8_DTYPES else (),
    scale_problem=_scales_per_scheme)

#: Every format reap reads. A new one is one entry here: a :class:`Format` with its own ``dequant`` (and
#: ``packing``, ``companions``, ``scale_problem`` where it has them).
FORMATS: tuple[Format, ...] = (FP8_BLOCK, MXFP4, COMPRESSED_TENSORS, MODELOPT, DENSE)

#: ``quantization_config.quant_method`` values reap reads, and the format they store weights in.
QUANT_METHODS = {"fp8": FP8_BLOCK, "mxfp4": MXFP4, "compressed-tensors": COMPRESSED_TENSORS, "modelopt": MODELOPT}
#: methods reap knows of and does not read, and why
NOT_READ = {
    "awq": "AWQ's qweight/qzeros/scales would slice per expert like the others, but no CPU reference dequantizer "
           "is on PyPI to check reap's against (AutoAWQ is archived, gptqmodel builds CUDA kernels)",
    "gptq": "GPTQ's qweight/qzeros/scales/g_idx would slice per expert like the others, but no CPU reference "
            "dequantizer is on PyPI to check reap's against (gptqmodel builds CUDA kernels)",
}


def supported() -> str:
    """One line naming every format reap reads."""
    return ("unquantized checkpoints, " + ", ".join(f"{k} ({v.description})" for k, v in QUANT_METHODS.items()))


def quantization_section(config: dict[str, Any]) -> dict[str, Any] | None:
    """``config.json``'s quantization config: ``quantization_config`` (older compressed-tensors releases:
    ``compression_config``), at the top or in ``text_config`` (multimodal wrappers)."""
    for node in (config, config.get("text_config") if isinstance(config.get("text_config"), dict) else {}):
        for key in ("quantization_config", "compression_config"):
            if isinstance(node.get(key), dict) and node[key]:
                return node[key]
    return None


def checkpoint_format(config: dict[str, Any], directory: str | Path | None = None) -> Format:
    """The quantized format a checkpoint declares (``config.json``, and ``hf_quant_config.json`` in ``directory``
    when there is one); dense when it declares none. UserError (one line) for one reap cannot read, naming it and
    what reap reads."""
    quant = quantization_section(config)
    hf_quant = Path(directory) / HF_QUANT_CONFIG if directory is not None else None
    modelopt_file = None
    if hf_quant is not None and hf_quant.is_file():
        try:
            modelopt_file = json.loads(hf_quant.read_text()).get("quantization") or {}
        except (ValueError, UnicodeDecodeError, AttributeError) as err:
            raise UserError(f"{hf_quant} is not valid JSON ({err}); restore the original file") from None
    if not quant:
        if modelopt_file is not None and (modelopt_file.get("quant_algo") or modelopt_file.get("kv_cache_quant_algo")):
            return replace(MODELOPT, quant=parse_modelopt(modelopt_file))
        return DENSE
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method not in QUANT_METHODS:
        why = f" ({NOT_READ[method]})" if method in NOT_READ else ""
        raise UserError(f"config.json declares quantization {method!r}{why}, which reap cannot read; reap reads "
                        f"{supported()}")
    if method == "fp8" and quant.get("fmt", "float8_e4m3fn") not in ("float8_e4m3fn", "e4m3"):
        raise UserError(f"config.json declares FP8 format {quant.get('fmt')!r}; reap reads float8_e4m3fn blocks")
    if method == "compressed-tensors":
        parsed = parse_compressed_tensors(quant)
        if all(g.scheme is None for g in parsed.groups):
            return DENSE
        return replace(COMPRESSED_TENSORS, quant=parsed)
    if method == "modelopt":
        details = modelopt_file if modelopt_file is not None else quant
        return replace(MODELOPT, quant=parse_modelopt(details))
    return QUANT_METHODS[method]


def group_parts(names, fmt: Format) -> dict[str, dict[str, str]]:
    """Stored tensor names -> {base name: {part: stored name}}. A stored name that is no companion of ``fmt`` is
    the values of its own base (a bf16 norm in an FP8 checkpoint is a base without a scale); companions of a base
    that has no values are plain tensors of their own (an MXFP4 ``x_scales`` without ``x_blocks``)."""
    groups: dict[str, dict[str, str]] = {}
    for name in names:
        hit = fmt.split(name) if fmt.parts else None
        if hit is None:  # FP8 values keep the base name itself
            groups.setdefault(name, {})["values"] = name
        else:
            groups.setdefault(hit[0], {})[hit[1]] = name
    for base in [b for b, p in groups.items() if "values" not in p]:
        for name in groups.pop(base).values():
            groups[name] = {"values": name}
    return groups


def values_per_element(name: str, dtype: str, fmt: Format) -> int:
    """How many logical values one stored element of the tensor ``name`` holds (8 per int32 of INT4, 2 per byte
    of FP4, 1 otherwise); 0 for a companion (scales, zero points, shapes hold no parameters)."""
    hit = fmt.split(name) if fmt.parts else None
    if hit is not None and hit[1] != "values":
        return 0
    if fmt.packing is None:
        return 1
    return fmt.packing(fmt, hit[0] if hit is not None else None, dtype)


def stored_params(name: str, dtype: str, numel: int, fmt: Format) -> int:
    """Parameters a stored tensor holds: companions none, an INT4 int32 word eight, an FP4 byte two, the rest one
    per element (channel-strategy INT4 rows padded to a whole word count the padding: at most 7 per row)."""
    return numel * values_per_element(name, dtype, fmt)


def value_dtype(name: str, dtype: str, fmt: Format) -> str:
    """The dtype of the values a stored tensor holds, for display: ``INT4`` for int32 words of 4-bit integers,
    ``FP4`` for uint8 pairs, else the stored dtype."""
    per = values_per_element(name, dtype, fmt)
    if per == 2 and dtype == "U8":
        return "FP4"
    if dtype == "I32" and per > 1:
        return f"INT{32 // per}"
    return dtype


def dequantize(parts: dict[str, "torch.Tensor"], fmt: Format, dtype: "torch.dtype", config: dict[str, Any],
               name: str = "") -> "torch.Tensor":
    """The logical tensor from its stored parts (already on the compute device), in ``dtype``. Activation scales
    and other parts that do not define the weight are ignored."""
    if "scale" not in parts:
        return parts["values"].to(dtype)
    if fmt.dequant is None:  # pragma: no cover - registry error
        raise AssertionError(f"{name}: format {fmt.name!r} stores a scale but has no dequantization: give its "
                             "Format entry in reap.formats (FORMATS) a dequant function")
    return fmt.dequant(fmt, parts, dtype, config, name)


def _need(scheme, name: str, kind: str):
    if scheme is None:
        raise UserError(f"{name}: no config group of quantization_config covers this {kind} quantized weight; the "
                        "checkpoint and its config.json disagree")
    return scheme


def companion_problem(fmt: Format, base: str, parts: dict[str, Any]) -> str | None:
    """What is wrong with one stored base's parts ({part: info with .name, .dtype, .shape}, e.g.
    :class:`reap.io.checkpoint.TensorInfo`), or None: the companions its format needs are present and shaped
    consistently with its values (the same leading dims, the expert axis of fused experts included)."""
    v = parts.get("values")
    if v is None or fmt.companions is None:
        return None
    have = set(parts)
    required = fmt.companions(v)
    if not required:
        return None
    kind = "int" if v.dtype in ("I32", "I8") else "float"
    scheme = fmt.scheme(base, kind) if fmt.quant is not None else None
    if scheme is not None and not scheme.symmetric and scheme.strategy in ("group", "channel"):
        required += ("zero_point",)
    missing = [p for p in required if p not in have]
    if missing:
        return f"{base} has no {'/'.join(missing)} beside its values {v.name}"
    if fmt.scale_problem is None:  # pragma: no cover - registry error
        raise AssertionError(f"format {fmt.name!r} names companions but cannot check them: give its Format entry in "
                             "reap.formats (FORMATS) a scale_problem function")

    def bad(what: str) -> str:
        return f"{base}: {what} {list(parts['scale'].shape)} does not fit its values {v.name} {list(v.shape)}"

    return fmt.scale_problem(fmt, base, parts, scheme, bad)
