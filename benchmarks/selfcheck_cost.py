"""What the run-time self-check (reap.stream.selfcheck) costs beside calibration: the streamer's layers run over calibration
data with statistics on, once; the self-check's own seconds (the reference forward and the comparisons on the first
batch of each kind of MoE layer) against the whole time of the layers.

    python benchmarks/selfcheck_cost.py MODEL --dataset DATA [--samples 64] [--device cpu|cuda] [--dtype bfloat16]

Writes one JSON line: tokens, layers, layer seconds, self-check seconds and share, and what was checked.
"""

from __future__ import annotations

import argparse
import json
import time

from reap.io.checkpoint import Checkpoint
from reap.data.tokens import calibration_sequences, load_tokenizer
from reap.model.derive import derive
from reap.core.options import DataOptions, EngineOptions
from reap.calibrate.stats import LayerAccumulator
from reap.stream.streamer import LayerStreamer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-tokens", type=int, default=4096)
    args = ap.parse_args()
    ckpt = Checkpoint(args.model)
    layout = derive(ckpt)
    tok = load_tokenizer(ckpt.path)
    seqs = calibration_sequences(DataOptions(dataset=args.dataset, samples=args.samples, max_length=args.max_length),
                                 tok)
    streamer = LayerStreamer(ckpt, layout, seqs, EngineOptions(device=args.device, dtype=args.dtype,
                                                               batch_tokens=args.batch_tokens, progress=False,
                                                               greedy_tokens=0))
    t0 = time.perf_counter()
    streamer.embed()
    for layer in range(layout.num_layers):
        streamer.run_layer(layer, LayerAccumulator(layout.num_experts))
    total = time.perf_counter() - t0
    check = streamer.selfcheck
    print(json.dumps({"model": str(ckpt.path), "tokens": streamer.tokens, "layers": layout.num_layers,
                      "device": args.device, "dtype": args.dtype, "layers_s": round(total, 3),
                      "selfcheck_s": round(check.seconds, 4), "selfcheck_share": round(check.seconds / total, 5),
                      "checked": check.results}))
    streamer.close()


if __name__ == "__main__":
    main()
