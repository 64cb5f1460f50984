"""Multi-token-prediction (MTP) modules kept: calibrated after the last decoder layer and pruned like every layer.

Tiny DeepSeek-V3, GLM-4.5 and Qwen3-Next checkpoints get one MTP module each as the releases store it
(:func:`reap.testing.tiny.add_mtp_modules`). The reference for every check is written here, independent of reap's MTP code:
the serving engines' formula (vLLM ``deepseek_mtp.py`` / ``glm4_moe_mtp.py`` / ``qwen3_next_mtp.py``)

    U_t = proj(concat(norm_e(embed(x_{t+1})), norm_h(H_t)))      H = the main model's last hidden state, after its norm
    logits = lm_head(final_norm(decoder_layer(U)))

with the RMSNorms written out below and the decoder layer run by transformers itself: a one-layer model of the
family whose layer 0 is loaded (by ``from_pretrained``) from the MTP module's stored decoder layer, whose final
norm is the module's own and whose embedding and head are the main model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import load_causal_lm, python_snippets, random_sequences, removed_in_memory, stored_tensors
from safetensors.torch import save_file
from typer.testing import CliRunner

from reap.model.arch import MTP_STYLES
from reap.io.checkpoint import Checkpoint
from reap.cli import app
from reap.model.derive import derive
from reap.core.options import EngineOptions
from reap.calibrate.stats import FIELDS, ExpertStats, LayerAccumulator
from reap.stream.streamer import LayerStreamer

FAMILIES = {"deepseek": "deepseek_v3", "glm": "glm4_moe", "qwen3_next": "qwen3_next"}
LENGTHS = (23, 40, 7, 31)


@pytest.fixture(scope="module")
def calibration_texts() -> list[str]:
    return python_snippets(8, lines=lambda n: 4 + 2 * n)


@pytest.fixture(scope="module")
def mtp_models(tmp_path_factory):
    from reap.testing.tiny import add_mtp_modules, make_tiny_model

    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            root = tmp_path_factory.mktemp("mtp-models")
            plain = make_tiny_model(root / f"{name}-plain", seed=2, family=FAMILIES[name])
            cache[name] = add_mtp_modules(plain, root / name, seed=5)
        return cache[name]

    return get


def _config(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def _style(config: dict):
    return next(s for s in MTP_STYLES if s.name == ("qwen3_next" if config["model_type"] == "qwen3_next" else "deepseek"))


# -- the reference: the engines' formula around transformers' own decoder layer -------------------------------
def _rms(x: torch.Tensor, w: torch.Tensor, eps: float, one_plus: bool) -> torch.Tensor:
    x = x.float()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * ((1.0 + w.float()) if one_plus else w.float())


class EngineMtp:
    """MTP module 0 of a checkpoint as the serving engines run it (see the module docstring)."""

    def __init__(self, path: Path, tmp: Path):
        config = _config(path)
        style, n = _style(config), config["num_hidden_layers"]
        layer = style.layer.format(layers="model.layers.", n=n, k=0)
        prefix = style.prefix.format(layers="model.layers.", n=n, k=0)
        own = {f"{prefix}{p}.weight" for p in (style.embed_norm, style.hidden_norm, style.proj, style.final_norm)}
        tensors = stored_tensors(path)
        state = {"model.layers.0." + k[len(layer):]: t for k, t in tensors.items()
                 if k.startswith(layer) and k not in own}
        state["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"]
        state["lm_head.weight"] = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])
        state["model.norm.weight"] = tensors[f"{prefix}{style.final_norm}.weight"]
        one = {k: v for k, v in config.items() if k not in ("num_nextn_predict_layers", "mtp_num_hidden_layers")}
        one["num_hidden_layers"] = 1
        one.update({"first_k_dense_replace": 0} if "first_k_dense_replace" in config else {})
        if config["model_type"] == "qwen3_next":
            one.update({"layer_types": ["full_attention"], "mlp_only_layers": [], "decoder_sparse_step": 1})
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "config.json").write_text(json.dumps(one))
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        self.layer_model = load_causal_lm(tmp, dtype=torch.float32, experts_implementation="eager").eval()
        self.main = load_causal_lm(path, dtype=torch.float32, experts_implementation="eager").eval()
        self.one_plus = config["model_type"] == "qwen3_next"  # Qwen3-Next's norms are the (1 + w) kind
        self.eps = config.get("rms_norm_eps", 1e-6)
        self.enorm, self.hnorm = tensors[f"{prefix}{style.embed_norm}.weight"], tensors[f"{prefix}{style.hidden_norm}.weight"]
        self.proj = tensors[f"{prefix}{style.proj}.weight"].float()

    @torch.no_grad()
    def inputs(self, ids: torch.Tensor) -> torch.Tensor:
        """U [1, T-1, H] for one sequence ids [1, T]."""
        h = self.main.model(ids).last_hidden_state  # after the final norm
        e = self.main.model.embed_tokens(ids[:, 1:])
        cat = torch.cat([_rms(e, self.enorm, self.eps, self.one_plus), _rms(h[:, :-1], self.hnorm, self.eps,
                                                                            self.one_plus)], dim=-1)
        return F.linear(cat, self.proj)

    @torch.no_grad()
    def run(self, ids: torch.Tensor, model=None):
        """(final_norm(Y) [1, T-1, H], logits [1, T-1, V])."""
        out = (model or self.layer_model)(inputs_embeds=self.inputs(ids), output_hidden_states=True)
        return out.hidden_states[-1], out.logits


def _experts_of(model):
    return next(m for m in model.modules() if all(hasattr(m, a) for a in ("has_gate", "is_transposed", "num_experts")))


@torch.no_grad()
def engine_stats(engine: EngineMtp, seqs) -> dict[str, torch.Tensor]:
    """count / gate_sum / ean_sum / reap_sum / max_norm / max_abs [E] of the MTP module's experts: hooks on
    transformers' own experts module record (tokens, chosen experts, weights); each pair's output is that module run
    for one expert."""
    experts = _experts_of(engine.layer_model)
    E = experts.num_experts
    acc = {f: torch.zeros(E, dtype=torch.float64) for f in ("count", "gate_sum", "ean_sum", "reap_sum", "max_norm",
                                                              "max_abs")}
    calls = []
    hook = experts.register_forward_pre_hook(lambda m, a, kw: calls.append((a, kw)), with_kwargs=True)
    for s in seqs:
        engine.run(torch.tensor([s]))
    hook.remove()
    for args, kw in calls:
        x, index, weights = (list(args) + [kw.get(k) for k in ("hidden_states", "top_k_index", "top_k_weights")
                                           [len(args):]])[:3]
        for k in range(index.shape[1]):
            f = experts(x, index[:, k : k + 1], torch.ones_like(weights[:, k : k + 1]))
            norm, e, w = f.double().norm(dim=-1), index[:, k], weights[:, k].double()
            acc["count"].index_add_(0, e, torch.ones_like(norm))
            acc["gate_sum"].index_add_(0, e, w)
            acc["ean_sum"].index_add_(0, e, norm)
            acc["reap_sum"].index_add_(0, e, w * norm)
            acc["max_norm"] = torch.maximum(acc["max_norm"], torch.zeros(E, dtype=torch.float64).scatter_reduce_(
                0, e, norm, "amax", include_self=True))
            acc["max_abs"] = torch.maximum(acc["max_abs"], torch.zeros(E, dtype=torch.float64).scatter_reduce_(
                0, e, f.double().abs().amax(dim=-1), "amax", include_self=True))
    return acc


# -- the checks -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FAMILIES))
def test_mtp_forward_and_statistics_equal_the_engines_formula(mtp_models, tmp_path, name):
    """reap's MTP module (after the decoder layers, batched and padded) gives the engines' normed output row for row,
    and its statistics equal the recomputation on transformers' own experts."""
    src = mtp_models(name)
    layout = derive(Checkpoint(src))
    n = layout.num_layers
    assert (layout.mtp_layers, layout.stat_layers) == (1, n + 1) and n in layout.moe
    seqs = random_sequences(_config(src)["vocab_size"], LENGTHS, seed=1)
    engine = EngineMtp(src, tmp_path / "engine")
    streamer = LayerStreamer(Checkpoint(src), layout, seqs, EngineOptions(device="cpu", dtype="float32",
                                                                            batch_tokens=96, progress=False))
    streamer.embed()
    for layer in range(n):
        streamer.run_layer(layer, None)
    acc = LayerAccumulator(layout.num_experts)
    streamer.run_mtp(0, acc)
    got = acc.to_dict()
    want = engine_stats(engine, seqs)
    for f in FIELDS:
        if f in want:
            torch.testing.assert_close(got[f], want[f], rtol=1e-4, atol=1e-5, msg=f)
    assert int(got["count"].sum()) == sum(n - 1 for n in LENGTHS) * layout.top_k
    for i, batch in enumerate(streamer.batches):  # the store holds final_norm(Y) of every real row
        out = streamer.store.get(i)
        for r, length in enumerate(batch.lengths):
            seq = batch.ids[r, :length].unsqueeze(0)
            ref, _ = engine.run(seq)
            torch.testing.assert_close(out[r, : length - 1].float(), ref[0], rtol=1e-4, atol=1e-4)
    streamer.close()


def _prune(src: Path, out: Path, *extra) -> dict:
    res = CliRunner().invoke(app, ["prune", str(src), "--out", str(out), "-q", *map(str, extra)])
    assert res.exit_code == 0, res.output
    return json.loads((out / "reap_report.json").read_text())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_pruned_mtp_module_equals_the_original_with_those_experts_removed(mtp_models, calibration_texts, tmp_path,
                                                                          name):
    """`reap prune --dataset`: the MTP layer keeps K experts chosen by its own statistics, config.json keeps its MTP
    count, transformers loads the main model (== removal in memory), the pruned MTP module's logits equal the
    original module's with the pruned experts removed, and `reap inspect` predicted the sizes written."""
    from reap.report.inspect import describe

    src = mtp_models(name)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in calibration_texts))
    predicted = describe(Checkpoint(src), ratio=0.3)
    out = tmp_path / "o"
    report = _prune(src, out, "--ratio", "0.3", "--dataset", data, "--max-length", "64", "--device", "cpu")
    config, n = _config(src), _config(src)["num_hidden_layers"]
    kept = {int(k): v["kept"] for k, v in report["layers"].items()}
    E, K = report["num_experts"], report["kept_per_layer"]
    assert n in kept and len(kept[n]) == K < E  # the MTP layer, pruned like every layer
    assert report["mtp"] == {"kept": True, "modules": 1, "layers": [n]}
    key = "mtp_num_hidden_layers" if name == "qwen3_next" else "num_nextn_predict_layers"
    assert _config(out)[key] == 1 and _config(out).get("num_hidden_layers") == n
    # its own saliency: the MTP layer's kept set is its own row's top experts (ties: the lower id), the same number
    # from each expert group where the router has groups (DeepSeek-V3)
    sal = torch.tensor(report["layers"][str(n)]["saliency"], dtype=torch.float64)
    groups = config.get("n_group") or 1
    size = E // groups
    want = sorted(e for g in range(groups) for e in sorted(range(g * size, (g + 1) * size),
                                                           key=lambda e: (-sal[e].item(), e))[: K // groups])
    assert want == kept[n]
    # the written MTP tensors: K experts, renumbered
    style, written = _style(config), Checkpoint(out)
    layer_prefix = style.layer.format(layers="model.layers.", n=n, k=0)
    experts = {int(k.split("experts.")[1].split(".")[0]) for k in written.infos
               if k.startswith(layer_prefix) and ".experts." in k and k.split("experts.")[1].split(".")[0].isdigit()}
    assert experts == set(range(K))
    # the main model == removal in memory (transformers ignores the MTP weights)
    original, small = removed_in_memory(src, out, {k: v for k, v in kept.items() if k < n})
    pruned = load_causal_lm(out, dtype=torch.float32).eval()
    ids = torch.tensor([random_sequences(config["vocab_size"], (29,), seed=3)[0]])
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, small(ids).logits, rtol=1e-4, atol=1e-4)
    # the MTP module: pruned checkpoint's (engines' formula) == the original's with those experts removed
    engine_out, engine_src = EngineMtp(out, tmp_path / "e-out"), EngineMtp(src, tmp_path / "e-src")
    big = engine_src.layer_model.state_dict()
    removed = load_causal_lm(tmp_path / "e-out", dtype=torch.float32, experts_implementation="eager",
                             config_only=_config(tmp_path / "e-out")).eval()
    state = {}
    for key_, t in removed.state_dict().items():
        b = big[key_]
        if b.shape != t.shape:
            dims = [d for d in range(b.dim()) if b.shape[d] != t.shape[d]]
            b = b.index_select(dims[0], torch.tensor(kept[n]))
        state[key_] = b
    removed.load_state_dict(state, strict=True)
    engine_src.main = small  # the original main model with its pruned experts removed, as the pruned one is
    _, want = engine_src.run(ids, model=removed)
    _, got = engine_out.run(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # inspect's prediction (MTP kept) == what prune wrote
    meta = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]
    assert meta["total_size"] == predicted["after"]["disk_bytes"] == sum(i.nbytes for i in written.infos.values())
    assert meta["total_parameters"] == predicted["after"]["total_params"]  # MTP included, as the index counts it
    assert predicted["mtp"]["kept"] and predicted["mtp"]["layers"] == [n]
    card = (out / "README.md").read_text()
    assert "Multi-token prediction | kept: 1 MTP module" in card


@pytest.mark.parametrize("name", list(FAMILIES))
def test_drop_mtp_leaves_the_module_out(mtp_models, tmp_path, name):
    """`--drop-mtp`: today's behaviour on request: no MTP tensor written, its config count 0, the rest the same
    surgery as on the checkpoint without MTP, and `reap inspect --drop-mtp` predicts the output."""
    from reap.report.inspect import describe

    src = mtp_models(name)
    plain = src.parent / f"{name}-plain"
    info = describe(Checkpoint(src), ratio=0.3, keep_mtp=False)
    with_mtp, without = tmp_path / "o", tmp_path / "plain"
    report = _prune(src, with_mtp, "--ratio", "0.3", "--method", "random", "--seed", "3", "--drop-mtp")
    _prune(plain, without, "--ratio", "0.3", "--method", "random", "--seed", "3")
    after, base = stored_tensors(with_mtp), stored_tensors(without)
    assert after.keys() == base.keys() and all(torch.equal(after[k], t) for k, t in base.items())
    key = "mtp_num_hidden_layers" if name == "qwen3_next" else "num_nextn_predict_layers"
    assert _config(with_mtp) == {**_config(without), key: 0}
    assert report["dropped_mtp_tensors"] == info["mtp"]["tensors"] > 0 and "mtp" not in report
    assert info["after"]["disk_bytes"] == sum(t.numel() * t.element_size() for t in after.values())
    assert "left out" in (with_mtp / "README.md").read_text()
    meta = json.loads((with_mtp / "model.safetensors.index.json").read_text())["metadata"]
    assert meta["total_size"] == info["after"]["disk_bytes"]
    assert meta["total_parameters"] == load_causal_lm(with_mtp).num_parameters() == info["after"]["total_params"]


def test_resume_continues_across_the_mtp_module(mtp_models, calibration_texts, tmp_path, monkeypatch):
    """An interrupt in the MTP module leaves the decoder layers' rows; --resume computes the MTP row only and the
    file equals an uninterrupted run's; prune --stats of a file without MTP rows says how to fix it."""
    from reap.calibrate.run import calibrate
    from reap.core.errors import UserError
    from reap.core.options import CalibrateOptions, DataOptions

    src = mtp_models("glm")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in calibration_texts))
    opts = CalibrateOptions(model=str(src), data=DataOptions(dataset=str(data), max_length=64),
                            out=tmp_path / "s.safetensors", engine=EngineOptions(device="cpu", dtype="float32",
                                                                                 progress=False),
                            checkpoint_every=1)
    full, _ = calibrate(CalibrateOptions(**{**opts.__dict__, "out": None}))
    n = _config(src)["num_hidden_layers"]
    assert full.num_layers == n + 1 and full.completed == set(range(n + 1))
    original = LayerStreamer.run_mtp

    def interrupted(self, k, accumulator=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(LayerStreamer, "run_mtp", interrupted)
    with pytest.raises(KeyboardInterrupt):
        calibrate(opts)
    assert ExpertStats.load(opts.out).completed == set(range(n))
    monkeypatch.setattr(LayerStreamer, "run_mtp", original)
    resumed, summary = calibrate(CalibrateOptions(**{**opts.__dict__, "resume": True}))
    assert summary["layers"] == 1 and summary["layers_run"] == 1  # from the hidden states after layer n - 1
    for f in FIELDS:
        torch.testing.assert_close(getattr(resumed, f), getattr(full, f), rtol=1e-9, atol=0)
    # a stats file made with --drop-mtp: pruning with the module kept says what to do
    dropped = tmp_path / "dropped.safetensors"
    calibrate(CalibrateOptions(**{**opts.__dict__, "out": dropped, "drop_mtp": True}))
    res = CliRunner().invoke(app, ["prune", str(src), "--out", str(tmp_path / "o"), "--ratio", "0.3", "--stats",
                                   str(dropped), "-q"])
    assert res.exit_code == 2 and "--drop-mtp" in res.output and "MTP" in res.output, res.output
    assert not (tmp_path / "o").exists()
    with pytest.raises(UserError, match="--drop-mtp"):
        calibrate(CalibrateOptions(**{**opts.__dict__, "out": dropped, "resume": True}))


def test_inspect_families_says_mtp_is_kept():
    res = CliRunner().invoke(app, ["inspect", "--families"])
    assert res.exit_code == 0, res.output
    last = res.output.strip().splitlines()[-1]
    assert "MTP" in last and "kept" in last and "--drop-mtp" in last and "mtp.layers.k." in last


def test_eval_of_a_model_with_mtp_is_the_main_models_loss(mtp_models, calibration_texts, tmp_path):
    """`reap eval` streams the main model only: the same loss with and without the MTP module on disk."""
    from reap.evaluate import evaluate
    from reap.core.options import EvalOptions

    src = mtp_models("glm")
    data = tmp_path / "e.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in calibration_texts))
    engine = EngineOptions(device="cpu", dtype="float32", progress=False)
    quiet = lambda _m: None  # noqa: E731
    with_mtp = evaluate(EvalOptions(str(src), str(data), 512, 64, engine), log=quiet)["loss"]
    without = evaluate(EvalOptions(str(src.parent / "glm-plain"), str(data), 512, 64, engine), log=quiet)["loss"]
    assert with_mtp == pytest.approx(without, rel=1e-6)
