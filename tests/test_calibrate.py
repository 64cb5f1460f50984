"""The layer streamer and calibration statistics, checked against transformers' own modeling code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import (assert_reference_outputs, calibrate_one_and_two_ranks, feed_reference_inputs, hooked_stats,
                     python_snippets, random_sequences, reference_layers)

from reap.calibrate.run import calibrate
from reap.io.checkpoint import Checkpoint
from reap.model.derive import derive
from reap.stream.hidden import make_batches
from reap.core.options import CalibrateOptions, DataOptions, EngineOptions
from reap.calibrate.stats import FIELDS, ExpertStats, LayerAccumulator
from reap.stream.streamer import LayerStreamer

LENGTHS = (23, 40, 7, 31)


def _sequences(vocab: int, seed: int = 0) -> list[list[int]]:
    return random_sequences(vocab, LENGTHS, seed)


@pytest.mark.parametrize("dtype,fixture,atol", [(torch.float32, "tiny_fp32", 1e-5), (torch.bfloat16, "tiny_bf16", 2e-2)])
@pytest.mark.parametrize("batch_tokens", [1, 4096])  # one sequence per batch, and padded batches
def test_layer_output_equals_transformers(request, dtype, fixture, atol, batch_tokens):
    path = request.getfixturevalue(fixture)
    ckpt = Checkpoint(path)
    spec = derive(ckpt)
    seqs = _sequences(ckpt.config["vocab_size"])
    ref = reference_layers(path, dtype, seqs)
    streamer = LayerStreamer(ckpt, spec, seqs, EngineOptions(device="cpu", dtype=str(dtype).split(".")[1],
                                                             batch_tokens=batch_tokens, progress=False))
    assert len(streamer.batches) == (len(seqs) if batch_tokens == 1 else 1)
    for layer in range(spec.num_layers):
        # feed transformers' own layer input, compare with its own layer output
        feed_reference_inputs(streamer, ref, layer, dtype)
        streamer.run_layer(layer, LayerAccumulator(spec.num_experts))
        assert_reference_outputs(streamer, ref, layer, atol)
    streamer.close()


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return python_snippets(6)


def _opts(model, data, **engine) -> CalibrateOptions:
    engine.setdefault("device", "cpu")
    engine.setdefault("progress", False)
    return CalibrateOptions(model=str(model), data=DataOptions(dataset=str(data), max_length=96),
                            engine=EngineOptions(**engine))


def test_stats_equal_whole_model_forward_with_hooks(tiny_fp32, tmp_path, texts):
    from reap.data.tokens import calibration_sequences, load_tokenizer

    data = _write_jsonl(tmp_path / "d.jsonl", texts[:3])
    opts = _opts(tiny_fp32, data, dtype="float32", batch_tokens=200)
    stats, summary = calibrate(opts)
    seqs = calibration_sequences(opts.data, load_tokenizer(tiny_fp32))
    want = hooked_stats(tiny_fp32, seqs)
    assert summary["tokens"] == sum(len(s) for s in seqs)
    for f in FIELDS:
        torch.testing.assert_close(getattr(stats, f), want[f], rtol=1e-5, atol=1e-6, msg=f)
    assert stats.count.sum(1).tolist() == [summary["tokens"] * 4.0] * 3  # top-4 of the tiny model
    assert stats.completed == {0, 1, 2}


def test_offload_modes_and_batching_give_the_same_stats(tiny_fp32, tmp_path, texts):
    data = _write_jsonl(tmp_path / "d.jsonl", texts)
    base, _ = calibrate(_opts(tiny_fp32, data, dtype="float32", batch_tokens=1, offload="device"))
    for engine in ({"offload": "cpu", "batch_tokens": 500}, {"offload": "disk", "workdir": tmp_path / "w"}):
        other, _ = calibrate(_opts(tiny_fp32, data, dtype="float32", **engine))
        for f in FIELDS:
            torch.testing.assert_close(getattr(other, f), getattr(base, f), rtol=1e-6, atol=1e-7)


def test_resumed_run_equals_uninterrupted(tiny_fp32, tmp_path, texts, monkeypatch):
    data = _write_jsonl(tmp_path / "d.jsonl", texts)
    full, _ = calibrate(_opts(tiny_fp32, data, dtype="float32"))
    out = tmp_path / "stats.safetensors"
    opts = CalibrateOptions(model=str(tiny_fp32), data=DataOptions(dataset=str(data), max_length=96), out=out,
                            engine=EngineOptions(device="cpu", dtype="float32", progress=False))
    original = LayerStreamer.run_layer

    def crash_on_layer_2(self, layer, accumulator=None, desc=None):
        if layer == 2:
            raise KeyboardInterrupt
        return original(self, layer, accumulator, desc)

    monkeypatch.setattr(LayerStreamer, "run_layer", crash_on_layer_2)
    with pytest.raises(KeyboardInterrupt):
        calibrate(opts)
    assert ExpertStats.load(out).completed == {0, 1}
    monkeypatch.setattr(LayerStreamer, "run_layer", original)
    from reap.core.errors import UserError

    with pytest.raises(UserError, match="--resume"):
        calibrate(opts)
    resumed, summary = calibrate(CalibrateOptions(**{**opts.__dict__, "resume": True}))
    assert summary["layers"] == 1
    assert resumed.completed == {0, 1, 2}
    for f in FIELDS:
        torch.testing.assert_close(getattr(resumed, f), getattr(full, f), rtol=1e-9, atol=0)
    loaded = ExpertStats.load(out)
    torch.testing.assert_close(loaded.reap_sum, full.reap_sum, rtol=1e-9, atol=0)


def test_resume_refuses_different_data(tiny_fp32, tmp_path, texts):
    from reap.core.errors import UserError

    data = _write_jsonl(tmp_path / "d.jsonl", texts)
    out = tmp_path / "s.safetensors"
    calibrate(CalibrateOptions(model=str(tiny_fp32), data=DataOptions(dataset=str(data), max_length=96), out=out,
                               engine=EngineOptions(device="cpu", progress=False)))
    with pytest.raises(UserError, match="different data"):
        calibrate(CalibrateOptions(model=str(tiny_fp32), data=DataOptions(dataset=str(data), max_length=50), out=out,
                                   engine=EngineOptions(device="cpu", progress=False), resume=True))


def test_layers_are_freed_after_use(tiny_fp32):
    """Only one layer's weights at a time: after run_layer nothing of it stays materialized."""
    ckpt = Checkpoint(tiny_fp32)
    spec = derive(ckpt)
    streamer = LayerStreamer(ckpt, spec, _sequences(ckpt.config["vocab_size"]),
                             EngineOptions(device="cpu", progress=False))
    streamer.embed()
    for layer in range(spec.num_layers):
        acc = LayerAccumulator(spec.num_experts)
        streamer.run_layer(layer, acc)
        assert acc.count.sum() == streamer.tokens * spec.top_k  # reap's experts implementation counted them
        module = streamer.layers[layer]
        assert all(t.is_meta for t in module.parameters())
        assert not any(hasattr(m, "_reap_probe") for m in module.modules())
    streamer.close()


def _stream_stats(path, prepare) -> list[dict]:
    ckpt = Checkpoint(path)
    spec = derive(ckpt)
    streamer = LayerStreamer(ckpt, spec, _sequences(ckpt.config["vocab_size"]),
                             EngineOptions(device="cpu", batch_tokens=64, progress=False), accumulator=LayerAccumulator)
    try:
        prepare(streamer)
        out = []
        for layer in range(spec.num_layers):
            acc = LayerAccumulator(spec.num_experts)
            streamer.run_layer(layer, acc)
            out.append(acc.to_dict())
        return out
    finally:
        streamer.close()


def test_layer_0_embeds_its_own_batches_and_a_warm_up_changes_nothing(tiny_fp32):
    """The embeddings are not computed ahead (layer 0 takes them from its own call of the base model): the same
    statistics as with every batch embedded into the store first, and as after a warm-up batch through layer 0 or
    through a layer with random weights before it is loaded."""
    def warm_up(st):
        st.loader.load_layer(0)
        st.loader._warm_up(0)
        assert st.warmup_seconds > 0  # it ran (a failing warm-up is skipped quietly)
        st.embed()

    def spare(st):  # layer 1 (not prepared yet on the CPU) with random weights, then back on the meta device
        st.loader._pool.submit(st.loader._warm_up, 1, True).result()
        assert st.warmup_seconds > 0
        assert all(p.device.type == "meta" for p in st.layers[1].parameters())
        st.embed()

    beside_ran = []

    def beside(st):  # the last layer with random weights on a thread of its own while layer 0 is prepared and runs
        st.loader._start_warm_up(None)
        beside_ran.append(st)
        st.embed()

    ahead = _stream_stats(tiny_fp32, lambda st: st.embed(ahead=True))
    for prepare in (lambda st: st.embed(), warm_up, spare, beside):
        got = _stream_stats(tiny_fp32, prepare)
        for a, b in zip(ahead, got):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert beside_ran[0].warmup_seconds > 0


def test_make_batches_respects_budget():
    seqs = [[1] * n for n in (5, 5, 9, 2, 30, 1)]
    batches = make_batches(seqs, 20)
    assert [b.lengths for b in batches] == [[5, 5], [9, 2], [30], [1]]
    assert all(b.ids.numel() <= 20 or len(b.lengths) == 1 for b in batches)


@pytest.mark.slow
def test_two_ranks_over_gloo_equal_one(tiny_fp32, tmp_path, texts):
    """torchrun --nproc-per-node 2 -m reap calibrate == a single process, up to float rounding."""
    single, two, _ = calibrate_one_and_two_ranks(tiny_fp32, _write_jsonl(tmp_path / "d.jsonl", texts), tmp_path)
    a, b = ExpertStats.load(single), ExpertStats.load(two)
    assert b.meta["world_size"] == 2 and a.meta["tokens"] == b.meta["tokens"]
    for f in FIELDS:  # the ranks batch different sequences together: float32 blocking differs slightly
        torch.testing.assert_close(getattr(b, f), getattr(a, f), rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_fp8_stats_track_bf16(mini_m2, mini_m2_fp8, calibration_data):
    """The same model in FP8 (dequantized on the fly) gives nearly the same saliency and the same choices."""
    from reap.selection.choose import choose_experts

    results = []
    for model in (mini_m2, mini_m2_fp8):
        opts = CalibrateOptions(model=str(model), data=DataOptions(dataset=str(calibration_data), samples=12,
                                                                   max_length=256),
                                engine=EngineOptions(device="cpu", dtype="float32", progress=False))
        results.append(calibrate(opts)[0].scores("reap"))
    bf16, fp8 = results
    for layer in range(bf16.shape[0]):
        corr = torch.corrcoef(torch.stack([bf16[layer], fp8[layer]]))[0, 1]
        assert corr > 0.97, (layer, corr)
        pruned_a = set(choose_experts(bf16[layer], 19)[1])
        pruned_b = set(choose_experts(fp8[layer], 19)[1])
        assert len(pruned_a & pruned_b) >= 15, (layer, pruned_a ^ pruned_b)


def test_resume_replays_no_layer(tiny_fp32, tmp_path, texts, monkeypatch):
    """Killed after layer 1: the hidden states after layer 1 are on disk beside the stats file, so --resume runs
    layer 2 only (no replay) and its statistics equal an uninterrupted run's; the checkpoint folder is removed at
    the end (kept with keep_checkpoint)."""
    data = _write_jsonl(tmp_path / "d.jsonl", texts)
    full, _ = calibrate(_opts(tiny_fp32, data, dtype="float32"))
    out = tmp_path / "stats.safetensors"
    opts = CalibrateOptions(model=str(tiny_fp32), data=DataOptions(dataset=str(data), max_length=96), out=out,
                            engine=EngineOptions(device="cpu", dtype="float32", progress=False), checkpoint_every=1)
    original = LayerStreamer.run_layer
    ran: list[int] = []

    def run_layer(self, layer, accumulator=None, desc=None):
        if layer == 2 and not ran[-1:] == ["resumed"]:
            raise KeyboardInterrupt
        ran.append(layer)
        return original(self, layer, accumulator, desc)

    monkeypatch.setattr(LayerStreamer, "run_layer", run_layer)
    with pytest.raises(KeyboardInterrupt):
        calibrate(opts)
    assert ran == [0, 1] and (tmp_path / "stats.safetensors.hidden" / "rank0-after-1" / "done").exists()
    ran.clear()
    ran.append("resumed")
    resumed, summary = calibrate(CalibrateOptions(**{**opts.__dict__, "resume": True, "keep_checkpoint": True}))
    assert ran == ["resumed", 2] and summary["layers_run"] == 1
    for f in FIELDS:
        torch.testing.assert_close(getattr(resumed, f), getattr(full, f), rtol=1e-9, atol=0)
    assert (tmp_path / "stats.safetensors.hidden").is_dir()  # kept when asked
    monkeypatch.setattr(LayerStreamer, "run_layer", original)
    out.unlink()
    calibrate(CalibrateOptions(**{**opts.__dict__, "overwrite": True}))
    assert not (tmp_path / "stats.safetensors.hidden").exists()  # removed by default
    # a file reap did not write under STATS.hidden stays, with its folder; reap's stale checkpoints go
    stale = tmp_path / "stats.safetensors.hidden" / "rank0-after-0"
    stale.mkdir(parents=True)
    (stale / "done").write_text("")
    (tmp_path / "stats.safetensors.hidden" / "notes.txt").write_text("mine")
    calibrate(CalibrateOptions(**{**opts.__dict__, "overwrite": True}))
    assert (tmp_path / "stats.safetensors.hidden" / "notes.txt").read_text() == "mine" and not stale.exists()


@pytest.mark.slow
def test_two_ranks_sharing_the_reading_equal_one(tiny_fp8, tmp_path, texts):
    """--weight-exchange share over gloo: each rank reads half of every layer's bytes (FP8 values and scales) and
    the ranks all-gather the rest; the statistics equal a single process's."""
    single, two, stderr = calibrate_one_and_two_ranks(tiny_fp8, _write_jsonl(tmp_path / "d.jsonl", texts), tmp_path,
                                                      "--weight-exchange", "share")
    assert "each layer read once per node (2 ranks share it)" in stderr
    a, b = ExpertStats.load(single), ExpertStats.load(two)
    assert b.meta["world_size"] == 2
    for f in FIELDS:
        torch.testing.assert_close(getattr(b, f), getattr(a, f), rtol=1e-6, atol=1e-9)


# -- memory: where the hidden states go, whether the batches fit, what an out-of-memory error says (issue 26) --------
GIB = 1 << 30


def test_offload_choice_from_the_memory_free_now():
    from reap.stream.hidden import MARGIN, offload_choice

    # on the GPU: the hidden states stay there when they, a batch's peak and the margin fit what is left once the
    # weights are placed (measured when the run is planned: another process's memory is not ours)
    assert offload_choice(10 * GIB, 4 * GIB, 10 * GIB + 4 * GIB + MARGIN, 100 * GIB) == "device"
    assert offload_choice(10 * GIB, 4 * GIB, 10 * GIB + 4 * GIB + MARGIN - 1, 100 * GIB) == "cpu"
    assert offload_choice(1 * GIB, 1 * GIB, -5 * GIB, 100 * GIB) == "cpu"  # the weights alone do not fit
    # in CPU memory when they take at most half of what is available, else on disk; on the CPU never "device"
    assert offload_choice(60 * GIB, 1 * GIB, 0, 100 * GIB) == "disk"
    assert offload_choice(10 * GIB, 1 * GIB, None, 100 * GIB) == "cpu"
    assert offload_choice(10 * GIB, 1 * GIB, None, 16 * GIB) == "disk"


def test_batch_fit_suggests_a_smaller_batch_tokens():
    from reap.stream.hidden import MARGIN, batch_peak_bytes, suggest_batch_tokens

    # DeepSeek-V3-like layer, bf16, 16384 tokens: the routed experts' pairs dominate (~7.5 GiB of the peak)
    peak = batch_peak_bytes(1, 16384, 7168, 2, top_k=8, expert_intermediate=2048, dense_intermediate=18432, heads=128)
    assert 7 * GIB < peak < 10 * GIB
    half = batch_peak_bytes(1, 8192, 7168, 2, top_k=8, expert_intermediate=2048, dense_intermediate=18432, heads=128)
    assert 2 * half == peak  # linear in the tokens
    eager = batch_peak_bytes(4, 4096, 64, 4, heads=8, eager=True)
    assert eager > batch_peak_bytes(4, 4096, 64, 4, heads=8)  # eager attention: the [B, heads, S, S] scores
    assert suggest_batch_tokens(16384, peak, peak + MARGIN) is None  # fits
    fit = suggest_batch_tokens(16384, peak, peak // 3 + MARGIN)
    assert fit == 4096  # a power of two, at most a third
    assert suggest_batch_tokens(16384, peak, MARGIN) == 0 and suggest_batch_tokens(16384, peak, -GIB) == 0


def test_memory_warnings_name_the_flags():
    from reap.calibrate.memory import memory_warnings
    from reap.stream.hidden import MARGIN
    from reap.core.options import EngineOptions

    plan = {"memory": "GPU", "room_bytes": 3 * GIB, "free_bytes": 20 * GIB, "total_bytes": 80 * GIB,
            "hidden_on": "device", "batch_tokens_fit": 4096, "largest_batch": 16384, "peak_bytes": 8 * GIB,
            "greedy_fits": True, "greedy_peak_bytes": 5 * GIB, "greedy_outputs_bytes": 4 * GIB}
    engine = EngineOptions(batch_tokens=16384)
    (line,) = memory_warnings(plan, engine)
    assert "likely do not fit" in line and "8.00 GiB" in line and "3.00 GiB of GPU memory" in line
    assert "20.00 GiB free now of 80.00 GiB" in line and "--batch-tokens 4096 (now 16384) or --offload cpu" in line
    greedy = {**plan, "batch_tokens_fit": None, "greedy_fits": False, "room_bytes": MARGIN + 3 * GIB}
    (line,) = memory_warnings(greedy, engine)
    assert "greedy search likely does not fit" in line and "--greedy-memory 2 (now 4 GiB)" in line
    assert memory_warnings({**plan, "batch_tokens_fit": None}, engine) == []
    none_fit = memory_warnings({**plan, "batch_tokens_fit": 0, "hidden_on": "cpu"}, engine)[0]
    assert "not even 16 tokens fit" in none_fit and "nvidia-smi" in none_fit and "--offload" not in none_fit


OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB "
       "is free. Process 4242 has 60.00 GiB memory in use. Including non-PyTorch memory, this process has 18.12 GiB "
       "memory in use. Of the allocated memory 17.50 GiB is allocated by PyTorch, and 100.00 MiB is reserved by "
       "PyTorch but unallocated.")


def test_out_of_memory_line():
    from reap.stream.hidden import describe_out_of_memory, make_batches, out_of_memory

    assert out_of_memory(torch.OutOfMemoryError(OOM)) == "gpu"
    assert out_of_memory(RuntimeError("CUDA error: out of memory")) == "gpu"
    assert out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: "
                                      "you tried to allocate 4096 bytes.")) == "cpu"
    assert out_of_memory(RuntimeError("shape mismatch")) is None and out_of_memory(ValueError("x")) is None
    batches = make_batches([[1] * 4096] * 8, 16384)
    line = describe_out_of_memory(torch.OutOfMemoryError(OOM), kind="gpu", what="in layer 3, batch 2 of 2",
                                  batch_tokens=16384, hidden_on="device", batches=batches, kept="s.st keeps 3")
    assert line.startswith("out of GPU memory in layer 3, batch 2 of 2: tried to allocate 2.00 GiB with 1.06 GiB free "
                           "of 79.19 GiB, other processes holding 60.01 GiB"), line
    assert "--batch-tokens 8192 (now 16384), or --offload cpu" in line and line.endswith("; s.st keeps 3")
    assert "--max-length" not in line and "\n" not in line
    # one sequence longer than the smaller batch: --max-length too; hidden states already off the GPU: no --offload
    line = describe_out_of_memory(torch.OutOfMemoryError("CUDA out of memory."), kind="gpu", what="in layer 0",
                                  batch_tokens=16384, hidden_on="cpu", batches=make_batches([[1] * 16000], 16384))
    assert "--batch-tokens 8192" in line and "--max-length 8000" in line and "--offload" not in line


def test_plan_is_sized_from_the_gpu_memory_free_now(tiny_fp32, monkeypatch):
    """The plan of a GPU run (its figures faked on the CPU): the hidden states stay on the device while the memory free
    now holds them, a batch and the margin; with less free (another process holding it) they go to CPU memory, and
    with less still the plan asks for a smaller --batch-tokens."""
    from reap.stream.hidden import MARGIN

    ckpt = Checkpoint(tiny_fp32)
    spec = derive(ckpt)
    streamer = LayerStreamer(ckpt, spec, _sequences(ckpt.config["vocab_size"]),
                             EngineOptions(device="cpu", dtype="float32", batch_tokens=4096, progress=False))
    try:
        monkeypatch.setattr(streamer, "device", torch.device("cuda"))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
        free = [10 * GIB]
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free[0], 80 * GIB))
        plan = streamer.plan(placing=True)
        assert plan["hidden_on"] == "device" and plan["memory"] == "GPU" and plan["batch_tokens_fit"] is None
        assert plan["free_bytes"] == 10 * GIB and plan["total_bytes"] == 80 * GIB and plan["peak_bytes"] > 0
        weights = 10 * GIB - plan["room_bytes"] - plan["store_bytes"]  # embeddings, head, two layers and their reads
        assert weights > 0
        assert streamer._offload_mode() == "device"
        free[0] = weights + plan["store_bytes"] + plan["peak_bytes"] + MARGIN - 1  # one byte short
        plan = streamer.plan(placing=True)
        assert plan["hidden_on"] == "cpu" and plan["batch_tokens_fit"] is None  # off the GPU, a batch fits
        free[0] = weights + MARGIN + plan["peak_bytes"] // 3
        plan = streamer.plan(placing=True)
        assert plan["hidden_on"] == "cpu" and plan["batch_tokens_fit"] == 32  # 4 x 40 padded tokens: a third, 2^n
        assert plan["room_bytes"] == MARGIN + plan["peak_bytes"] // 3
        assert streamer.plan()["hidden_on"] == streamer.store.mode  # after placing: where the store is
    finally:
        monkeypatch.undo()
        streamer.close()
