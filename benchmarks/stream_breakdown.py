"""Where a streamed calibration's time goes, batch by batch and layer by layer (run on a CUDA machine).

    PYTHONPATH=src python benchmarks/stream_breakdown.py --out $OUT/breakdown.json [--workdir /tmp/stream-bench]
        [--layers 6] [--tokens 1048576] [--interval 0.005] [--tokenize-s 3]

The streamer as ``reap calibrate`` drives it (benchmarks/stream_bench.py's random-weight MiniMax-M2-width FP8
checkpoint, bf16, hidden states on the device, no greedy search, the checkpoint in the page cache): created first
(layer 0 is read and loaded in the background), then ``--tokenize-s`` seconds standing in for tokenization, then
every layer (load wait, forward, statistics; layer 0 embeds its own batches, as in calibrate). ``--interval``
sets the GIL's switch interval after the streamer is made (default: reap's own, reap.stream.streamer.SWITCH_INTERVAL);
Python's default is 0.005. Each variant belongs in a process of its own (CUDA start-up happens once per process).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stream_bench import checkpoint  # noqa: E402

from reap.io.checkpoint import Checkpoint  # noqa: E402
from reap.model.derive import derive  # noqa: E402
from reap.calibrate.stats import LayerAccumulator  # noqa: E402
from reap.stream.streamer import EngineOptions, LayerStreamer  # noqa: E402


def arguments(doc: str) -> argparse.ArgumentParser:
    """The options this benchmark and benchmarks/stream_timeline.py share."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/stream-bench"))
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=1 << 20)
    ap.add_argument("--tokenize-s", type=float, default=3.0)
    return ap


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--interval", type=float, default=None)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    gpu = args.device != "cpu"
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = checkpoint(args.workdir, args.layers)
    ckpt = Checkpoint(model)
    layout = derive(ckpt)
    t0 = time.perf_counter()
    st = LayerStreamer(ckpt, layout, None, EngineOptions(device=args.device, dtype="bfloat16", progress=False,
                                                         greedy_tokens=0, keep_page_cache=True))
    made = time.perf_counter() - t0
    if args.interval is not None:
        sys.setswitchinterval(args.interval)
    time.sleep(args.tokenize_s)
    g = torch.Generator().manual_seed(0)
    st.set_sequences([torch.randint(0, 4096, (2048,), generator=g).tolist() for _ in range(args.tokens // 2048)])
    st.embed()  # as calibrate does: layer 0 embeds its own batches (its per-batch call of the base model)
    layers = []
    for layer in range(layout.num_layers):
        t = time.perf_counter()
        st.run_layer(layer, LayerAccumulator(layout.num_experts, st.device))
        layers.append(time.perf_counter() - t)
    st.close()
    res = {"gpu": torch.cuda.get_device_name(0) if gpu else "none", "torch": torch.__version__,
           "switch_interval": args.interval if args.interval is not None else "reap default",
           "tokens": st.tokens, "batches": len(st.batches), "streamer_s": round(made, 3),
           "warmup_s": round(st.warmup_seconds, 3),
           "layer_s": [round(x, 3) for x in layers], "weights_wait_s": [round(x, 3) for x in st.stats.wait_seconds],
           "total_s": round(sum(layers), 3),
           "tok_s_per_layer": round(st.tokens * len(layers) / sum(layers), 1)}
    print(json.dumps(res), flush=True)
    args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
