"""``reap demo``: the whole pipeline on a built-in default, in seconds, with nothing to download.

Generates a tiny random MiniMax-M2 checkpoint (several shards, byte-level tokenizer), calibrates it on
reap's own Python source, prunes it with REAP, then checks the result the way the tests do: transformers
loads it, and its logits equal the original model's with the pruned experts masked out of routing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from reap.core.errors import UserError
from reap.core.names import REPORT_NAME

MARKER = ".reap-demo"


def _fresh_dir(path: Path) -> Path:
    path = Path(path)
    if path.exists():
        if not (path / MARKER).exists() and any(path.iterdir()):
            raise UserError(f"{path} exists and was not made by `reap demo`; pass --dir with a new folder")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / MARKER).write_text("made by reap demo; safe to delete\n")
    return path


def masked_logits_gap(original: Path, pruned: Path, seed: int = 0) -> float:
    """max |logits(pruned) - logits(original with pruned experts' correction bias = -inf)| on random tokens."""
    from transformers import AutoModelForCausalLM

    report = json.loads((pruned / REPORT_NAME).read_text())
    a = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32)
    with torch.no_grad():
        for layer, entry in report["layers"].items():
            a.model.layers[int(layer)].mlp.e_score_correction_bias[entry["pruned"]] = float("-inf")
        ids = torch.randint(0, a.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(seed))
        return (a(ids).logits - b(ids).logits).abs().max().item()


def run_demo(workdir: Path, ratio: float = 0.25, progress: bool = True, log=print) -> dict:
    """The whole pipeline in ``workdir``; returns what it made (paths, expert counts, the logit check)."""
    from reap.core.options import CalibrateOptions, DataOptions, EngineOptions, PruneOptions
    from reap.prune import prune_model
    from reap.testing.tiny import make_tiny_model

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    workdir = _fresh_dir(workdir)
    model = make_tiny_model(workdir / "tiny-minimax-m2", seed=0)
    log(f"1/3 generated a tiny MiniMax-M2 checkpoint at {model}")
    data = workdir / "calibration.jsonl"
    sources = sorted(Path(__file__).parent.glob("*.py"))
    with open(data, "w") as f:
        for src in sources:
            f.write(json.dumps({"path": src.name, "text": src.read_text()}) + "\n")
    log(f"2/3 calibration data: reap's own {len(sources)} source files -> {data}")
    calibration = CalibrateOptions(
        model=str(model), data=DataOptions(dataset=str(data), max_length=512),
        engine=EngineOptions(device="cpu", dtype="float32", progress=progress),
    )
    out = workdir / "tiny-minimax-m2-reap"
    result = prune_model(PruneOptions(model=str(model), out=out, ratio=ratio, method="reap",
                                      calibration=calibration, progress=progress), log=log)
    report = json.loads((out / REPORT_NAME).read_text())
    gap = masked_logits_gap(model, out)
    log(f"3/3 pruned {report['num_experts']} -> {result.kept_per_layer} experts per layer into {out}; transformers "
        f"loads it; max |logit difference| vs the original with those experts masked out of routing: {gap:.2e}")
    for layer, entry in report["layers"].items():
        log(f"    layer {layer}: pruned experts {entry['pruned']}")
    if gap > 1e-3:
        raise RuntimeError(f"demo check failed: pruned model differs from the masked original by {gap}")
    return {"model": str(model), "pruned": str(out), "experts_before": report["num_experts"],
            "experts_after": result.kept_per_layer, "max_logit_gap": gap,
            "pruned_experts": {layer: entry["pruned"] for layer, entry in report["layers"].items()}}
