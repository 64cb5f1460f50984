"""What a Mixture-of-Experts checkpoint is, derived from transformers instead of typed in.

reap keeps no per-family table of tensor names or routing rules. For a checkpoint it builds transformers' own
model from ``config.json`` on the meta device (parameters on meta, buffers real) and reads off it:

* **the MoE layers**: the decoder stack (the ``layers`` ModuleList that holds experts modules) and, per layer,
  the experts module (any class on transformers' standard experts interface, ``@use_experts_implementation``)
  and its parent, the MoE block, with the router, shared experts and gates;
* **the expert axis**: the model is built a second time with twice the experts (each ``config.json`` entry
  equal to the expert count is tried, nested ``text_config`` included; the ones that change the experts
  module's count are the *count keys*), and every tensor whose shape follows the count is an expert tensor
  along that dimension: router rows, correction biases of any shape (ERNIE's ``[1, E]``), fused experts and
  their biases. Integer tensors of an MoE block that do not follow it hold expert ids as values (DeepSeek-V4's
  token -> expert hash table ``tid2eid``);
* **the disk layout**: transformers' conversion mapping for the model (renamings, per-expert tensors merged
  into fused ones, transposes) applied to every stored name, quantization companions through
  :mod:`reap.formats`, gives each stored tensor a :class:`Role`: one expert's tensor (``experts.{E}.w1``), a
  tensor holding every expert along an axis, an expert-id table, a multi-token-prediction tensor transformers
  never loads, or anything else (copied as it is).

What cannot be derived is a short table: :data:`MODEL_TYPE_ALIASES` (checkpoints whose ``model_type`` is
remote code for an architecture transformers has), :data:`NOT_STREAMABLE` (base models that feed a layer more
than the previous layer gave) and :data:`MTP_KEYS`. Errors name the piece that is missing.

This module holds those tables (with :data:`MTP_STYLES` and :data:`TOP_K_ATTRS`), the data classes
(:class:`Layout`, :class:`MoELayer`, :class:`Role`, :class:`MtpStyle`), transformers' config and meta model for a
``config.json`` (:func:`build_config`, :func:`model_class`, :func:`build_model`, :func:`extended_config`), the
humanizers :func:`human_count` / :func:`human_bytes`. The MoE layers and the expert axis are read by
:mod:`reap.model.model_side`, the disk layout by :mod:`reap.model.disk_side`, and :func:`reap.model.derive.derive` puts the two
together.

Legend: E experts, K kept experts, L decoder layers, H hidden.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from reap.core.errors import UserError
from reap.formats import Format

if TYPE_CHECKING:
    import torch

#: ``model_type`` values that are remote code for an architecture transformers implements: built with its classes
#: (the ``auto_map`` code is never run). Add an entry when a release renames a model type it did not change.
MODEL_TYPE_ALIASES = {"kimi_k2": "deepseek_v3"}
#: model types whose base model feeds layers something computed from earlier layers' hidden states (beyond what a
#: layer returns), which a stream that keeps only the latest layer's output cannot reproduce: type -> why
_BLOCK_STATES = ("its base model collects the hidden states entering every block-boundary layer and feeds them to "
                 "later layers (block_states), which a layer-at-a-time stream does not keep")
NOT_STREAMABLE = {"inkling2": _BLOCK_STATES, "inkling2_text": _BLOCK_STATES}
#: config keys that count multi-token-prediction modules stored beside the decoder layers (transformers never
#: loads them); set to 0 when the output leaves those modules out.
MTP_KEYS = ("num_nextn_predict_layers", "mtp_num_hidden_layers")


@dataclass(frozen=True)
class MtpStyle:
    """How a family stores its multi-token-prediction modules (names relative to module k's prefix) and how they
    combine a token's embedding with the previous depth's hidden state, as the serving engines run them (see
    :mod:`reap.stream.mtp`). ``{layers}`` is the main decoder layers' stored prefix, ``{n}`` = num_hidden_layers + k."""

    name: str
    prefix: str  # module k's own tensors
    layer: str  # module k's decoder layer (a main-model MoE layer class)
    embed_norm: str
    hidden_norm: str
    proj: str
    final_norm: str


#: DeepSeek-V3 / Kimi-K2 / GLM-4.5 (model.layers.61 / .92 / .46) and Qwen3-Next (mtp.*). A new style is one entry.
MTP_STYLES = (
    MtpStyle("deepseek", "{layers}{n}.", "{layers}{n}.", "enorm", "hnorm", "eh_proj", "shared_head.norm"),
    MtpStyle("qwen3_next", "mtp.", "mtp.layers.{k}.", "pre_fc_norm_embedding", "pre_fc_norm_hidden", "fc", "norm"),
)


#: attribute names under which transformers' MoE blocks and routers (or the text config) keep top-k and groups
TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "moe_topk", "experts_per_token", "top_k_experts", "moe_k")
N_GROUP_ATTRS = ("n_group", "num_group", "num_expert_group")
TOPK_GROUP_ATTRS = ("topk_group", "num_topk_group")


@dataclass(frozen=True)
class MoELayer:
    """One decoder layer's MoE block, as transformers builds it (model-side names)."""

    index: int
    block: str  # module path of the MoE block (the experts module's parent)
    experts: str  # module path of transformers' experts module
    tensors: dict[str, int]  # model tensor name -> its expert axis (experts, router rows, biases)
    id_tables: tuple[str, ...] = ()  # integer tensors whose values are expert ids (hash routing)
    router: str | None = None  # the router's [E, H] weight, if the block has one
    # model tensor name -> slots after the E experts along its expert axis that are not experts (LongCat-Flash's
    # zero-computation experts, ZAYA's skip class, Inkling's shared-expert gates): kept, never pruned
    extra: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Role:
    """What one stored tensor is to pruning.

    kind: ``expert`` (one expert's tensor; ``span`` is where its index sits in the name), ``rows`` (every
    expert along ``axis``), ``ids`` (values are expert ids), ``shape`` (a compressed-tensors ``weight_shape`` of fused
    experts: its value at ``axis`` is the expert count), ``mtp`` (a multi-token-prediction tensor transformers never
    loads) or ``other`` (copied as it is). ``part`` is ``experts`` or ``router`` for the
    first three.
    """

    kind: str
    layer: int | None = None
    expert: int | None = None
    span: tuple[int, int] | None = None
    axis: int | None = None
    part: str = ""
    model: str | None = None  # the model tensor it loads into
    buffer: bool = False  # it loads into a buffer (a correction bias, a hash table): no parameter count
    extra: int = 0  # ``rows``: slots after the E experts along ``axis`` that are not experts (kept as they are)


@dataclass(frozen=True)
class Layout:
    """A checkpoint's MoE structure: model-side from transformers, disk-side from its conversion mapping."""

    family: str  # config.json's model_type
    model_type: str  # the transformers model type it is built as
    model_class: str
    layers_path: str  # model path of the decoder stack, e.g. "model.layers"
    num_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    count_keys: tuple[tuple[str, ...], ...]  # config.json key paths holding the expert count
    moe: dict[int, MoELayer]
    roles: dict[str, Role] = field(default_factory=dict)  # stored name -> role
    format: Format | None = None
    n_group: int = 1
    topk_group: int = 1
    expert_intermediate: int = 0
    mtp_keys: tuple[str, ...] = ()  # MTP count keys present in config.json
    # multi-token-prediction modules kept (and pruned) as MoE layers num_layers .. num_layers + mtp_layers - 1
    mtp_layers: int = 0
    mtp_style: MtpStyle | None = None
    mtp_disk_layers: str = ""  # how stored names spell the main decoder layers, e.g. "model.layers."

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self.moe)

    @property
    def stat_layers(self) -> int:
        """Rows of the statistics: the decoder layers, then the MTP modules."""
        return self.num_layers + self.mtp_layers

    def mtp_prefix(self, k: int) -> str:
        """The stored-name prefix of MTP module k (its projections and norms)."""
        return self.mtp_style.prefix.format(layers=self.mtp_disk_layers, n=self.num_layers + k, k=k)

    def mtp_layer_prefix(self, k: int) -> str:
        """The stored-name prefix of MTP module k's decoder layer."""
        return self.mtp_style.layer.format(layers=self.mtp_disk_layers, n=self.num_layers + k, k=k)

    def routing(self) -> str:
        text = f"top-{self.top_k}"
        if self.n_group > 1:
            text += f", top-{self.topk_group} of {self.n_group} expert groups"
        return text + " (transformers' own router)"

    def stored(self, kind: str) -> list[str]:
        return [n for n, r in self.roles.items() if r.kind == kind]


# -- transformers' model ------------------------------------------------------------------------------------------
def transformers_model_type(config: dict[str, Any]) -> str:
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise UserError("config.json has no model_type; it is not a transformers checkpoint (restore the original "
                        "config.json)")
    return MODEL_TYPE_ALIASES.get(model_type, model_type)


def build_config(config: dict[str, Any]):
    """transformers' config object for ``config.json`` (a deep copy: the dict is never changed), without the
    quantization section (reap dequantizes by itself)."""
    import transformers
    from transformers import CONFIG_MAPPING, PretrainedConfig

    data = copy.deepcopy(config)
    decode = getattr(PretrainedConfig, "_decode_special_floats", None)  # {"__float__": "Infinity"} as transformers saves
    data = decode(data) if decode is not None else data
    data.pop("quantization_config", None)
    model_type = transformers_model_type(data)
    if model_type != data.get("model_type"):
        data.pop("auto_map", None)
    data.pop("model_type", None)
    if model_type in NOT_STREAMABLE:
        raise UserError(f"model_type {model_type!r} cannot be calibrated layer by layer: {NOT_STREAMABLE[model_type]}; "
                        "it is listed in NOT_STREAMABLE in src/reap/model/arch.py")
    if model_type not in CONFIG_MAPPING:
        raise UserError(
            f"model_type {config.get('model_type')!r} is not implemented by the installed transformers "
            f"{transformers.__version__}; upgrade transformers (`pip install -U transformers`), or, if it is an "
            "architecture transformers has under another name, add it to MODEL_TYPE_ALIASES in src/reap/model/arch.py"
        )
    try:
        return CONFIG_MAPPING[model_type].from_dict(data)
    except Exception as err:  # noqa: BLE001 - a config transformers rejects is the user's file
        raise UserError(f"transformers rejects this config.json as {model_type} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); restore the original config.json") from None


def model_class(cfg, config: dict[str, Any]):
    """The transformers class the checkpoint was saved from (its ``architectures``), else the causal-LM class."""
    import transformers
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    for name in config.get("architectures") or ():
        cls = getattr(transformers, str(name), None)
        if isinstance(cls, type) and getattr(cls, "config_class", None) is type(cfg):
            return cls
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)]
    except KeyError:
        raise UserError(f"transformers has no causal language model for model_type {cfg.model_type!r} (and "
                        f"architectures {config.get('architectures')} name none it has); reap streams causal "
                        "language models") from None


def build_model(cfg, cls, dtype: "torch.dtype | None" = None):
    """transformers' model with every parameter on the meta device and buffers real (on the CPU): rotary
    frequencies and other buffers computed at construction are right, no weight memory is used."""
    import torch
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False), _large_empty_on_meta():
        model = cls._from_config(cfg, dtype=dtype or torch.float32)
    return model.eval()


#: elements above which ``torch.empty`` allocates on the meta device while a meta model is built
LARGE_EMPTY = 1 << 26


class _large_empty_on_meta:
    """While building a meta model, a ``torch.empty`` of more than :data:`LARGE_EMPTY` elements with no device is
    made on the meta device directly. accelerate's ``init_empty_weights`` moves each parameter to meta only once it is
    registered, after ``torch.empty`` allocated it on the CPU: Kimi-K2's fused experts doubled to 768 (the expert-axis
    probe) are a 45 GB ``torch.empty``, which a machine that does not overcommit memory refuses. Buffers are never
    that large, so they stay real."""

    def __enter__(self):
        import torch

        self.real = real = torch.empty

        def empty(*size, **kwargs):
            dims = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
            if kwargs.get("device") is None and all(isinstance(d, int) for d in dims) and math.prod(dims) > LARGE_EMPTY:
                kwargs["device"] = "meta"
            return real(*size, **kwargs)

        torch.empty = empty
        return self

    def __exit__(self, *exc):
        import torch

        torch.empty = self.real
        return False


def extended_config(config: dict[str, Any], extra: int) -> dict[str, Any]:
    """config.json with ``extra`` more decoder layers (the MTP modules' decoder layers, built as transformers builds
    main layers: full attention, MoE)."""
    out = copy.deepcopy(config)
    text = out.get("text_config") if isinstance(out.get("text_config"), dict) else out
    n = text["num_hidden_layers"]
    text["num_hidden_layers"] = n + extra
    for key, fill in (("layer_types", "full_attention"), ("mlp_layer_types", None)):
        value = text.get(key)
        if isinstance(value, list) and len(value) == n:
            text[key] = value + [fill if fill is not None else value[-1]] * extra
    return out
