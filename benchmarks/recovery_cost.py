"""What recovery costs on one MiniMax-M2-width MoE layer (issue 28 item 6, "the cost of each at MiniMax-M2 width").

One MiniMax-M2 decoder layer at the released width (hidden 3072, 256 experts of intermediate 1536, top-8, sigmoid
router with correction bias), random weights with the router spread, in bf16 on the GPU; a sample of S hidden
states; the same steps :class:`reap.recover.observer.Recovery` runs after a layer's batches, timed one by one:
the sample (unpruned and pruned outputs), the similarity, the merge (``fold``: every proposal of the first
``--proposals`` pruned experts, extrapolated to all of them), the router re-fit (``--steps`` Adam steps).

    python benchmarks/recovery_cost.py [--tokens 4096] [--ratio 0.3] [--proposals 8] [--steps 200]

Prints one JSON line (seconds per step, peak GPU memory).
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--proposals", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=1536)
    a = p.parse_args()
    from transformers import MiniMaxM2Config, MiniMaxM2ForCausalLM

    from reap.calibrate.greedy import RouterDriver
    from reap.recover import observer as obs
    from reap.recover.methods import FOLD_CANDIDATES
    from reap.recover.refit import fit, router_leaf
    from reap.recover.sample import LayerSample
    from reap.stream.experts import use_reap_experts

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = MiniMaxM2Config(hidden_size=a.hidden, intermediate_size=a.intermediate, num_local_experts=a.experts,
                          num_experts_per_tok=8, num_hidden_layers=1, vocab_size=256)
    torch.manual_seed(0)
    with torch.device(dev):
        model = MiniMaxM2ForCausalLM._from_config(cfg, dtype=dtype)
    use_reap_experts(model)
    block = model.model.layers[0].mlp
    with torch.no_grad():
        block.gate.weight.normal_(0, 0.5 / a.hidden ** 0.5 * 8)
        block.e_score_correction_bias.normal_(0, 0.1)
        block.experts.gate_up_proj.normal_(0, 0.02)
        block.experts.down_proj.normal_(0, 0.02)
    E, K = a.experts, 8
    xs = torch.randn(a.tokens, a.hidden, device=dev, dtype=dtype)
    tensors = {"mlp.gate.weight": 0, "mlp.e_score_correction_bias": 0}
    driver = RouterDriver(block, block.experts, tensors, "mlp", K, E)
    n_drop = int(round(a.ratio * E))
    scores = torch.rand(E, dtype=torch.float64)
    kept = sorted(torch.argsort(scores, descending=True)[: E - n_drop].tolist())
    removed = torch.ones(E, dtype=torch.bool, device=dev)
    removed[kept] = False
    out = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "dtype": str(dtype),
           "tokens": a.tokens, "experts": E, "kept": len(kept), "hidden": a.hidden, "intermediate": a.intermediate}

    def timed(key, fn):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        out[key] = round(time.perf_counter() - t0, 3)
        return r

    with torch.inference_mode():
        sample = timed("sample_s", lambda: LayerSample(driver, block.experts, xs, removed))
        sample.use_router(router_leaf(driver, "mlp.gate.weight", "mlp"))
        rec = obs.Recovery(obs.RecoverSpec("fold", True, "reap", None, n_drop))
        acc = SimpleNamespace(count=torch.rand(E, dtype=torch.float64) * 100 + 1, reap_sum=torch.rand(E) + 0.1)
        state = SimpleNamespace(experts=block.experts, accumulator=acc, layer=0)
        import reap.recover.methods as methods

        original = methods._fold
        methods.MERGE_METHODS["fold"] = methods.MergeMethod("fold", "", "count",
                                                            lambda p_: original(p_)[: a.proposals])
        record: dict = {}
        timed("merge_s_first_proposals", lambda: rec._merge(state, sample, driver, kept, scores, record))
        out["similarity_s"] = record.get("seconds", {}).get("similarity")
        out["proposals_timed"] = a.proposals
        out["candidates_each"] = FOLD_CANDIDATES
        per = (out["merge_s_first_proposals"] - (out["similarity_s"] or 0)) / a.proposals
        out["merge_s_per_pruned_expert"] = round(per, 3)
        out["merge_s_layer_estimate"] = round((out["similarity_s"] or 0) + per * n_drop, 1)
        res = timed("refit_s", lambda: fit(sample, sample.leaf, steps=a.steps))
        out["refit_steps"] = res.steps
        out["refit_improved"] = res.improved
    if dev.type == "cuda":
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
