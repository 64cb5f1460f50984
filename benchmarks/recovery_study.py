"""Issue 28's table: prune / merge (fold, ream), each with and without the router re-fit, on both trained fixtures.

One calibration per fixture (reap's own, the default criterion greedy-rerouted) carries one recovery observer per
(ratio, variant) (:class:`reap.recover.observer.Recovery`: every variant sees the same statistics and the same layer
samples); each variant's plan and router rows are then written by reap's rewrite, and every written checkpoint is
evaluated by transformers itself (float32, eager experts) on two held-out sets calibration never saw:

* ``eval``: the first 32,768 targets of ../shared/data/eval.jsonl.gz (networkx), windows of 513 at stride 512, as
  docs/criteria.md;
* ``rich``: the same from the Python files of the ``rich`` 13.7.1 sdist (PyPI), in sorted path order: another
  project's code (downloaded once into benchmarks/data/, git-ignored).

Calibration: the first ``--docs`` documents of calibration.jsonl.gz, truncated to 1024 tokens, float32, CPU.

    PYTHONPATH=src python benchmarks/recovery_study.py --fixture mini-m2 --docs 64 [--ratios 0.3,0.5] \
        [--eval-tokens 32768] [--tokens 4096] [--steps 200]
    PYTHONPATH=src python benchmarks/recovery_study.py --summary      # the markdown table from the results
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "benchmarks" / "results" / "recovery_study.jsonl"
DATA = ROOT / "benchmarks" / "data"
EVAL_TOKENS, SEQ_LEN = 32768, 512  # --eval-tokens sets the first
ARGS = None
VARIANTS = (("prune", None, False), ("prune+refit", None, True), ("fold", "fold", False),
            ("fold+refit", "fold", True), ("ream", "ream", False), ("ream+refit", "ream", True))


def rich_texts() -> list[str]:
    DATA.mkdir(parents=True, exist_ok=True)
    sdist = DATA / "rich-13.7.1.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "rich==13.7.1", "--no-deps", "--no-binary", ":all:",
                        "-d", str(DATA)], check=True, capture_output=True)
    with tarfile.open(sdist) as tar:
        members = sorted((m for m in tar.getmembers() if m.name.endswith(".py") and m.isfile()), key=lambda m: m.name)
        return [tar.extractfile(m).read().decode("utf-8", "replace") for m in members]


def eval_texts() -> list[str]:
    with gzip.open(SHARED / "data" / "eval.jsonl.gz", "rt") as fh:
        return [json.loads(line)["text"] for line in fh]


def windows(tok, texts: list[str], eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    EVAL_TOKENS = ARGS.eval_tokens
    stream: list[int] = []
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [eos]
        if len(stream) > EVAL_TOKENS + 1:
            break
    s = torch.tensor(stream[: EVAL_TOKENS + 1])
    idx = torch.arange(EVAL_TOKENS // SEQ_LEN)[:, None] * SEQ_LEN + torch.arange(SEQ_LEN + 1)[None]
    win = s[idx]
    return win[:, :-1], win[:, 1:]


@torch.no_grad()
def loss(path: Path, sets: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()
    out = {}
    for name, (inputs, targets) in sets.items():
        total = 0.0
        for i in range(0, inputs.shape[0], 8):
            logits = model(inputs[i : i + 8]).logits.float()
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[i : i + 8].reshape(-1),
                                     reduction="sum").item()
        out[name] = round(total / targets.numel(), 5)
    return out


def run(fixture: str, docs: int, ratios: list[float]) -> None:
    from transformers import AutoTokenizer

    from reap.calibrate.run import calibrate
    from reap.core.options import CalibrateOptions, DataOptions, EngineOptions
    from reap.io.checkpoint import Checkpoint
    from reap.model.validate import derive_checked
    from reap.recover.observer import RecoverSpec, Recovery
    from reap.rewrite.surgery import rewrite
    from reap.selection.choose import experts_to_drop, plan_from_scores
    from reap.selection.plan import ExpertPlan, Routing

    path = SHARED / "fixtures" / fixture
    ckpt = Checkpoint(path)
    spec = derive_checked(ckpt)
    routing = Routing.of(spec)
    tok = AutoTokenizer.from_pretrained(path)
    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    sets = {"eval": windows(tok, eval_texts(), eos), "rich": windows(tok, rich_texts(), eos)}
    observers = {}
    for r in ratios:
        for name, merge, refit in VARIANTS:
            if merge is None and not refit:
                continue
            observers[(r, name)] = Recovery(RecoverSpec(merge, refit, "greedy-rerouted", routing,
                                                        experts_to_drop(routing, r), tokens=ARGS.tokens,
                                                        refit_steps=ARGS.steps), log=lambda *_: None)
    opts = CalibrateOptions(model=str(path), data=DataOptions(dataset=str(SHARED / "data" / "calibration.jsonl.gz"),
                                                              samples=docs, max_length=1024),
                            engine=EngineOptions(device="cpu", dtype="float32", progress=False))
    t0 = time.perf_counter()
    stats, summary = calibrate(opts, ckpt, layout=spec, observers=list(observers.values()), log=lambda *_: None)
    cal_s = time.perf_counter() - t0
    rows = [{"fixture": fixture, "docs": docs, "variant": "original", "ratio": 0.0, **loss(path, sets),
             "eval_tokens": ARGS.eval_tokens}]
    print(json.dumps(rows[-1]), flush=True)
    scores = stats.scores("greedy-rerouted")
    for r in ratios:
        plain = plan_from_scores(scores, routing, spec.moe_layers, experts_to_drop(routing, r), "greedy-rerouted")
        for name, merge, refit in VARIANTS:
            rec = observers.get((r, name))
            plan = plain if rec is None else ExpertPlan(plain.num_experts, {l: rec.layers[l] for l in plain.moe_layers},
                                                        plain.method)
            rows_ = {} if rec is None else rec.router_rows
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "out"
                rewrite(ckpt, spec, plan, out, {}, progress=False, router_rows=rows_,
                        neuron_columns=rec.columns if rec is not None else None)
                got = loss(out, sets)
            records = rec.records if rec is not None else {}
            row = {"fixture": fixture, "docs": docs, "variant": name, "ratio": r, **got,
                   "eval_tokens": ARGS.eval_tokens, "recover_tokens": ARGS.tokens, "refit_steps": ARGS.steps,
                   "merged": sum(len(out_.sources) - 1 for l in plan.moe_layers for out_ in plan.merges(l).values()),
                   "refit_layers": len(rows_),
                   "recover_s": round(rec.seconds, 2) if rec is not None else 0.0,
                   "calibration_s": round(cal_s, 1),
                   "layer_error_held": [round(records[l]["error_final"][1], 4) for l in sorted(records)]
                   if records else None}
            rows.append(row)
            print(json.dumps(row), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def summary() -> None:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    for fixture in sorted({r["fixture"] for r in rows}):
        print(f"\n{fixture}\n\n| ratio | variant | eval loss | rich loss | merged experts | re-fit layers | recovery s |")
        print("|---|---|---|---|---|---|---|")
        for r in [r for r in rows if r["fixture"] == fixture]:
            print(f"| {r['ratio']} | {r['variant']} | {r['eval']:.4f} | {r['rich']:.4f} | {r.get('merged', '')} | "
                  f"{r.get('refit_layers', '')} | {r.get('recover_s', '')} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--fixture", default="mini-m2")
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--ratios", default="0.3,0.5")
    p.add_argument("--summary", action="store_true")
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--tokens", type=int, default=4096, help="--recover-tokens")
    p.add_argument("--steps", type=int, default=200, help="router re-fit steps")
    p.add_argument("--threads", type=int, default=2)
    global ARGS
    a = ARGS = p.parse_args()
    if a.summary:
        summary()
    else:
        torch.set_num_threads(a.threads)
        run(a.fixture, a.docs, [float(x) for x in a.ratios.split(",")])


if __name__ == "__main__":
    main()
