"""A streamed calibration's timeline on the GPU: when each batch ran, and what the prefetch thread did meanwhile.

    PYTHONPATH=src python benchmarks/stream_timeline.py --out $OUT/timeline.json [--workdir /tmp/stream-bench]
        [--layers 6] [--tokens 1048576] [--mode overlap|serial] [--tokenize-s 3]

The same streamer and checkpoint as benchmarks/stream_breakdown.py (random-weight MiniMax-M2-width FP8, bf16,
hidden states on the device, no greedy search, page cache warm). Every batch's end is a CUDA event on the compute
stream, so a batch's GPU time is the gap between two events; every phase of the prefetch thread (waiting for the
read, the copy to the GPU, dequantization, transformers' loader) is timed on the host. Per layer it reports the
batches' GPU time while the prefetch thread was busy and after, so what the loading costs the computing layer is
read off directly.

``--mode serial`` loads each layer only when it is needed (no overlap): per layer, the loading's own time and the
layer's compute with nothing beside it.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stream_bench import checkpoint  # noqa: E402
from stream_breakdown import arguments  # noqa: E402

import reap.stream.load_recipe as load_recipe  # noqa: E402
import reap.stream.loader as layer_loading  # noqa: E402
from reap.io.checkpoint import Checkpoint  # noqa: E402
from reap.model.derive import derive  # noqa: E402
from reap.calibrate.stats import LayerAccumulator  # noqa: E402
from reap.stream.loader import LayerLoader  # noqa: E402
from reap.stream.streamer import EngineOptions, LayerStreamer  # noqa: E402


class Recorder:
    """Host-time phases by thread, and CUDA events on the compute stream."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.phases: list[dict] = []
        self.lock = threading.Lock()

    def wrap(self, owner, name: str, label: str):
        fn = getattr(owner, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                with self.lock:
                    self.phases.append({"what": label, "thread": threading.current_thread().name,
                                        "start": t - self.t0, "end": time.perf_counter() - self.t0})

        setattr(owner, name, timed)


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--mode", choices=("overlap", "serial"), default="overlap")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = checkpoint(args.workdir, args.layers)
    ckpt = Checkpoint(model)
    layout = derive(ckpt)
    rec = Recorder()
    rec.wrap(layer_loading, "load_into", "load_into")
    rec.wrap(load_recipe.Recipe, "apply", "recipe")
    rec.wrap(LayerLoader, "materialize", "materialize")
    rec.wrap(LayerLoader, "_read_layer", "read")
    rec.wrap(LayerLoader, "_prepare", "prepare")
    st = LayerStreamer(ckpt, layout, None, EngineOptions(device="cuda", dtype="bfloat16", progress=False,
                                                         greedy_tokens=0, keep_page_cache=True))
    if args.mode == "serial":  # prepare a layer only when it is asked for
        wanted = [0]
        prefetch = st.loader.prefetch
        st.loader.prefetch = lambda layer: prefetch(layer) if layer == wanted[0] else None
    time.sleep(args.tokenize_s)
    g = torch.Generator().manual_seed(0)
    st.set_sequences([torch.randint(0, 4096, (2048,), generator=g).tolist() for _ in range(args.tokens // 2048)])
    st.embed()  # as calibrate does: layer 0 embeds its own batches
    torch.cuda.synchronize()
    ref = torch.cuda.Event(enable_timing=True)
    ref.record()
    ref_host = time.perf_counter() - rec.t0
    marks: list[tuple[int, torch.cuda.Event, float]] = []
    put = st.store.put
    current = [0]

    def put_marked(i, h):
        put(i, h)
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        marks.append((current[0], ev, time.perf_counter() - rec.t0))

    st.store.put = put_marked
    layer_host = []
    for layer in range(layout.num_layers):
        current[0] = layer
        if args.mode == "serial":
            wanted[0] = layer
        t = time.perf_counter()
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        marks.append((layer, start, t - rec.t0))
        st.run_layer(layer, LayerAccumulator(layout.num_experts, st.device))
        layer_host.append((t - rec.t0, time.perf_counter() - rec.t0))
    torch.cuda.synchronize()
    st.close()
    # GPU time of each mark since ref (ms -> s), and of each batch: the gap to the previous mark of its layer
    gpu = [(layer, ref.elapsed_time(ev) / 1e3 + ref_host, host) for layer, ev, host in marks]
    layers = []
    for layer in range(layout.num_layers):
        pts = [(g_, h) for L, g_, h in gpu if L == layer]
        batch_gpu = [b[0] - a[0] for a, b in zip(pts, pts[1:])]
        lo, hi = layer_host[layer]
        prep = [p for p in rec.phases if p["what"] == "prepare" and lo <= p["start"] < hi]
        busy_until = max((p["end"] for p in prep), default=layer_host[layer][0])
        during = [d for (a, _), d in zip(pts[1:], batch_gpu) if a <= busy_until]
        after = [d for (a, _), d in zip(pts[1:], batch_gpu) if a > busy_until]
        layers.append({
            "layer": layer, "host_s": round(layer_host[layer][1] - layer_host[layer][0], 3),
            "gpu_first_to_last_batch_s": round(pts[-1][0] - pts[0][0], 3),
            "batch_gpu_ms_mean": round(1e3 * sum(batch_gpu) / max(1, len(batch_gpu)), 2),
            "batches_while_prefetch_busy": len(during),
            "batch_gpu_ms_while_busy": round(1e3 * sum(during) / max(1, len(during)), 2),
            "batch_gpu_ms_after": round(1e3 * sum(after) / max(1, len(after)), 2),
            "prefetch_busy_s": round(busy_until - layer_host[layer][0], 3) if prep else 0.0,
            "batch_gpu_ms": [round(1e3 * d, 1) for d in batch_gpu]})
    res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "mode": args.mode,
           "loader": "transformers" if not load_recipe.enabled() else "recipes",
           "warmup_s": round(st.warmup_seconds, 3),
           "tokens": st.tokens, "batches": len(st.batches),
           "layers": layers, "stats": {"layer_seconds": st.stats.layer_seconds, "wait_seconds": st.stats.wait_seconds},
           "phases": [{**p, "start": round(p["start"], 4), "end": round(p["end"], 4)} for p in rec.phases]}
    for L in layers:
        print({k: v for k, v in L.items() if k != "batch_gpu_ms"}, flush=True)
    args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
