"""Layer 0 in a fresh GPU process: what its first batches cost with each warm-up (``REAP_WARMUP``), and when.

    PYTHONPATH=src python benchmarks/first_batch.py --out $OUT/first.json [--workdir /tmp/stream-bench]
        [--layers 6] [--tokens 1048576] [--tokenize-s 0.5] [--modes probe off layer spare]

The checkpoint of benchmarks/stream_bench.py (random-weight MiniMax-M2-width FP8, bf16, hidden states on the
device, no greedy search, page cache warm). Each mode runs in a child process of its own (fresh CUDA state): the
streamer is made, ``--tokenize-s`` stand in for tokenization (the CLI benchmark's 512 short documents take well
under a second), then layers 0 and 1 run. The first eight batches of layer 0 are timed one by one (the host waits
for each), so the first batch's setup is read off directly; the layer totals include that waiting. ``probe``: the
first and second calls of the operations such a layer runs, one by one, in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stream_bench import checkpoint  # noqa: E402
from stream_breakdown import arguments  # noqa: E402


def child(args) -> dict:
    from reap.io.checkpoint import Checkpoint
    from reap.model.derive import derive
    from reap.calibrate.stats import LayerAccumulator
    from reap.stream.streamer import EngineOptions, LayerStreamer

    model = checkpoint(args.workdir, args.layers)
    ckpt = Checkpoint(model)
    layout = derive(ckpt)
    t0 = time.perf_counter()
    st = LayerStreamer(ckpt, layout, None, EngineOptions(device="cuda", dtype="bfloat16", progress=False,
                                                         greedy_tokens=0, keep_page_cache=True))
    made = time.perf_counter() - t0
    time.sleep(args.tokenize_s)
    g = torch.Generator().manual_seed(0)
    st.set_sequences([torch.randint(0, 4096, (2048,), generator=g).tolist() for _ in range(args.tokens // 2048)])
    st.embed()
    put, marks = st.store.put, []

    def timed_put(i, h):
        put(i, h)
        if len(marks) < 8:
            torch.cuda.synchronize()
            marks.append(time.perf_counter())

    st.store.put = timed_put
    layers = []
    for layer in range(2):
        t = time.perf_counter()
        st.run_layer(layer, LayerAccumulator(layout.num_experts, st.device))
        layers.append(time.perf_counter() - t)
        if layer == 0:
            start = t + st.stats.wait_seconds[0]
    st.close()
    batches = [b - a for a, b in zip([start] + marks, marks)]
    return {"mode": os.environ.get("REAP_WARMUP", "spare"), "tokenize_s": args.tokenize_s,
            "streamer_s": round(made, 3), "warmup_s": round(st.warmup_seconds, 3),
            "wait_s": round(st.stats.wait_seconds[0], 3),
            "layer0_batches_s": [round(b, 4) for b in batches], "layer_s": [round(x, 3) for x in layers],
            "batches": len(st.batches)}


def probe() -> dict:
    """First and second calls of the operations an M2-width layer runs, one by one, in a fresh process (seconds):
    whether the first batch's setup is a few libraries or many kernels."""
    import torch.nn.functional as F

    dev, bf = "cuda", torch.bfloat16
    out: dict = {}

    def timed(name, fn):
        for k in (1, 2):
            torch.cuda.synchronize()
            a = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            out[f"{name}_{k}"] = round(time.perf_counter() - a, 4)

    timed("init", lambda: torch.zeros(1, device=dev))
    x = torch.randn(16384, 3072, device=dev, dtype=bf)
    w = torch.randn(3072, 6144, device=dev, dtype=bf)
    timed("matmul_bf16", lambda: x @ w)
    r = torch.randn(256, 3072, device=dev)
    timed("linear_fp32", lambda: F.linear(x.float(), r))
    q = torch.randn(8, 48, 2048, 128, device=dev, dtype=bf)
    kv = torch.randn(8, 8, 2048, 128, device=dev, dtype=bf)
    timed("sdpa_gqa_causal", lambda: F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True))
    logits = torch.randn(16384, 256, device=dev)
    timed("sigmoid_topk", lambda: torch.topk(logits.sigmoid(), 8, dim=-1))
    flat = torch.randint(0, 256, (131072,), device=dev)
    timed("sort_bincount_cumsum", lambda: torch.cumsum(torch.bincount(torch.sort(flat, stable=True)[0],
                                                                      minlength=256), 0, dtype=torch.int32))
    offs = torch.cumsum(torch.bincount(flat, minlength=256), 0, dtype=torch.int32)
    xs = torch.randn(131072, 3072, device=dev, dtype=bf)
    we = torch.randn(256, 3072, 3072, device=dev, dtype=bf)
    mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
    timed("grouped_mm", lambda: mm(xs, we.transpose(-2, -1), offs=offs))
    timed("rmsnorm_silu_mul", lambda: (x.float().pow(2).mean(-1, keepdim=True).rsqrt() * F.silu(x.float()) * x))
    acc = torch.zeros(256, dtype=torch.float64, device=dev)
    timed("vector_norm_index_add_f64", lambda: acc.index_add_(0, flat, torch.linalg.vector_norm(
        xs[:131072, :64], dim=-1, dtype=torch.float32).double()))
    fp8 = torch.randn(3072, 3072, device=dev).to(torch.float8_e4m3fn)
    timed("fp8_dequant", lambda: fp8.to(bf) * 2.0)
    out["sum_first"] = round(sum(v for k, v in out.items() if k.endswith("_1")), 4)
    return out


def main() -> None:
    ap = arguments(__doc__)
    ap.set_defaults(tokenize_s=0.5)
    ap.add_argument("--modes", nargs="*", default=["probe", "off", "layer", "spare"])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.child:
        print("RESULT " + json.dumps(probe() if os.environ.get("REAP_WARMUP") == "probe" else child(args)), flush=True)
        return
    checkpoint(args.workdir, args.layers)
    out = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "runs": []}
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--child", "--out", str(args.out), "--workdir", str(args.workdir),
               "--layers", str(args.layers), "--tokens", str(args.tokens), "--tokenize-s", str(args.tokenize_s)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "REAP_WARMUP": mode})
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        run = json.loads(line[7:]) if line else {"mode": mode, "error": proc.stderr[-2000:]}
        print(json.dumps(run), flush=True)
        out["runs"].append(run)
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
