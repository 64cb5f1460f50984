"""The support matrix: every MoE model type of the installed transformers, end to end on a tiny checkpoint.

For each model type (``reap.model.moe_types``): a tiny random checkpoint saved by transformers in several shards;
the statistics reap's streamer gathers (padded batches) == hooks on transformers' own experts on the same batches
(fp32), and every layer after the first of its kind, loaded by the recipe learned from transformers' own load
(``reap.stream.load_recipe``), == transformers' loader's result bit for bit; ``reap prune --ratio 0.3 --method random``
writes a checkpoint whose every tensor is a source tensor byte for byte (kept experts renumbered, router rows and
biases sliced, expert-id tables renumbered), that transformers loads with no missing or unexpected weights, whose
logits equal the original model's with the pruned experts removed in memory, and whose config.json differs only in the expert-count keys; and ``reap eval`` equals
transformers' own loss. The outcome of every type is compared with ``src/reap/families.json`` (what
``reap inspect --families`` and the README show); ``REAP_UPDATE_FAMILIES=1`` rewrites that file instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import (assert_exact_surgery, assert_recipe_load_equals_transformers, hooked_stats, load_causal_lm,
                     random_sequences, removed_in_memory)
from typer.testing import CliRunner

from reap.model import moe_types
from reap.io.checkpoint import Checkpoint
from reap.cli import app
from reap.model.derive import derive
from reap.model.families import MATRIX_NAME, load_matrix, markdown_table
from reap.core.options import EngineOptions
from reap.calibrate.stats import FIELDS, LayerAccumulator
from reap.stream.streamer import LayerStreamer

pytestmark = pytest.mark.slow  # every MoE model type of transformers end to end: ~2 minutes on 2 cores

TYPES = moe_types.moe_model_types()
LENGTHS = (23, 17, 9, 30)  # two padded batches of two at 64 tokens per batch
OUTCOMES: dict[str, dict] = {}


def _layout_text(layout) -> str:
    kinds = {r.kind for r in layout.roles.values() if r.part == "experts"}
    storage = "per-expert tensors" if "expert" in kinds else "fused [E, ...] tensors"
    keys = ", ".join(".".join(k) for k in layout.count_keys)
    extras = []
    if layout.n_group > 1:
        extras.append(f"{layout.n_group} expert groups")
    if any(m.id_tables for m in layout.moe.values()):
        extras.append("expert-id tables renumbered")
    return f"{storage} on disk as {layout.model_class}; count in {keys}" + (f"; {', '.join(extras)}" if extras else "")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("matrix-data") / "eval.jsonl"
    path.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 3}) + "\n"
                            for i in range(6)))
    return path


def _known(model_type: str) -> bool:
    """The matrix lists the type (its outcome is checked strictly); else it is new to reap (a newer transformers)."""
    return model_type in load_matrix()["model_types"]


def _refused_by_reap(model_type: str, src: Path, text_file: Path, tmp_path: Path) -> str | None:
    """A model type the matrix does not know yet, run as a user would (`reap prune --dataset`, the default
    criterion): the one line reap refused it with (exit 2, nothing published), or None where it pruned (then every
    strict check below must hold: reap published an output). A traceback fails."""
    out = tmp_path / "first-run"
    res = CliRunner().invoke(app, ["prune", str(src), "--out", str(out), "--ratio", "0.3", "--dataset",
                                   str(text_file), "--device", "cpu", "--dtype", "float32", "--batch-tokens", "64",
                                   "-q"])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception  # a traceback for a model type: CI fails
    if res.exit_code == 0:
        return None
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and lines and lines[-1].startswith("reap: error:"), res.output
    assert not out.exists(), "a refused run published an output"
    return lines[-1].removeprefix("reap: error:").strip().replace(str(tmp_path), "...")


@pytest.mark.parametrize("model_type", TYPES)
def test_model_type_end_to_end(model_type, tmp_path, text_file):
    """Every type the matrix knows: its recorded outcome, strictly. A type it does not know yet (a newer
    transformers): reap either refuses it in one line (its layout, its run-time self-check) or every check holds;
    CI fails only where reap publishes a wrong output or a traceback."""
    if model_type in moe_types.UNSUPPORTED:
        OUTCOMES[model_type] = {"status": "unsupported", "reason": moe_types.UNSUPPORTED[model_type]}
        pytest.skip(moe_types.UNSUPPORTED[model_type])
    from reap.core.errors import UserError
    from reap.testing.tiny import make_tiny_model

    known = _known(model_type)
    try:
        src = make_tiny_model(tmp_path / "src", family=model_type, seed=0)  # derives the layout to shape the weights
    except UserError as err:  # a layout reap cannot prune: the matrix records why
        OUTCOMES[model_type] = {"status": "unsupported", "reason": str(err).replace(str(tmp_path), "...")}
        pytest.skip(str(err))
    except Exception as err:  # noqa: BLE001 - the test's tiny config, not reap: a new type may need a shape
        if known:
            raise
        pytest.skip(f"no tiny checkpoint of the new type {model_type} ({type(err).__name__}: {err}); add its shape "
                    "to OVERRIDES in src/reap/testing/tiny_configs.py")
    if not known:
        why = _refused_by_reap(model_type, src, text_file, tmp_path)
        if why is not None:
            OUTCOMES[model_type] = {"status": "unsupported", "reason": why}
            pytest.skip(f"reap refuses the new type {model_type}: {why}")
    ckpt = Checkpoint(src)
    try:
        layout = derive(ckpt)
    except UserError as err:
        OUTCOMES[model_type] = {"status": "unsupported", "reason": str(err).replace(str(tmp_path), "...")}
        pytest.skip(str(err))
    assert layout.moe_layers and layout.num_experts >= 4

    # statistics == hooks on transformers' experts, on the same padded batches
    seqs = random_sequences(250, LENGTHS)
    streamer = LayerStreamer(ckpt, layout, seqs, EngineOptions(device="cpu", dtype="float32", batch_tokens=64,
                                                               progress=False))
    groups, start = [], 0
    for b in streamer.batches:
        groups.append(list(range(start, start + len(b.lengths))))
        start += len(b.lengths)
    assert any(b.padded for b in streamer.batches)
    want = hooked_stats(src, seqs, batches=groups)
    streamer.embed()
    for layer in range(layout.num_layers):
        acc = LayerAccumulator(layout.num_experts)
        streamer.run_layer(layer, acc)
        got = acc.to_dict()
        for f in FIELDS:
            torch.testing.assert_close(got[f], want[f][layer], rtol=1e-4, atol=1e-5, msg=f"layer {layer} {f}")
    # every later layer of a kind is loaded by the recipe learned from transformers' load of the first: bit for bit
    # what transformers' loader gives
    used = [assert_recipe_load_equals_transformers(streamer, layer) for layer in range(1, layout.num_layers)]
    assert any(used), "no layer loads by a recipe: every layer goes through transformers' slower loader"
    streamer.close()

    # prune: exact surgery, transformers loads it, logits == removal in memory, config changes in the counts only
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["prune", str(src), "--out", str(out), "--ratio", "0.3", "--method", "random",
                                   "--seed", "1", "-q"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "reap_report.json").read_text())
    kept = {int(k): v["kept"] for k, v in report["layers"].items()}
    remap = {int(k): v for k, v in report.get("id_remap", {}).items()}
    assert_exact_surgery(src, out, kept, remap)
    original, small = removed_in_memory(src, out, kept, remap)
    pruned, info = load_causal_lm(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    ids = torch.randint(0, 250, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, small(ids).logits, rtol=1e-5, atol=1e-5)
    before, after = (json.loads((p / "config.json").read_text()) for p in (src, out))
    k = len(next(iter(kept.values())))
    for path in layout.count_keys:
        node = before
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = k
    assert after == before

    # streamed eval == transformers' own loss on the same windows
    res = CliRunner().invoke(app, ["eval", str(src), "--dataset", str(text_file), "--max-tokens", "200", "--seq-len",
                                   "48", "--device", "cpu", "--dtype", "float32", "-q", "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    from reap.data.tokens import load_tokenizer
    from reap.evaluate import eval_stream, windows

    tok = load_tokenizer(src)
    stream, _ = eval_stream(str(text_file), tok, tok.eos_token_id, 201)
    inputs, targets = windows(stream, 48, 200)
    total = 0.0
    with torch.no_grad():
        for inp, tgt in zip(inputs, targets):
            logits = original(torch.tensor([inp])).logits[0].float()
            total += torch.nn.functional.cross_entropy(logits, torch.tensor(tgt), reduction="sum").item()
    assert result["loss"] == pytest.approx(total / result["tokens"], rel=1e-5)
    OUTCOMES[model_type] = {"status": "verified", "layout": _layout_text(layout)}


def test_the_matrix_file_and_the_readme_say_what_the_tests_found():
    """Run last: families.json records every outcome above (REAP_UPDATE_FAMILIES=1 writes it), README holds its table."""
    import transformers

    if not OUTCOMES:
        pytest.skip("no model type was checked in this run")
    path = Path(__file__).resolve().parents[1] / "src" / "reap" / MATRIX_NAME
    if os.environ.get("REAP_UPDATE_FAMILIES") == "1":
        path.write_text(json.dumps({"transformers": transformers.__version__,
                                    "model_types": dict(sorted(OUTCOMES.items()))}, indent=1) + "\n")
    matrix = load_matrix()
    if matrix["transformers"] != transformers.__version__:
        pytest.skip(f"the matrix was made with transformers {matrix['transformers']}, this is {transformers.__version__}")
    for model_type, outcome in OUTCOMES.items():
        assert matrix["model_types"].get(model_type) == outcome, (model_type, outcome)
    if set(OUTCOMES) == set(TYPES):
        assert set(matrix["model_types"]) == set(TYPES)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert markdown_table(matrix) in readme, "README's support table is stale: paste reap.model.families.markdown_table()"


def test_inspect_families_lists_the_matrix():
    """`reap inspect --families` shows every model type of the installed transformers and of the matrix, each
    verified (with its layout) or not (with the reason)."""
    import transformers

    res = CliRunner().invoke(app, ["inspect", "--families", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    matrix = load_matrix()
    assert {r["model_type"] for r in rows} == set(TYPES) | set(matrix["model_types"])
    for r in rows:
        assert r["status"] in ("verified", "unsupported", "not checked")
        assert r.get("layout") if r["status"] == "verified" else r.get("reason")
    if matrix["transformers"] == transformers.__version__:
        assert all(r["status"] != "not checked" for r in rows)
    text = CliRunner().invoke(app, ["inspect", "--families"]).stdout
    assert "verified" in text and all(r["model_type"] in text for r in rows)
    bad = CliRunner().invoke(app, ["inspect", "--families", "--ratio", "0.3"])
    assert bad.exit_code == 2 and "takes no model" in bad.output
