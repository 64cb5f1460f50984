"""Every supported family on a GPU: calibration on CUDA against the CPU, and reap's streamed forward against
transformers' own model on CUDA (run on a CUDA machine; nothing is downloaded).

    python benchmarks/family_gpu_check.py --data calibration.jsonl.gz [--families MODEL_TYPE ...] [--out results.json]

For each model type (default: the named families of the support matrix; any type reap.testing.tiny can build: random
weights, saved by transformers in several shards; an FP8 copy in the released block-FP8 layout where the family
ships FP8, MXFP4 for gpt-oss):

1. ``calibrate`` on the CPU in float32 and on CUDA in float32 and bfloat16 (64 samples x 256 tokens): the largest
   relative difference of the REAP scores (CUDA fp32 vs CPU fp32), and how many of the experts a 0.3 prune drops
   are the same (CUDA bf16 vs CPU fp32, per layer).
2. ``evaluate`` (the layer streamer on CUDA, bf16 and fp32) against transformers' whole-model forward on CUDA in
   the same dtype on the same windows: the loss difference.
3. ``prune_model`` on CUDA (calibrating there) end to end; the output loads in transformers on CUDA.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from reap.model.arch import build_config, model_class
from reap.calibrate.run import calibrate
from reap.evaluate import evaluate, eval_stream, windows
from reap.core.options import CalibrateOptions, DataOptions, EngineOptions, EvalOptions, PruneOptions
from reap.prune import prune_model
from reap.selection.choose import choose_experts, n_to_drop
from reap.testing.tiny import make_tiny_model
from reap.testing.tiny_formats import convert_to_fp8, convert_to_mxfp4

#: the families named in the "any family" issue, as transformers model types
NAMED = ("minimax_m2", "qwen3_moe", "mixtral", "deepseek_v3", "kimi_k2", "glm4_moe", "qwen3_next", "gpt_oss",
         "ernie4_5_moe", "olmoe", "qwen2_moe", "deepseek_v2", "dots1", "hunyuan_v1_moe", "glm4_moe_lite",
         "glm_moe_dsa", "deepseek_v32", "deepseek_v4", "qwen3_5_moe", "gemma4", "nemotron_h", "granitemoe", "minimax")

FP8_FAMILIES = {"minimax_m2", "deepseek_v3", "qwen3_moe", "glm4_moe", "qwen3_next"}
DEVICE = "cuda"  # --device cpu: a dry run of this script on a machine without a GPU
quiet = lambda *_: None  # noqa: E731


def transformers_loss(model_dir: Path, data: str, dtype: torch.dtype, max_tokens: int, seq_len: int) -> float:
    """Mean next-token loss of transformers' own model on the windows reap.evaluate scores."""
    from reap.data.tokens import load_tokenizer

    tok = load_tokenizer(model_dir)
    stream, _ = eval_stream(data, tok, tok.eos_token_id, max_tokens + 1)
    inputs, targets = windows(stream, seq_len, max_tokens)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = build_config(config)  # kimi_k2 (remote code in the release) is built as the DeepSeek-V3 it is
    model = model_class(cfg, config).from_pretrained(model_dir, config=cfg, dtype=dtype)
    model = model.to(DEVICE).eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for x, y in zip(inputs, targets):
            logits = model(torch.tensor([x], device=DEVICE)).logits[0].float()  # [S, V]
            total += torch.nn.functional.cross_entropy(logits, torch.tensor(y, device=DEVICE), reduction="sum").item()
            count += len(y)
    del model
    if DEVICE != "cpu":
        torch.cuda.empty_cache()
    return total / count


def check_family(name: str, data: str, work: Path) -> dict:
    res: dict = {"family": name}
    src = make_tiny_model(work / name, family=name, shard_size="200KB")
    models = {"fp32": src}
    if name in FP8_FAMILIES:
        models["fp8"] = convert_to_fp8(src, work / f"{name}-fp8")
    if name == "gpt_oss":  # released in MXFP4
        models["mxfp4"] = convert_to_mxfp4(src, work / f"{name}-mxfp4")
    cal = DataOptions(dataset=data, samples=64, max_length=256)
    for label, model in models.items():
        r: dict = {}
        stats = {}
        for device, dtype in (("cpu", "float32"), (DEVICE, "float32"), (DEVICE, "bfloat16")):
            t0 = time.perf_counter()
            s, _ = calibrate(CalibrateOptions(model=str(model), data=cal,
                                              engine=EngineOptions(device=device, dtype=dtype, progress=False)), log=quiet)
            stats[device, dtype] = s
            r[f"calibrate_{device}_{dtype}_s"] = round(time.perf_counter() - t0, 2)
        ref, fp32, bf16 = (stats[k].scores("reap") for k in (("cpu", "float32"), (DEVICE, "float32"), (DEVICE, "bfloat16")))
        live = ref.abs() > 0
        r["reap_scores_max_rel_cuda_fp32_vs_cpu"] = float(((fp32 - ref).abs()[live] / ref.abs()[live]).max())
        n_drop = n_to_drop(ref.shape[1], 0.3)
        layers = [layer for layer in sorted(stats["cpu", "float32"].completed) if ref[layer].abs().sum() > 0]
        same = []
        for layer in layers:
            a = set(choose_experts(ref[layer], n_drop)[1])
            b = set(choose_experts(bf16[layer], n_drop)[1])
            same.append(len(a & b))
        r["pruned_same_cuda_bf16_vs_cpu_fp32"] = f"{same} of {n_drop} per layer"
        for dtype, tdtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            ev = evaluate(EvalOptions(model=str(model), dataset=data, max_tokens=4096, seq_len=512,
                                      engine=EngineOptions(device=DEVICE, dtype=dtype, progress=False)), log=quiet)
            if label == "fp32":  # transformers dequantizes FP8 its own way; compare on the plain copy
                ref_loss = transformers_loss(model, data, tdtype, 4096, 512)
                r[f"eval_{dtype}_reap"] = round(ev["loss"], 6)
                r[f"eval_{dtype}_transformers"] = round(ref_loss, 6)
                r[f"eval_{dtype}_abs_diff"] = abs(ev["loss"] - ref_loss)
            else:
                r[f"eval_{dtype}_reap"] = round(ev["loss"], 6)
        out = work / f"{name}-{label}-pruned"
        t0 = time.perf_counter()
        prune_model(PruneOptions(model=str(model), out=out, ratio=0.3, progress=False,
                                 calibration=CalibrateOptions(model=str(model), data=cal,
                                                              engine=EngineOptions(device=DEVICE, dtype="bfloat16",
                                                                                   progress=False))), log=quiet)
        r["prune_cuda_s"] = round(time.perf_counter() - t0, 2)
        if label == "fp32":
            r["pruned_loss_transformers_fp32"] = round(transformers_loss(out, data, torch.float32, 4096, 512), 6)
        res[label] = r
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--families", nargs="*", default=None)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    assert DEVICE == "cpu" or torch.cuda.is_available(), "run this on a CUDA machine"
    names = args.families or list(NAMED)
    results = {"gpu": torch.cuda.get_device_name() if DEVICE != "cpu" else "none (dry run)", "torch": torch.__version__, "families": []}
    import transformers

    results["transformers"] = transformers.__version__
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            try:
                r = check_family(name, args.data, Path(tmp))
            except ValueError as err:  # reap.testing.tiny has no config for it
                r = {"family": name, "skipped": str(err)}
            except Exception as err:  # noqa: BLE001 - report and go on with the next family
                import traceback

                r = {"family": name, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-3000:]}
            print(json.dumps(r), flush=True)
            results["families"].append(r)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
