"""The greedy re-routing search inside the layer streamer: the data of the default criterion.

For each MoE layer (and MTP module) that calibration runs, :class:`GreedySearch` keeps a strided sample of the MoE
block's input tokens while the batches go through (a forward pre-hook), then drives the block's own router with
experts removed (:class:`reap.stream.experts.RouterDriver`), runs every expert on the sample and hands both to
:func:`reap.calibrate.stats.greedy_routed_order`; the removal order (or why ``weighted-ean`` stands in for the layer) goes
on the layer's accumulator. With several ranks every rank searches the same sample, all ranks' tokens together.

Legend: S sampled tokens, E experts, K top-k, H hidden.
"""

from __future__ import annotations

import sys

import torch
from tqdm.auto import tqdm


class GreedySearch:
    """The greedy re-routing order (:func:`reap.calibrate.stats.greedy_routed_order`) on a sample of each MoE layer's
    input: a mixin of :class:`reap.stream.streamer.LayerStreamer`, whose ``layout``, ``opts``, ``dtype``, ``device``,
    ``dist`` and ``tokens`` it reads. :meth:`greedy_start` before a layer's batches, :meth:`greedy_finish` after
    them."""

    def _block_of(self, module, moe, layer: int):
        return module.get_submodule(moe.block[len(f"{self.layout.layers_path}.{layer}."):]) if moe.block != \
            f"{self.layout.layers_path}.{layer}" else module

    def greedy_sample_size(self) -> int:
        """Tokens per layer in the greedy sample (all ranks together): ``greedy_tokens``, fewer where every expert's
        output on them would not fit ``greedy_memory`` GiB."""
        from reap.calibrate.stats import greedy_sample_tokens

        elem = torch.empty((), dtype=self.dtype).element_size()
        return greedy_sample_tokens(self.layout.num_experts, self.layout.hidden_size, elem, self.opts.greedy_tokens,
                                    self.opts.greedy_memory * (1 << 30))

    def greedy_seconds(self, expert_params: float, flops: float, bandwidth: float, sample: int) -> float:
        """A rough time of the greedy search over the whole run, per rank: every expert on the sample of every MoE
        layer (2 FLOPs per parameter of ``expert_params``, all layers' experts, and sampled token at ``flops``), and
        the search itself, bound by memory (``bandwidth`` bytes/s): it costs its [rows, K+1, H] float64 arrays ~30
        times over (25 to 38 measured on a CPU), for the sample's rows and again, after each removal, for the rows
        whose K+1 choices held the removed expert (about (K+1)/E' of them, E' the experts left); plus a few
        milliseconds of routing and synchronizing per removal step on a GPU (not measured)."""
        E, K, H = self.layout.num_experts, self.layout.top_k, self.layout.hidden_size
        if sample <= 0 or not self.layout.moe or not 0 < K < E:
            return 0.0
        rows = sample * (1 + (K + 1) * sum(1 / left for left in range(K + 1, E + 1)))
        search = rows * (K + 1) * H * 8 * 30 / bandwidth + (E - K) * (3e-3 if self.device.type == "cuda" else 0.0)
        return 2 * expert_params * sample / flops + len(self.layout.moe) * search

    def greedy_start(self, module, moe, experts, layer: int, accumulator):
        """(TokenSample, hook) of the greedy search for this MoE layer (module: its decoder layer), or (None, None)
        when nothing is accumulated or the search is off (``greedy_tokens`` 0)."""
        if accumulator is None or self.opts.greedy_tokens <= 0:
            return None, None
        return self._greedy_sampler(module, moe, experts, layer)

    def greedy_finish(self, module, moe, experts, layer: int, sample, hook, accumulator):
        """After the layer's batches: stop sampling and put the greedy order (or why there is none) on
        ``accumulator``. Returns the hook still to remove (None)."""
        if hook is not None:
            hook.remove()
        if sample is not None:
            accumulator.greedy_order, accumulator.greedy_note = self._greedy(module, moe, experts, layer, sample)
            accumulator.greedy_sample = getattr(self, "_greedy_size", 0)
        return None

    def _greedy_sampler(self, module, moe, experts, layer: int):
        """(TokenSample, hook): a forward pre-hook on the layer's MoE block keeps every ceil(T / S)-th real token of
        its input, in calibration order (T: this rank's tokens, S: its share of the sample)."""
        from reap.calibrate.stats import TokenSample

        size = -(-self.greedy_sample_size() // self.dist.world)
        if size <= 0:
            return TokenSample(1), None
        sample = TokenSample(size, stride=max(1, -(-self.tokens // size)))
        block = self._block_of(module, moe, layer)

        def pre(mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            x = x.reshape(-1, x.shape[-1])
            mask = experts._reap_probe.token_mask
            sample.add(x[mask] if mask is not None and mask.numel() == x.shape[0] else x)

        return sample, block.register_forward_pre_hook(pre, with_kwargs=True)

    def _greedy(self, module, moe, experts, layer: int, sample) -> tuple[list[int] | None, str | None]:
        """(removal order, None), or (None, why weighted-ean stands in for this layer)."""
        self._greedy_size = 0
        from reap.stream.experts import RouterDriver, expert_outputs, is_wrapped, pair_outputs
        from reap.calibrate.stats import greedy_routed_order

        fallback = "; weighted-ean (sum of g x ||f||) stands in for greedy-rerouted in this layer"
        spec, E, K = self.layout, self.layout.num_experts, self.layout.top_k
        if spec.n_group > 1:
            return None, f"group-limited routing (n_group {spec.n_group}) is not a plain top-k{fallback}"
        if moe.id_tables:
            return None, f"hash routing (expert-id tables) does not re-route{fallback}"
        if moe.extra:  # what a removed expert's tokens pick may be a slot that is no expert, which the model's
            # config (not the block) names: the driven router cannot tell it from an expert
            return None, f"its router has slots beyond the experts (skip or zero-computation classes){fallback}"
        if sample.size == 0 and self.dist.world == 1:
            return None, (f"--greedy-memory {self.opts.greedy_memory:g} GiB holds no token's {E} expert outputs"
                          f"{fallback}")
        xs = sample.rows if sample.size else None
        if self.dist.world > 1:  # every rank greedy-searches the same sample (all ranks' tokens): the same order
            import torch.distributed as d

            parts = [None] * self.dist.world
            d.all_gather_object(parts, xs.cpu() if xs is not None else None)
            xs = torch.cat([p.to(self.device) for p in parts if p is not None])
        block = self._block_of(module, moe, layer)
        try:
            driver = RouterDriver(block, experts, moe.tensors, moe.block, K, E, moe.extra)
            ids_k, w_k = driver(xs)
            xe = driver.inputs.reshape(xs.shape[0], -1)  # the experts' own input (a block may project first)
            ids_n, w_n = driver(xs, None, K + 1)
        except torch.OutOfMemoryError:  # the run's memory, not the router: reported as such (reap.calibrate.run)
            raise
        except (ValueError, RuntimeError, TypeError, KeyError, IndexError) as err:
            return None, f"its router cannot be driven with experts removed ({err}){fallback}"
        member = (ids_n[:, :, None] == ids_k[:, None, :]).any(-1)  # [S, K+1]
        nested = member.sum(1) == K
        if float(nested.float().mean()) < 0.999:
            return None, (f"its top-{K + 1} choice does not contain its top-{K} for {int((~nested).sum())} of "
                          f"{xs.shape[0]} tokens{fallback}")
        def constant(t):  # the same value for every token (up to rounding)
            return bool((t.max() - t.min()) <= 1e-3 * t.abs().mean())

        renorm = constant(w_k.double().sum(1))  # the chosen weights renormalized (times a constant scale, maybe)
        if not renorm:
            _, w_all = driver(xs[:4096], None, E)
            if constant(w_all.double().sum(1)):  # a softmax over all experts, not renormalized over the chosen
                return None, ("its weights are a softmax over all experts, not renormalized over the chosen ones, so "
                              "removing an expert rescales every token's output; the greedy error model assumes "
                              f"renormalized (or independent sigmoid) weights{fallback}")

        # a bar of its own: the layer's token bar stands at 100% meanwhile (every expert run, then each removal)
        bar = tqdm(total=2 * E - K, unit="step", file=sys.stderr, leave=False,
                   desc=(f"layer {layer + 1}/{spec.num_layers}" if layer < spec.num_layers else
                         f"MTP module {layer - spec.num_layers}") + ": greedy search",
                   disable=not self.opts.progress or self.dist.rank != 0)

        def route(removed, rows):
            if bar.n < bar.total:
                bar.update()
            x = xs[rows.to(xs.device)]
            ids_a, _ = driver(x, removed, K)
            ids_b, w_b = driver(x, removed, K + 1)
            last = (ids_b[:, :, None] != ids_a[:, None, :]).all(-1)  # [S, K+1]: the next choice
            pos = torch.argsort(last.to(torch.int8), dim=1, stable=True)  # the top-k first, the next choice last
            return ids_b.gather(1, pos), w_b.gather(1, pos)

        # every expert's output on the sample [S, E, H] (model dtype), one expert at a time
        S = self._greedy_size = xs.shape[0]
        outputs = None
        grouped = experts._reap_probe.grouped if experts._reap_probe.grouped is not None else False
        try:
            for e in range(E):
                bar.update()
                counts = torch.zeros(E, dtype=torch.long, device=xs.device)
                counts[e] = S
                ids = torch.full((S,), e, dtype=torch.long, device=xs.device)
                y = pair_outputs(experts, xe, ids) if is_wrapped(experts) else expert_outputs(experts, xe, ids,
                                                                                                  counts, grouped)
                if outputs is None:
                    outputs = y.new_empty(S, E, y.shape[-1])
                outputs[:, e] = y
        except torch.OutOfMemoryError:  # the run's memory (--greedy-memory): reported as such (reap.calibrate.run)
            bar.close()
            raise
        except (RuntimeError, ValueError, TypeError) as err:  # an experts module reap's replay does not fit
            bar.close()
            return None, f"its experts could not be run on the sample ({str(err).splitlines()[0]}){fallback}"
        try:
            order = greedy_routed_order(route, outputs, K, renormalize=renorm)
        finally:
            bar.close()
        return order, None
