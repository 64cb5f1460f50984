"""Data-parallel calibration on several GPUs: `reap calibrate` with 1 rank and under `torchrun` with N ranks
(NCCL), on mini-m2 and on MiniMax-M2-width layers; the statistics compared and the wall time / throughput.

    python benchmarks/multi_gpu_check.py --mini-m2 DIR --data calibration.jsonl.gz --ranks 2 [--m2-layers 2]
        [--out results.json]

1. mini-m2, float32, 256 documents x 1024 tokens: 1 rank vs N ranks. Every field of the statistics (tokens
   routed, gate sums, EAN, REAP sums) per layer and expert: largest relative difference; and the experts a 0.3
   REAP prune drops, per layer.
2. A generated MiniMax-M2-width FP8 checkpoint (``rewrite_bench.make_m2_checkpoint``, random weights, with a
   byte-level tokenizer), bfloat16, ``--m2-samples`` documents of up to 2048 tokens (the data file used
   ``--m2-repeat-data`` times for more tokens): the same comparison, and the calibration time
   per layer with 1 and N GPUs (each rank reads the layer's weights itself; they come from the page cache after
   the first reader).

NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and friends are set for every child process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rewrite_bench import make_m2_checkpoint  # noqa: E402

from reap.calibrate.stats import FIELDS, ExpertStats  # noqa: E402
from reap.selection.choose import choose_experts, n_to_drop  # noqa: E402
from reap.testing.tiny import make_byte_tokenizer  # noqa: E402

SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def calibrate(model: Path, data: str, out: Path, ranks: int, samples: int, max_length: int, dtype: str) -> dict:
    args = ["-m", "reap", "calibrate", str(model), "--dataset", data, "--samples", str(samples), "--max-length",
            str(max_length), "--device", "cuda", "--dtype", dtype, "--out", str(out), "--overwrite", "-q"]
    cmd = [sys.executable, *args] if ranks == 1 else ["torchrun", "--standalone", f"--nproc-per-node={ranks}", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, **SAFE_ENV}, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])}... failed: {proc.stderr[-3000:]}")
    line = next(line for line in proc.stdout.splitlines()[::-1] if line.startswith("{"))
    return {"ranks": ranks, "wall_s": round(wall, 2), **json.loads(line)}


def compare(a_path: Path, b_path: Path) -> dict:
    a, b = ExpertStats.load(a_path), ExpertStats.load(b_path)
    res = {}
    for f in FIELDS:
        x, y = getattr(a, f).double(), getattr(b, f).double()
        live = x.abs() > 0
        res[f"max_rel_{f}"] = float(((x - y).abs()[live] / x.abs()[live]).max()) if live.any() else 0.0
    sa, sb = a.scores("reap"), b.scores("reap")
    n_drop = n_to_drop(a.num_experts, 0.3)
    same = [len(set(choose_experts(sa[i], n_drop)[1]) & set(choose_experts(sb[i], n_drop)[1]))
            for i in sorted(a.completed)]
    res["pruned_same_per_layer"] = f"{same} of {n_drop}"
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mini-m2", type=Path, required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--m2-layers", type=int, default=2)
    ap.add_argument("--m2-samples", type=int, default=64, help="documents of up to 2048 tokens at M2 width")
    ap.add_argument("--m2-repeat-data", type=int, default=1, help="use the data file this many times (more tokens)")
    ap.add_argument("--skip-mini", action="store_true")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/reap-multi-gpu"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import torch

    args.workdir.mkdir(parents=True, exist_ok=True)
    results: dict = {"gpus": torch.cuda.device_count(), "gpu": torch.cuda.get_device_name(),
                     "torch": torch.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version()))}
    runs = {} if args.skip_mini else {"mini_m2": (args.mini_m2, 256, 1024, "float32", args.data)}
    if args.m2_layers:
        m2 = make_m2_checkpoint(args.workdir / "m2", args.m2_layers)
        make_byte_tokenizer(m2)
        runs["m2_width"] = (m2, args.m2_samples, 2048, "bfloat16", ",".join([args.data] * args.m2_repeat_data))
    for name, (model, samples, max_length, dtype, data) in runs.items():
        r = {}
        for ranks in (1, args.ranks):
            out = args.workdir / f"{name}-{ranks}.safetensors"
            calibrate(model, data, out, ranks, samples, max_length, dtype)  # warm-up (page cache, kernels)
            r[f"ranks_{ranks}"] = calibrate(model, data, out, ranks, samples, max_length, dtype)
        r["compare"] = compare(args.workdir / f"{name}-1.safetensors", args.workdir / f"{name}-{args.ranks}.safetensors")
        one, many = r["ranks_1"]["seconds"], r[f"ranks_{args.ranks}"]["seconds"]
        r["speedup"] = round(one / many, 3)
        r["efficiency"] = round(one / many / args.ranks, 3)
        results[name] = r
        print(json.dumps({name: r}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
