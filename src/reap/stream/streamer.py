"""The layer streamer: a model's decoder layers run one at a time, as transformers wrote them.

The model is transformers' own class built from ``config.json`` with every parameter on the meta device
(:func:`reap.model.arch.build_model`). The text model's own tensors outside the decoder layers (embeddings, final
norm, ...) are loaded once; then, layer by layer, the layer's stored tensors are read from the shards (by a
background thread, up to two layers ahead), dequantized on the compute device (:mod:`reap.formats`), loaded by
transformers' own loader (its conversion mapping merges per-expert tensors into fused ones) or, for later layers of
a kind, by the recipe learned from it (:mod:`reap.stream.load_recipe`), every batch's hidden states go through the layer,
and the layer returns to the meta device. Layer 0 takes its input, the embeddings, from its own call of the base
model.

What a layer is called with is what transformers' base model passes it: for each batch, the base model's own
forward runs with the decoder layers replaced by pass-throughs and stops at the layer in question
(:meth:`LayerStreamer.layer_call`), so masks per layer kind, rotary embeddings, per-layer inputs and hash-routing
token ids are the model's own. The MoE blocks run as transformers wrote them too (routers, shared experts,
gates); only the experts go through reap's implementation (:mod:`reap.stream.experts`), which computes each expert on its
routed tokens and feeds the statistics. Hidden states stay on the GPU when they fit, else in (pinned) CPU
memory, else on disk.

This module holds :class:`LayerStreamer` (which layer gets which stored tensors, where the hidden states live, the
base model's calls, running a layer); its parts live beside it: :mod:`reap.stream.loader` (preparing layers on the
prefetch thread: the streamer's ``loader``), :mod:`reap.stream.weights` (reading a layer's bytes, dequantizing,
loading), :mod:`reap.stream.hidden` (batches and the hidden states between layers), :mod:`reap.stream.ranks`
(torchrun ranks, the device, shared reading) and :mod:`reap.stream.observers` (what a caller hands the streamer to
do around each MoE layer: calibration's greedy re-routing search, :mod:`reap.calibrate.greedy`).

Legend: B sequences in a batch, S padded length, H hidden, T tokens.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from reap.model.arch import Layout, build_config, build_model, model_class
from reap.io.checkpoint import Checkpoint
from reap.core.errors import UserError
from reap.stream.loader import LayerLoader
from reap.stream.hidden import Batch, HiddenStore, make_batches
from reap.stream.experts import ExpertsProbe, use_reap_experts
from reap.core.options import EngineOptions
from reap.stream.observers import close_all, finish_all, start_all
from reap.stream.selfcheck import SelfCheck
from reap.stream.ranks import Dist, WeightShare, resolve_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


#: types of the objects a base model hands every decoder layer of one forward for the layers to share (a layer
#: writes, a later one reads): carried per batch from layer to layer (:meth:`LayerStreamer.carried`)
CARRIED_STATE = ("KVSharingDict",)


class _Stop(Exception):
    """Raised by the pass-through layer that was asked for: its call has been captured."""


def block_of(layout: Layout, module, moe, layer: int):
    """The MoE block of decoder layer ``layer`` (``module``; the layer itself where the block is the layer)."""
    return module.get_submodule(moe.block[len(f"{layout.layers_path}.{layer}."):]) if moe.block != \
        f"{layout.layers_path}.{layer}" else module


# -- the streamer ----------------------------------------------------------------------------------------


@dataclass
class StreamStats:
    tokens: int = 0
    layer_seconds: list[float] = field(default_factory=list)  # per layer run: load + forward + statistics
    wait_seconds: list[float] = field(default_factory=list)  # of which waiting for the layer's weights


class LayerStreamer:
    """Runs sequences through the model one decoder layer at a time; see the module docstring."""

    def __init__(self, ckpt: Checkpoint, layout: Layout, sequences: list[list[int]] | None, opts: EngineOptions,
                 dist: Dist | None = None, observers=(), accumulator=None):
        """``sequences`` may come later (:meth:`set_sequences`): layer 0 is read and materialized in the background
        from here on, while the caller tokenizes. ``observers``: :class:`reap.stream.observers.LayerObserver` run
        around every MoE layer; ``accumulator``: makes the accumulator of the warm-up batch's statistics
        (:class:`reap.stream.loader.LayerLoader`; None: none taken)."""
        opts = opts.resolved()
        self.ckpt, self.layout, self.opts = ckpt, layout, opts
        self.dist = dist or Dist()
        self.device = resolve_device(opts.device, self.dist)
        if opts.dtype not in DTYPES:
            raise UserError(f"--dtype {opts.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        self.dtype = DTYPES[opts.dtype]
        if opts.batch_tokens <= 0:
            raise UserError("--batch-tokens must be a positive number of tokens, e.g. 16384")
        cfg = build_config(ckpt.config)
        self.model = build_model(cfg, model_class(cfg, ckpt.config), self.dtype)
        self.experts = use_reap_experts(self.model)
        self.selfcheck = SelfCheck(str(ckpt.config.get("model_type")))
        self.layers = self.model.get_submodule(layout.layers_path)
        self.text = self.model.get_submodule(layout.layers_path.rpartition(".")[0])
        self.text_path = layout.layers_path.rpartition(".")[0]
        for sub in self.text.modules():  # buffers (rotary frequencies, correction biases...) live on the device
            for name, b in list(sub._buffers.items()):
                if b is not None:
                    sub._buffers[name] = b.to(self.device)
        self._stored = self._stored_by_layer()
        self.observers = list(observers)
        # transformers' loader works in the calling thread (so on the prefetch thread's CUDA stream), not in a pool
        os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
        if opts.exchange not in ("auto", "read", "share"):
            raise UserError(f"--weight-exchange {opts.exchange!r} is not one of auto, read, share")
        share = None
        if self.dist.world > 1 and (opts.exchange == "share" or (opts.exchange == "auto" and self.device.type == "cuda")):
            share = WeightShare.for_node(self.device)
        self.loader = LayerLoader(ckpt, layout, self.model, self.layers, self.device, self.dtype, opts, self.dist,
                                  self._stored, share, self.layer_call_for, accumulator)
        self._arity: dict[int, int] = {}  # layer -> length of the tuple it returns (0: a tensor)
        self._carried: dict[tuple, object] = {}  # (batch, keyword) -> state the layers share (CARRIED_STATE)
        self._from_embeddings = False  # layer 0 takes its input from the base model's call (embed())
        self.loader._load(self._stored["base"], "the embeddings and final norm")
        self.loader.warm_up_early()  # on a GPU: a random batch through a spare layer, beside layer 0's loading
        self.loader.prefetch(0)
        self.batches: list[Batch] = []
        self.tokens = 0
        self.store: HiddenStore | None = None
        if sequences is not None:
            self.set_sequences(sequences)

    def set_sequences(self, sequences: list[list[int]]) -> None:
        """The calibration (or evaluation) sequences: batches, and where their hidden states live. Where the model's
        attention materializes its scores (eager attention), a batch's [B, heads, S, S] float32 scores stay within
        ~4 GiB."""
        text = self.model.config.get_text_config()
        max_square = None
        if getattr(self.model.config, "_attn_implementation", None) == "eager":
            max_square = (4 << 30) // (4 * max(1, getattr(text, "num_attention_heads", 1) or 1))
        self.batches = make_batches(sequences, self.opts.batch_tokens, max_square)
        self.tokens = sum(sum(b.lengths) for b in self.batches)
        self.store = HiddenStore(self._offload_mode(), self.device, self.opts.workdir)
        self.stats = StreamStats(tokens=self.tokens)

    @property
    def warmup_seconds(self) -> float:
        """How long the warm-up batch took (0: none ran)."""
        return self.loader.warmup_seconds

    # -- which stored tensors belong where
    def _stored_by_layer(self) -> dict:
        prefix = self.layout.layers_path + "."
        out: dict = {"base": [], "head": []}
        head = self.model.get_output_embeddings()
        head_names = {f"{self._path_of(head)}.{n}" for n, _ in head.named_parameters()} if head is not None else set()
        for name, role in self.layout.roles.items():
            target = role.model
            if target is None or role.kind == "mtp":
                continue
            if target.startswith(prefix):
                out.setdefault(int(target[len(prefix):].partition(".")[0]), []).append(name)
            elif target.startswith(self.text_path + "."):
                out["base"].append(name)
            elif target in head_names:
                out["head"].append(name)
        return out

    def _path_of(self, module) -> str:
        return next(n for n, m in self.model.named_modules() if m is module)

    # -- placement
    def _offload_mode(self) -> str:
        """Where the hidden states live: ``--offload``, or with ``auto`` where :meth:`plan` puts them (sized from the
        memory free now)."""
        mode = self.opts.offload
        if mode not in ("auto", "device", "cpu", "disk"):
            raise UserError(f"--offload {mode!r} is not one of auto, device, cpu, disk")
        if mode != "auto":
            return mode
        return self.plan(placing=True)["hidden_on"]

    def plan(self, placing: bool = False) -> dict:
        """What the run will hold and roughly take, sized from the memory free now (:func:`reap.stream.placement.plan`;
        ``placing``: the hidden states' place is being decided)."""
        from reap.stream.placement import plan

        return plan(self, placing)

    # -- what transformers' base model passes each layer
    def _forward_base(self, i: int | Batch, stubs: dict[int, object]):
        """Run the text model's own forward on batch ``i`` (an index, or a batch of its own) with decoder layers j
        replaced by ``stubs[j]``."""
        self.loader.join_warm_up()
        b = self.batches[i] if isinstance(i, int) else i
        for j, fn in stubs.items():
            self.layers[j].forward = fn
        try:
            mask = b.mask().to(self.device) if b.padded else None
            return self.text(input_ids=b.ids.to(self.device), attention_mask=mask, use_cache=False)
        finally:
            for j in stubs:
                del self.layers[j].forward

    def _passthrough(self, j: int, i: int | None, h: torch.Tensor | None = None):
        """A stand-in for decoder layer j on batch i: returns its input (or ``h``) as the layer would, with what
        else the last layer that ran returned for this batch (the base model may hand it to the next layer)."""
        arity = self._arity.get(j, 0)

        def forward(*args, **kwargs):
            out = h if h is not None else (args[0] if args else kwargs["hidden_states"])
            if not arity:
                return out
            extras = tuple(self.store.get_extras(i))[: arity - 1] if i is not None else ()
            return (out, *extras, *(None,) * (arity - 1 - len(extras)))

        return forward

    def layer_call(self, i: int, layer: int) -> tuple[tuple, dict]:
        """(args, kwargs) of transformers' base model's call of decoder layer ``layer`` for batch ``i``."""
        return self.layer_call_for(i, layer)

    def layer_call_for(self, i: int | Batch, layer: int) -> tuple[tuple, dict]:
        """The same for batch ``i`` or for a batch of its own (an MTP module's shifted tokens)."""
        captured: dict = {}

        def capture(*args, **kwargs):
            captured["call"] = (args, kwargs)
            raise _Stop

        stubs = {j: self._passthrough(j, i if isinstance(i, int) else None) for j in range(layer)}
        stubs[layer] = capture
        try:
            self._forward_base(i, stubs)
        except _Stop:
            return captured["call"]
        raise UserError(f"transformers' {type(self.text).__name__} never called decoder layer {layer}; reap cannot "
                        "stream this model")

    def carried(self, i: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """A layer call's arguments with the state the base model shares between its layers for one forward
        (:data:`CARRIED_STATE`: cross-layer key/value sharing, where a later layer reads the keys and values an earlier
        one stored) replaced by batch ``i``'s own object, kept from layer to layer: each captured call of the base
        model makes a new, empty one."""
        for key, value in kwargs.items():
            if type(value).__name__ in CARRIED_STATE:
                kwargs = {**kwargs, key: self._carried.setdefault((i, key), value)}
        return args, kwargs

    # -- running
    def embed(self, ahead: bool = False) -> None:
        """Start from the embeddings: the hidden states the base model gives layer 0 (embedded, scaled or expanded
        as the model does). They are not computed ahead unless asked (``ahead``: into the hidden-state store): the
        base model's call of layer 0, which :meth:`run_layer` makes for every batch anyway, carries them, so layer 0
        takes its input from there."""
        self._from_embeddings = not ahead
        if ahead:
            with torch.inference_mode():
                for i in range(len(self.batches)):
                    args, kwargs = self.layer_call(i, 0)
                    self.store.put(i, args[0] if args else kwargs["hidden_states"])

    @torch.inference_mode()
    def run_layer(self, layer: int, accumulator=None, desc: str | None = None) -> None:
        """Run every batch through decoder layer ``layer``; MoE statistics go to ``accumulator``; the observers
        (:mod:`reap.stream.observers`) start before the batches and finish after them."""
        t0 = time.perf_counter()
        module = self.loader.load_layer(layer)
        self.stats.wait_seconds.append(time.perf_counter() - t0)
        probes = []
        moe = self.layout.moe.get(layer)
        check = None
        observed: list = []
        if moe is not None:
            experts = module.get_submodule(moe.experts[len(f"{self.layout.layers_path}.{layer}."):])
            experts._reap_probe = ExpertsProbe(accumulator)
            probes.append(experts)
            observed = start_all(self.observers, self, layer, module, moe, experts, accumulator)
            if accumulator is not None:  # statistics are taken: checked against transformers' own first
                check = self.selfcheck.arm(layer, block_of(self.layout, module, moe, layer), experts)
        bar = tqdm(total=self.tokens, unit="tok", unit_scale=True, file=sys.stderr, leave=False,
                   desc=desc or f"layer {layer + 1}/{self.layout.num_layers}",
                   disable=not self.opts.progress or self.dist.rank != 0)
        try:
            from_store = not (layer == 0 and self._from_embeddings)
            for i, b in enumerate(self.batches):
                args, kwargs = self.carried(i, *self.layer_call(i, layer))  # layer 0's input (the embeddings) among them
                if from_store:
                    h = self.store.get(i)
                    args = (h, *args[1:]) if args else args
                    if not args:
                        kwargs = {**kwargs, "hidden_states": h}
                for experts in probes:
                    experts._reap_probe.token_mask = b.mask().reshape(-1).bool().to(self.device) if b.padded else None
                out = module(*args, **kwargs)
                if check is not None:
                    self.selfcheck.finish(check, b.mask().reshape(-1).bool().to(self.device) if b.padded else None)
                    check = None
                if isinstance(out, tuple):  # (hidden states, what the base model hands the next layer, ...)
                    self._arity[layer] = len(out)
                    self.store.put_extras(i, tuple(out[1:]))
                    out = out[0]
                self.store.put(i, out)
                bar.update(sum(b.lengths))
            if layer == 0:
                self._from_embeddings = False
            finish_all(observed)
        finally:
            bar.close()
            self.selfcheck.disarm(check)
            close_all(observed)
            for experts in probes:
                del experts._reap_probe
            self.loader.free_layer(layer)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats.layer_seconds.append(time.perf_counter() - t0)


    @torch.inference_mode()
    def final_output(self, i: int):
        """The base model's output for batch i: its forward runs with every layer a pass-through, the last one
        giving the stored hidden states, so whatever it does after the last layer (final norm) is its own code."""
        last = self.layout.num_layers - 1
        stubs = {j: self._passthrough(j, i) for j in range(last)}
        stubs[last] = self._passthrough(last, i, self.store.get(i))
        return self._forward_base(i, stubs)

    def run_mtp(self, k: int, accumulator=None) -> None:
        """Multi-token-prediction module k (after the last decoder layer; :mod:`reap.stream.mtp`)."""
        from reap.stream.mtp import MtpRunner

        t0 = time.perf_counter()
        if getattr(self, "_mtp", None) is None:
            self._mtp = MtpRunner(self)
        self._mtp.run(k, accumulator)
        self.stats.layer_seconds.append(time.perf_counter() - t0)

    def load_head(self) -> None:
        """The LM head's tensors (tied to the embeddings where the model says so)."""
        head = self.model.get_output_embeddings()
        if self._stored["head"]:
            self.loader._load(self._stored["head"], "the LM head")
        if head.weight.device.type == "meta":
            if not getattr(self.model.config.get_text_config(), "tie_word_embeddings", False):
                raise UserError(f"{self.ckpt.path} has no LM head tensor and config.json does not tie it to the "
                                "embeddings; the checkpoint is incomplete (re-download its shards)")
            head.weight = self.model.get_input_embeddings().weight

    @torch.inference_mode()
    def logits(self, i: int, output, positions: torch.Tensor) -> torch.Tensor:
        """Batch i's logits [B, P, V] at ``positions``, by the model's own head (its forward with the base model
        answering ``output``: softcapping, scaling and vocabulary cuts are the model's code)."""
        b = self.batches[i]
        self.text.forward = lambda *args, **kwargs: output
        try:
            mask = b.mask().to(self.device) if b.padded else None
            return self.model(input_ids=b.ids.to(self.device), attention_mask=mask, use_cache=False,
                              logits_to_keep=positions.to(self.device)).logits
        finally:
            del self.text.forward

    def close(self) -> None:
        self.loader.close()
        if self.store is not None:
            self.store.close()
        self._carried.clear()
        self.ckpt.close()


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak host RSS and (on CUDA) peak device memory, in GiB."""
    out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)}
    if device.type == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / (1 << 30)
    return out
