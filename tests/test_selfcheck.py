"""The run-time self-check (:mod:`reap.stream.selfcheck`): reap's reading of the experts against transformers' own code on
the first batch of every kind of MoE layer, before any statistic is trusted.

Each failure mode is produced by a deliberately wrong piece of reap (patched in the test) on a real tiny model, and
the run must stop in one line naming the model type; the right reading passes and records what it checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import reap.stream.experts
from reap.cli import app


@pytest.fixture(scope="module")
def ergo(tmp_path_factory) -> Path:
    """A tiny ERGO: its experts class calls the dispatched projections one route per row with weight 1 and applies a
    per-expert RMSNorm and the routing weights outside them."""
    from reap.testing.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("selfcheck") / "ergo", family="ergo", seed=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("selfcheck-data") / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i * i}\n" * (1 + i % 3)}) + "\n"
                            for i in range(8)))
    return path


def _calibrate(model: Path, data: Path, out: Path):
    return CliRunner().invoke(app, ["calibrate", str(model), "--dataset", str(data), "--out", str(out), "--device",
                                    "cpu", "--dtype", "float32", "--batch-tokens", "96", "--greedy-tokens", "0", "-q"])


def _one_line_refusal(res, *needles: str) -> str:
    assert res.exit_code == 2, res.output
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), res.exception
    errors = [line for line in res.output.splitlines() if line.startswith("reap: error:")]
    assert len(errors) == 1 and "Traceback" not in res.output, res.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_ergo_read_inside_the_dispatch_is_stopped(ergo, data, tmp_path, monkeypatch):
    """Without reading ERGO's experts at the module the block calls, reap would see g = 1 and f before the norm on
    rows of the module's own (each route a row) while its output is still right: the terms check stops it."""
    monkeypatch.setattr(reap.stream.experts, "is_wrapped", lambda module: False)
    res = _calibrate(ergo, data, tmp_path / "stats.safetensors")
    _one_line_refusal(res, "self-check", "'ergo'", "rows")


def test_ergo_read_at_the_block_passes_and_matches_transformers(ergo, data, tmp_path):
    from helpers import hooked_stats, random_sequences

    from reap.io.checkpoint import Checkpoint
    from reap.model.derive import derive
    from reap.core.options import EngineOptions
    from reap.calibrate.stats import FIELDS, LayerAccumulator
    from reap.stream.streamer import LayerStreamer

    ckpt = Checkpoint(ergo)
    layout = derive(ckpt)
    seqs = random_sequences(250, (23, 17, 9, 30))
    streamer = LayerStreamer(ckpt, layout, seqs, EngineOptions(device="cpu", dtype="float32", batch_tokens=64,
                                                               progress=False, greedy_tokens=0))
    groups, start = [], 0
    for b in streamer.batches:
        groups.append(list(range(start, start + len(b.lengths))))
        start += len(b.lengths)
    want = hooked_stats(ergo, seqs, batches=groups)
    streamer.embed()
    try:
        for layer in range(layout.num_layers):
            acc = LayerAccumulator(layout.num_experts)
            streamer.run_layer(layer, acc)
            for f in FIELDS:
                torch.testing.assert_close(acc.to_dict()[f], want[f][layer], rtol=1e-4, atol=1e-5)
        results = streamer.selfcheck.results
    finally:
        streamer.close()
    # one kind of MoE layer: checked once, on its first layer, both errors at float32 rounding
    assert [r["layer"] for r in results] == [layout.moe_layers[0]]
    assert results[0]["rows"] > 0 and results[0]["output_error"] < 1e-5 and results[0]["terms_error"] < 1e-5


def test_wrong_routing_weights_in_the_statistics_are_stopped(tiny_fp32, data, tmp_path, monkeypatch):
    """A deliberately wrong experts implementation that hands the statistics twice the weight the model applies."""
    record = reap.stream.experts._record

    def wrong(probe, T, token, ids, gate, y):
        record(probe, T, token, ids, gate * 2, y)

    monkeypatch.setattr(reap.stream.experts, "_record", wrong)
    out = tmp_path / "stats.safetensors"
    res = _calibrate(tiny_fp32, data, out)
    _one_line_refusal(res, "self-check", "'minimax_m2'", "weight or the output")


def test_wrong_expert_outputs_are_stopped(tiny_fp32, data, tmp_path, monkeypatch):
    """A deliberately wrong experts implementation whose outputs differ from transformers' own."""
    outputs = reap.stream.experts.expert_outputs
    monkeypatch.setattr(reap.stream.experts, "expert_outputs", lambda *a, **k: outputs(*a, **k) * 1.5)
    res = _calibrate(tiny_fp32, data, tmp_path / "stats.safetensors")
    _one_line_refusal(res, "self-check", "differs from transformers'")


def test_padding_counted_as_traffic_is_stopped(tiny_fp32, monkeypatch):
    """A deliberately wrong implementation that counts the padded rows of a batch as routed tokens."""
    from helpers import random_sequences

    from reap.io.checkpoint import Checkpoint
    from reap.model.derive import derive
    from reap.core.errors import UserError
    from reap.core.options import EngineOptions
    from reap.calibrate.stats import LayerAccumulator
    from reap.stream.streamer import LayerStreamer

    forward = reap.stream.experts.reap_experts_forward

    def no_mask(self, *args):
        probe = getattr(self, "_reap_probe", None)
        if probe is not None:
            probe.token_mask = None
        return forward(self, *args)

    ckpt = Checkpoint(tiny_fp32)
    layout = derive(ckpt)
    streamer = LayerStreamer(ckpt, layout, random_sequences(250, (23, 17, 9, 30)),
                             EngineOptions(device="cpu", dtype="float32", batch_tokens=64, progress=False,
                                           greedy_tokens=0))
    assert streamer.batches[0].padded
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(reap.stream.experts.IMPLEMENTATION, no_mask)
    try:
        streamer.embed()
        with pytest.raises(UserError, match=r"self-check failed for model type 'minimax_m2'.*pairs"):
            for layer in range(layout.num_layers):
                streamer.run_layer(layer, LayerAccumulator(layout.num_experts))
    finally:
        ExpertsInterface.register(reap.stream.experts.IMPLEMENTATION, forward)
        streamer.close()
