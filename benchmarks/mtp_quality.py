"""Quality proxy for pruned multi-token-prediction (MTP) modules (issue 16): top-1 agreement of the pruned MTP head
with the original's on held-out text, MTP experts chosen by their own saliency (the default criterion) vs at random.

A tiny random DeepSeek-V3 / GLM-4.5 / Qwen3-Next checkpoint gets one MTP module (``reap.testing.tiny.add_mtp_modules``), is
calibrated on the first documents of ``../shared/data/calibration.jsonl.gz`` and pruned at 0.3 by ``reap prune``
(default method), then again with only the MTP layer's kept experts drawn at random (5 seeds, ``--keep``: the
main layers as the default chose them). Both the original and the pruned MTP heads then predict
token t+2 from the main model's hidden state at t and token t+1 on the first ``--tokens`` tokens of
``eval.jsonl.gz`` (the engines' formula, as in tests/test_mtp.py: the main model and a one-layer transformers
model holding the MTP decoder layer, both loaded by transformers); the figure is the fraction of positions where
the pruned head's argmax equals the original's (the main model pruned alike in both, so the difference is the
MTP layer's choice).

    PYTHONPATH=src:tests python benchmarks/mtp_quality.py [--family deepseek_v3] [--docs 64] [--tokens 8192]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT / "tests"))


def _docs(name: str, n: int) -> list[str]:
    out = []
    with gzip.open(SHARED / "data" / name, "rt") as fh:
        for line in fh:
            out.append(json.loads(line)["text"])
            if len(out) >= n:
                break
    return out


def _prune(src: Path, out: Path, *extra: str) -> None:
    from typer.testing import CliRunner

    from reap.cli import app

    res = CliRunner().invoke(app, ["prune", str(src), "--out", str(out), "--ratio", "0.3", "-q", "--device", "cpu",
                                   *extra])
    if res.exit_code != 0:
        raise SystemExit(res.output)


def _prune_keep(src: Path, out: Path, keep: Path) -> None:
    from typer.testing import CliRunner

    from reap.cli import app

    res = CliRunner().invoke(app, ["prune", str(src), "--out", str(out), "--keep", str(keep), "-q"])
    if res.exit_code != 0:
        raise SystemExit(res.output)


@torch.no_grad()
def _predictions(engine, windows: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([engine.run(w)[1][0].argmax(-1) for w in windows])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="deepseek_v3")
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mtp_quality.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    from test_mtp import EngineMtp

    from reap.testing.tiny import add_mtp_modules, make_tiny_model

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = add_mtp_modules(make_tiny_model(tmp / "plain", seed=2, family=args.family), tmp / "src", seed=5)
        data = tmp / "calib.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in _docs("calibration.jsonl.gz", args.docs)))
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(src)
        ids = [i for t in _docs("eval.jsonl.gz", 400) for i in tok(t, add_special_tokens=False)["input_ids"]]
        ids = torch.tensor(ids[: args.tokens])
        windows = [ids[i : i + 257][None] for i in range(0, len(ids) - 257, 256)]
        original = _predictions(EngineMtp(src, tmp / "e-src"), windows)
        results = {}
        _prune(src, tmp / "own", "--dataset", str(data), "--max-length", "512")
        results["own saliency (default method)"] = [
            float((_predictions(EngineMtp(tmp / "own", tmp / "e-own"), windows) == original).float().mean())]
        report = json.loads((tmp / "own" / "reap_report.json").read_text())
        keep = {layer: v["kept"] for layer, v in report["layers"].items()}
        mtp_layer = str(report["mtp"]["layers"][0])
        E, K = report["num_experts"], report["kept_per_layer"]
        results["random (MTP layer only; main layers as above)"] = []
        for seed in range(args.seeds):
            g = torch.Generator().manual_seed(seed)
            groups = json.loads((src / "config.json").read_text()).get("n_group") or 1  # the same number per group
            size = E // groups
            chosen = {**keep, mtp_layer: sorted(g_ * size + i for g_ in range(groups)
                                                for i in torch.randperm(size, generator=g)[: K // groups].tolist())}
            (tmp / f"keep{seed}.json").write_text(json.dumps(chosen))
            out = tmp / f"random{seed}"
            _prune_keep(src, out, tmp / f"keep{seed}.json")
            pred = _predictions(EngineMtp(out, tmp / f"e-random{seed}"), windows)
            results["random (MTP layer only; main layers as above)"].append(float((pred == original).float().mean()))
    row = {"family": args.family, "docs": args.docs, "eval_positions": int(original.numel()), "ratio": 0.3,
           "top1_agreement": results, "seconds": round(time.perf_counter() - start, 1),
           "date": time.strftime("%Y-%m-%d"), "machine": "CPU (2 cores)", "torch": torch.__version__}
    print(json.dumps(row, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(args.out.read_text()) if args.out.is_file() else []
    existing = [r for r in existing if r.get("family") != args.family] + [row]
    args.out.write_text(json.dumps(existing, indent=1) + "\n")


if __name__ == "__main__":
    main()
