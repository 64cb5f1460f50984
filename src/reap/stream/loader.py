"""Preparing a streamer's layers on the prefetch thread: reading, dequantizing, loading, the warm-up batch.

:class:`LayerLoader`, owned by :class:`reap.stream.streamer.LayerStreamer` (its ``loader``), holds the reader, the
prefetch and read-ahead threads, the loads in flight and the recipes learned: on a GPU the read-ahead thread reads
layer after layer onto the device (:class:`reap.stream.weights.LayerReader`)
while the prefetch thread, on its own CUDA stream, dequantizes the next layer (:func:`reap.stream.weights.materialize`)
and loads it into transformers' model: the first layer of each kind by transformers' own loader, later ones by the
recipe learned from it (:mod:`reap.stream.load_recipe`). Meanwhile a warm-up thread runs one batch of random tokens through
a spare layer with random weights, so that the GPU's kernels and libraries are set up before the first real batch
(:func:`warm_up_mode`); every other caller of the base model waits for it (:meth:`LayerLoader.join_warm_up`).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import sys
import threading
import time

import torch
from tqdm.auto import tqdm

from reap.stream import load_recipe
from reap.core.errors import UserError
from reap.formats import group_parts
from reap.stream.hidden import Batch
from reap.stream.experts import ExpertsProbe
from reap.stream.weights import LayerBytes, LayerReader, load_into, materialize, to_meta

SWITCH_INTERVAL = 2e-4  # seconds: the GIL's switch interval while a GPU streamer's prefetch thread runs


class LayerLoader:
    """A streamer's layer preparation (see the module docstring). ``model``: transformers' model on the meta device,
    ``layers`` its decoder layers; ``stored``: the stored tensors of each layer (and of ``"base"``, ``"head"``);
    ``share``: the node's :class:`reap.stream.ranks.WeightShare` or None; ``layer_call``: the streamer's
    :meth:`reap.stream.streamer.LayerStreamer.layer_call_for` (the warm-up's call of a layer); ``accumulator``: makes
    the accumulator the warm-up's statistics go to (``accumulator(num_experts, device)``; None: none taken)."""

    def __init__(self, ckpt, layout, model, layers, device, dtype, opts, dist, stored: dict, share, layer_call,
                 accumulator=None):
        self.ckpt, self.layout, self.model, self.layers = ckpt, layout, model, layers
        self.device, self.dtype, self.opts, self.dist = device, dtype, opts, dist
        self.stored, self.layer_call, self.accumulator = stored, layer_call, accumulator
        # without sharing, ranks of one node read the same files: the first read leaves the pages for the others
        self.reader = LayerReader(ckpt, pin=device.type == "cuda", share=share,
                                  keep_cache=opts.keep_page_cache or (dist.world > 1 and share is None))
        self._side = torch.cuda.Stream(device) if device.type == "cuda" else None
        # the prefetch thread's Python (transformers' loader) holds the GIL while the compute thread waits for it
        # after every synchronizing call; a short switch interval hands it back in 0.2 ms instead of 5 ms
        self._switch = sys.getswitchinterval()
        if self._side is not None:
            sys.setswitchinterval(min(self._switch, SWITCH_INTERVAL))
        self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="reap-prefetch")
        self._read_pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="reap-readahead")
        self._pending: dict[int, cf.Future] = {}
        self._reads: dict[int, cf.Future] = {}
        self._recipes: dict[tuple, load_recipe.Recipe] = {}  # layer signature -> how transformers loaded one
        self._recipe_tries: dict[tuple, int] = {}
        self.warmup_seconds = 0.0
        self._waiting_on: int | None = None  # the layer the compute thread waits for
        self._warming: cf.Future | None = None  # the early warm-up (warm_up_early), until joined
        self._warm_pool: cf.ThreadPoolExecutor | None = None
        self._local = threading.local()  # .warming: this thread runs the warm-up

    def close(self) -> None:
        if self._warm_pool is not None:
            self._warm_pool.shutdown(wait=True)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._read_pool.shutdown(wait=True, cancel_futures=True)
        sys.setswitchinterval(self._switch)
        self.reader.close()

    def layer_bytes(self, layer: int | None = None) -> int:
        """Bytes of one layer's weights in the compute dtype (the largest layer when ``layer`` is None)."""
        sizes = [sum(self.ckpt.infos[n].numel for n in names) * torch.finfo(self.dtype).bits // 8
                 for key, names in self.stored.items() if isinstance(key, int) and (layer is None or key == layer)]
        return max(sizes, default=0)

    # -- reading and materializing a layer (on the prefetch thread, on its own CUDA stream, one layer ahead)
    def prefetch(self, layer: int) -> None:
        """Start preparing layer ``layer``. On a GPU its bytes are read by the read-ahead thread, which reads layer
        after layer back to back, at most two ahead, onto the device (through the reader's pinned chunks); every
        read goes through that one thread, so ranks sharing the reading exchange in the same order."""
        if not 0 <= layer < self.layout.num_layers or layer in self._pending:
            return
        if self._side is not None:
            for ahead in (layer, layer + 1):
                if ahead < self.layout.num_layers and ahead not in self._reads and ahead not in self._pending:
                    self._reads[ahead] = self._read_pool.submit(self._read_layer, ahead)
        self._pending[layer] = self._pool.submit(self._prepare, layer)

    def _read_layer(self, layer: int) -> LayerBytes:
        """Layer ``layer``'s stored tensors: on a GPU, on the device already (through the reader's pinned chunks,
        or all-gathered when the ranks share the reading); on the CPU, in its slot."""
        device = self.device if self.device.type == "cuda" else None
        return self.reader.read_bytes(self.stored.get(layer, []), slot=layer % 2, device=device)

    def _prepare(self, layer: int):
        """Dequantize layer ``layer`` (its bytes on the device already) and load it into transformers' model, while
        the previous layer computes; returns the model keys still missing and the CUDA event the compute stream
        waits for. With ``REAP_WARMUP=layer``, layer 0 then runs the warm-up batch. On the CPU the layer is also read
        here."""
        if self._side is None:
            return self._load_layer(self._read_layer(layer).views(), layer), None
        host = self._reads.pop(layer).result()
        with torch.cuda.stream(self._side):
            raw = host.to(self.device).views()  # no copy: already there
            # its block goes back to the stream that allocated it (the reader's copies) only once this stream's
            # work on it is done
            host.base.record_stream(self._side)
            missing = self._load_layer(raw, layer)
            if layer == 0 and self._waiting_on != 0 and warm_up_mode() == "layer":
                self._warm_up(layer, stream=self._side)  # the run is not waiting for layer 0 yet: time to spare
            event = torch.cuda.Event()
            event.record(self._side)
        return missing, event

    def materialize(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """:func:`reap.stream.weights.materialize` for this streamer's layout, device and dtype."""
        return materialize(raw, self.layout, self.device, self.dtype, self.ckpt.config)

    def _load_raw(self, raw: dict[str, torch.Tensor], what: str) -> set[str]:
        return load_into(self.model, self.materialize(raw), self.device, self.dtype, what)

    def _load_layer(self, raw: dict[str, torch.Tensor], layer: int) -> set[str]:
        """Decoder layer ``layer``'s stored tensors into the model: by the recipe learned from an earlier layer of
        its kind (:mod:`reap.stream.load_recipe`), else by transformers' loader, learning the recipe from what it did."""
        state = self.materialize(raw)
        names = load_recipe.normalized(state, layer)
        sig = load_recipe.signature(state, names) if load_recipe.enabled() else None
        recipe = self._recipes.get(sig)
        if recipe is not None:
            recipe.apply(self.layers[layer], state, names)
            return set()
        missing = load_into(self.model, state, self.device, self.dtype, f"layer {layer}")
        prefix = f"{self.layout.layers_path}.{layer}."
        tries = self._recipe_tries.get(sig, 0)
        if sig is not None and tries < 2 and not any(k.startswith(prefix) for k in missing):
            self._recipe_tries[sig] = tries + 1
            recipe, why = load_recipe.learn(self.layers[layer], prefix, state, self._targets(raw), layer)
            if recipe is not None:
                self._recipes[sig] = recipe
            elif self.opts.progress and self.dist.rank == 0 and tries == 0:
                tqdm.write(f"note: layer {layer} and those like it load through transformers' loader ({why})",
                           file=sys.stderr)
        return missing

    def _targets(self, raw: dict[str, torch.Tensor]) -> dict[str, tuple]:
        """For each base name of these stored tensors: (the model tensor it loads into, its expert index or None,
        its name with the expert index written ``*`` or None)."""
        out = {}
        for base, parts in group_parts(list(raw), self.layout.format).items():
            role = self.layout.roles.get(parts["values"])
            if role is None:
                continue
            expert = role.kind == "expert" and role.span is not None
            out[base] = (role.model, role.expert if expert else None,
                         base[: role.span[0]] + "*" + base[role.span[1]:] if expert else None)
        return out

    def _load(self, names: list[str], what: str) -> set[str]:
        """Load tensors kept for the whole run (embeddings, norm, head) from a buffer of their own."""
        return self._load_raw(self.reader.read(names, device=self.device), what)

    def load_layer(self, layer: int) -> torch.nn.Module:
        """Decoder layer ``layer`` on the device (prepared by the prefetch thread; the next one starts there)."""
        self.prefetch(layer)
        self._waiting_on = layer
        missing, event = self._pending.pop(layer).result()
        self.join_warm_up()  # before the next layer (perhaps the warm-up's) is prepared
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        self.prefetch(layer + 1)
        prefix = f"{self.layout.layers_path}.{layer}."
        absent = sorted(k for k in missing if k.startswith(prefix))
        if absent:
            raise UserError(f"layer {layer}: the checkpoint has no tensor for transformers' {absent[0]}; a shard is "
                            "missing or the checkpoint does not match its config.json")
        return self.layers[layer]

    def free_layer(self, layer: int) -> None:
        if self.device.type == "cuda":  # its weights may be reused by the next layer's loading on the other stream
            torch.cuda.current_stream(self.device).synchronize()
        to_meta(self.layers[layer])

    # -- warming up the GPU
    def warm_up_early(self) -> None:
        """Start the warm-up of a fresh GPU process beside layer 0's preparation (see :func:`warm_up_mode`)."""
        if self._side is not None and warm_up_mode() == "spare" and self._spare_fits():
            self._start_warm_up(torch.cuda.Stream(self.device))

    def _start_warm_up(self, stream) -> None:
        """Queue the spare-layer warm-up (its work on ``stream``); :meth:`join_warm_up` waits for it."""
        if self.layout.num_layers < 2:  # no spare layer: on the prefetch thread, before layer 0 is prepared
            self._warming = self._pool.submit(self._warm_up, 0, True, stream)
            return
        # on a thread of its own, beside layer 0's preparation, through the last layer (prepared last)
        self._warm_pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="reap-warmup")
        self._warming = self._warm_pool.submit(self._warm_up, self.layout.num_layers - 1, True, stream)

    def _spare_fits(self) -> bool:
        """Room on the device for a layer with random weights beside layer 0 and its bytes, read meanwhile."""
        free, _ = torch.cuda.mem_get_info(self.device)
        return free > 3 * self.layer_bytes() + (2 << 30)

    def join_warm_up(self) -> None:
        """Wait for a warm-up still running (the base model's calls patch the layers' forwards: one thread at a
        time); called by every caller of the base model except the warm-up itself."""
        if self._warming is not None and not getattr(self._local, "warming", False):
            self._warming.result()
            self._warming = None

    def _warm_up(self, layer: int, spare: bool = False, stream=None) -> None:
        """One batch of random tokens through decoder layer ``layer``, its statistics thrown away: the GPU's kernels
        are loaded and its libraries set up before the first real batch. ``spare``: before the layer is loaded,
        with random weights (returned to the meta device after), while layer 0's bytes are read; else right after
        it is loaded. A warm-up that fails is skipped: the first real batch reports the error."""
        t0 = time.perf_counter()
        text = self.model.config.get_text_config()
        width = max(1, min(2048, self.opts.batch_tokens))
        rows = max(1, self.opts.batch_tokens // width)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, max(1, int(getattr(text, "vocab_size", 2) or 2)), (rows, width), generator=g)
        module, experts = self.layers[layer], None
        self._local.warming = True
        try:
            with torch.cuda.stream(stream):  # None: the current stream
                if spare:
                    _random_parameters(module, self.device)
                moe = self.layout.moe.get(layer)
                if moe is not None:
                    experts = module.get_submodule(moe.experts[len(f"{self.layout.layers_path}.{layer}."):])
                    experts._reap_probe = ExpertsProbe(self.accumulator(self.layout.num_experts, self.device)
                                                       if self.accumulator is not None else None)
                with torch.inference_mode():
                    args, kwargs = self.layer_call(Batch(ids, [width] * rows), layer)
                    module(*args, **kwargs)
                if stream is not None:
                    stream.synchronize()
        except Exception:  # noqa: BLE001 (a warm-up only: whatever fails here, the first real batch reports)
            return
        finally:
            self._local.warming = False
            if experts is not None and hasattr(experts, "_reap_probe"):
                del experts._reap_probe
            if spare:
                to_meta(module)
        self.warmup_seconds = time.perf_counter() - t0


def warm_up_mode() -> str:
    """How a GPU streamer warms up (``REAP_WARMUP``). ``spare`` (the default): one batch of random tokens through the
    last decoder layer with random weights, on a thread of its own from the streamer's start, while layer 0 is read
    and loaded and the data is tokenized (skipped where the device has no room for a third layer). ``layer``: the
    batch goes through the loaded layer 0 if the run is not waiting for it yet. ``off``: the first real batch sets
    up the GPU (its first attention call alone takes ~0.8 s on an H200)."""
    mode = os.environ.get("REAP_WARMUP", "spare")
    return mode if mode in ("spare", "layer", "off") else "spare"


@torch.no_grad()
def _random_parameters(module: torch.nn.Module, device: torch.device) -> None:
    """Every parameter of ``module`` on the meta device replaced by random values on ``device`` (std 0.02)."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.device.type == "meta":
                fresh = torch.empty(p.shape, dtype=p.dtype, device=device)
                fresh.normal_(0.0, 0.02) if fresh.is_floating_point() else fresh.zero_()
                sub._parameters[name] = torch.nn.Parameter(fresh, requires_grad=False)
