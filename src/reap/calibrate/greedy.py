"""The greedy re-routing search, the data of the default criterion: one home for all of it but its order algorithms.

For each MoE layer (and MTP module) that calibration runs, :class:`GreedySearch`, a layer observer that calibration
hands the streamer (:mod:`reap.stream.observers`), keeps a strided sample of the MoE block's input tokens while the
batches go through (a forward pre-hook), then, after the layer, drives the block's own router with experts removed
(:class:`RouterDriver`), computes each sampled token's top-C experts' outputs once
(:class:`reap.calibrate.greedy_order.OutputCache`; the pairs later steps need beyond them on the fly) and hands both to
:func:`reap.calibrate.greedy_order.greedy_routed_order`; the removal order (or why ``weighted-ean`` stands in for the
layer) goes on the layer's accumulator. With several ranks every rank searches the same sample, all ranks' tokens
together. What the search adds to the run's time and memory enters the streamer's plan (:meth:`GreedySearch.cost`).

Legend: S sampled tokens, E experts, K top-k, H hidden, C expert outputs cached per sampled token, N pairs.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from reap.stream.experts import ExpertsProbe
from reap.stream.observers import ObserverCost


@dataclass
class _Layer:
    """One layer's search: what :meth:`GreedySearch.start` hands :meth:`GreedySearch.finish`."""

    streamer: object
    layer: int
    module: object
    moe: object
    experts: object
    accumulator: object
    sample: object  # reap.calibrate.greedy_order.TokenSample
    hook: object | None  # the sampling pre-hook, until removed
    size: int = 0  # tokens the search ran on (all ranks')


class GreedySearch:
    """The greedy re-routing order (:func:`reap.calibrate.greedy_order.greedy_routed_order`) on a sample of each MoE
    layer's input: a :class:`reap.stream.observers.LayerObserver`, reading the streamer's ``layout``, ``opts``,
    ``dtype``, ``device``, ``dist`` and ``tokens``. ``seconds``: the time the searches took after the layers'
    forward (included in the streamer's layer times)."""

    def __init__(self):
        self.seconds = 0.0

    # -- what it adds to the run (the streamer's plan)
    @staticmethod
    def sample_size(streamer) -> int:
        """Tokens per layer in the greedy sample (all ranks together): ``greedy_tokens``, fewer where the search
        would not fit ``greedy_memory`` GiB with K+1 expert outputs cached per token
        (:func:`reap.calibrate.greedy_order.greedy_sample_tokens`)."""
        from reap.calibrate.greedy_order import greedy_sample_tokens

        layout = streamer.layout
        return greedy_sample_tokens(layout.num_experts, layout.hidden_size, _elem(streamer.dtype),
                                    streamer.opts.greedy_tokens, streamer.opts.greedy_memory * (1 << 30),
                                    layout.top_k)

    @staticmethod
    def cache_slots(streamer, sample: int) -> int:
        """C, the expert outputs cached per token of a ``sample``-token search within ``greedy_memory`` GiB."""
        from reap.calibrate.greedy_order import greedy_cache_slots

        layout = streamer.layout
        return greedy_cache_slots(layout.num_experts, layout.hidden_size, _elem(streamer.dtype), sample,
                                  streamer.opts.greedy_memory * (1 << 30), layout.top_k)

    @classmethod
    def estimated_seconds(cls, streamer, expert_params: float, flops: float, bandwidth: float, sample: int) -> float:
        """A rough time of the greedy search over the whole run, per rank, per MoE layer summed:

        * the cache fill: each token's top-C experts (2 FLOPs per expert parameter and pair at ``flops``, or, where
          longer, every expert's weights read once per call at ``bandwidth`` bytes/s);
        * the pairs computed on the fly: a step with E' experts left re-routes ~S(K+1)/E' tokens, each needing its
          new next choice, which is about its (K+1)E/E'-th original choice: beyond the cache once E' < (K+1)E/C; one
          call per such step (its compute, or the weights of min(E', pairs) experts read);
        * the search's float64 work, bound by memory: [rows, K+1, H] float64 ~6 times over (4 to 8 measured on a CPU;
          the full-output search before it: 27 to 41), for the sample's rows and again, after each removal, for the
          ~S(K+1)/E' rows re-routed;
        * on a GPU, a few milliseconds of routing, launching and synchronizing per removal step (not measured).
        """
        from reap.stream.hidden import greedy_pair_bytes, greedy_work_limit

        layout = streamer.layout
        E, K, H, L = layout.num_experts, layout.top_k, layout.hidden_size, len(layout.moe)
        if sample <= 0 or not layout.moe or not 0 < K < E:
            return 0.0
        elem, C = _elem(streamer.dtype), cls.cache_slots(streamer, sample)
        per_expert = expert_params / (L * E)  # one expert of one layer
        chunk = max(1, greedy_work_limit(streamer.opts.greedy_memory * (1 << 30))
                    // greedy_pair_bytes(H, layout.expert_intermediate, elem))

        def call(pairs: float, experts: float) -> float:
            return max(2 * per_expert * pairs / flops, experts * per_expert * elem / bandwidth)

        fill = sum(call(min(chunk, sample * C - lo), E) for lo in range(0, sample * C, chunk))
        steps = [(left, sample * (K + 1) / left) for left in range(K + 1, E + 1)]  # (E', rows re-routed)
        late = sum(call(hit, min(left, hit)) for left, hit in steps if (K + 1) * E > C * left)
        rows = sample + sum(hit for _, hit in steps)
        search = rows * (K + 1) * H * 8 * 6 / bandwidth
        overhead = (E - K) * (3e-3 if streamer.device.type == "cuda" else 0.0)
        return L * (fill + late + search + overhead)

    def cost(self, streamer, expert_params: float, flops: float, bandwidth: float) -> ObserverCost:
        """The search's time and peak (:func:`reap.stream.hidden.greedy_peak_bytes`): every rank searches the whole
        sample of each MoE layer (all ranks' tokens). Plan entries: ``greedy_s``, ``greedy_peak_bytes``,
        ``greedy_outputs_bytes`` (what ``--greedy-memory`` bounds: the whole peak), ``greedy_sample`` (tokens),
        ``greedy_slots`` (C) and ``greedy_fits``."""
        from reap.stream.hidden import greedy_peak_bytes

        layout = streamer.layout
        sample = min(streamer.tokens * streamer.dist.world, self.sample_size(streamer)) \
            if streamer.opts.greedy_tokens > 0 and layout.moe else 0
        slots = self.cache_slots(streamer, sample) if sample else 0
        seconds = self.estimated_seconds(streamer, expert_params, flops, bandwidth, sample)
        peak = greedy_peak_bytes(sample, slots, layout.hidden_size, _elem(streamer.dtype), layout.top_k,
                                 layout.expert_intermediate, streamer.opts.greedy_memory * (1 << 30))
        plan = {"greedy_s": seconds, "greedy_peak_bytes": peak, "greedy_outputs_bytes": peak, "greedy_sample": sample,
                "greedy_slots": slots}
        return ObserverCost(seconds, peak, plan, fits="greedy_fits")

    # -- the observer
    def start(self, streamer, layer: int, module, moe, experts, accumulator) -> _Layer | None:
        """The search of this MoE layer (module: its decoder layer), sampling from now on, or None when nothing is
        accumulated or the search is off (``greedy_tokens`` 0). A forward pre-hook on the layer's MoE block keeps
        every ceil(T / S)-th real token of its input, in calibration order (T: this rank's tokens, S: its share of
        the sample)."""
        from reap.calibrate.greedy_order import TokenSample
        from reap.stream.streamer import block_of

        if accumulator is None or streamer.opts.greedy_tokens <= 0:
            return None
        state = _Layer(streamer, layer, module, moe, experts, accumulator, TokenSample(1), None)
        size = -(-self.sample_size(streamer) // streamer.dist.world)
        if size <= 0:
            return state
        state.sample = TokenSample(size, stride=max(1, -(-streamer.tokens // size)))
        state.hook = sample_inputs(block_of(streamer.layout, module, moe, layer), experts, state.sample)
        return state

    def finish(self, state: _Layer) -> None:
        """After the layer's batches: stop sampling and put the greedy order (or why there is none) on the layer's
        accumulator."""
        self.close(state)
        t0 = time.perf_counter()
        try:
            acc = state.accumulator
            acc.greedy_order, acc.greedy_note = self._greedy(state)
            acc.greedy_sample = state.size
        finally:
            self.seconds += time.perf_counter() - t0

    def close(self, state: _Layer) -> None:
        if state.hook is not None:
            state.hook.remove()
            state.hook = None

    def _greedy(self, state: _Layer) -> tuple[list[int] | None, str | None]:
        """(removal order, None), or (None, why weighted-ean stands in for this layer)."""
        from reap.calibrate.greedy_order import ExpertsFailed, OutputCache, PairOutputs, greedy_routed_order
        from reap.stream.hidden import greedy_pair_bytes, greedy_work_limit
        from reap.stream.streamer import block_of

        st, layer, module, moe, experts, sample = (state.streamer, state.layer, state.module, state.moe,
                                                   state.experts, state.sample)
        state.size = 0
        fallback = "; weighted-ean (sum of g x ||f||) stands in for greedy-rerouted in this layer"
        spec, E, K = st.layout, st.layout.num_experts, st.layout.top_k
        if spec.n_group > 1:
            return None, f"group-limited routing (n_group {spec.n_group}) is not a plain top-k{fallback}"
        if moe.id_tables:
            return None, f"hash routing (expert-id tables) does not re-route{fallback}"
        if moe.extra:  # what a removed expert's tokens pick may be a slot that is no expert, which the model's
            # config (not the block) names: the driven router cannot tell it from an expert
            return None, f"its router has slots beyond the experts (skip or zero-computation classes){fallback}"
        if sample.size == 0 and st.dist.world == 1:
            return None, (f"--greedy-memory {st.opts.greedy_memory:g} GiB holds no sampled token's search ({K + 1} "
                          f"expert outputs and its float64 arrays){fallback}")
        xs = sample.rows if sample.size else None
        if st.dist.world > 1:  # every rank greedy-searches the same sample (all ranks' tokens): the same order
            import torch.distributed as d

            parts = [None] * st.dist.world
            d.all_gather_object(parts, xs.cpu() if xs is not None else None)
            xs = torch.cat([p.to(st.device) for p in parts if p is not None])
        block = block_of(st.layout, module, moe, layer)
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

        # the expert outputs: each token's top-C under the model's routing (C from --greedy-memory), computed in
        # calls of at most `chunk` pairs; the pairs a removal step needs beyond them on the fly (OutputCache)
        S = state.size = xs.shape[0]
        memory, elem = st.opts.greedy_memory * (1 << 30), _elem(st.dtype)
        C = self.cache_slots(st, S)
        work = greedy_work_limit(memory)  # the pairs of a call of the fill, the tokens costed at once
        chunk = max(1, work // greedy_pair_bytes(spec.hidden_size, spec.expert_intermediate, elem))
        rows = max(1, work // ((K + 3) * spec.hidden_size * (8 + elem)))
        ids_c = ids_n
        if C > K + 1:
            try:
                ids_c, _ = driver(xs, None, C)
            except torch.OutOfMemoryError:
                raise
            except (ValueError, RuntimeError, TypeError, KeyError, IndexError):  # a router that takes no top-C:
                C = K + 1  # the top-(K+1) it took; the rest on the fly
        fills = -(-S * C // chunk)
        # a bar of its own: the layer's token bar stands at 100% meanwhile (the cache's fill, then each removal)
        bar = tqdm(total=fills + E - K, unit="step", file=sys.stderr, leave=False,
                   desc=(f"layer {layer + 1}/{spec.num_layers}" if layer < spec.num_layers else
                         f"MTP module {layer - spec.num_layers}") + ": greedy search",
                   disable=not st.opts.progress or st.dist.rank != 0)

        def route(removed, rows):
            if bar.n < bar.total:
                bar.update()
            x = xs[rows.to(xs.device)]
            ids_a, _ = driver(x, removed, K)
            ids_b, w_b = driver(x, removed, K + 1)
            last = (ids_b[:, :, None] != ids_a[:, None, :]).all(-1)  # [S, K+1]: the next choice
            pos = torch.argsort(last.to(torch.int8), dim=1, stable=True)  # the top-k first, the next choice last
            return ids_b.gather(1, pos), w_b.gather(1, pos)

        pairs = PairOutputs(experts, xe, E, bar)
        try:
            try:
                cache = OutputCache(pairs, ids_c, E, chunk=chunk)
                pairs.bar = None
                return greedy_routed_order(route, cache, K, renormalize=renorm, chunk=rows), None
            finally:
                bar.close()
        except ExpertsFailed as err:  # an experts module reap's replay does not fit
            return None, f"its experts could not be run on the sample ({err}){fallback}"


def _elem(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def sample_inputs(block, experts, sample):
    """Offer every real token of the MoE block's input to ``sample`` (a
    :class:`reap.calibrate.greedy_order.TokenSample`) as the layer's batches go through: a forward pre-hook on the
    block (returned, to remove), the padding left out by the experts probe's token mask."""

    def pre(mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        x = x.reshape(-1, x.shape[-1])
        mask = experts._reap_probe.token_mask
        sample.add(x[mask] if mask is not None and mask.numel() == x.shape[0] else x)

    return block.register_forward_pre_hook(pre, with_kwargs=True)


# -- the model's own routing, driven on a token sample ---------------------------------------------------------
#: attributes that hold a block's expert count (set to the kept count while its router rows are sliced)
NUM_EXPERTS_ATTRS = ("num_experts", "n_routed_experts", "num_local_experts")


class RouterDriver:
    """Runs a decoder layer's MoE block (transformers' own forward: router, correction bias, scaling) on a token
    sample with some experts removed and top-k set to any k, and returns what it hands its experts module.

    Removal is what the pruned checkpoint does: the block's router rows and biases (every tensor of the layer's
    layout outside the experts module, along its expert axis) are sliced to the kept experts for the call, and its
    expert-count attributes set to the kept count; top-k is every attribute in :data:`reap.model.arch.TOP_K_ATTRS` of
    the block and its submodules (experts excluded) that holds the model's top-k. The experts module is not run
    (:class:`reap.stream.experts.ExpertsProbe` ``capture``). Everything is restored after each call.

    ``ValueError`` (from the constructor) where the block cannot be driven that way: no top-k attribute, or a
    router tensor that is not found.
    """

    def __init__(self, block, experts, tensors: dict[str, int], block_path: str, top_k: int, num_experts: int,
                 extra: dict[str, int] | None = None):
        from reap.model.arch import TOP_K_ATTRS

        self.block, self.experts, self.top_k, self.E = block, experts, top_k, num_experts
        skip = {id(m) for m in experts.modules()}
        subs = [m for m in block.modules() if id(m) not in skip]
        self.k_attrs = [(m, a) for m in subs for a in TOP_K_ATTRS if getattr(m, a, None) == top_k
                        and isinstance(getattr(m, a), int) and not isinstance(getattr(m, a), bool)]
        self.e_attrs = [(m, a, 0) for m in subs for a in NUM_EXPERTS_ATTRS if getattr(m, a, None) == num_experts
                        and isinstance(getattr(m, a), int) and not isinstance(getattr(m, a), bool)]
        # counts of the experts and the slots after them (ZAYA's num_router_classes E + 1, LongCat-Flash's router
        # n_routed_experts E + zero experts): attributes named for experts or classes
        for slots in sorted(set((extra or {}).values()) - {0}):
            self.e_attrs += [(m, a, slots) for m in subs for a, v in vars(m).items()
                             if ("expert" in a or "classes" in a) and isinstance(v, int) and not isinstance(v, bool)
                             and v == num_experts + slots]
        if not self.k_attrs:
            raise ValueError(f"{type(block).__name__} keeps its top-k in no attribute reap knows ({', '.join(TOP_K_ATTRS)})")
        exp_prefix = next(n for n, m in block.named_modules() if m is experts)
        self.rows = []  # (owner module, leaf name, is parameter, expert axis, slots after the experts)
        for name, axis in tensors.items():
            rel = name[len(block_path) + 1:] if name.startswith(block_path + ".") else None
            if rel is None or rel == exp_prefix or rel.startswith(exp_prefix + "."):
                continue
            owner_path, _, leaf = rel.rpartition(".")
            owner = block.get_submodule(owner_path) if owner_path else block
            slots = (extra or {}).get(name, 0)
            if leaf in owner._parameters:
                self.rows.append((owner, leaf, True, axis, slots))
            elif leaf in owner._buffers:
                self.rows.append((owner, leaf, False, axis, slots))
            else:
                raise ValueError(f"router tensor {name} not found in {type(block).__name__}")

    @contextmanager
    def pruned(self, kept: torch.Tensor | None, k: int | None = None, replace: dict | None = None):
        """The block as the pruned checkpoint has it, restored on exit: only the ``kept`` experts (None: every one;
        their rows and the slots after them of every router tensor, expert-count attributes set to match) and top-k
        ``k`` (default: the model's). ``replace``: {(owner module, leaf name): tensor} put in place of a row tensor
        instead of its slice (any tensor, a gradient's included; its kept rows, then its slots)."""
        saved_rows, saved_attrs = [], []
        try:
            for m, a in self.k_attrs:
                saved_attrs.append((m, a, getattr(m, a)))
                setattr(m, a, self.top_k if k is None else k)
            if kept is not None:
                for m, a, slots in self.e_attrs:
                    saved_attrs.append((m, a, getattr(m, a)))
                    setattr(m, a, int(kept.numel()) + slots)
                for owner, leaf, is_param, axis, slots in self.rows:
                    table = owner._parameters if is_param else owner._buffers
                    t = table[leaf]
                    saved_rows.append((table, leaf, t))
                    given = (replace or {}).get((owner, leaf))
                    if given is not None:
                        table[leaf] = given.to(t.dtype)
                        continue
                    rows = torch.cat([kept, torch.arange(self.E, self.E + slots, device=kept.device)]) if slots else kept
                    with torch.no_grad():
                        sl = t.index_select(axis, rows.to(t.device))
                    table[leaf] = torch.nn.Parameter(sl, requires_grad=False) if is_param else sl
            yield self.block
        finally:
            for table, leaf, t in saved_rows:
                table[leaf] = t
            for m, a, v in reversed(saved_attrs):
                setattr(m, a, v)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, removed: torch.Tensor | None = None, k: int | None = None):
        """x [S, H] -> (expert ids [S, k] (original numbering), weights [S, k]) as the block routes with ``removed``
        (bool [E]) experts gone and top-k ``k`` (default: the model's)."""
        k = self.top_k if k is None else k
        kept = None
        if removed is not None and bool(removed.any()):
            kept = (~removed.to(torch.bool)).nonzero().squeeze(1)
        captured: list = []
        with self.pruned(kept, k):
            before = getattr(self.experts, "_reap_probe", None)
            self.experts._reap_probe = ExpertsProbe(capture=captured)
            try:
                self.block(x[None])
            finally:
                if before is not None:
                    self.experts._reap_probe = before
                else:
                    del self.experts._reap_probe
        if len(captured) != 1:
            raise ValueError(f"the MoE block called its experts {len(captured)} times, expected once")
        idx, w, self.inputs = captured[0]  # inputs: what the block hands its experts (its own projection, maybe)
        if idx.shape != (x.shape[0], k):
            raise ValueError(f"the router chose {list(idx.shape)} experts with top-k set to {k}, expected "
                             f"{[x.shape[0], k]}: it does not take its top-k from the attributes reap sets")
        if kept is not None:
            idx = kept.to(idx.device)[idx]
        return idx, w
