"""One MiniMax-M2 decoder layer at the released dimensions through reap's LayerStreamer (run on a CUDA GPU).

    PYTHONPATH=src python benchmarks/m2_layer_bench.py --out-dir $OUT [--tokens 16384 65536 262144]
        [--workdir /tmp/m2-layer-bench] [--repeats 3] [--dense-tokens 16384]

Random weights: a 1-layer FP8 checkpoint (hidden 3072, 256 experts x intermediate 1536, 48 heads x 128,
8 KV heads, 128x128 block scales, vocab 4096) is generated on the local disk with the generator of
benchmarks/rewrite_bench.py, then, for each calibration size (random token ids, sequences of 2048,
16384 padded tokens per batch, bf16):

* ``run_layer``: LayerStreamer.run_layer with a LayerAccumulator, the layer's bytes already read by the
  prefetch thread (as in steady state), so it counts materializing (H2D + dequantize) + forward + stats;
  median of ``--repeats`` after a warm-up;
* ``reap forward``: the same loop over the batches with the layer already materialized;
* ``transformers``: MiniMaxM2DecoderLayer (experts_implementation="grouped_mm", sdpa) with the same weights
  dequantized to bf16, on the same hidden states, no statistics;
* achieved TFLOP/s (routed experts T*8*3*2*H*I, attention projections, causal QK^T and PV) and that as a
  share of a bf16 8192^3 torch.matmul measured in the same run;
* ``dense``: every token through all 256 experts (weighted by the same routing), timed on
  ``--dense-tokens`` tokens and scaled;
* the layer-load breakdown (read from the shards into pinned memory, H2D + dequantize + assemble) and a
  prototype of a batched dequantize; the forward breakdown (attention vs router vs dispatch vs expert
  matmuls vs statistics vs combine) with CUDA events in a subclass of RoutedMoE, and torch.profiler tables;
* hidden states on the CPU (``--offload cpu``) against on the device, at 64K tokens;
* ``--candidates``: proposed src patches measured on the last size (combine without atomics, the statistics
  norm without an fp32 copy, the whole layer with them as ``FastMoE``, a reused pinned hidden-state buffer).

Results: ``results.json`` (and profiler tables) in ``--out-dir``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rewrite_bench import M2, make_m2_checkpoint  # noqa: E402

from reap.arch import detect, route  # noqa: E402
from reap.calibrate import EngineOptions, LayerStreamer  # noqa: E402
from reap.checkpoint import Checkpoint  # noqa: E402
from reap.moe import RoutedMoE  # noqa: E402
from reap.saliency import LayerAccumulator  # noqa: E402


# -- timing helpers ------------------------------------------------------------------------------------------
def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Marks:
    """Named intervals measured with CUDA events (or perf_counter on CPU), summed over calls."""

    def __init__(self, device):
        self.device, self.open, self.pairs = device, {}, []

    def _now(self):
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def start(self, name):
        self.open[name] = self._now()

    def stop(self, name):
        self.pairs.append((name, self.open.pop(name), self._now()))

    def totals(self) -> dict[str, float]:
        sync(self.device)
        out: dict[str, float] = {}
        for name, a, b in self.pairs:
            dt = a.elapsed_time(b) / 1e3 if self.device.type == "cuda" else b - a
            out[name] = out.get(name, 0.0) + dt
        self.pairs.clear()
        return out


def _routing(moe) -> tuple:
    """route()'s optional routing argument, where this version of reap has one."""
    return (moe.routing,) if getattr(moe, "routing", None) is not None else ()


class TimedMoE(RoutedMoE):
    """RoutedMoE._moe with interval marks (the same operations as reap/moe.py, in the same order)."""

    marks: Marks | None = None

    def _moe(self, x):
        m = self.marks
        m.start("moe.router")
        T, H = x.shape
        K, E = self.top_k, self.num_experts
        logits = F.linear(x.to(self.router.dtype), self.router)
        weights, chosen = route(logits, self.bias, K, self.family, *_routing(self))
        m.stop("moe.router")
        m.start("moe.dispatch")
        flat_expert = chosen.reshape(-1)
        expert_sorted, order = torch.sort(flat_expert, stable=True)
        token_sorted = order // K
        gate_sorted = weights.reshape(-1)[order]
        counts = torch.bincount(flat_expert, minlength=E)
        xs = x[token_sorted]
        m.stop("moe.dispatch")
        m.start("moe.experts")
        y = self._experts(xs, counts)
        m.stop("moe.experts")
        m.start("moe.stats")
        if self.accumulator is not None:
            norms = y.float().norm(dim=-1)
            self.accumulator.add(expert_sorted, gate_sorted, norms)
        m.stop("moe.stats")
        m.start("moe.combine")
        out = torch.zeros_like(x)
        out.index_add_(0, token_sorted, (y * gate_sorted[:, None]).to(x.dtype))
        if getattr(self, "shared", None) is not None:
            out = out + self.shared(x)
        m.stop("moe.combine")
        return out


class DenseMoE(RoutedMoE):
    """The dense alternative: every expert on every token (same routing weights; norms of all experts)."""

    def _moe(self, x):
        logits = F.linear(x.to(self.router.dtype), self.router)
        weights, chosen = route(logits, self.bias, self.top_k, self.family, *_routing(self))
        gates = torch.zeros(x.shape[0], self.num_experts, device=x.device).scatter_(1, chosen, weights)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        norms = torch.empty(x.shape[0], self.num_experts, device=x.device)
        for e in range(self.num_experts):
            y = F.linear(self.act(F.linear(x, self.w_gate[e])) * F.linear(x, self.w_up[e]), self.w_down[e])
            norms[:, e] = torch.linalg.vector_norm(y, dim=-1, dtype=torch.float32)
            out.addcmul_(y, gates[:, e : e + 1])
        if self.accumulator is not None:
            idx = torch.arange(self.num_experts, device=x.device).expand_as(norms)
            self.accumulator.add(idx, gates, norms)
        return out.to(x.dtype)


def _combine(kind: str, y, order, token_sorted, gate_sorted, weights, T, K, H, dtype):
    """Ways to turn expert outputs y [N, H] (sorted by expert) into the layer output [T, H]."""
    if kind == "index_add_bf16":  # reap/moe.py today: fp32 product, cast, bf16 atomics
        out = torch.zeros(T, H, dtype=dtype, device=y.device)
        out.index_add_(0, token_sorted, (y * gate_sorted[:, None]).to(dtype))
        return out
    if kind == "index_add_fp32":
        out = torch.zeros(T, H, dtype=torch.float32, device=y.device)
        out.index_add_(0, token_sorted, y.float() * gate_sorted[:, None])
        return out.to(dtype)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    yk = y[inv].view(T, K, H)  # back to (token, k) order
    if kind == "sum_fp32":  # transformers' grouped_mm path
        return (yk * weights.unsqueeze(-1)).sum(dim=1).to(dtype)
    if kind == "bmm_fp32w":  # [T,1,K] x [T,K,H], fp32 weights and accumulation
        return torch.bmm(weights.unsqueeze(1), yk.float()).squeeze(1).to(dtype)
    if kind == "bmm_bf16w":  # weights rounded to bf16, fp32 accumulation inside the GEMM
        return torch.bmm(weights.to(dtype).unsqueeze(1), yk).squeeze(1)
    raise ValueError(kind)


COMBINES = ("index_add_bf16", "index_add_fp32", "sum_fp32", "bmm_fp32w", "bmm_bf16w")


class FastMoE(RoutedMoE):
    """Proposed reap/moe.py: statistics norm without an fp32 copy of y, combine without atomics."""

    combine = "bmm_bf16w"

    def _moe(self, x):
        T, H = x.shape
        K, E = self.top_k, self.num_experts
        logits = F.linear(x.to(self.router.dtype), self.router)
        weights, chosen = route(logits, self.bias, K, self.family, *_routing(self))
        flat_expert = chosen.reshape(-1)
        expert_sorted, order = torch.sort(flat_expert, stable=True)
        token_sorted = order // K
        gate_sorted = weights.reshape(-1)[order]
        counts = torch.bincount(flat_expert, minlength=E)
        y = self._experts(x[token_sorted], counts)
        if self.accumulator is not None:
            norms = torch.linalg.vector_norm(y, dim=-1, dtype=torch.float32)
            self.accumulator.add(expert_sorted, gate_sorted, norms)
        out = _combine(self.combine, y, order, token_sorted, gate_sorted, weights, T, K, H, x.dtype)
        if getattr(self, "shared", None) is not None:
            out = out + self.shared(x)
        return out


class PinnedStore:
    """Proposed HiddenStore(mode="cpu"): one pinned buffer per batch, reused across layers, async copies."""

    def __init__(self, device):
        self.device, self._items = device, {}

    def put(self, i, h):
        buf = self._items.get(i)
        if buf is None or buf.shape != h.shape or buf.dtype != h.dtype:
            buf = self._items[i] = torch.empty(h.shape, dtype=h.dtype, pin_memory=True)
        buf.copy_(h, non_blocking=True)  # stream-ordered before the next get's H2D copy

    def get(self, i):
        return self._items[i].to(self.device, non_blocking=True)


def candidates(st, module, moe, entry, res, device, repeats) -> dict:
    """Numbers for proposed src patches: combine / norm micro-benchmarks on one batch, the whole layer with
    FastMoE, and the CPU hidden-state store."""
    from reap.calibrate import HiddenStore

    out: dict = {}
    # capture one batch's MoE inputs
    cap = {}
    def grab(m, a):  # returns None: a pre-hook that returns a value would replace the module's input
        cap.setdefault("x", a[0].reshape(-1, a[0].shape[-1]))

    h0 = moe.register_forward_pre_hook(grab)
    with torch.inference_mode():
        moe.accumulator = None
        layer_call(st, module, 0, moe)
    h0.remove()
    x = cap["x"]
    T, H = x.shape
    K, E = moe.top_k, moe.num_experts
    with torch.inference_mode():
        logits = F.linear(x.to(moe.router.dtype), moe.router)
        weights, chosen = route(logits, moe.bias, K, moe.family, *_routing(moe))
        flat = chosen.reshape(-1)
        _, order = torch.sort(flat, stable=True)
        token_sorted = order // K
        gate_sorted = weights.reshape(-1)[order]
        y = moe._experts(x[token_sorted], torch.bincount(flat, minlength=E))
        ref = torch.zeros(T, H, dtype=torch.float64, device=device)
        ref.index_add_(0, token_sorted, y.double() * gate_sorted.double()[:, None])
        scale = ref.abs().max()

        def timeit(fn, n=10):
            fn()
            sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                r = fn()
            sync(device)
            return (time.perf_counter() - t0) / n, r

        comb = {}
        for kind in COMBINES:
            dt, r = timeit(lambda: _combine(kind, y, order, token_sorted, gate_sorted, weights, T, K, H, x.dtype))
            comb[kind] = {"ms": dt * 1e3, "max_err_vs_fp64_rel": ((r.double() - ref).abs().max() / scale).item()}
        out["combine_one_batch"] = comb
        dt1, n1 = timeit(lambda: y.float().norm(dim=-1))
        dt2, n2 = timeit(lambda: torch.linalg.vector_norm(y, dim=-1, dtype=torch.float32))
        out["norm_one_batch"] = {"float_norm_ms": dt1 * 1e3, "vector_norm_dtype_ms": dt2 * 1e3,
                                 "max_rel_diff": ((n1 - n2).abs() / n1.clamp(min=1e-30)).max().item()}
        del y, ref, logits
    # the whole layer, all batches, with FastMoE (each combine that is accurate enough)
    acc_ref = LayerAccumulator(E, device)
    moe.__class__ = RoutedMoE
    moe.accumulator = acc_ref
    forward_all(st, module, moe, batches=[0])
    layer = {}
    for kind in ("sum_fp32", "bmm_fp32w", "bmm_bf16w", "index_add_fp32"):
        moe.__class__ = FastMoE
        moe.combine = kind
        acc = LayerAccumulator(E, device)
        moe.accumulator = acc
        forward_all(st, module, moe, batches=[0])
        stat_diff = max(((getattr(acc, f) - getattr(acc_ref, f)).abs()
                         / getattr(acc_ref, f).abs().clamp(min=1e-12)).max().item()
                        for f in ("count", "gate_sum", "ean_sum", "reap_sum", "max_norm"))
        times = []
        for _ in range(repeats + 1):
            moe.accumulator = LayerAccumulator(E, device)
            times.append(forward_all(st, module, moe))
        fw = med(times[1:])
        layer[kind] = {"forward_s": fw, "tokens_per_s": entry["tokens"] / fw,
                       "tflops": entry["flops"]["total"] / fw / 1e12,
                       "peak_share": entry["flops"]["total"] / fw / 1e12 / res["matmul_peak_tflops"],
                       "stats_max_rel_diff_vs_current_batch0": stat_diff}
        if "tf_forward_s" in entry:
            layer[kind]["speedup_vs_transformers"] = entry["tf_forward_s"] / fw
        if "dense" in res:
            layer[kind]["speedup_vs_dense"] = res["dense"]["dense_s_per_token"] * entry["tokens"] / fw
    moe.__class__ = RoutedMoE
    out["layer_with_fastmoe"] = layer
    # hidden states in CPU memory: HiddenStore(cpu) today vs one reused pinned buffer per batch
    if device.type == "cuda":
        hs = [torch.randn(8, 2048, H, device=device, dtype=torch.bfloat16) for _ in range(8)]  # 128K tokens
        for name, store in (("current", HiddenStore("cpu", device, None)), ("pinned_reuse", PinnedStore(device))):
            for rep in range(2):
                sync(device)
                t0 = time.perf_counter()
                for i, h in enumerate(hs):
                    store.put(i, h)
                sync(device)
                t1 = time.perf_counter()
                for i in range(len(hs)):
                    store.get(i)
                sync(device)
                t2 = time.perf_counter()
            gb = sum(h.numel() * 2 for h in hs) / 1e9
            out[f"hidden_store_{name}"] = {"put_GBps": gb / (t1 - t0), "get_GBps": gb / (t2 - t1),
                                          "s_per_M_tokens_put_get": ((t1 - t0) + (t2 - t1)) * 1e6 / (8 * 8 * 2048)}
        del hs
    return out


# -- FLOP counts ---------------------------------------------------------------------------------------------
def flops(tokens: int, seq: int, dims: dict) -> dict[str, float]:
    H, I, K = dims["hidden"], dims["inter"], dims["top_k"]
    q, kv = dims["heads"] * dims["head_dim"], dims["kv_heads"] * dims["head_dim"]
    n_seq = tokens // seq
    routed = tokens * K * 3 * 2 * H * I
    proj = tokens * 2 * H * (q + 2 * kv) + tokens * 2 * q * H
    core = n_seq * 2 * 2 * dims["heads"] * dims["head_dim"] * seq * (seq + 1) / 2  # causal QK^T + PV
    return {"routed": routed, "attn_proj": proj, "attn_core": core, "total": routed + proj + core,
            "dense_experts": tokens * dims["experts"] * 3 * 2 * H * I}


def matmul_peak(device, n=8192, iters=20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


# -- pieces --------------------------------------------------------------------------------------------------
def layer_call(st: LayerStreamer, module, i: int, moe=None):
    b = st.batches[i]
    h = st.store.get(i)
    pos, mask, token_mask = st._inputs(b, h)
    if moe is not None:
        moe.token_mask = token_mask
    out = module(h, attention_mask=mask, position_ids=pos, past_key_values=None, use_cache=False,
                 position_embeddings=st.rotary(h, pos))
    return out[0] if isinstance(out, tuple) else out


@torch.inference_mode()
def forward_all(st, module, moe=None, batches=None) -> float:
    """Seconds for every batch through module (outputs discarded; inputs unchanged)."""
    sync(st.device)
    t0 = time.perf_counter()
    for i in batches if batches is not None else range(len(st.batches)):
        layer_call(st, module, i, moe)
    sync(st.device)
    return time.perf_counter() - t0


def transformers_layer(st: LayerStreamer, module, moe: RoutedMoE):
    """transformers' MiniMaxM2DecoderLayer (grouped_mm experts, sdpa) holding the same bf16 weights."""
    from transformers.models.minimax_m2.modeling_minimax_m2 import MiniMaxM2DecoderLayer

    cfg = copy.deepcopy(st.config)
    cfg._attn_implementation = "sdpa"
    cfg._experts_implementation = "grouped_mm"
    with torch.device("meta"):
        layer = MiniMaxM2DecoderLayer(cfg, 0)
    state = {k: v for k, v in module.state_dict().items() if not k.startswith("mlp.")}
    state.update({"mlp.gate.weight": moe.router, "mlp.e_score_correction_bias": moe.bias,
                  "mlp.experts.gate_up_proj": torch.cat([moe.w_gate, moe.w_up], dim=1),
                  "mlp.experts.down_proj": moe.w_down})
    layer.load_state_dict(state, strict=True, assign=True)
    return layer.eval()


def read_split(st: LayerStreamer) -> dict[str, float]:
    """The prefetch thread's work for layer 0, split: shard (mmap) -> tensor, tensor -> pinned memory."""
    prefix = st.spec.family.layer_prefix.format(layer=0)
    t_get = t_pin = 0.0
    nbytes = 0
    for name in st.ckpt.infos:
        if name.startswith(prefix):
            t0 = time.perf_counter()
            t = st.ckpt.tensor(name)
            t1 = time.perf_counter()
            if st.device.type == "cuda":
                t = t.pin_memory()
            t_get += t1 - t0
            t_pin += time.perf_counter() - t1
            nbytes += t.numel() * t.element_size()
    return {"get_tensor_s": t_get, "pin_memory_s": t_pin, "layer_bytes": nbytes}


def evict(paths) -> bool:
    """Drop the files' clean pages from the page cache (posix_fadvise DONTNEED); True if it was possible."""
    ok = True
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        except (OSError, AttributeError):
            ok = False
    return ok


def batched_materialize(st: LayerStreamer, raw: dict, dtype) -> tuple[dict, dict[str, float]]:
    """Prototype: one [E, O, I] FP8 tensor per projection (assembled in pinned memory), one H2D copy and one
    dequantize per projection (in chunks of 64 experts), instead of 3 x E small copies and dequantizes."""
    spec, dev = st.spec, st.device
    lp = spec.family.layer_prefix.format(layer=0)
    E, I, H = spec.num_experts, spec.expert_intermediate, spec.hidden_size
    bo, bi = st.ckpt.block_size
    t_cpu = t_gpu = 0.0
    out = {}
    for p in ("gate", "up", "down"):
        o, i = (H, I) if p == "down" else (I, H)
        names = [spec.projection_name(0, e, p)[len(lp):] for e in range(E)]
        t0 = time.perf_counter()
        q = torch.empty((E, o, i), dtype=torch.uint8, pin_memory=dev.type == "cuda")
        s = torch.empty((E, o // bo, i // bi), dtype=torch.float32, pin_memory=dev.type == "cuda")
        for e, n in enumerate(names):
            q[e].copy_(raw[n].view(torch.uint8))
            s[e].copy_(raw[n + "_scale_inv"])
        t1 = time.perf_counter()
        qd, sd = q.to(dev, non_blocking=True), s.to(dev, non_blocking=True)
        w = torch.empty((E, o, i), dtype=dtype, device=dev)
        for c in range(0, E, 64):
            blk = qd[c : c + 64].view(torch.float8_e4m3fn).view(-1, o // bo, bo, i // bi, bi).float()
            w[c : c + 64] = (blk * sd[c : c + 64].view(-1, o // bo, 1, i // bi, 1)).reshape(-1, o, i).to(dtype)
        sync(dev)
        t_cpu += t1 - t0
        t_gpu += time.perf_counter() - t1
        out[p] = w
        del qd, sd
    return out, {"assemble_pinned_cpu_s": t_cpu, "h2d_dequantize_s": t_gpu}


def med(xs):
    return statistics.median(xs) if xs else None


# -- main ----------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/m2-layer-bench"))
    ap.add_argument("--out-dir", type=Path, default=Path("."))
    ap.add_argument("--tokens", type=int, nargs="+", default=[16384, 65536, 262144])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dense-tokens", type=int, default=16384)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny dimensions, to check the script on a CPU")
    ap.add_argument("--candidates", action="store_true", help="measure proposed src patches (last size)")
    ap.add_argument("--skip", nargs="*", default=[], help="sections to skip: tf dense profile offload batched")
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    dims = dict(M2)
    if args.small:
        dims.update(hidden=256, experts=16, inter=128, heads=4, kv_heads=2, head_dim=64, top_k=4)
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, "dims": dims,
                 "seq": args.seq, "batch_tokens": args.batch_tokens, "repeats": args.repeats}
    import transformers

    res["transformers"] = transformers.__version__
    if device.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(device)
    save = lambda: (args.out_dir / "results.json").write_text(json.dumps(res, indent=2))  # noqa: E731

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    t0 = time.perf_counter()
    model = make_m2_checkpoint(args.workdir / "m2-1L", 1, vocab=4096, dims=dims if args.small else None, log=log)
    res["generate_s"] = time.perf_counter() - t0
    ckpt = Checkpoint(model)
    spec = detect(ckpt.config)
    res["layer_disk_bytes"] = sum(i.nbytes for n, i in ckpt.infos.items() if n.startswith("model.layers.0."))
    res["matmul_peak_tflops"] = matmul_peak(device, 8192 if device.type == "cuda" else 256,
                                            20 if device.type == "cuda" else 2)
    log(f"bf16 matmul peak {res['matmul_peak_tflops']:.1f} TFLOP/s")
    save()

    def streamer(tokens, offload="device"):
        g = torch.Generator().manual_seed(tokens)
        seqs = torch.randint(0, 4096, (tokens // args.seq, args.seq), generator=g).tolist()
        return LayerStreamer(ckpt, spec, seqs, EngineOptions(device=str(device), dtype="bfloat16",
                                                             batch_tokens=args.batch_tokens, offload=offload,
                                                             progress=False))

    # -- layer load: read (prefetch thread's work) and materialize, separately
    st = streamer(args.seq)
    st.embed()
    st.run_layer(0, LayerAccumulator(spec.num_experts, device))  # warm-up: CUDA context, kernels, host allocator
    load = {"read_s": [], "materialize_s": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        raw = st._read(0)
        load["read_s"].append(time.perf_counter() - t0)
        st._pending[0] = _done(raw)
        sync(device)
        t0 = time.perf_counter()
        module = st.load_layer(0)
        sync(device)
        load["materialize_s"].append(time.perf_counter() - t0)
        st._pending.pop(1, None)
        if _ is not args.repeats - 1:
            st.free_layer(0)
    res["load"] = {k: med(v) for k, v in load.items()} | {"all": load}
    res["load"].update(read_split(st))
    if "batched" not in args.skip:
        ref = module.mlp
        ws, tb = batched_materialize(st, raw, torch.bfloat16)
        tb["equal_to_current"] = all(torch.equal(ws[p], getattr(ref, f"w_{p}")) for p in ws)
        del ws
        ws, tb2 = batched_materialize(st, raw, torch.bfloat16)  # second call: warm host allocator
        res["load"]["batched_prototype"] = {**tb2, "equal_to_current": tb["equal_to_current"]}
        del ws, ref
    st.free_layer(0)
    del module
    # the same read with the shard files evicted from the page cache (cold local disk), if possible
    shards = [model / s for s in ckpt.shards]
    if evict(shards):
        t0 = time.perf_counter()
        raw = st._read(0)
        res["load"]["read_cold_s"] = time.perf_counter() - t0
    del raw
    st.close()
    log(f"load {json.dumps({k: v for k, v in res['load'].items() if k != 'all'})}")
    save()

    res["sizes"] = []
    for tokens in args.tokens:
        entry: dict = {"tokens": tokens, "flops": flops(tokens, args.seq, dims)}
        st = streamer(tokens)
        entry["offload"] = st.store.mode
        st.embed()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        st.run_layer(0, LayerAccumulator(spec.num_experts, device))  # warm-up (includes the read)
        runs = []
        for _ in range(args.repeats):
            st.embed()
            st.prefetch(0)
            st._pending[0].result()  # steady state: the read happened during the previous layer
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            st.run_layer(0, LayerAccumulator(spec.num_experts, device))
            runs.append(time.perf_counter() - t0)
            st._pending.pop(1, None)
        entry["run_layer_s"] = med(runs)
        entry["run_layer_all_s"] = runs
        if device.type == "cuda":
            entry["peak_gpu_gib_run_layer"] = torch.cuda.max_memory_allocated(device) / 2**30
        # forward only, layer materialized
        st.embed()
        module = st.load_layer(0)
        st._pending.pop(1, None)
        moe = module.mlp
        fw = []
        for r in range(args.repeats + 1):
            moe.accumulator = LayerAccumulator(spec.num_experts, device)
            dt = forward_all(st, module, moe)
            if r:
                fw.append(dt)
        entry["reap_forward_s"] = med(fw)
        entry["reap_forward_all_s"] = fw
        f = entry["flops"]
        entry["tokens_per_s_run_layer"] = tokens / entry["run_layer_s"]
        entry["tokens_per_s_forward"] = tokens / entry["reap_forward_s"]
        entry["tflops_forward"] = f["total"] / entry["reap_forward_s"] / 1e12
        entry["tflops_run_layer"] = f["total"] / entry["run_layer_s"] / 1e12
        entry["peak_share_forward"] = entry["tflops_forward"] / res["matmul_peak_tflops"]
        entry["peak_share_run_layer"] = entry["tflops_run_layer"] / res["matmul_peak_tflops"]
        if "tf" not in args.skip:
            moe.accumulator = None
            tl = transformers_layer(st, module, moe)
            with torch.inference_mode():
                a = layer_call(st, module, 0, moe).float()
                b = layer_call(st, tl, 0).float()
            entry["tf_vs_reap_max_rel_diff"] = ((a - b).abs().max() / b.abs().max()).item()
            del a, b
            tf = [forward_all(st, tl, None) for _ in range(args.repeats + 1)][1:]
            entry["tf_forward_s"] = med(tf)
            entry["tf_forward_all_s"] = tf
            entry["speedup_vs_transformers"] = entry["tf_forward_s"] / entry["reap_forward_s"]
            del tl
        # forward breakdown (CUDA events) on all batches, statistics on
        marks = Marks(device)
        moe.__class__ = TimedMoE
        moe.marks = marks
        moe.accumulator = LayerAccumulator(spec.num_experts, device)
        hooks = [module.self_attn.register_forward_pre_hook(lambda *a: marks.start("attention")),
                 module.self_attn.register_forward_hook(lambda *a: marks.stop("attention")),
                 module.mlp.register_forward_pre_hook(lambda *a: marks.start("moe")),
                 module.mlp.register_forward_hook(lambda *a: marks.stop("moe"))]
        with torch.inference_mode():
            sync(device)
            t0 = time.perf_counter()
            for i in range(len(st.batches)):
                marks.start("layer")
                layer_call(st, module, i, moe)
                marks.stop("layer")
            sync(device)
            wall = time.perf_counter() - t0
        for h in hooks:
            h.remove()
        tot = marks.totals()
        with torch.inference_mode():  # the timed copy of RoutedMoE._moe computes what reap/moe.py computes
            moe.accumulator = None
            timed_out = layer_call(st, module, 0, moe)
            moe.__class__ = RoutedMoE
            again = layer_call(st, module, 0, moe)
            entry["timed_moe_vs_routed_moe_max_rel"] = ((timed_out.float() - again.float()).abs().max()
                                                        / again.float().abs().max()).item()
            entry["routed_moe_run_to_run_max_rel"] = ((layer_call(st, module, 0, moe).float() - again.float())
                                                      .abs().max() / again.float().abs().max()).item()
            moe.__class__ = TimedMoE
            marks.totals()
        tot["norms_residual_rope_mask"] = tot["layer"] - tot["attention"] - tot["moe"]
        tot["moe.other"] = tot["moe"] - sum(v for k, v in tot.items() if k.startswith("moe."))
        entry["breakdown_s"] = {k: round(v, 5) for k, v in tot.items()} | {"wall": wall}
        entry["attention_tflops"] = (f["attn_proj"] + f["attn_core"]) / tot["attention"] / 1e12
        entry["experts_tflops"] = f["routed"] / tot["moe.experts"] / 1e12
        moe.__class__ = RoutedMoE
        if "profile" not in args.skip and tokens == args.tokens[-1] and device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            moe.accumulator = LayerAccumulator(spec.num_experts, device)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                forward_all(st, module, moe, batches=[0, 1])
            (args.out_dir / "profile_reap_2batches.txt").write_text(
                prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))
        if "dense" not in args.skip and "dense" not in res and tokens >= args.dense_tokens:
            nb = max(1, args.dense_tokens // args.batch_tokens)
            dense_tokens = sum(sum(st.batches[i].lengths) for i in range(nb))
            moe.accumulator = LayerAccumulator(spec.num_experts, device)
            moe.__class__ = DenseMoE
            dn = [forward_all(st, module, moe, batches=range(nb)) for _ in range(2)][1:]
            moe.__class__ = RoutedMoE
            moe.accumulator = LayerAccumulator(spec.num_experts, device)
            sp = [forward_all(st, module, moe, batches=range(nb)) for _ in range(2)][1:]
            res["dense"] = {"tokens": dense_tokens, "dense_s": med(dn), "reap_s_same_tokens": med(sp),
                            "dense_tflops": (flops(dense_tokens, args.seq, dims)["dense_experts"]
                                             + f["attn_proj"] * dense_tokens / tokens
                                             + f["attn_core"] * dense_tokens / tokens) / med(dn) / 1e12,
                            "dense_s_per_token": med(dn) / dense_tokens}
        if args.candidates and tokens == args.tokens[-1]:
            res["candidates"] = candidates(st, module, moe, entry, res, device, args.repeats)
            log(f"candidates {json.dumps(res['candidates'])}")
        if device.type == "cuda":
            entry["peak_gpu_gib_total"] = torch.cuda.max_memory_allocated(device) / 2**30
        st.free_layer(0)
        st.close()
        del module, moe
        res["sizes"].append(entry)
        log(f"{tokens} tokens: {json.dumps({k: v for k, v in entry.items() if not k.endswith('_all_s')})}")
        save()

    if "dense" in res:
        for e in res["sizes"]:
            e["speedup_vs_dense"] = res["dense"]["dense_s_per_token"] * e["tokens"] / e["reap_forward_s"]
    # hidden states in pinned CPU memory instead of on the device
    if "offload" not in args.skip:
        tokens = 65536 if 65536 in args.tokens else args.tokens[0]
        out = {"tokens": tokens}
        for mode in ("device", "cpu"):
            st = streamer(tokens, offload=mode)
            st.embed()
            st.run_layer(0, LayerAccumulator(spec.num_experts, device))
            st.prefetch(0)
            st._pending[0].result()
            t0 = time.perf_counter()
            st.run_layer(0, LayerAccumulator(spec.num_experts, device))
            out[f"run_layer_{mode}_s"] = time.perf_counter() - t0
            st.close()
        res["offload"] = out
        log(f"offload {json.dumps(out)}")
    save()
    print(json.dumps(res, indent=2))


class _done:
    """A finished future holding a value (to hand a read layer to LayerStreamer.load_layer)."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


if __name__ == "__main__":
    main()
