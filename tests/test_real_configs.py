"""Released checkpoints as people download them (issue 13): tiny checkpoints built with the exact config.json of
real releases (../shared/real-configs: only the sizes shrunk; every other field and quirk verbatim) and their tensor
names, pruned and calibrated end to end through the CLI.

Each test names the release it stands for. The general guard runs on every output here: config.json differs from
the input's in the expert-count keys (and documented MTP keys) only (helpers.assert_config_changed_only_in_counts).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import add_tensors, assert_config_changed_only_in_counts, load_causal_lm, tiny_release
from typer.testing import CliRunner

from reap.cli import app

pytestmark = pytest.mark.slow  # the released configs as tiny checkpoints, end to end: ~1 minute

# DeepSeek-V3 shaped releases (Kimi-K2, DeepSeek-R1): the sizes that make them tiny, every other field as released
DEEPSEEK_TINY = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=32, qk_nope_head_dim=16,
                     qk_rope_head_dim=8, v_head_dim=16, vocab_size=258, bos_token_id=256, eos_token_id=256)
KIMI_TINY = dict(DEEPSEEK_TINY, n_routed_experts=16)  # released: 384 experts, top-8, layer 0 dense
GPT_OSS_TINY = dict(hidden_size=64, intermediate_size=32, num_hidden_layers=2, layer_types=["sliding_attention",
                    "full_attention"], num_local_experts=8, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    vocab_size=258, eos_token_id=256, pad_token_id=257, sliding_window=8)
QWEN3_NEXT_TINY = dict(hidden_size=64, intermediate_size=48, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32, num_hidden_layers=4, num_experts=16, num_experts_per_tok=4,
                       head_dim=16, num_attention_heads=4, num_key_value_heads=2, linear_key_head_dim=32,
                       linear_value_head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, vocab_size=258,
                       bos_token_id=256, eos_token_id=256)


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("real-data") / "calib.jsonl"
    docs = [f"def f{i}(x, y):\n    return x * {i} + y ** {i % 3}  # {'abc' * i}\n" * (2 + i % 4) for i in range(24)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def _release(real_configs: Path, name: str) -> Path:
    path = real_configs / name / "config.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent from the shared real configs")
    return path


def _inv_freq_per_layer(path: Path, config: dict) -> dict[str, torch.Tensor]:
    """Kimi-K2 as released stores its rotary frequencies in every layer (old remote code saved the buffer)."""
    dim = config["qk_rope_head_dim"]
    inv = 1.0 / (config["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    return {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv.to(torch.bfloat16)
            for i in range(config["num_hidden_layers"])}


@pytest.fixture(scope="module")
def kimi(real_configs, tmp_path_factory) -> Path:
    """Kimi-K2-Instruct as released: model_type kimi_k2 with auto_map to remote code, FP8 blocks, legacy yarn
    rope_scaling + rope_theta, and self_attn.rotary_emb.inv_freq stored in every layer."""
    path = tiny_release(_release(real_configs, "Kimi-K2-Instruct"), tmp_path_factory.mktemp("kimi") / "Kimi-K2-Instruct",
                        KIMI_TINY, fmt="fp8")
    config = _config(path)
    assert config["model_type"] == "kimi_k2" and "auto_map" in config and config["rope_scaling"]["type"] == "yarn"
    add_tensors(path, _inv_freq_per_layer(path, config), "model-rotary.safetensors")
    return path


# -- item 1: a calibrated prune changes config.json in the expert count only ----------------------------------------
@pytest.mark.parametrize("release, shrink, fmt", [
    ("gpt-oss-20b", GPT_OSS_TINY, "mxfp4"),  # rope_theta was written into rope_scaling
    ("DeepSeek-R1", dict(DEEPSEEK_TINY, n_routed_experts=32, first_k_dense_replace=1), "fp8"),  # rope_type added
])
def test_calibrated_prune_keeps_the_released_config(real_configs, tmp_path, data, release, shrink, fmt):
    src = tiny_release(_release(real_configs, release), tmp_path / release, shrink, fmt=fmt)
    before = (src / "config.json").read_bytes()
    out = tmp_path / "out"
    res = cli("prune", src, "--out", out, "--ratio", "0.25", "--dataset", data, "--max-length", "64", "--device", "cpu",
              "-q")
    assert res.exit_code == 0, res.output
    assert (src / "config.json").read_bytes() == before  # the input untouched
    assert_config_changed_only_in_counts(src, out)
    config = _config(out)
    assert config["rope_scaling"] == json.loads(before)["rope_scaling"] and "rope_parameters" not in config


# -- item 2: Kimi-K2 as released calibrates and prunes, its inv_freq tensors kept -----------------------------------
def test_kimi_k2_as_released_calibrates_and_prunes(kimi, tmp_path, data):
    from safetensors import safe_open

    from reap.io.checkpoint import Checkpoint
    from reap.model.derive import derive

    layout = derive(Checkpoint(kimi))
    inv = [n for n in layout.roles if n.endswith("rotary_emb.inv_freq")]
    assert len(inv) == 2 and all(layout.roles[n].kind == "other" and layout.roles[n].model is None for n in inv)
    out = tmp_path / "Kimi-K2-REAP"
    res = cli("prune", kimi, "--out", out, "--ratio", "0.25", "--dataset", data, "--max-length", "64", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "1 MoE layer " in res.stderr and "layers)" not in res.stderr  # item 5: "in 1 layers"
    assert_config_changed_only_in_counts(kimi, out)
    report = json.loads((out / "reap_report.json").read_text())
    assert report["calibration"]["tokens"] > 0 and list(report["layers"]) == ["1"]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for name in inv:  # copied byte for byte, not loaded
        with safe_open(str(kimi / "model-rotary.safetensors"), "pt") as a, safe_open(str(out / index[name]), "pt") as b:
            assert torch.equal(a.get_tensor(name), b.get_tensor(name))
    assert (out / "configuration_deepseek.py").exists() is False  # the tiny release carries no remote code files
    assert json.loads((out / "config.json").read_text())["n_routed_experts"] == 12


def test_kimi_k2_tokenizer_loads_or_says_what_helps(kimi, tmp_path):
    """transformers' AutoTokenizer builds kimi_k2's config as a generic PreTrainedConfig, which breaks on the legacy
    yarn fields (AttributeError max_position_embeddings): reap hands it DeepSeek-V3's config. A tokenizer that is the
    model's own code says --trust-remote-code; one whose code needs a missing package says which."""
    import shutil

    from reap.data.tokens import load_tokenizer
    from reap.core.errors import UserError

    from transformers import AutoTokenizer

    with pytest.raises(AttributeError, match="max_position_embeddings"):  # what reap did before: transformers alone
        AutoTokenizer.from_pretrained(str(kimi), local_files_only=True)
    tok = load_tokenizer(kimi, config=_config(kimi))
    assert len(tok("def f")["input_ids"]) == 5  # byte-level: one token per byte
    remote = tmp_path / "kimi-remote"
    shutil.copytree(kimi, remote)
    (remote / "tokenizer.json").unlink()
    (remote / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "TikTokenTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer",
                                                                               None]}}))
    (remote / "tokenization_kimi.py").write_text("import tiktoken  # as the release's tokenizer\n")
    with pytest.raises(UserError, match="--trust-remote-code") as err:
        load_tokenizer(remote, config=_config(remote))
    assert "\n" not in str(err.value) and "max_position_embeddings" not in str(err.value)
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install tiktoken"):
            load_tokenizer(remote, trust_remote_code=True, config=_config(remote))


# -- item 3: Qwen3-Next without mtp_num_hidden_layers ------------------------------------------------------------
def test_qwen3_next_release_drops_mtp_on_request_without_adding_keys(real_configs, tmp_path):
    """--drop-mtp (the MTP module here has experts and a router but no attention: incomplete unless dropped)."""
    src = tiny_release(_release(real_configs, "Qwen3-Next-80B-A3B-Instruct"), tmp_path / "Qwen3-Next", QWEN3_NEXT_TINY)
    config = _config(src)
    assert "mtp_num_hidden_layers" not in config
    # the release's MTP module (mtp.*): its own experts and router, in the last shard, shards named -of-N
    H, E = config["hidden_size"], config["num_experts"]
    g = torch.Generator().manual_seed(3)
    mtp = {"mtp.fc.weight": torch.randn(H, 2 * H, generator=g), "mtp.norm.weight": torch.ones(H),
           "mtp.layers.0.mlp.gate.weight": torch.randn(E, H, generator=g)}
    for e in range(E):
        for part, shape in (("gate_proj", (32, H)), ("up_proj", (32, H)), ("down_proj", (H, 32))):
            mtp[f"mtp.layers.0.mlp.experts.{e}.{part}.weight"] = torch.randn(*shape, generator=g)
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards) + 1
    renamed = {s: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, s in enumerate(shards)}
    for old, new in renamed.items():
        (src / old).rename(src / new)
    index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    add_tensors(src, mtp, f"model-{n:05d}-of-{n:05d}.safetensors")
    kept = cli("inspect", src, "--ratio", "0.25")  # kept by default: an incomplete module is refused in one line
    assert kept.exit_code == 2 and "mtp.layers.0" in kept.output and "--drop-mtp" in kept.output, kept.output
    info = json.loads(cli("inspect", src, "--ratio", "0.25", "--drop-mtp", "--json").stdout)
    assert info["mtp"]["tensors"] == len(mtp)
    text = cli("inspect", src, "--ratio", "0.25", "--drop-mtp").stdout
    assert "points of it the multi-token-prediction module left out" in text  # item 5: the "% fewer" says so
    out = tmp_path / "out"
    res = cli("prune", src, "--out", out, "--ratio", "0.25", "--method", "random", "--drop-mtp", "-q")
    assert res.exit_code == 0, res.output
    assert_config_changed_only_in_counts(src, out)
    assert "mtp_num_hidden_layers" not in _config(out)
    written = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(k.startswith("mtp.") for k in written)
    names = sorted(set(written.values()))
    assert names == [f"model-{i:05d}-of-{n - 1:05d}.safetensors" for i in range(1, n)]  # item 5: no gap in the names
    assert sorted(p.name for p in out.glob("*.safetensors")) == names
    model, loading = load_causal_lm(out, dtype=torch.float32, output_loading_info=True)
    assert not any(loading.values()), loading


# -- item 4: every kept layer dense ---------------------------------------------------------------------------------
def test_all_dense_layers_say_so(real_configs, tmp_path):
    """DeepSeek-R1 cut to its first two layers (first_k_dense_replace 3 as released): no layer has experts."""
    src = tiny_release(_release(real_configs, "DeepSeek-R1"), tmp_path / "DeepSeek-R1-2-layers",
                       dict(DEEPSEEK_TINY, n_routed_experts=32))
    assert _config(src)["first_k_dense_replace"] == 3
    for args in (["prune", src, "--out", tmp_path / "out", "--ratio", "0.25", "--method", "random"], ["inspect", src]):
        res = cli(*args)
        assert res.exit_code == 2 and "Traceback" not in res.output
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "no decoder layer of this checkpoint has experts" in lines[0], res.stderr
        assert "router tensor" not in lines[0]
    assert not (tmp_path / "out").exists()


# -- item 5: help and wording ----------------------------------------------------------------------------------------
def test_help_texts_and_metavars():
    """`--keep` shows its JSON shape (rich markup ate `[kept expert ids]`); calibrate's --seed does not mention
    --method random; every command names its model MODEL the same way; flags show no <bool> type."""
    env = {"COLUMNS": "200", "TERMINAL_WIDTH": "200"}
    texts = {c: CliRunner().invoke(app, [c, "--help"], env=env).stdout for c in
             ("prune", "calibrate", "eval", "report", "inspect", "demo")}
    assert '{"<layer>": [kept expert ids]}' in texts["prune"]
    seed = next(line for line in texts["calibrate"].splitlines() if line.lstrip("│ ").startswith("--seed"))
    assert "--method" not in seed and "Seed for --shuffle." in seed
    for command in ("prune", "calibrate", "eval", "inspect"):
        assert f" {command} [OPTIONS] [MODEL]" in texts[command], texts[command][:300]
    assert all("<bool>" not in t for t in texts.values())
    assert all("--json" in t for t in texts.values())


def test_stats_file_mode_follows_the_umask(tiny_fp32, tmp_path, data):
    out = tmp_path / "s.safetensors"
    old = os.umask(0o022)
    try:
        res = cli("calibrate", tiny_fp32, "--dataset", data, "--out", out, "--max-length", "32", "--samples", "4",
                  "--device", "cpu", "-q")
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_many_missing_shards_are_all_counted(tiny_fp32, tmp_path):
    import shutil

    model = tmp_path / "partial"
    shutil.copytree(tiny_fp32, model)
    shards = sorted(set(json.loads((model / "model.safetensors.index.json").read_text())["weight_map"].values()))
    for s in shards[5:]:
        (model / s).unlink()
    res = cli("inspect", model)
    assert res.exit_code == 2
    assert f"{len(shards) - 5} of the {len(shards)} shards" in res.stderr and shards[5] in res.stderr
    assert "more" in res.stderr


def test_inspect_units_and_active_convention(tiny_fp32):
    text = cli("inspect", tiny_fp32, "--ratio", "0.25").stdout
    assert "MiB on disk" in text and "0.00 GiB" not in text
    assert "without the embedding and LM-head tables" in text


def test_card_wording(tiny_fp32, tmp_path):
    out = tmp_path / "o"
    assert cli("prune", tiny_fp32, "--out", out, "--ratio", "0.25", "--method", "random", "-q").exit_code == 0
    card = (out / "README.md").read_text()
    assert "by reap (random)" not in card and "chosen at random (a baseline)" in card
    assert "keeps 12 of its 16 experts" in card


# -- item 6: no FutureWarning from transformers -------------------------------------------------------------------
def test_calibration_raises_no_future_or_deprecation_warning(tiny_fp32, data):
    from reap.calibrate.run import calibrate
    from reap.core.options import CalibrateOptions, DataOptions, EngineOptions

    opts = CalibrateOptions(model=str(tiny_fp32), data=DataOptions(dataset=str(data), samples=6, max_length=48),
                            engine=EngineOptions(device="cpu", dtype="float32", progress=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calibrate(opts, log=lambda _m: None)
    bad = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
           and ("transformers" in str(w.filename) or "reap" in str(w.filename) or "past_key_values" in str(w.message))]
    assert not bad, [f"{w.filename}:{w.lineno}: {w.message}" for w in bad]


# -- item 7: first-run edges -------------------------------------------------------------------------------------------
def test_skip_reason_says_where_the_fixtures_come_from(monkeypatch, tmp_path):
    import conftest

    monkeypatch.setattr(conftest, "SHARED", tmp_path / "no-shared")
    with pytest.raises(pytest.skip.Exception) as skipped:
        conftest._shared("fixtures/mini-m2")
    reason = str(skipped.value)
    assert "README.md" in reason and "not part of the repository" in reason and "../shared" in reason


def _run(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "reap", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300, **kw)


def test_progress_in_a_log_file_is_plain_lines(tiny_fp32, tmp_path, data):
    """stderr to a file: no bars, no cursor codes, no carriage returns; a line per layer, and the tokenizing said."""
    res = _run("calibrate", tiny_fp32, "--dataset", data, "--out", tmp_path / "s.safetensors", "--max-length", "48",
               "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert "\x1b[" not in res.stderr and "\r" not in res.stderr
    assert "tokenizing 24 records" in res.stderr and "tokenized 24 records" in res.stderr
    assert sum(1 for line in res.stderr.splitlines() if line.startswith("layers: ")) == 3
    res = _run("prune", tiny_fp32, "--out", tmp_path / "o", "--ratio", "0.25", "--method", "random")
    assert res.returncode == 0 and "\r" not in res.stderr and "\x1b[" not in res.stderr
    assert "MiB" in res.stderr and "verifying the output" in res.stderr


def test_every_command_has_the_same_json(tiny_fp32, tmp_path, data):
    """--json: the result as one JSON object on stdout; without it, human text (not JSON)."""
    stats = tmp_path / "s.safetensors"
    out = tmp_path / "o"
    runs = {
        "calibrate": ["calibrate", tiny_fp32, "--dataset", data, "--out", stats, "--max-length", "32", "--samples", "4",
                      "--device", "cpu", "-q", "--overwrite"],
        "prune": ["prune", tiny_fp32, "--out", out, "--ratio", "0.25", "--stats", stats, "-q"],
        "eval": ["eval", out, "--dataset", data, "--max-tokens", "64", "--seq-len", "32", "--device", "cpu", "-q"],
        "report": ["report", out],
        "inspect": ["inspect", tiny_fp32],
    }
    for command, args in runs.items():
        res = cli(*args, "--json")
        assert res.exit_code == 0, (command, res.output)
        result = json.loads(res.stdout)
        assert isinstance(result, dict) and result, command
        if command == "prune":
            assert result["out"] == str(out.resolve()) and result["experts_after"] == 12
            assert_config_changed_only_in_counts(tiny_fp32, out)
            import shutil

            shutil.rmtree(out)
        human = cli(*args)
        assert human.exit_code == 0, (command, human.output)
        with pytest.raises(ValueError):
            json.loads(human.stdout)


def test_hub_id_is_logged_as_org_name(tiny_fp32, tmp_path):
    """A model from the Hugging Face cache is named org/name in the log, not by its snapshot hash."""
    import shutil

    hub = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-moe"
    snapshot = hub / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_fp32, snapshot)
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text(snapshot.name)
    res = _run("prune", "tiny-org/tiny-moe", "--out", tmp_path / "o", "--ratio", "0.25", "--method", "random",
               env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr
    assert "pruning tiny-org/tiny-moe:" in res.stderr and snapshot.name not in res.stderr


def test_heatmap_pruned_grey_is_far_from_every_kept_colour():
    import numpy as np
    from matplotlib import colormaps

    from reap.report import KEPT_CMAP, pruned_cmap

    kept = colormaps[KEPT_CMAP](np.linspace(0, 1, 256))[:, :3]
    grey = pruned_cmap()(np.linspace(0, 1, 64))[:, :3]
    distance = np.sqrt(((grey[:, None, :] - kept[None, :, :]) ** 2).sum(-1)).min()
    assert distance > 0.2, distance
    luminance = grey @ np.array([0.2126, 0.7152, 0.0722])
    assert luminance.min() > 0.35  # no pruned cell darker than this, however low its score
