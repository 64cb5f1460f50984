"""Stream several MiniMax-M2-width layers through the real calibration path on one GPU and check that GPU
memory stays flat from layer to layer (one layer materialized at a time) and that prefetch keeps up.

    python benchmarks/m2_stream_check.py --layers 4 --tokens 131072 [--workdir /tmp/m2-stream]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rewrite_bench import make_m2_checkpoint  # noqa: E402

from reap.arch import detect  # noqa: E402
from reap.calibrate import EngineOptions, LayerStreamer  # noqa: E402
from reap.checkpoint import Checkpoint  # noqa: E402
from reap.saliency import LayerAccumulator  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/m2-stream"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    t0 = time.perf_counter()
    model = make_m2_checkpoint(args.workdir, num_layers=args.layers, log=lambda *a: None)
    gen_s = time.perf_counter() - t0
    ckpt = Checkpoint(model)
    spec = detect(ckpt.config)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 4096, (args.seq,), generator=g).tolist() for _ in range(args.tokens // args.seq)]
    st = LayerStreamer(ckpt, spec, seqs, EngineOptions(device="cuda", dtype="bfloat16", progress=False))
    st.prefetch(0)
    st.embed()
    rows = []
    for layer in range(spec.num_layers):
        torch.cuda.reset_peak_memory_stats()
        acc = LayerAccumulator(spec.num_experts, st.device)
        t = time.perf_counter()
        st.run_layer(layer, acc)
        rows.append({"layer": layer, "seconds": round(time.perf_counter() - t, 3),
                     "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                     "allocated_after_gib": round(torch.cuda.memory_allocated() / 2**30, 2),
                     "routed_pairs": int(acc.count.sum().item())})
        print(json.dumps(rows[-1]), flush=True)
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "layers": args.layers,
              "tokens": st.tokens, "generate_s": round(gen_s, 1), "hidden_states": st.store.mode, "rows": rows}
    st.close()
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
