"""MiniMax-M2 decoder layers at the released width through reap's LayerStreamer, against transformers' own
grouped_mm forward of the same layer (run on a CUDA GPU).

    PYTHONPATH=src python benchmarks/m2_layer_bench.py --out-dir $OUT [--tokens 65536 262144] [--layers 4]
        [--workdir /tmp/m2-layer-bench] [--repeats 3] [--cli-tokens 262144]

Random weights: an FP8 checkpoint (hidden 3072, 256 experts x intermediate 1536, 48 heads x 128, 8 KV heads,
128x128 block scales, vocab 4096) generated with benchmarks/rewrite_bench.py. For each calibration size
(random token ids, sequences of 2048, 16384 padded tokens per batch, bf16, hidden states on the device):

* ``forward``: layer 0 materialized once; every batch through it as calibration does (the base model's forward
  with pass-through layers gives the layer's inputs, then transformers' decoder layer runs with reap's experts
  implementation and the float64 statistics) - median of ``--repeats`` after a warm-up;
* ``forward, inputs captured beforehand``: the same without the per-batch capture pass (what that pass costs);
* ``transformers``: the same decoder layer with transformers' own ``grouped_mm`` experts implementation, no
  statistics, on the same inputs; the two outputs compared (relative to the output's scale);
* ``run_layer``: LayerStreamer.run_layer (materialize from prefetched bytes + forward + statistics);
* achieved TFLOP/s and the share of a bf16 8192^3 matmul measured in the same run;
* with ``--layers N``: every layer streamed in a row (run_layer time, peak and residual GPU memory per layer);
* ``--cli-tokens``: the whole ``reap calibrate`` command on the N-layer checkpoint (tokens/s per layer).

Results: ``results.json`` in ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rewrite_bench import M2, make_m2_checkpoint  # noqa: E402

from reap.io.checkpoint import Checkpoint  # noqa: E402
from reap.model.derive import derive  # noqa: E402
from reap.stream.experts import IMPLEMENTATION, ExpertsProbe  # noqa: E402
from reap.core.options import EngineOptions  # noqa: E402
from reap.calibrate.stats import LayerAccumulator  # noqa: E402
from reap.stream.streamer import LayerStreamer  # noqa: E402


DEVICE = "cuda"  # --device cpu: a dry run of the script's logic (small --dims) on a machine without a GPU


def sync() -> None:
    if DEVICE != "cpu":
        torch.cuda.synchronize()


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def flops(tokens: int, seq: int) -> float:
    H, I, K = M2["hidden"], M2["inter"], M2["top_k"]
    q, kv = M2["heads"] * M2["head_dim"], M2["kv_heads"] * M2["head_dim"]
    routed = tokens * K * 3 * 2 * H * I
    proj = tokens * 2 * H * (q + 2 * kv) + tokens * 2 * q * H
    core = tokens // seq * 2 * 2 * M2["heads"] * M2["head_dim"] * seq * (seq + 1) / 2
    return routed + proj + core


def matmul_peak() -> float:
    n = 8192 if DEVICE != "cpu" else 256
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    sync()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    sync()
    return 10 * 2 * n**3 / (time.perf_counter() - t0) / 1e12


def set_experts(module, name: str) -> None:
    for m in module.modules():
        if hasattr(m, "has_gate"):
            m.config._experts_implementation_internal = name


def timed(fn, repeats: int, setup=None) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after a warm-up (``setup()`` before each, not timed)."""
    if setup:
        setup()
    fn()
    times = []
    for _ in range(repeats):
        if setup:
            setup()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return med(times)


def bench_size(ckpt, layout, tokens: int, repeats: int, peak: float) -> dict:
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 4096, (2048,), generator=g).tolist() for _ in range(tokens // 2048)]
    st = LayerStreamer(ckpt, layout, seqs, EngineOptions(device=DEVICE, dtype="bfloat16", batch_tokens=16384,
                                                         offload="device", progress=False))
    st.embed(ahead=True)
    inputs = [st.store.get(i) for i in range(len(st.batches))]
    module = st.loader.load_layer(0)
    experts = next(m for m in module.modules() if hasattr(m, "has_gate"))
    calls = [st.layer_call(i, 0) for i in range(len(st.batches))]

    def forward(capture: bool, stats: bool):
        outs = []
        with torch.inference_mode():
            experts._reap_probe = ExpertsProbe(LayerAccumulator(layout.num_experts, st.device) if stats else None)
            for i, h in enumerate(inputs):
                args, kwargs = st.layer_call(i, 0) if capture else calls[i]
                out = module(h, *args[1:], **kwargs)
                outs.append(out[0] if isinstance(out, tuple) else out)
            del experts._reap_probe
        return outs

    res: dict = {"tokens": st.tokens, "batches": len(st.batches)}
    f = flops(st.tokens, 2048)
    res["forward_s"] = timed(lambda: forward(True, True), repeats)
    res["forward_precaptured_s"] = timed(lambda: forward(False, True), repeats)
    reap_out = forward(True, True)[0].float()
    set_experts(module, "grouped_mm")
    res["transformers_s"] = timed(lambda: forward(False, False), repeats)
    ref_out = forward(False, False)[0].float()
    set_experts(module, IMPLEMENTATION)
    res["reap_vs_transformers_max_rel"] = ((reap_out - ref_out).abs().max() / ref_out.abs().max()).item()
    st.loader.free_layer(0)
    for key in ("forward_s", "forward_precaptured_s", "transformers_s"):
        res[key.replace("_s", "_tok_s")] = st.tokens / res[key]
    res["forward_tflops"] = f / res["forward_s"] / 1e12
    res["forward_share_of_peak"] = res["forward_tflops"] / peak
    res["reap_over_transformers"] = res["transformers_s"] / res["forward_s"]
    res["capture_overhead"] = res["forward_s"] / res["forward_precaptured_s"] - 1

    def setup():
        st.embed()
        st.loader.prefetch(0)
        st.loader._pending[0].result()  # bytes already read, as in steady state

    if DEVICE != "cpu":
        torch.cuda.reset_peak_memory_stats()
    res["run_layer_s"] = timed(lambda: st.run_layer(0, LayerAccumulator(layout.num_experts, st.device)), repeats,
                               setup)
    res["run_layer_tok_s"] = st.tokens / res["run_layer_s"]
    res["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30 if DEVICE != "cpu" else 0.0
    st.close()
    return res


def stream_layers(ckpt, layout, tokens: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 4096, (2048,), generator=g).tolist() for _ in range(tokens // 2048)]
    st = LayerStreamer(ckpt, layout, seqs, EngineOptions(device=DEVICE, dtype="bfloat16", progress=False))
    st.loader.prefetch(0)
    st.embed()
    rows = []
    gpu = DEVICE != "cpu"
    for layer in range(layout.num_layers):
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        st.run_layer(layer, LayerAccumulator(layout.num_experts, st.device))
        rows.append({"layer": layer, "seconds": round(time.perf_counter() - t, 3),
                     "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else 0.0,
                     "allocated_after_gib": round(torch.cuda.memory_allocated() / 2**30, 2) if gpu else 0.0})
        print(json.dumps(rows[-1]), flush=True)
    st.close()
    return rows


def whole_cli(model: Path, tokens: int, workdir: Path) -> dict:
    """The whole ``reap calibrate`` command on the checkpoint (benchmarks/stream_bench.py's runner and data)."""
    import stream_bench

    from reap.testing.tiny import make_byte_tokenizer

    stream_bench.DEVICE = DEVICE
    make_byte_tokenizer(model)
    return stream_bench.run_cli(model, stream_bench.data_file(workdir, tokens), workdir / "cli.stats")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--tokens", type=int, nargs="*", default=[65536, 262144])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cli-tokens", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/m2-layer-bench"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dims", type=json.loads, default=None, help="JSON overrides of the M2 dimensions (dry runs)")
    args = ap.parse_args()
    import transformers

    global DEVICE
    DEVICE = args.device
    if args.dims:
        M2.update(args.dims)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = make_m2_checkpoint(args.workdir / f"m2-{args.layers}", num_layers=args.layers, log=lambda *a: None,
                               dims=args.dims)
    result = {"gpu": torch.cuda.get_device_name(0) if DEVICE != "cpu" else "none (dry run)", "torch": torch.__version__,
              "transformers": transformers.__version__, "generate_s": round(time.perf_counter() - t0, 1),
              "matmul_peak_tflops": matmul_peak(), "sizes": []}
    ckpt = Checkpoint(model)
    layout = derive(ckpt)
    for tokens in args.tokens:
        entry = bench_size(ckpt, layout, tokens, args.repeats, result["matmul_peak_tflops"])
        print(json.dumps(entry), flush=True)
        result["sizes"].append(entry)
    if args.layers > 1:
        result["stream"] = stream_layers(ckpt, layout, max(args.tokens))
    if args.cli_tokens:
        result["cli"] = whole_cli(model, args.cli_tokens, args.workdir)
        print(json.dumps(result["cli"]), flush=True)
    (args.out_dir / "results.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
