"""The layer streamer: calibration statistics without ever materializing the whole model.

The model skeleton is built from ``config.json`` on the meta device with transformers' own classes (its
attention, norms and rotary embedding). Then, layer by layer: the layer's tensors are read from the
shards (by a background thread, one layer ahead), FP8 blocks are dequantized on the compute device, the
MoE block is swapped for the instrumented :class:`reap.moe.RoutedMoE`, every calibration batch's hidden
states go through transformers' decoder layer (with the mask its kind needs: causal for attention, padding
only for linear attention, by ``config.layer_types``), the statistics are accumulated (float64) and the layer is
freed. Hidden states stay on the GPU when they fit, else in (pinned) CPU memory, else on disk.

Data parallel: under ``torchrun`` each rank takes every WORLD_SIZE-th sequence, statistics are
all-reduced after each layer (NCCL on GPU, gloo on CPU) and only rank 0 writes.

Legend: B sequences in a batch, S padded length, H hidden, T tokens, E experts.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from reap import __version__
from reap.arch import MoESpec, detect
from reap.checkpoint import Checkpoint, dequantize_blocks, dequantize_mxfp4
from reap.errors import UserError
from reap.moe import FusedClampedSwiGLUMoE, RoutedMoE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineOptions:
    """How to run the layer streamer."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16
    batch_tokens: int = 16384  # padded tokens per forward batch
    offload: str = "auto"  # where hidden states live between layers: auto | device | cpu | disk
    workdir: Path | None = None  # for offload=disk (default: a temporary directory)
    progress: bool = True
    trust_remote_code: bool = False

    def resolved(self) -> "EngineOptions":
        """These options with ``dtype="auto"`` made concrete: bfloat16 on a GPU, float32 on the CPU."""
        if self.dtype != "auto":
            return self
        gpu = self.device.startswith("cuda") or (self.device == "auto" and torch.cuda.is_available())
        return replace(self, dtype="bfloat16" if gpu else "float32")


# -- torch.distributed -------------------------------------------------------------------------------
@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, device: str) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend=backend)
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def sum_int(self, value: int, device: torch.device) -> int:
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t)
        return int(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def resolve_device(device: str, dist: Dist) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
        if device == "cuda":
            device = f"cuda:{dist.local_rank}"
    elif device != "cpu":
        raise UserError(f"--device {device!r} is not supported; use cpu, cuda or cuda:N")
    return torch.device(device)


# -- hidden-state storage ------------------------------------------------------------------------------
class HiddenStore:
    """Per-batch hidden states between layers, on the device, in CPU memory, or in files on disk."""

    def __init__(self, mode: str, device: torch.device, workdir: Path | None):
        self.mode, self.device = mode, device
        self._items: dict[int, torch.Tensor] = {}
        self._tmp = None
        if mode == "disk":
            if workdir is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="reap-hidden-")
                workdir = Path(self._tmp.name)
            self.dir = Path(workdir)
            self.dir.mkdir(parents=True, exist_ok=True)

    def put(self, i: int, h: torch.Tensor) -> None:
        if self.mode == "device":
            self._items[i] = h
        elif self.mode == "cpu":
            if self.device.type != "cuda":
                self._items[i] = h
                return
            # one pinned buffer per batch, reused every layer: a single device-to-host copy, no re-pinning;
            # the stream orders it after this layer's reads of the same buffer
            buf = self._items.get(i)
            if buf is None or buf.shape != h.shape or buf.dtype != h.dtype:
                buf = torch.empty(h.shape, dtype=h.dtype, pin_memory=True)
                self._items[i] = buf
            buf.copy_(h, non_blocking=True)
        else:
            from safetensors.torch import save_file

            save_file({"h": h.to("cpu").contiguous()}, str(self.dir / f"hidden-{i}.safetensors"))

    def get(self, i: int) -> torch.Tensor:
        if self.mode == "disk":
            from safetensors.torch import load_file

            return load_file(str(self.dir / f"hidden-{i}.safetensors"))["h"].to(self.device)
        return self._items[i].to(self.device, non_blocking=True)

    def close(self) -> None:
        self._items.clear()
        if self._tmp is not None:
            self._tmp.cleanup()


@dataclass
class Batch:
    ids: torch.Tensor  # [B, S] int64, right-padded
    lengths: list[int]

    @property
    def padded(self) -> bool:
        return min(self.lengths) != self.ids.shape[1]


def make_batches(sequences: list[list[int]], batch_tokens: int) -> list[Batch]:
    """Consecutive sequences grouped so that B x S (padded) stays within batch_tokens (at least one each)."""
    batches, group = [], []
    for seq in sequences:
        if group and (len(group) + 1) * max(len(seq), *(len(g) for g in group)) > batch_tokens:
            batches.append(group)
            group = []
        group.append(seq)
    if group:
        batches.append(group)
    out = []
    for group in batches:
        width = max(len(s) for s in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        for row, seq in enumerate(group):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        out.append(Batch(ids, [len(s) for s in group]))
    return out


# -- the streamer ----------------------------------------------------------------------------------------
@dataclass
class StreamStats:
    tokens: int = 0
    seconds: float = 0.0
    layer_seconds: list[float] = field(default_factory=list)


class LayerStreamer:
    """Runs sequences through the model one decoder layer at a time; see the module docstring."""

    def __init__(self, ckpt: Checkpoint, spec: MoESpec, sequences: list[list[int]], opts: EngineOptions,
                 dist: Dist | None = None):
        from transformers import AutoConfig, AutoModelForCausalLM

        opts = opts.resolved()
        self.ckpt, self.spec, self.opts = ckpt, spec, opts
        self.dist = dist or Dist()
        self.device = resolve_device(opts.device, self.dist)
        if opts.dtype not in DTYPES:
            raise UserError(f"--dtype {opts.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        self.dtype = DTYPES[opts.dtype]
        if opts.batch_tokens <= 0:
            raise UserError("--batch-tokens must be a positive number of tokens, e.g. 16384")
        cfg = dict(ckpt.config)
        cfg.pop("quantization_config", None)  # weights are dequantized by reap itself
        model_type = cfg.pop("model_type")
        if spec.family.transformers_model_type:  # e.g. kimi_k2 -> deepseek_v3: transformers' classes, not remote code
            model_type = spec.family.transformers_model_type
            cfg.pop("auto_map", None)
        self.config = AutoConfig.for_model(model_type, **cfg)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(
                self.config, attn_implementation=spec.family.attn_implementation,
                trust_remote_code=opts.trust_remote_code
            )
        self.config = self.model.config
        self.layers = self.model.model.layers
        rotary_cls = type(self.model.model.rotary_emb)
        self.rotary = rotary_cls(config=self.config).to(self.device)
        self.batches = make_batches(sequences, opts.batch_tokens)
        self.tokens = sum(sum(b.lengths) for b in self.batches)
        self.store = HiddenStore(self._offload_mode(), self.device, opts.workdir)
        self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="reap-prefetch")
        self._pending: dict[int, cf.Future] = {}
        self._original_moe: dict[int, torch.nn.Module] = {}  # transformers' MoE blocks (meta) while swapped out
        self.stats = StreamStats(tokens=self.tokens)

    # -- placement
    def _offload_mode(self) -> str:
        mode = self.opts.offload
        if mode not in ("auto", "device", "cpu", "disk"):
            raise UserError(f"--offload {mode!r} is not one of auto, device, cpu, disk")
        if mode != "auto":
            return mode
        need = self.tokens * self.spec.hidden_size * torch.finfo(self.dtype).bits // 8
        need += sum(b.ids.numel() - sum(b.lengths) for b in self.batches) * self.spec.hidden_size * 4
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if need < free - 3 * self.layer_bytes() - (8 << 30):
                return "device"
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):  # pragma: no cover
            available = 1 << 40
        return "cpu" if need < available // 2 else "disk"

    def layer_bytes(self, layer: int = 0) -> int:
        prefix = self.spec.family.layer_prefix.format(layer=layer)
        return sum(i.numel * 2 for n, i in self.ckpt.infos.items() if n.startswith(prefix))

    # -- reading a layer (background thread) and materializing it (compute thread)
    def _read(self, layer: int) -> dict[str, torch.Tensor]:
        prefix = self.spec.family.layer_prefix.format(layer=layer)
        pin = self.device.type == "cuda"
        out = {}
        for name in self.ckpt.infos:
            if name.startswith(prefix):
                t = self.ckpt.tensor(name)
                out[name[len(prefix):]] = t.pin_memory() if pin else t
        return out

    def prefetch(self, layer: int) -> None:
        if 0 <= layer < self.spec.num_layers and layer not in self._pending:
            self._pending[layer] = self._pool.submit(self._read, layer)

    def _weight(self, raw: dict[str, torch.Tensor], key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = raw[key].to(self.device, non_blocking=True)
        scale = raw.get(key + "_scale_inv")
        if scale is not None and t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            return dequantize_blocks(t, scale.to(self.device), dtype or self.dtype, self.ckpt.block_size)
        return t.to(dtype or self.dtype)

    def load_layer(self, layer: int) -> torch.nn.Module:
        """Materialize decoder layer ``layer`` on the device, with the instrumented MoE if it has experts."""
        self.prefetch(layer)
        raw = self._pending.pop(layer).result()
        self.prefetch(layer + 1)
        fam, spec = self.spec.family, self.spec
        module = self.layers[layer]
        lp = fam.layer_prefix.format(layer=layer)
        moe_prefix = fam.moe_prefix.format(layer=layer)[len(lp):]
        router_key = spec.router_name(layer)[len(lp):]
        has_experts = router_key in raw  # dense layers (first_k_dense_replace, mlp_only_layers, ...) have no router
        state = {}
        for key in raw:
            if key.endswith("_scale_inv") or (has_experts and key.startswith(moe_prefix)):
                continue
            state[key] = self._weight(raw, key)
        if has_experts:
            original = self._original_moe.setdefault(layer, getattr(module, fam.moe_module))
            setattr(module, fam.moe_module, self._routed_moe(layer, raw, original))
        missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
        missing = [m for m in missing if not m.startswith(fam.moe_module + ".")] if has_experts else missing
        if missing or unexpected:
            raise UserError(
                f"layer {layer}: the checkpoint's tensors do not match transformers' {type(module).__name__} "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}); check the {fam.name} entry in src/reap/arch.py"
            )
        return module

    def _routed_moe(self, layer: int, raw: dict[str, torch.Tensor], original: torch.nn.Module) -> RoutedMoE:
        fam = self.spec.family
        if fam.expert_fn != ("clamped_swiglu" if fam.fused_experts else "glu"):  # the two kinds moe.py computes
            layout = "fused" if fam.fused_experts else "per-expert"
            raise UserError(f"family {fam.name}: expert_fn {fam.expert_fn!r} with {layout} tensors is not implemented; "
                            "src/reap/moe.py computes glu experts from per-expert tensors and clamped_swiglu ones from "
                            "fused tensors")
        if fam.fused_experts:  # one tensor per projection, experts along dim 0 (gpt-oss)
            return self._fused_moe(layer, raw)
        spec, fam, lp = self.spec, self.spec.family, self.spec.family.layer_prefix.format(layer=layer)
        key = lambda name: name[len(lp):]  # noqa: E731
        router_raw = raw[key(spec.router_name(layer))]
        # the router runs in float32 when the family says so or it is stored so (released FP8 layouts), else in
        # the compute dtype
        router_dtype = torch.float32 if fam.router_float32 or router_raw.dtype == torch.float32 else self.dtype
        router = self._weight(raw, key(spec.router_name(layer)), router_dtype)
        bias_name = spec.router_bias_name(layer)
        bias = raw[key(bias_name)].to(self.device) if bias_name and key(bias_name) in raw else None
        used = {key(spec.router_name(layer))} | ({key(bias_name)} if bias_name else set())
        E, I, H = spec.num_experts, spec.expert_intermediate, spec.hidden_size
        w = {p: torch.empty((E, H, I) if p == "down" else (E, I, H), dtype=self.dtype, device=self.device)
             for p in ("gate", "up", "down")}
        for e in range(E):
            for p in w:
                name = key(spec.projection_name(layer, e, p))
                w[p][e] = self._weight(raw, name)
                used.add(name)
        # shared experts and their gate: transformers' own sub-modules of the MoE block, loaded with this layer's tensors
        shared = {}
        for attr in (fam.shared_experts, fam.shared_expert_gate):
            if not attr:
                continue
            sp = fam.moe_prefix.format(layer=layer)[len(lp):] + attr + "."
            sstate = {k[len(sp):]: self._weight(raw, k) for k in raw if k.startswith(sp) and not k.endswith("_scale_inv")}
            used |= {k for k in raw if k.startswith(sp)}
            shared[attr] = getattr(original, attr)
            missing, unexpected = shared[attr].load_state_dict(sstate, strict=False, assign=True)
            if missing or unexpected:
                raise UserError(f"layer {layer}: the tensors under {sp} do not match transformers' "
                                f"{type(shared[attr]).__name__} (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                                f"check the {fam.name} entry in src/reap/arch.py")
        # every tensor of the MoE block must be understood: an unknown one (a gate of its own, say) means the
        # family entry does not describe this checkpoint and the routing would silently differ
        moe_prefix = fam.moe_prefix.format(layer=layer)[len(lp):]
        regex = fam.expert_regex()
        unknown = [k for k in raw if k.startswith(moe_prefix) and k not in used and not k.endswith("_scale_inv")
                   and not regex.match(lp + k)]
        if unknown:
            raise UserError(f"layer {layer}: MoE tensors {unknown[:3]} are not described by the {fam.name} entry in "
                            "src/reap/arch.py (reap would route differently from the model); add them there")
        act = getattr(self.config, fam.hidden_act_key, "silu")
        return RoutedMoE(fam, spec.top_k, router, bias, w["gate"], w["up"], w["down"], act, routing=spec.routing,
                         shared=shared.get(fam.shared_experts), shared_gate=shared.get(fam.shared_expert_gate))

    def _fused_weight(self, raw: dict[str, torch.Tensor], key: str) -> tuple[torch.Tensor, set[str]]:
        """A fused expert tensor in the compute dtype (dequantized from MXFP4 ``_blocks``/``_scales`` when stored so),
        and the raw keys it used."""
        if key in raw:
            return self._weight(raw, key), {key}
        blocks, scales = raw.get(key + "_blocks"), raw.get(key + "_scales")
        if blocks is None or scales is None:
            raise UserError(f"the checkpoint has neither {key} nor {key}_blocks + {key}_scales (MXFP4); it does not "
                            f"match the {self.spec.family.name} entry in src/reap/arch.py")
        w = dequantize_mxfp4(blocks.to(self.device), scales.to(self.device), self.dtype)
        return w, {key + "_blocks", key + "_scales"}

    def _fused_moe(self, layer: int, raw: dict[str, torch.Tensor]) -> FusedClampedSwiGLUMoE:
        """The instrumented MoE of a fused-expert family (gpt-oss), with every MoE tensor of the layer accounted for."""
        spec, fam, lp = self.spec, self.spec.family, self.spec.family.layer_prefix.format(layer=layer)
        key = lambda name: name[len(lp):]  # noqa: E731
        router_key = key(spec.router_name(layer))
        router_raw = raw[router_key]
        router_dtype = torch.float32 if fam.router_float32 or router_raw.dtype == torch.float32 else self.dtype
        router = self._weight(raw, router_key, router_dtype)
        used = {router_key}
        logit_bias = None
        bias_name = spec.router_logit_bias_name(layer)
        if bias_name and key(bias_name) in raw:
            logit_bias = self._weight(raw, key(bias_name), router_dtype)
            used.add(key(bias_name))
        w = {}
        for part, name in fam.fused_names(layer).items():
            w[part], keys = self._fused_weight(raw, key(name))
            used |= keys
        E, I, H = spec.num_experts, spec.expert_intermediate, spec.hidden_size
        want = {"gate_up": (E, H, 2 * I), "gate_up_bias": (E, 2 * I), "down": (E, I, H), "down_bias": (E, H)}
        bad = {p: tuple(t.shape) for p, t in w.items() if tuple(t.shape) != want.get(p, tuple(t.shape))}
        if bad:
            raise UserError(f"layer {layer}: fused expert tensors of shape {bad}, expected {want}; config.json and the "
                            "weights disagree")
        moe_prefix = fam.moe_prefix.format(layer=layer)[len(lp):]
        unknown = [k for k in raw if k.startswith(moe_prefix) and k not in used]
        if unknown:
            raise UserError(f"layer {layer}: MoE tensors {unknown[:3]} are not described by the {fam.name} entry in "
                            "src/reap/arch.py (reap would compute differently from the model); add them there")
        limit = fam.swiglu_limit
        if fam.swiglu_limit_key and isinstance(self.ckpt.config.get(fam.swiglu_limit_key), (int, float)):
            limit = float(self.ckpt.config[fam.swiglu_limit_key])
        return FusedClampedSwiGLUMoE(fam, spec.top_k, router, logit_bias, w["gate_up"], w["gate_up_bias"], w["down"],
                                     w["down_bias"], alpha=fam.swiglu_alpha, limit=limit, routing=spec.routing)

    def free_layer(self, layer: int) -> None:
        """Drop the layer's weights: the instrumented MoE (plain tensors, which .to("meta") would not move)
        goes, transformers' block comes back, and every parameter returns to the meta device."""
        module = self.layers[layer]
        original = self._original_moe.pop(layer, None)
        if original is not None:
            setattr(module, self.spec.family.moe_module, original)
        module.to("meta")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- running
    def embed(self) -> None:
        weight = self.ckpt.load(self.spec.family.embed_weight, self.dtype, self.device)
        for i, b in enumerate(self.batches):
            self.store.put(i, F.embedding(b.ids.to(self.device), weight))
        del weight

    def _mask_function(self, layer: int):
        """transformers' mask builder for this layer's kind (``config.layer_types``; full attention without it):
        the 4D causal mask for attention, the 2D padding mask for linear attention (Qwen3-Next's Gated DeltaNet),
        exactly as the model's own forward picks it."""
        from transformers.masking_utils import LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING, create_causal_mask

        kinds = getattr(self.config, "layer_types", None)
        if not kinds:
            return create_causal_mask
        fn = LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING.get(kinds[layer])
        if not callable(fn):
            raise UserError(f"layer {layer} is of kind {kinds[layer]!r} (config.json layer_types), for which "
                            "transformers has no mask builder that reap knows how to call; upgrade transformers or "
                            "add the kind to LayerStreamer._mask_function in src/reap/calibrate.py")
        return fn

    def _inputs(self, b: Batch, h: torch.Tensor, layer: int = 0):
        B, S = b.ids.shape
        pos = torch.arange(S, device=self.device).unsqueeze(0).expand(B, S)
        mask2d = None
        if b.padded:
            mask2d = torch.zeros(B, S, dtype=torch.long, device=self.device)
            for row, n in enumerate(b.lengths):
                mask2d[row, :n] = 1
        mask = self._mask_function(layer)(config=self.config, inputs_embeds=h, attention_mask=mask2d,
                                          past_key_values=None, position_ids=pos)
        return pos, mask, (mask2d.reshape(-1).bool() if mask2d is not None else None)

    @torch.inference_mode()
    def run_layer(self, layer: int, accumulator=None, desc: str | None = None) -> None:
        """Run every batch through decoder layer ``layer``; MoE statistics go to ``accumulator``."""
        t0 = time.perf_counter()
        module = self.load_layer(layer)
        moe = getattr(module, self.spec.family.moe_module)
        if isinstance(moe, RoutedMoE):
            moe.accumulator = accumulator
        bar = tqdm(total=self.tokens, unit="tok", unit_scale=True, file=sys.stderr, leave=False,
                   desc=desc or f"layer {layer + 1}/{self.spec.num_layers}",
                   disable=not self.opts.progress or self.dist.rank != 0)
        for i, b in enumerate(self.batches):
            h = self.store.get(i)
            pos, mask, token_mask = self._inputs(b, h, layer)
            if isinstance(moe, RoutedMoE):
                moe.token_mask = token_mask
            out = module(h, attention_mask=mask, position_ids=pos, past_key_values=None, use_cache=False,
                         position_embeddings=self.rotary(h, pos))
            out = out[0] if isinstance(out, tuple) else out
            self.store.put(i, out)
            bar.update(sum(b.lengths))
        bar.close()
        self.free_layer(layer)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats.layer_seconds.append(time.perf_counter() - t0)

    @torch.inference_mode()
    def final_hidden(self, i: int) -> torch.Tensor:
        """Batch i's last hidden states after the final norm, [B, S, H] (for evaluation)."""
        if not hasattr(self, "_final_norm"):
            norm = self.model.model.norm
            norm.load_state_dict({"weight": self.ckpt.load(self.spec.family.final_norm_weight, self.dtype, self.device)},
                                 assign=True)
            self._final_norm = norm
        return self._final_norm(self.store.get(i))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.store.close()
        self.ckpt.close()


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak host RSS and (on CUDA) peak device memory, in GiB."""
    out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)}
    if device.type == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / (1 << 30)
    return out


# -- calibration -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrateOptions:
    model: str
    data: Any  # reap.data.DataOptions
    out: Path | None = None  # stats file (safetensors); None = keep in memory
    engine: EngineOptions = EngineOptions()
    resume: bool = False
    overwrite: bool = False
    recipe: dict[str, Any] | None = None  # the effective CLI options, recorded in the stats metadata


def _data_meta(data) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(data).items()}


def calibrate(opts: CalibrateOptions, ckpt: Checkpoint | None = None, log=print):
    """Stream the calibration data through the model; return (ExpertStats, summary dict).

    With ``opts.out`` the statistics are written after every layer (rank 0 only), so ``resume`` can pick
    up at the next layer.
    """
    from reap.data import calibration_sequences, load_tokenizer
    from reap.saliency import ExpertStats, LayerAccumulator

    opts = replace(opts, engine=opts.engine.resolved())
    ckpt = ckpt or Checkpoint(opts.model)
    spec = detect(ckpt.config)
    out = Path(opts.out) if opts.out else None
    meta = {
        "tool_version": __version__,
        "model": str(ckpt.path),
        "family": spec.family.name,
        "num_layers": spec.num_layers,
        "num_experts": spec.num_experts,
        "top_k": spec.top_k,
        "data": _data_meta(opts.data),
        "dtype": opts.engine.dtype,
    }
    stats = None
    if out is not None and out.exists():
        if opts.resume:
            stats = ExpertStats.load(out)
            mismatch = [k for k in ("model", "num_experts", "num_layers", "data", "dtype") if stats.meta.get(k) != meta[k]]
            if mismatch:
                raise UserError(
                    f"--resume: {out} was made with different {', '.join(mismatch)} "
                    f"({', '.join(f'{k}={stats.meta.get(k)!r}' for k in mismatch)}); rerun with the same options "
                    "or start fresh with --overwrite"
                )
        elif not opts.overwrite:
            raise UserError(f"stats file {out} exists; pass --resume to continue it, --overwrite to replace it, or choose another --out")
    elif opts.resume and out is None:
        raise UserError("--resume needs --out STATS (the stats file to continue)")
    if out is not None and not out.parent.exists():
        raise UserError(f"the folder of --out ({out.parent}) does not exist; create it first")

    dist = Dist.from_env(opts.engine.device)
    tokenizer = load_tokenizer(ckpt.path, trust_remote_code=opts.engine.trust_remote_code)
    sequences = calibration_sequences(opts.data, tokenizer)
    mine = sequences[dist.rank :: dist.world]
    streamer = LayerStreamer(ckpt, spec, mine, opts.engine, dist)
    tokens = dist.sum_int(streamer.tokens, streamer.device)
    meta.update({"samples": len(sequences), "tokens": tokens, "world_size": dist.world})
    if opts.recipe is not None:
        meta["options"] = opts.recipe
    if stats is None:
        stats = ExpertStats(spec.num_layers, spec.num_experts, meta)
    start_layer = 0
    while start_layer in stats.completed:
        start_layer += 1
    if dist.rank == 0:
        log(f"calibrating {ckpt.path.name}: {len(sequences)} samples, {tokens} tokens, {spec.num_layers} layers x "
            f"{spec.num_experts} experts (top-{spec.top_k}), {streamer.device} {opts.engine.dtype}, "
            f"hidden states on {streamer.store.mode}" + (f", {dist.world} ranks" if dist.world > 1 else "")
            + (f"; resuming at layer {start_layer}" if start_layer else ""))
    t0 = time.perf_counter()
    try:
        streamer.prefetch(0)
        streamer.embed()
        layer_bar = tqdm(range(spec.num_layers), desc="layers", unit="layer", file=sys.stderr,
                         disable=not opts.engine.progress or dist.rank != 0)
        for layer in layer_bar:
            if layer < start_layer:  # replay: rebuild the hidden states, stats are already final
                streamer.run_layer(layer, None, desc=f"replay {layer + 1}/{spec.num_layers}")
                continue
            acc = LayerAccumulator(spec.num_experts, streamer.device)
            streamer.run_layer(layer, acc)
            acc.all_reduce()
            stats.set_layer(layer, acc)
            if out is not None and dist.rank == 0:
                stats.save(out)
            layer_bar.set_postfix(tok_s=f"{streamer.tokens * dist.world / streamer.stats.layer_seconds[-1]:.0f}")
        layer_bar.close()
    finally:
        streamer.close()
    seconds = time.perf_counter() - t0
    summary = {"tokens": tokens, "seconds": round(seconds, 3), "layers": spec.num_layers - start_layer,
               "tokens_per_second_per_layer": round(tokens * (spec.num_layers - start_layer) / max(seconds, 1e-9), 1),
               **{k: round(v, 3) for k, v in peak_memory(streamer.device).items()}}
    stats.meta["summary"] = summary
    if out is not None and dist.rank == 0:
        stats.save(out)
    dist.barrier()
    return stats, summary
