"""GPU checks and mini-m2 throughput for the calibration engine (run on a CUDA machine).

    python benchmarks/gpu_check.py --mini-m2 DIR --mini-m2-fp8 DIR --data calibration.jsonl.gz \
        [--cpu-report reap_report.json] [--out results.json]

1. reap's experts implementation with the grouped matmul (bf16, CUDA) equals its per-expert loop, outputs and
   statistics.
2. transformers' own decoder layer and reap's streamed layer agree on CUDA in bf16 (padded batches).
3. The reference protocol (256 docs x 1024 tokens) calibrated on the GPU in bf16 (bf16 and FP8 checkpoints)
   and fp32: tokens/s, peak GPU memory, and the pruned experts compared with a CPU fp32 run's report.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from reap.calibrate.run import calibrate
from reap.io.checkpoint import Checkpoint
from reap.model.derive import derive
from reap.stream.experts import ExpertsProbe, reap_experts_forward
from reap.core.options import CalibrateOptions, DataOptions, EngineOptions
from reap.calibrate.stats import FIELDS, LayerAccumulator
from reap.selection.choose import choose_experts
from reap.stream.streamer import LayerStreamer


def check_grouped(device) -> dict:
    """reap's experts implementation on a bf16 MiniMax-M2 experts module: the grouped matmul path == the loop."""
    from transformers import AutoModelForCausalLM

    from reap.model.model_side import is_experts_module
    from reap.testing.tiny import tiny_config

    torch.manual_seed(0)
    config = tiny_config(hidden_size=192, intermediate_size=96, num_local_experts=64, num_experts_per_tok=8)
    model = AutoModelForCausalLM.from_config(config)
    experts = next(m for m in model.modules() if is_experts_module(m)).to(device, torch.bfloat16)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0.0, 0.05)
    T, K, E = 8192, 8, 64
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, 192, generator=g).to(device, torch.bfloat16)
    index = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(device)
    weights = torch.rand(T, K, generator=g).to(device)
    res = []
    for grouped in (False, True):
        experts._reap_probe = ExpertsProbe(LayerAccumulator(E, device), grouped=grouped)
        with torch.no_grad():
            res.append((reap_experts_forward(experts, x, index, weights).float(), experts._reap_probe.accumulator.to_dict()))
    out_err = (res[0][0] - res[1][0]).abs().max().item() / res[0][0].abs().max().item()
    stat_err = max(((res[0][1][f] - res[1][1][f]).abs() / res[0][1][f].abs().clamp(min=1e-9)).max().item()
                   for f in FIELDS)
    return {"grouped_vs_loop_max_rel_out": out_err, "grouped_vs_loop_max_rel_stat": stat_err}


def check_layers(model: Path, device) -> dict:
    from transformers import AutoModelForCausalLM

    ckpt = Checkpoint(model)
    spec = derive(ckpt)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 4096, (n,), generator=g).tolist() for n in (300, 517, 64, 1024)]
    ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).to(device)
    caps: dict[int, list] = {}
    hooks = [layer.register_forward_hook(lambda m, a, kw, o, i=i: caps.setdefault(i, []).append(
        ((a[0] if a else kw["hidden_states"]), o)), with_kwargs=True) for i, layer in enumerate(ref.model.layers)]
    with torch.no_grad():
        for s in seqs:
            ref.model(torch.tensor([s], device=device))
    for h in hooks:
        h.remove()
    st = LayerStreamer(ckpt, spec, seqs, EngineOptions(device=str(device), dtype="bfloat16", batch_tokens=8192,
                                                       progress=False))
    worst = 0.0
    for layer in range(spec.num_layers):
        b = st.batches[0]
        h = torch.zeros(*b.ids.shape, spec.hidden_size, dtype=torch.bfloat16, device=device)
        for r, n in enumerate(b.lengths):
            h[r, :n] = caps[layer][r][0][0]
        st.store.put(0, h)
        st.run_layer(layer, LayerAccumulator(spec.num_experts, device))
        out = st.store.get(0)
        for r, n in enumerate(b.lengths):
            want = caps[layer][r][1][0].float()
            worst = max(worst, ((out[r, :n].float() - want).abs().max() / want.abs().max()).item())
    st.close()
    return {"layer_vs_transformers_bf16_max_rel": worst, "grouped_used": True}


def run_protocol(model: Path, data: Path, dtype: str, device) -> tuple[dict, torch.Tensor]:
    opts = CalibrateOptions(model=str(model), data=DataOptions(dataset=str(data), samples=256, max_length=1024),
                            engine=EngineOptions(device=str(device), dtype=dtype, progress=False))
    torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    stats, summary = calibrate(opts, log=lambda *_: None)
    summary["wall_s"] = round(time.perf_counter() - t0, 2)
    return summary, stats.scores("reap")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mini-m2", type=Path, required=True)
    ap.add_argument("--mini-m2-fp8", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--cpu-report", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    device = torch.device("cuda:0")
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    result.update(check_grouped(device))
    result.update(check_layers(args.mini_m2, device))
    cpu = None
    if args.cpu_report and args.cpu_report.exists():
        cpu = json.loads(args.cpu_report.read_text())["layers"]
    for name, model, dtype in (("bf16", args.mini_m2, "bfloat16"), ("fp8", args.mini_m2_fp8, "bfloat16"),
                               ("bf16-fp32compute", args.mini_m2, "float32")):
        calibrate_once = run_protocol(model, args.data, dtype, device)  # warm-up (kernels, caches)
        summary, scores = run_protocol(model, args.data, dtype, device)
        entry = {**summary, "warmup_wall_s": calibrate_once[0]["wall_s"]}
        if cpu is not None:
            same = [len(set(choose_experts(scores[int(layer)], 19)[1]) & set(v["pruned"])) for layer, v in cpu.items()]
            cpu_scores = torch.tensor([cpu[str(layer)]["saliency"] for layer in range(scores.shape[0])], dtype=torch.float64)
            entry["pruned_overlap_with_cpu_fp32_of_19"] = same
            entry["max_rel_saliency_diff_vs_cpu"] = ((scores - cpu_scores).abs() / cpu_scores.abs().clamp(min=1e-12)).max().item()
        result[name] = entry
        print(name, json.dumps(entry), flush=True)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
