"""The default pipeline on a GPU: greedy re-routing search and MTP modules through CUDA (bf16), and what the greedy
search costs in calibration time.

1. A tiny GLM-4.5 checkpoint with an MTP module (``reap.testing.tiny.add_mtp_modules``), pruned at 0.3 by ``reap prune
   --dataset`` on the GPU in bf16 (default criterion); the MTP layer's kept experts and the layers where greedy fell
   back are recorded, and the kept sets compared with a CPU float32 run.
2. mini-m2 (``--fixture``), calibrated on ``--docs`` documents: wall time with the greedy search (default) and
   without it (``--greedy-tokens 0``).

    PYTHONPATH=src:tests python benchmarks/default_gpu_check.py --fixture .device/mini-m2 \
        --data .device/calibration.jsonl.gz --out $OUT/default_gpu.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
import time
from pathlib import Path

import torch
from typer.testing import CliRunner

from reap.cli import app


def _run(*args) -> float:
    t0 = time.perf_counter()
    res = CliRunner().invoke(app, [str(a) for a in args])
    if res.exit_code != 0:
        raise SystemExit(res.output)
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixture", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    from reap.testing.tiny import add_mtp_modules, make_tiny_model

    row: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                 "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    import transformers

    row["transformers"] = transformers.__version__
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "d.jsonl"
        with gzip.open(args.data, "rt") as fh, open(data, "w") as out:
            for i, line in enumerate(fh):
                if i >= args.docs:
                    break
                out.write(line)
        src = add_mtp_modules(make_tiny_model(tmp / "plain", seed=2, family="glm4_moe"), tmp / "glm-mtp", seed=5)
        kept = {}
        for device, dtype in (("cuda", "bfloat16"), ("cpu", "float32")):
            out = tmp / f"glm-{device}"
            secs = _run("prune", src, "--out", out, "--ratio", "0.3", "--dataset", data, "--max-length", "256",
                        "--device", device, "--dtype", dtype, "-q")
            report = json.loads((out / "reap_report.json").read_text())
            kept[device] = {k: v["kept"] for k, v in report["layers"].items()}
            row[f"glm_mtp_{device}"] = {"seconds": round(secs, 2), "method": report["method"], "mtp": report.get("mtp"),
                                        "greedy_fallback": report.get("greedy_fallback")}
        row["glm_mtp_same_kept_cuda_bf16_vs_cpu_fp32"] = {k: kept["cuda"][k] == kept["cpu"][k] for k in kept["cpu"]}
        for label, extra in (("with_greedy", ()), ("without_greedy", ("--greedy-tokens", "0"))):
            stats = tmp / f"m2-{label}.safetensors"
            secs = _run("calibrate", args.fixture, "--dataset", data, "--out", stats, "--max-length", "512",
                        "--device", "cuda" if torch.cuda.is_available() else "cpu", "-q", *extra)
            row[f"mini_m2_calibrate_{label}_s"] = round(secs, 2)
    print(json.dumps(row, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
