"""Preparing a streamer's layers on the prefetch thread: reading, dequantizing, loading, the warm-up batch.

A mixin of :class:`reap.stream.LayerStreamer` (its ``reader``, ``layout``, ``model``, ``layers``, streams and
pools): on a GPU the read-ahead thread reads layer after layer onto the device (:class:`reap.weights.LayerReader`)
while the prefetch thread, on its own CUDA stream, dequantizes the next layer (:func:`reap.weights.materialize`)
and loads it into transformers' model: the first layer of each kind by transformers' own loader, later ones by the
recipe learned from it (:mod:`reap.load_recipe`). Layer 0 then runs a warm-up batch while the data is tokenized.
"""

from __future__ import annotations

import sys
import time

import torch
from tqdm.auto import tqdm

from reap import load_recipe
from reap.errors import UserError
from reap.formats import group_parts
from reap.hidden import Batch
from reap.moe import ExpertsProbe
from reap.weights import LayerBytes, load_into, materialize, to_meta


class LayerLoading:
    """The streamer's layer preparation (see the module docstring)."""

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
        return self.reader.read_bytes(self._stored.get(layer, []), slot=layer % 2, device=device)

    def _prepare(self, layer: int):
        """Dequantize layer ``layer`` (its bytes on the device already) and load it into transformers' model, while
        the previous layer computes; returns the model keys still missing and the CUDA event the compute stream
        waits for. Layer 0 then runs a warm-up batch. On the CPU the layer is also read here."""
        if self._side is None:
            return self._load_layer(self._read_layer(layer).views(), layer), None
        host = self._reads.pop(layer).result()
        with torch.cuda.stream(self._side):
            raw = host.to(self.device).views()  # no copy: already there
            # its block goes back to the stream that allocated it (the reader's copies) only once this stream's
            # work on it is done
            host.base.record_stream(self._side)
            missing = self._load_layer(raw, layer)
            if layer == 0 and self._waiting_on != 0:  # the run is not waiting for layer 0 yet: time to spare
                self._warm_up(layer)
            event = torch.cuda.Event()
            event.record(self._side)
        return missing, event

    def _materialize(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """:func:`reap.weights.materialize` for this streamer's layout, device and dtype."""
        return materialize(raw, self.layout, self.device, self.dtype, self.ckpt.config)

    def _load_raw(self, raw: dict[str, torch.Tensor], what: str) -> set[str]:
        return load_into(self.model, self._materialize(raw), self.device, self.dtype, what)

    def _load_layer(self, raw: dict[str, torch.Tensor], layer: int) -> set[str]:
        """Decoder layer ``layer``'s stored tensors into the model: by the recipe learned from an earlier layer of
        its kind (:mod:`reap.load_recipe`), else by transformers' loader, learning the recipe from what it did."""
        state = self._materialize(raw)
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
    def _warm_up(self, layer: int) -> None:
        """One batch of random tokens through decoder layer ``layer`` (its statistics thrown away), on the prefetch
        thread right after the layer is loaded: the GPU's kernels are loaded and its libraries set up while the data
        is still tokenized, not in the first real batch. Skipped where the run already waits for the layer (the
        first real batch sets them up as soon)."""
        from reap.saliency import LayerAccumulator

        t0 = time.perf_counter()
        text = self.model.config.get_text_config()
        width = max(1, min(2048, self.opts.batch_tokens))
        rows = max(1, self.opts.batch_tokens // width)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, max(1, int(getattr(text, "vocab_size", 2) or 2)), (rows, width), generator=g)
        experts = None
        try:
            moe = self.layout.moe.get(layer)
            experts = self.model.get_submodule(moe.experts) if moe is not None else None
            if experts is not None:
                experts._reap_probe = ExpertsProbe(LayerAccumulator(self.layout.num_experts, self.device))
            with torch.inference_mode():
                args, kwargs = self.layer_call_for(Batch(ids, [width] * rows), layer)
                self.layers[layer](*args, **kwargs)
            if self._side is not None:
                self._side.synchronize()
        except Exception:  # noqa: BLE001 (a warm-up only: whatever fails here, the first real batch reports)
            return
        finally:
            if experts is not None and hasattr(experts, "_reap_probe"):
                del experts._reap_probe
        self.warmup_seconds = time.perf_counter() - t0
