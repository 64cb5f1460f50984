"""Research script for issue #18: which expert-pruning criterion works on both shared fixtures.

Independent of reap's calibration and eval code (which is being rewritten): the model is transformers' own
(``AutoModelForCausalLM.from_pretrained``, float32, eager experts), statistics come from forward hooks on each
MoE block, and experts are removed in memory by masking them out of routing (pruned experts never chosen, the
remaining chosen weights renormalized as the model does), which equals the pruned checkpoint (README: "pruned
== original with pruned experts masked"; checked: the same losses as ``reap prune --keep`` + ``reap eval``).
The criteria themselves are reap's (:mod:`reap.selection.criteria`, :mod:`reap.selection.choose`,
:func:`reap.calibrate.greedy_order.greedy_rerouted_order`), fed here the way calibration would feed them.

    PYTHONPATH=src python benchmarks/criteria_study.py stats   --fixture F [--docs 256]   # statistics
    PYTHONPATH=src python benchmarks/criteria_study.py greedy  --fixture F [--docs 256] [--tokens 65536]
    PYTHONPATH=src python benchmarks/criteria_study.py table   --fixture F [--docs 256] --criteria a,b,...
    PYTHONPATH=src python benchmarks/criteria_study.py summary --criteria a,b   # markdown tables
    PYTHONPATH=src python benchmarks/criteria_study.py eval-keep --fixture F KEEP.json ...  # or "none"
    # the tool itself: `reap calibrate` (its greedy order included), then the same eval of its choices
    reap calibrate ../shared/fixtures/F --dataset ../shared/data/calibration.jsonl.gz --samples N --max-length 1024 \
        --device cpu --dtype float32 --out benchmarks/results/criteria/F.docsN.stats.safetensors
    PYTHONPATH=src python benchmarks/criteria_study.py tool --fixture F --docs N --criteria greedy-rerouted,reap
    # the greedy sample's size (issue 28): `reap calibrate --greedy-tokens N` for each N, then the same eval of
    # greedy-rerouted (and reap, once: it does not depend on N), one jsonl line per run and ratio
    PYTHONPATH=src python benchmarks/criteria_study.py sample --fixture F --docs 64 --tokens 672,2400,8000 \
        --out benchmarks/results/greedy_sample_cpu.jsonl

Protocol (the same for every number): calibration = the first ``--docs`` documents of calibration.jsonl.gz in
file order, no special tokens, truncated to 1024 tokens, one document per sequence, float32; eval = the first
32,768 targets of eval.jsonl.gz (each document + EOS, concatenated), windows of 513 at stride 512.

Per layer the ``stats`` step records, in float64, what :mod:`reap.calibrate.stats` accumulates (fed through its
:class:`~reap.calibrate.stats.LayerAccumulator`, including the new sum of ||f||^2) and, for the research criteria,
the re-routing reconstruction error of each routed pair: with S the token's top-k set and n its next choice
(k+1-th under the model's own choice rule), y = sum_{i in S} w_i f_i / sum_{i in S} w_i and
y_{-j} = sum_{i in S-j+n} w_i f_i / sum_{i in S-j+n} w_i (w: the unnormalized routing weights, softmax
probabilities or sigmoid scores), the pair (x, j) adds ||y - y_{-j}|| and ||y - y_{-j}||^2 (``rr_sum``,
``rr_sq_sum``), and the Gram matrix of these changes over co-routed experts (``rr_gram``, for the quadratic
greedy); and the same without re-routing (S-j only, renormalized: ``dr_sum``). ``greedy`` runs
:func:`reap.calibrate.greedy_order.greedy_rerouted_order` on a :class:`reap.calibrate.greedy_order.TokenSample` of each layer's inputs
(every ceil(T / N)-th token). Results go to ``benchmarks/results/criteria/``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ["REAP_SHARED"]) if os.environ.get("REAP_SHARED") else ROOT.parent / "shared"
if not SHARED.exists():
    SHARED = Path("/work/shared")
RESULTS = ROOT / "benchmarks" / "results" / "criteria"
RATIOS = (0.3, 0.5)
EVAL_TOKENS, SEQ_LEN, MAX_LEN = 32768, 512, 1024
CHUNK = 8192  # tokens per chunk in the statistics pass


# -- model, data ---------------------------------------------------------------------------------------------
def load_model(fixture: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = SHARED / "fixtures" / fixture
    # eager experts: the same per-expert loop as reap's CPU path, and ~20x faster on CPU than grouped_mm
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(path)


def read_docs(name: str, n: int | None) -> list[str]:
    out = []
    with gzip.open(SHARED / "data" / name, "rt") as fh:
        for line in fh:
            out.append(json.loads(line)["text"])
            if n is not None and len(out) >= n:
                break
    return out


def calibration_ids(tok, docs: int) -> list[list[int]]:
    seqs = [tok(t, add_special_tokens=False)["input_ids"][:MAX_LEN] for t in read_docs("calibration.jsonl.gz", docs)]
    return [s for s in seqs if s]


def eval_windows(tok, eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [W, S], targets [W, S]) covering the first EVAL_TOKENS targets of the eval stream."""
    stream: list[int] = []
    with gzip.open(SHARED / "data" / "eval.jsonl.gz", "rt") as fh:
        for line in fh:
            stream += tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [eos]
            if len(stream) > EVAL_TOKENS + 1:
                break
    s = torch.tensor(stream[: EVAL_TOKENS + 1])
    w = EVAL_TOKENS // SEQ_LEN
    idx = torch.arange(w)[:, None] * SEQ_LEN + torch.arange(SEQ_LEN + 1)[None]
    win = s[idx]  # [W, S+1]
    return win[:, :-1], win[:, 1:]


# -- routing with a mask of removed experts -----------------------------------------------------------------
def raw_weights(moe, x: torch.Tensor, removed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(unnormalized routing weights [T, E], choice scores [T, E]) with removed experts never chosen.

    qwen3_moe: softmax over the kept experts (removed logits -inf), chosen by probability; minimax_m2:
    sigmoid scores (weights) chosen by sigmoid + e_score_correction_bias.
    """
    logits = F.linear(x, moe.gate.weight)  # [T, E]
    if hasattr(moe, "e_score_correction_bias"):
        w = torch.sigmoid(logits.float())
        choice = w + moe.e_score_correction_bias
    else:
        if removed is not None:
            logits = logits.masked_fill(removed, float("-inf"))
        w = torch.softmax(logits, dim=-1, dtype=torch.float)
        choice = w
    if removed is not None:
        choice = choice.masked_fill(removed, float("-inf"))
    return w, choice


def route(moe, x, removed, k):
    """(renormalized weights [T, k], indices [T, k]) exactly as the model routes, removed experts excluded."""
    w, choice = raw_weights(moe, x, removed)
    if hasattr(moe, "e_score_correction_bias"):
        _, idx = torch.topk(choice, k, dim=-1, sorted=False)
        top = w.gather(1, idx)
    else:
        top, idx = torch.topk(choice, k, dim=-1)
    return top / top.sum(-1, keepdim=True), idx


def masked_forward(moe, k):
    def forward(hidden_states):
        b, s, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)
        weights, idx = route(moe, x, getattr(moe, "removed", None), k)
        return moe.experts(x, idx, weights.to(x.dtype)).reshape(b, s, h)

    return forward


def install_masks(model) -> None:
    k = model.config.num_experts_per_tok
    for layer in model.model.layers:
        layer.mlp.removed = None
        layer.mlp.forward = masked_forward(layer.mlp, k)


def set_keep(model, keep: dict[int, list[int]] | None) -> None:
    e = num_experts(model)
    for i, layer in enumerate(model.model.layers):
        if keep is None:
            layer.mlp.removed = None
        else:
            removed = torch.ones(e, dtype=torch.bool)
            removed[list(keep[i])] = False
            layer.mlp.removed = removed


def num_experts(model) -> int:
    return model.model.layers[0].mlp.gate.weight.shape[0]


@torch.no_grad()
def eval_loss(model, inputs, targets, batch: int = 8) -> float:
    total = 0.0
    for i in range(0, inputs.shape[0], batch):
        logits = model(inputs[i : i + batch]).logits.float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[i : i + batch].reshape(-1),
                                 reduction="sum").item()
    return total / targets.numel()


# -- statistics ------------------------------------------------------------------------------------------------
def expert_outputs(experts, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """f_{idx[t, m]}(x_t) for every (t, m): [T, M, H]."""
    t, m = idx.shape
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=experts.gate_up_proj.shape[0]).tolist()
    xs = x[order // m]
    y = torch.empty(t * m, x.shape[1], dtype=x.dtype)
    start = 0
    for e, n in enumerate(counts):
        if n:
            g, u = F.linear(xs[start : start + n], experts.gate_up_proj[e]).chunk(2, dim=-1)
            y[start : start + n] = F.linear(experts.act_fn(g) * u, experts.down_proj[e])
            start += n
    out = torch.empty_like(y)
    out[order] = y
    return out.view(t, m, -1)


@torch.no_grad()
def capture_inputs(model, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Each MoE block's input for every calibration token (unpruned model): per layer [T, H] float32."""
    store: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: store[i].append(a[0].reshape(-1, a[0].shape[-1])))
             for i, layer in enumerate(model.model.layers)]
    try:
        for s in seqs:
            model(torch.tensor([s]))
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(xs) for xs in store]


@torch.no_grad()
def layer_stats(moe, x: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """reap.calibrate.stats's accumulators (via LayerAccumulator) plus the research sums, float64 [E] each."""
    from reap.calibrate.stats import LayerAccumulator

    e = moe.gate.weight.shape[0]
    acc = LayerAccumulator(e)
    extra = {f: torch.zeros(e, dtype=torch.float64) for f in ("rr_sum", "rr_sq_sum", "dr_sum")}
    extra["rr_gram"] = torch.zeros(e, e, dtype=torch.float64)  # sum_t <D_ti, D_tj> over co-routed i, j
    for lo in range(0, x.shape[0], CHUNK):
        xc = x[lo : lo + CHUNK]
        w, choice = raw_weights(moe, xc, None)
        _, idx = torch.topk(choice, k + 1, dim=-1)  # [t, k+1], the k+1-th is the next choice
        wr = w.gather(1, idx).double()  # [t, k+1] unnormalized
        f = expert_outputs(moe.experts, xc, idx).double()  # [t, k+1, H]
        wk, fk = wr[:, :k], f[:, :k]
        wsum = wk.sum(1, keepdim=True)  # [t, 1]
        num = (wk[..., None] * fk).sum(1)  # [t, H]
        y = num / wsum
        gate = wk / wsum  # [t, k] the weights the model applies
        acc.add(idx[:, :k], gate, fk.norm(dim=-1))
        # remove position i, re-route to the next choice n
        num_rr = num[:, None] - wk[..., None] * fk + (wr[:, k, None, None] * f[:, k, None])  # [t, k, H]
        den_rr = wsum - wk + wr[:, k, None]  # [t, k]
        d_vec = y[:, None] - num_rr / den_rr[..., None]  # [t, k, H]
        d_rr = d_vec.norm(dim=-1)  # [t, k]
        gram = d_vec @ d_vec.transpose(1, 2)  # [t, k, k]
        ii = idx[:, :k, None].expand(-1, k, k)
        extra["rr_gram"].index_put_((ii.reshape(-1), ii.transpose(1, 2).reshape(-1)), gram.reshape(-1), accumulate=True)
        num_dr = num[:, None] - wk[..., None] * fk
        d_dr = (y[:, None] - num_dr / (wsum - wk)[..., None]).norm(dim=-1)
        flat = idx[:, :k].reshape(-1)
        extra["rr_sum"].index_add_(0, flat, d_rr.reshape(-1))
        extra["rr_sq_sum"].index_add_(0, flat, d_rr.reshape(-1) ** 2)
        extra["dr_sum"].index_add_(0, flat, d_dr.reshape(-1))
    return {**acc.to_dict(), **extra}


def stats_path(fixture: str, docs: int) -> Path:
    return RESULTS / f"{fixture}.docs{docs}.stats.pt"


def cmd_stats(args) -> None:
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.fixture)
    t0 = time.perf_counter()
    seqs = calibration_ids(tok, args.docs)
    xs = capture_inputs(model, seqs)
    k = model.config.num_experts_per_tok
    per_layer = [layer_stats(layer.mlp, x, k) for layer, x in zip(model.model.layers, xs)]
    out = {f: torch.stack([p[f] for p in per_layer]) for f in per_layer[0]}  # [L, E]
    out["tokens"] = sum(len(s) for s in seqs)
    RESULTS.mkdir(parents=True, exist_ok=True)
    torch.save(out, stats_path(args.fixture, args.docs))
    print(f"{args.fixture}: {out['tokens']} tokens from {len(seqs)} documents, {time.perf_counter() - t0:.0f}s "
          f"-> {stats_path(args.fixture, args.docs)}")


def load_stats(fixture: str, docs: int):
    """The study's statistics as a reap.calibrate.stats.ExpertStats (research fields as extra attributes)."""
    from reap.calibrate.stats import ExpertStats

    raw = torch.load(stats_path(fixture, docs))
    count = raw["count"]
    stats = ExpertStats(count.shape[0], count.shape[1], meta={"tokens": raw["tokens"], "documents": docs})
    for f, t in raw.items():
        if isinstance(t, torch.Tensor):
            setattr(stats, f, t.clone())
    stats.completed = set(range(count.shape[0]))
    greedy = RESULTS / f"{fixture}.docs{docs}.greedy.json"
    if greedy.exists():  # the greedy-rerouted criterion reads these ranks through the registry
        for layer, order in json.loads(greedy.read_text())["orders"].items():
            stats.set_greedy_order(int(layer), order)
    return stats


# -- greedy selection with re-routing ------------------------------------------------------------------------
@torch.no_grad()
def greedy_layer(moe, x: torch.Tensor, k: int, max_tokens: int, n_steps: int | None = None) -> tuple[list[int], int]:
    """(reap.calibrate.greedy_order.greedy_rerouted_order on a TokenSample of x, sample size): the library's greedy, fed the
    way calibration would feed it: weights, choice scores and every expert's output on the sampled tokens."""
    from reap.calibrate.greedy_order import TokenSample, greedy_rerouted_order

    sample = TokenSample(max_tokens, stride=max(1, math.ceil(x.shape[0] / max_tokens)))
    for lo in range(0, x.shape[0], CHUNK):  # fed batch by batch, as a calibrator would
        sample.add(x[lo : lo + CHUNK])
    xs = sample.rows
    e = moe.gate.weight.shape[0]
    w, choice = raw_weights(moe, xs, None)
    f = expert_outputs(moe.experts, xs, torch.arange(e).expand(xs.shape[0], e))  # [S, E, H] float32
    return greedy_rerouted_order(w, choice, f, k, n_steps), xs.shape[0]


def cmd_greedy(args) -> None:
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.fixture)
    xs = capture_inputs(model, calibration_ids(tok, args.docs))
    from reap.selection.choose import n_to_drop

    k = model.config.num_experts_per_tok
    steps = n_to_drop(num_experts(model), max(RATIOS))  # enough for the table's ratios (the library default: E - k)
    orders, sizes = {}, {}
    for i, (layer, x) in enumerate(zip(model.model.layers, xs)):
        t0 = time.perf_counter()
        orders[i], sizes[i] = greedy_layer(layer.mlp, x, k, args.tokens, steps)
        print(f"layer {i}: {sizes[i]} of {x.shape[0]} tokens, {time.perf_counter() - t0:.0f}s: {orders[i]}", flush=True)
    path = RESULTS / f"{args.fixture}.docs{args.docs}.greedy.json"
    path.write_text(json.dumps({"max_tokens": args.tokens, "sample_tokens": sizes, "orders": orders}) + "\n")
    print(f"-> {path}")


# -- criteria and the table ---------------------------------------------------------------------------------------
def research_scores(stats, name: str) -> torch.Tensor | None:
    """Scores of criteria that need the study's extra statistics (None for other names)."""
    count = stats.count
    if name == "rerouted-error":
        return stats.rr_sum.clone()
    if name == "rerouted-sq-error":
        return stats.rr_sq_sum.clone()
    if name == "rerouted-error-mean":
        return torch.where(count > 0, stats.rr_sum / count.clamp_min(1), 0.0)
    if name == "dropped-error":
        return stats.dr_sum.clone()
    mean = torch.where(count > 0, stats.reap_sum / count.clamp_min(1), 0.0)
    if name.startswith("reap-prior-"):  # reap-prior with another prior strength
        from reap.selection.criteria import reap_prior_scores

        return torch.where(count > 0, reap_prior_scores(stats, float(name.rsplit("-", 1)[1])), 0.0)
    if name.startswith("geometric-"):  # mean x count^beta: beta 0 = REAP, 1 = weighted EAN
        return mean * count ** float(name.rsplit("-", 1)[1])
    if name == "shrink-to-mean":  # REAP mean shrunk towards the layer's pair-weighted mean by n_bar pseudo-tokens
        n_bar = count.sum(1, keepdim=True) / count.shape[1]
        mu = stats.reap_sum.sum(1, keepdim=True) / count.sum(1, keepdim=True)
        return (stats.reap_sum + n_bar * mu) / (count + n_bar)
    return None


def quadratic_greedy_order(gram: torch.Tensor, n_drop: int) -> list[int]:
    """Greedy removal order under the quadratic model of the layer-output error: removing the set S costs
    sum_{i, j in S} Q[i, j], Q[i, j] = sum over tokens routed to both of <D_i, D_j> (D: the single-removal,
    re-routed output change; Q's diagonal is rr_sq_sum). Each step removes the expert with the least
    Q[j, j] + 2 sum_{i in S} Q[i, j]."""
    q = gram.to(torch.float64)
    removed = torch.zeros(q.shape[0], dtype=torch.bool)
    order = []
    for _ in range(n_drop):
        cost = q.diagonal() + 2 * (q * removed[:, None]).sum(0)
        cost[removed] = float("inf")
        j = int(torch.argmin(cost))
        removed[j] = True
        order.append(j)
    return order


def keep_from(scores: torch.Tensor, ratio: float) -> dict[int, list[int]]:
    from reap.selection.choose import choose_experts, n_to_drop

    n = n_to_drop(scores.shape[1], ratio)
    return {layer: choose_experts(scores[layer], n)[0] for layer in range(scores.shape[0])}


def keep_for(stats, name: str, ratio: float, fixture: str, docs: int) -> dict[int, list[int]]:
    from reap.selection.criteria import CRITERIA
    from reap.selection.choose import select

    if name == "greedy-quadratic":
        from reap.selection.choose import n_to_drop

        e, n = stats.num_experts, n_to_drop(stats.num_experts, ratio)
        return {l: sorted(set(range(e)) - set(quadratic_greedy_order(stats.rr_gram[l], n))) for l in range(stats.num_layers)}
    scores = research_scores(stats, name)
    if scores is not None:
        return keep_from(scores, ratio)
    base, _, modifier = name.partition("+")
    if base in CRITERIA and modifier in ("", "protect"):
        return select(stats, base, ratio, protect_super=bool(modifier)).keep
    raise SystemExit(f"unknown criterion {name!r}")


def cmd_table(args) -> None:
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.fixture)
    install_masks(model)
    inputs, targets = eval_windows(tok, tok.eos_token_id if tok.eos_token_id is not None else 0)
    stats = load_stats(args.fixture, args.docs)
    path = RESULTS / f"{args.fixture}.docs{args.docs}.table.json"
    table = json.loads(path.read_text()) if path.exists() else {}
    if "unpruned" not in table:
        set_keep(model, None)
        table["unpruned"] = {"loss": eval_loss(model, inputs, targets)}
    for name in args.criteria.split(","):
        for ratio in RATIOS:
            keep = keep_for(stats, name, ratio, args.fixture, args.docs)
            set_keep(model, keep)
            loss = eval_loss(model, inputs, targets)
            table.setdefault(name, {})[str(ratio)] = {"loss": loss, "keep": {str(k): v for k, v in keep.items()}}
            print(f"{args.fixture} docs={args.docs} {name:24s} {ratio}: {loss:.4f}", flush=True)
        path.write_text(json.dumps(table, indent=1) + "\n")


def cmd_eval_keep(args) -> None:
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.fixture)
    install_masks(model)
    inputs, targets = eval_windows(tok, tok.eos_token_id if tok.eos_token_id is not None else 0)
    for path in args.keep:
        keep = {int(k): v for k, v in json.loads(Path(path).read_text()).items()} if path != "none" else None
        set_keep(model, keep)
        print(f"{path}: {eval_loss(model, inputs, targets):.4f}", flush=True)


def cmd_tool(args) -> None:
    """Eval of the experts reap itself chooses from a `reap calibrate` stats file (reap.selection.choose.plan_from_scores on
    reap.selection.criteria's scores), with the pruned-set overlap against the study's own choice for the same criterion at
    256 documents where that table has it."""
    from reap.selection.plan import Routing
    from reap.calibrate.stats import ExpertStats
    from reap.selection.choose import n_to_drop, plan_from_scores

    torch.set_num_threads(args.threads)
    stats = ExpertStats.load(RESULTS / f"{args.fixture}.docs{args.docs}.stats.safetensors")
    model, tok = load_model(args.fixture)
    install_masks(model)
    inputs, targets = eval_windows(tok, tok.eos_token_id if tok.eos_token_id is not None else 0)
    path = RESULTS / f"{args.fixture}.docs{args.docs}.tool.json"
    table = json.loads(path.read_text()) if path.exists() else {}
    ref_path = RESULTS / f"{args.fixture}.docs256.table.json"
    ref = json.loads(ref_path.read_text()) if ref_path.exists() else {}
    layers = sorted(stats.completed)
    for name in args.criteria.split(","):
        scores = stats.scores(name)
        for ratio in RATIOS:
            routing = Routing(args.fixture, stats.num_experts, 1)
            keep = plan_from_scores(scores, routing, layers, n_to_drop(stats.num_experts, ratio), name).keep
            set_keep(model, keep)
            loss = eval_loss(model, inputs, targets)
            entry = {"loss": loss, "keep": {str(k): v for k, v in keep.items()}, "tokens": stats.meta.get("tokens")}
            if name in ref:
                entry["overlap_with_256"] = overlap(keep, {int(k): v for k, v in ref[name][str(ratio)]["keep"].items()},
                                                    stats.num_experts)
            table.setdefault(name, {})[str(ratio)] = entry
            print(f"{args.fixture} docs={args.docs} (reap calibrate) {name:18s} {ratio}: {loss:.4f}"
                  + (f"  overlap with the 256-doc choice {entry['overlap_with_256']:.2f}" if "overlap_with_256" in entry
                     else ""), flush=True)
        path.write_text(json.dumps(table, indent=1) + "\n")


def cmd_sample(args) -> None:
    """The greedy sample's size against the held-out loss: per ``--tokens`` N, `reap calibrate` (in process, the
    protocol above, ``--greedy-tokens N``, CPU float32), then the eval of greedy-rerouted's choice at each ratio; REAP
    from the first run's statistics (the same for every N). Appends one json line per (criterion, tokens, ratio) to
    ``--out``: loss, sampled tokens, routed pairs per expert (N x K / E), calibration and greedy seconds."""
    from reap.calibrate.run import calibrate
    from reap.core.options import CalibrateOptions, DataOptions, EngineOptions
    from reap.selection.choose import n_to_drop, plan_from_scores
    from reap.selection.plan import Routing

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.fixture)
    install_masks(model)
    inputs, targets = eval_windows(tok, tok.eos_token_id if tok.eos_token_id is not None else 0)
    k, e = model.config.num_experts_per_tok, num_experts(model)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(args.stats_dir).mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(int(t) for t in args.tokens.split(",")):
        path = Path(args.stats_dir) / f"{args.fixture}.docs{args.docs}.greedy{n}.stats.safetensors"
        path.unlink(missing_ok=True)
        engine = EngineOptions(device="cpu", dtype="float32", progress=False, greedy_tokens=n)
        data = DataOptions(dataset=str(SHARED / "data" / "calibration.jsonl.gz"), samples=args.docs, max_length=MAX_LEN)
        t0 = time.perf_counter()
        stats, summary = calibrate(CalibrateOptions(model=str(SHARED / "fixtures" / args.fixture), out=path,
                                                    engine=engine, data=data), log=lambda m: None)
        seconds = time.perf_counter() - t0
        sampled = sorted({int(v) for v in (stats.meta.get("greedy") or {}).get("sample_tokens", {}).values()}) or None
        layers = sorted(stats.completed)
        for name in ("greedy-rerouted", "reap") if i == 0 else ("greedy-rerouted",):
            scores = stats.scores(name)
            for ratio in RATIOS:
                keep = plan_from_scores(scores, Routing(args.fixture, e, 1), layers, n_to_drop(e, ratio), name).keep
                set_keep(model, keep)
                loss = eval_loss(model, inputs, targets)
                row = {"fixture": args.fixture, "docs": args.docs, "calib_tokens": summary["tokens"], "criterion": name,
                       "greedy_tokens": n if name == "greedy-rerouted" else None,
                       "sampled_tokens": sampled if name == "greedy-rerouted" else None,
                       "pairs_per_expert": round(min(sampled) * k / e, 1) if name == "greedy-rerouted" and sampled
                       else None, "ratio": ratio,
                       "loss": round(loss, 5), "calibrate_s": round(seconds, 1),
                       "greedy_s": summary.get("greedy_seconds"), "threads": args.threads,
                       "keep": {str(a): b for a, b in keep.items()}}
                with out.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(f"{args.fixture} docs={args.docs} {name:16s} tokens={n:6d} ratio {ratio}: {loss:.4f} "
                      f"(calibrate {seconds:.0f} s, greedy {summary.get('greedy_seconds')} s)", flush=True)


def overlap(keep_a: dict, keep_b: dict, num_experts: int) -> float:
    """Mean over layers of |pruned_a & pruned_b| / |pruned_b| (1.0: the same experts pruned)."""
    fr = []
    for layer, kb in keep_b.items():
        pa = set(range(num_experts)) - set(keep_a[layer])
        pb = set(range(num_experts)) - set(kb)
        fr.append(len(pa & pb) / max(len(pb), 1))
    return sum(fr) / len(fr)


def cmd_summary(args) -> None:
    """Markdown tables from the saved results: criteria x fixtures x ratios, and calibration size."""
    fixtures = ("mini-m2", "mini-qwen3moe")
    tables = {f: json.loads((RESULTS / f"{f}.docs256.table.json").read_text()) for f in fixtures}
    names = [n for n in tables[fixtures[0]] if n != "unpruned" and all(n in t for t in tables.values())]
    head = " | ".join(f"{f} {r}" for f in fixtures for r in RATIOS)
    print(f"| criterion | {head} |\n|---|" + "---|" * (len(fixtures) * len(RATIOS)))
    print("| unpruned | " + " | ".join(f"{tables[f]['unpruned']['loss']:.4f}" for f in fixtures for _ in RATIOS) + " |")
    best = {(f, r): min(tables[f][n][str(r)]["loss"] for n in names) for f in fixtures for r in RATIOS}
    for n in names:
        cells = []
        for f in fixtures:
            for r in RATIOS:
                v = tables[f][n][str(r)]["loss"]
                cells.append(f"**{v:.4f}**" if v == best[f, r] else f"{v:.4f}")
        print(f"| {n} | " + " | ".join(cells) + " |")
    sizes = [d for d in (16, 64) if all((RESULTS / f"{f}.docs{d}.table.json").exists() for f in fixtures)]
    if not sizes:
        return
    print("\n| criterion | documents | tokens | " + " | ".join(f"{f} {r} loss (overlap)" for f in fixtures for r in RATIOS)
          + " |\n|---|---|---|" + "---|" * (len(fixtures) * len(RATIOS)))
    for n in args.criteria.split(","):
        for d in (*sizes, 256):
            cells, toks = [], None
            for f in fixtures:
                t = json.loads((RESULTS / f"{f}.docs{d}.table.json").read_text())
                toks = torch.load(stats_path(f, d))["tokens"]
                for r in RATIOS:
                    ref = tables[f][n][str(r)]["keep"]
                    got = t[n][str(r)]
                    e = torch.load(stats_path(f, d))["count"].shape[1]
                    cells.append(f"{got['loss']:.4f} ({overlap(got['keep'], ref, e):.2f})")
            print(f"| {n} | {d} | {toks} | " + " | ".join(cells) + " |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("stats", "table", "greedy", "eval-keep", "summary", "tool", "sample"):
        s = sub.add_parser(name)
        s.add_argument("--fixture", required=name != "summary")
        s.add_argument("--docs", type=int, default=256)
        s.add_argument("--threads", type=int, default=1)
        if name in ("table", "summary", "tool"):
            s.add_argument("--criteria", required=True)
        if name == "greedy":
            s.add_argument("--tokens", type=int, default=65536, help="sample size: every ceil(T / N)-th token")
        if name == "sample":
            s.add_argument("--tokens", required=True, help="greedy sample sizes, comma-separated")
            s.add_argument("--out", required=True, help="the jsonl the rows are appended to")
            s.add_argument("--stats-dir", default="/tmp/reap-greedy-sample", help="where the stats files go")
        if name == "eval-keep":
            s.add_argument("keep", nargs="+")
    args = p.parse_args(argv)
    {"stats": cmd_stats, "table": cmd_table, "greedy": cmd_greedy, "eval-keep": cmd_eval_keep,
     "summary": cmd_summary, "tool": cmd_tool, "sample": cmd_sample}[args.cmd](args)


if __name__ == "__main__":
    main(sys.argv[1:])
