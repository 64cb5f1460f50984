"""The layer streamer at MiniMax-M2 width on one GPU: host memory against model size, the whole CLI against the
forward alone, and where the hidden states live (run on a CUDA machine).

    PYTHONPATH=src python benchmarks/stream_bench.py --out $OUT/stream.json [--workdir /tmp/stream-bench]
        [--memory-layers 2 6] [--memory-tokens 262144] [--cli-tokens 1048576]
        [--offload-tokens 1048576 10485760] [--disk-tokens 4194304] [--skip memory cli offload]
        [--cli-cache cold warm] [--cli-variants '' '--greedy-tokens 0']

Random-weight FP8 checkpoints (benchmarks/rewrite_bench.py's generator, hidden 3072, 256 experts) with 2 and 6
(``--memory-layers``) decoder layers, a byte-level tokenizer, random text of 2048 tokens per document:

* ``memory``: ``reap calibrate`` as a user runs it, on each checkpoint; the peak resident memory the kernel reports
  for the process (VmHWM from /proc: anonymous + file-backed + pinned pages, what a job scheduler counts) and the
  split at the end (RssAnon, RssFile);
* ``cli``: ``reap calibrate`` on the largest checkpoint with ``--cli-tokens``: wall time, the summary's tokens/s per
  layer (first layer included), against the forward-only figure measured in the same process kind
  (benchmarks/m2_layer_bench.py's ``forward``);
* ``offload``: the streamer on the 2-layer checkpoint with the hidden states on the device, in pinned CPU memory and
  on disk, per ``--offload-tokens`` (disk at ``--disk-tokens``, which must fit the disk); seconds per layer, and the
  disk's own sequential read speed (a cold read of the checkpoint's shards) beside them.
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
from rewrite_bench import make_m2_checkpoint  # noqa: E402

from reap.io.checkpoint import Checkpoint  # noqa: E402
from reap.model.derive import derive  # noqa: E402
from reap.core.options import EngineOptions  # noqa: E402
from reap.calibrate.stats import LayerAccumulator  # noqa: E402
from reap.stream.streamer import LayerStreamer  # noqa: E402
from reap.testing.tiny import make_byte_tokenizer  # noqa: E402

DEVICE = "cuda"  # --device cpu --dims '{...}': a dry run of the script's logic on a machine without a GPU
DIMS: dict | None = None


def checkpoint(workdir: Path, layers: int) -> Path:
    path = workdir / f"m2-{layers}"
    if not (path / "config.json").exists():
        make_m2_checkpoint(path, num_layers=layers, log=lambda *a: None, dims=DIMS)
    make_byte_tokenizer(path)
    return path


def data_file(workdir: Path, tokens: int) -> Path:
    path = workdir / f"data-{tokens}.jsonl"
    if not path.exists():
        g = torch.Generator().manual_seed(0)
        with open(path, "w") as f:
            for _ in range(tokens // 2048):
                f.write(json.dumps({"text": bytes(torch.randint(32, 127, (2048,), generator=g).tolist()).decode()})
                        + "\n")
    return path


def run_cli(model: Path, data: Path, out: Path, *extra: str) -> dict:
    """``reap calibrate`` in a child process; its summary, wall time and /proc memory at exit and at peak."""
    out.unlink(missing_ok=True)
    code = ("import resource, runpy, sys, json, atexit\n"
            "def report():\n"
            "    st = dict(l.split(':', 1) for l in open('/proc/self/status') if ':' in l)\n"
            "    sys.stderr.write('PROC ' + json.dumps({k: st[k].strip() for k in ('VmHWM', 'VmRSS', 'RssAnon', "
            "'RssFile', 'RssShmem') if k in st}) + '\\n')\n"
            "atexit.register(report)\n"
            "sys.argv = ['reap'] + sys.argv[1:]\n"
            "runpy.run_module('reap', run_name='__main__')\n")
    cmd = [sys.executable, "-c", code, "calibrate", str(model), "--dataset", str(data), "--max-length", "2048",
           "--out", str(out), "--device", DEVICE, "-q", "--json", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": "src"})
    wall = time.perf_counter() - t0
    if proc.returncode:
        return {"error": proc.stderr[-3000:]}
    summary = json.loads(proc.stdout)  # --json: one object
    mem = next((json.loads(line[5:]) for line in proc.stderr.splitlines() if line.startswith("PROC ")), {})
    plan = next((line for line in proc.stderr.splitlines() if line.startswith("plan:")), "")
    return {"wall_s": round(wall, 2), "plan": plan, "proc": mem, **summary}


def cold_read_speed(model: Path) -> float:
    """GB/s of reading the checkpoint's shards once after dropping them from the page cache."""
    shards = sorted(model.glob("*.safetensors"))
    for p in shards:
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    t0 = time.perf_counter()
    total = 0
    for p in shards:
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(64 << 20):
                total += len(chunk)
    return total / (time.perf_counter() - t0) / 1e9


def offload_run(model: Path, tokens: int, mode: str, workdir: Path) -> dict:
    ckpt = Checkpoint(model)
    layout = derive(ckpt)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 4096, (2048,), generator=g).tolist() for _ in range(tokens // 2048)]
    gpu = DEVICE != "cpu"
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    # the layers' weights from the page cache and no greedy search: the hidden states' placement is what differs
    st = LayerStreamer(ckpt, layout, seqs, EngineOptions(device=DEVICE, dtype="bfloat16", offload=mode,
                                                         workdir=workdir / f"hidden-{mode}", progress=False,
                                                         greedy_tokens=0, keep_page_cache=True))
    st.embed()
    if gpu:
        torch.cuda.synchronize()
    setup = time.perf_counter() - t0
    per_layer = []
    for layer in range(layout.num_layers):
        t = time.perf_counter()
        st.run_layer(layer, LayerAccumulator(layout.num_experts, st.device))
        per_layer.append(round(time.perf_counter() - t, 3))
    res = {"tokens": st.tokens, "mode": st.store.mode, "setup_s": round(setup, 2), "layer_s": per_layer,
           "tok_s_per_layer_steady": round(st.tokens / min(per_layer), 1),
           "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else 0.0}
    st.close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/stream-bench"))
    ap.add_argument("--memory-layers", type=int, nargs="*", default=[2, 6])
    ap.add_argument("--memory-tokens", type=int, default=262144)
    ap.add_argument("--cli-tokens", type=int, default=1048576)
    ap.add_argument("--offload-tokens", type=int, nargs="*", default=[1048576, 10485760])
    ap.add_argument("--disk-tokens", type=int, default=4194304)
    ap.add_argument("--skip", nargs="*", default=[])
    ap.add_argument("--cli-cache", nargs="*", default=["cold", "warm"], help="cli runs from the disk and/or the page cache")
    ap.add_argument("--cli-variants", nargs="*", default=[""], help="extra flags of each warm cli run, e.g. '' "
                    "'--greedy-tokens 0'")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dims", type=json.loads, default=None)
    args = ap.parse_args()
    import transformers

    global DEVICE, DIMS
    DEVICE, DIMS = args.device, args.dims
    args.workdir.mkdir(parents=True, exist_ok=True)
    result: dict = {"gpu": torch.cuda.get_device_name(0) if DEVICE != "cpu" else "none (dry run)",
                    "torch": torch.__version__,
                    "transformers": transformers.__version__, "cpus": os.cpu_count()}

    def save():
        args.out.write_text(json.dumps(result, indent=2))

    models = {n: checkpoint(args.workdir, n) for n in sorted(set(args.memory_layers) | {2})}
    if "memory" not in args.skip:
        data = data_file(args.workdir, args.memory_tokens)
        result["memory"] = {}
        for n in args.memory_layers:
            r = run_cli(models[n], data, args.workdir / f"mem-{n}.stats")
            result["memory"][f"{n}_layers"] = r
            print("memory", n, json.dumps(r), flush=True)
            save()
    if "cli" not in args.skip:
        n = max(models)
        data = data_file(args.workdir, args.cli_tokens)
        if "cold" in args.cli_cache:
            result["cli"] = run_cli(models[n], data, args.workdir / "cli.stats", "--checkpoint-every", "0")
            result["cli_with_hidden_checkpoints"] = run_cli(models[n], data, args.workdir / "cli2.stats")
            for key in ("cli", "cli_with_hidden_checkpoints"):
                print(key, json.dumps(result[key]), flush=True)
        if "warm" in args.cli_cache:
            warm = ("--checkpoint-every", "0", "--keep-page-cache")
            run_cli(models[n], data, args.workdir / "cli3.stats", *warm)  # brings the checkpoint into the page cache
            for k, variant in enumerate(args.cli_variants):  # extra flags of each warm run ("": the defaults)
                key = "cli_page_cache_warm" + (f" {variant}" if variant else "")
                key += f" #{args.cli_variants[:k].count(variant) + 1}" if args.cli_variants.count(variant) > 1 else ""
                result[key] = run_cli(models[n], data, args.workdir / "cli3.stats", *warm, *variant.split())
                print(key, json.dumps(result[key]), flush=True)
        save()
    if "offload" not in args.skip:
        for n, path in models.items():  # the disk runs need the room
            if n != 2:
                import shutil

                shutil.rmtree(path, ignore_errors=True)
        result["disk_cold_read_GBps"] = round(cold_read_speed(models[2]), 2)
        result["offload"] = []
        runs = [(t, m) for t in args.offload_tokens for m in ("device", "cpu")] + [(args.disk_tokens, "disk"),
                                                                                   (args.disk_tokens, "device")]
        for tokens, mode in runs:
            r = offload_run(models[2], tokens, mode, args.workdir)
            result["offload"].append(r)
            print("offload", json.dumps(r), flush=True)
            save()
    save()


if __name__ == "__main__":
    main()
