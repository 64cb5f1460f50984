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

Legend: E experts, K kept experts, L decoder layers, H hidden.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from reap.errors import UserError
from reap.formats import Format, checkpoint_format, companion_problem, group_parts

if TYPE_CHECKING:
    import torch

    from reap.checkpoint import Checkpoint

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
    :mod:`reap.mtp`). ``{layers}`` is the main decoder layers' stored prefix, ``{n}`` = num_hidden_layers + k."""

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
GROUP_SCORE_TOP = 2  # group-limited routers (DeepSeek-V3 style) score a group by its best two experts


@dataclass(frozen=True)
class MoELayer:
    """One decoder layer's MoE block, as transformers builds it (model-side names)."""

    index: int
    block: str  # module path of the MoE block (the experts module's parent)
    experts: str  # module path of transformers' experts module
    tensors: dict[str, int]  # model tensor name -> its expert axis (experts, router rows, biases)
    id_tables: tuple[str, ...] = ()  # integer tensors whose values are expert ids (hash routing)
    router: str | None = None  # the router's [E, H] weight, if the block has one


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

    def min_kept(self) -> int:
        """The fewest experts a layer may keep: top-k, and with groups enough in the allowed groups for top-k
        (and at least two per group, which the group score needs)."""
        if self.n_group <= 1:
            return self.top_k
        return max(-(-self.top_k // self.topk_group), GROUP_SCORE_TOP) * self.n_group

    def routing(self) -> str:
        text = f"top-{self.top_k}"
        if self.n_group > 1:
            text += f", top-{self.topk_group} of {self.n_group} expert groups"
        return text + " (transformers' own router)"

    def stored(self, kind: str) -> list[str]:
        return [n for n, r in self.roles.items() if r.kind == kind]


def human_count(n: float) -> str:
    """12_300_000_000 -> '12.3B'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.3g}{unit}" if value < 100 else f"{math.floor(value + 0.5)}{unit}"
    return str(int(n))


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


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
                        "it is listed in NOT_STREAMABLE in src/reap/arch.py")
    if model_type not in CONFIG_MAPPING:
        raise UserError(
            f"model_type {config.get('model_type')!r} is not implemented by the installed transformers "
            f"{transformers.__version__}; upgrade transformers (`pip install -U transformers`), or, if it is an "
            "architecture transformers has under another name, add it to MODEL_TYPE_ALIASES in src/reap/arch.py"
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
    count_keys, axes = [], {}
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
            if len(dims) != 1 or before[dims[0]] != E or shape[dims[0]] != 2 * E:
                raise UserError(f"transformers' tensor {name} changes from {list(before)} to {list(shape)} when the "
                                f"expert count doubles; reap only slices tensors along one expert axis")
            axes[name] = dims[0]
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
        moe[layer] = MoELayer(layer, block, path, tensors, ids, router)
    stray = [n for n in axes if not any(n in m.tensors for m in moe.values())]
    if stray:
        raise UserError(f"{stray[0]} follows the expert count but lies outside every decoder layer's MoE block; "
                        "reap does not know which layer's choice applies to it")
    first = moe[min(moe)]
    block_modules = [modules[first.block], *modules[first.block].children()]
    top_k = _attr(block_modules, TOP_K_ATTRS) or _attr([text_cfg], TOP_K_ATTRS)
    if top_k is None:
        raise UserError(f"cannot tell top-k from transformers' {type(modules[first.block]).__name__} (no attribute "
                        f"{'/'.join(TOP_K_ATTRS)}); add the attribute name to TOP_K_ATTRS in src/reap/arch.py")
    n_group = _attr(block_modules, N_GROUP_ATTRS) or _attr([text_cfg], N_GROUP_ATTRS) or 1
    topk_group = _attr(block_modules, TOPK_GROUP_ATTRS) or _attr([text_cfg], TOPK_GROUP_ATTRS) or 1
    experts_mod = modules[first.experts]
    intermediate = getattr(experts_mod, "intermediate_dim", None) or getattr(experts_mod, "intermediate_size", 0)
    num_layers = getattr(text_cfg, "num_hidden_layers", None) or len(model.get_submodule(layers_path))
    layout = Layout(
        family=str(config.get("model_type")), model_type=cfg.model_type, model_class=cls.__name__,
        layers_path=layers_path, num_layers=int(num_layers), num_experts=E, top_k=int(top_k),
        hidden_size=int(text_cfg.hidden_size), count_keys=tuple(count_keys), moe=moe,
        n_group=n_group if n_group > 1 else 1, topk_group=topk_group if n_group > 1 else 1,
        expert_intermediate=int(intermediate or 0),
        mtp_keys=tuple(k for k in MTP_KEYS if isinstance(config.get(k), int) and config.get(k)),
    )
    return layout, model, cfg


# -- the disk layout ----------------------------------------------------------------------------------------------
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
                role = Role("rows", moe.index, axis=axis, part=part, model=target)
                for kind, stored in parts.items():
                    companion = _companion_role(kind, ckpt.infos[stored], ckpt.infos[parts["values"]].shape, axis, E,
                                                role)
                    if companion is None:
                        shape = ckpt.infos[stored].shape
                        raise UserError(f"{stored} has shape {list(shape)}: expected {E} experts along dimension "
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


def _mtp_modules(layout: Layout, names) -> tuple[MtpStyle | None, int, str]:
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


def derive(ckpt: "Checkpoint", keep_mtp: bool = True) -> Layout:
    """The checkpoint's :class:`Layout`, every stored tensor with its role. Multi-token-prediction modules stored
    beside the decoder layers are kept as MoE layers after the last one (their decoder layer built by transformers
    as one more layer of the model), unless ``keep_mtp`` is False: then they are left out of pruned outputs."""
    return derive_with_model(ckpt, keep_mtp)[0]


def derive_with_model(ckpt: "Checkpoint", keep_mtp: bool = True):
    """:func:`derive` and transformers' meta model it maps the checkpoint onto (with the MTP modules' decoder layers
    as layers num_hidden_layers + k when they are kept)."""
    layout, model, _ = derive_model(ckpt.config)
    style, count, disk = _mtp_modules(layout, ckpt.infos) if keep_mtp else (None, 0, "")
    if not count:
        return map_checkpoint(layout, model, ckpt), model
    wide, wide_model, _ = derive_model(extended_config(ckpt.config, count), type(model))
    mtp = replace(wide, num_layers=layout.num_layers, mtp_layers=count, mtp_style=style, mtp_disk_layers=disk,
                   mtp_keys=layout.mtp_keys)
    return map_checkpoint(mtp, wide_model, ckpt), wide_model
