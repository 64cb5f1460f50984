"""reap report: pictures, summary and model card from a pruned directory or a stats file; failure-safe in prune."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from reap.io.checkpoint import hub_id
from reap.core.errors import UserError
from reap.core.options import CalibrateOptions, DataOptions, EngineOptions, PruneOptions
from reap.prune import prune_model
from reap.report import (
    CARD_NAME,
    FIGURES,
    SUMMARY_NAME,
    load_report_data,
    render_report,
    reproduce_command,
    write_model_card,
)
from reap.calibrate.stats import ExpertStats
from reap.selection.choose import choose_experts

PNG = b"\x89PNG\r\n\x1a\n"
QUIET = lambda *_: None  # noqa: E731
SECTIONS = ("## Pruning", "## Size", "## Experts kept per layer", "## Reproduce")


def _check_png(path: Path, min_width: int = 1000, min_height: int = 450) -> None:
    """A valid PNG, large enough to read (issue 26: a 412x226 heat map cut its title)."""
    from PIL import Image

    assert path.read_bytes()[:8] == PNG, f"{path} is not a PNG"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= min_width and im.size[1] >= min_height, (path.name, im.size)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reportdata") / "calib.jsonl"
    docs = [f"class C{i}:\n    def m(self, y):\n        return y ** {i % 4} - {i}\n" * (1 + i % 3) for i in range(24)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def pruned_reap(tiny_fp32, data_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pruned") / "tiny-reap"
    calibration = CalibrateOptions(model=str(tiny_fp32), data=DataOptions(dataset=str(data_file), max_length=128),
                                   engine=EngineOptions(device="cpu", dtype="float32", progress=False))
    prune_model(PruneOptions(model=str(tiny_fp32), out=out, ratio=0.25, method="reap", calibration=calibration,
                             progress=False), log=QUIET)
    return out


def test_prune_writes_card_pictures_and_summary(pruned_reap, tiny_fp32):
    report = json.loads((pruned_reap / "reap_report.json").read_text())
    for name in FIGURES.values():
        _check_png(pruned_reap / name)
    card = (pruned_reap / CARD_NAME).read_text()
    for section in (*SECTIONS, "## Pictures"):
        assert f"\n{section}\n" in card, section
    assert card.startswith("---\n") and "tags:" in card.split("---")[1]
    assert f"# {pruned_reap.name}\n" in card
    assert str(tiny_fp32) in card and "| Ratio | 0.25 |" in card and "16 -> 12" in card
    assert "REAP" in card and str(report["calibration"]["data"]["dataset"]) in card
    assert f"{report['calibration']['tokens']:,}" in card  # calibration tokens
    assert report["created"] in card and "reap 0.1.0" in card
    assert f"{report['bytes_before']:,} bytes" in card and f"{report['bytes_after']:,} bytes" in card
    # parameters before/after from reap.report.inspect.describe
    from reap.io.checkpoint import Checkpoint
    from reap.report.inspect import describe

    before, after = describe(Checkpoint(tiny_fp32))["before"], describe(Checkpoint(pruned_reap))["before"]
    assert f"{before['total_params']:,}" in card and f"{after['total_params']:,}" in card
    for layer, entry in report["layers"].items():
        assert f"| {layer} | 12 | {', '.join(map(str, entry['pruned']))} |" in card
    for name in FIGURES.values():  # every picture is linked and exists
        assert f"]({name})" in card
    # the command: sys.argv was pytest's, so the card rebuilds an equivalent `reap prune` line
    command = card.split("```bash\n")[1].split("\n```")[0]
    assert command.startswith(f"reap prune {tiny_fp32} --out {pruned_reap} --ratio 0.25 --method reap --dataset ")
    summary = (pruned_reap / SUMMARY_NAME).read_text()
    assert "reap, 16 -> 12 experts (ratio 0.25)" in summary
    assert "frequency would prune" in summary and "Spearman(frequency, REAP)" in summary
    assert len([line for line in summary.splitlines() if line[:5].strip().isdigit()]) == 3  # one row per layer


def test_render_report_of_a_pruned_dir_is_repeatable(pruned_reap, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(pruned_reap, copy)
    for name in (*FIGURES.values(), SUMMARY_NAME, CARD_NAME):
        (copy / name).unlink()
    source = json.loads((copy / "reap_report.json").read_text())["source"]
    evaluation = {"original": {"model": source, "num_experts": 16, "dataset": "ev.jsonl", "tokens": 4096,
                               "seq_len": 256, "loss": 2.0, "perplexity": 7.389},
                  "pruned": {"model": str(copy), "num_experts": 12, "dataset": "ev.jsonl", "tokens": 4096,
                             "seq_len": 256, "loss": 2.1, "perplexity": 8.166}}
    written = render_report(copy, evaluation=evaluation, log=QUIET)
    assert {p.name for p in written} == {*FIGURES.values(), SUMMARY_NAME, CARD_NAME}
    card = (copy / CARD_NAME).read_text()
    assert "## Evaluation" in card and "| pruned | 2.1000 | 8.166 |" in card and "| change | +0.1000 |" in card
    lines = lambda d: (d / SUMMARY_NAME).read_text().splitlines()[1:]  # noqa: E731 - the first names the dir
    assert lines(copy) == lines(pruned_reap)
    # out_dir elsewhere: pictures and summary there, no card
    other = tmp_path / "elsewhere"
    written = render_report(copy, out_dir=other, log=QUIET)
    assert CARD_NAME not in {p.name for p in written} and (other / FIGURES["heatmap"]).is_file()


def test_stats_file_report(pruned_reap, tmp_path):
    stats_file = tmp_path / "calib.safetensors"
    shutil.copyfile(pruned_reap / "reap_stats.safetensors", stats_file)
    data = load_report_data(stats_file, ratio=0.25, method="reap")
    stats = ExpertStats.load(stats_file)
    report = json.loads((pruned_reap / "reap_report.json").read_text())
    for layer in range(stats.num_layers):  # the same cut as the pruner's
        want = choose_experts(stats.scores("reap")[layer], 4)[1]
        assert data.pruned[layer] == want == report["layers"][str(layer)]["pruned"]
    written = render_report(stats_file, ratio=0.25, log=QUIET)
    out = tmp_path / "calib-report"
    assert [p.parent for p in written] == [out] * 4
    assert {p.name for p in written} == {*FIGURES.values(), SUMMARY_NAME}
    for name in FIGURES.values():
        _check_png(out / name)
    # no ratio: saliency only, no cut; another method
    written = render_report(stats_file, out_dir=tmp_path / "nocut", method="frequency", log=QUIET)
    assert len(written) == 4
    assert "frequency" in (tmp_path / "nocut" / SUMMARY_NAME).read_text().splitlines()[0]
    with pytest.raises(UserError, match="random"):
        render_report(stats_file, method="random", log=QUIET)
    with pytest.raises(UserError, match="does not exist"):
        render_report(tmp_path / "missing.safetensors", log=QUIET)
    with pytest.raises(UserError, match="neither"):
        render_report(tmp_path / "nocut", log=QUIET)


def test_random_and_keep_file_prunings(tiny_fp32, tmp_path):
    rnd = tmp_path / "rnd"
    prune_model(PruneOptions(model=str(tiny_fp32), out=rnd, ratio=0.5, method="random", seed=7, progress=False),
                log=QUIET)
    _check_png(rnd / FIGURES["heatmap"])
    assert not (rnd / FIGURES["curves"]).exists()  # a random draw is no measured score: nothing to sort
    assert not (rnd / FIGURES["scatter"]).exists()  # no statistics without calibration
    card = (rnd / CARD_NAME).read_text()
    assert "random choice (seed 7)" in card and "none (the choice does not use calibration)" in card
    assert "--method random --seed 7" in card
    keep = tmp_path / "keep.json"
    keep.write_text(json.dumps({str(layer): list(range(0, 16, 2)) for layer in range(3)}))
    kf = tmp_path / "kf"
    prune_model(PruneOptions(model=str(tiny_fp32), out=kf, keep_file=keep, progress=False), log=QUIET)
    _check_png(kf / FIGURES["heatmap"])
    assert not (kf / FIGURES["curves"]).exists()  # nothing to sort without scores
    card = (kf / CARD_NAME).read_text()
    assert f"--keep {keep}" in card and "| 0 | 8 | 1, 3, 5, 7, 9, 11, 13, 15 |" in card


def test_pruning_without_matplotlib(tiny_fp32, tmp_path, monkeypatch, caplog):
    """No matplotlib: pruning still succeeds, with card and summary and a logged note; a source's own license
    is carried into the card, and pictures a source carries from an earlier pruning are not copied."""
    src = tmp_path / "src"
    shutil.copytree(tiny_fp32, src)
    (src / CARD_NAME).write_text("---\nlicense: apache-2.0\npipeline_tag: text-generation\n---\n# the original\n")
    (src / FIGURES["heatmap"]).write_bytes(PNG + b"stale")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "out"
    notes: list[str] = []
    result = prune_model(PruneOptions(model=str(src), out=out, ratio=0.25, method="random", progress=False),
                         log=notes.append)
    assert result.out == out and (out / "reap_report.json").is_file()
    assert any("matplotlib is not installed" in n for n in notes)  # said where the run's messages go
    assert not any(out.glob("*.png"))
    card = (out / CARD_NAME).read_text()
    assert 'license: "apache-2.0"' in card and 'pipeline_tag: "text-generation"' in card
    assert "# the original" not in card and "## Pictures" not in card
    assert (out / SUMMARY_NAME).is_file()
    with pytest.raises(UserError, match="matplotlib"):
        render_report(out, log=QUIET)


def test_card_when_the_source_is_gone(pruned_reap, tmp_path):
    report = json.loads((pruned_reap / "reap_report.json").read_text())
    report["source"] = str(tmp_path / "no-longer-here")
    report["command"] = f"reap prune {report['source']} --out x --ratio 0.25 --stats s.safetensors"
    path = write_model_card(tmp_path, report, figures=[])
    card = path.read_text()
    assert f"{report['bytes_before']:,} bytes" in card and f"{report['bytes_after']:,} bytes" in card
    assert "| Parameters | - |" in card  # neither checkpoint readable here: no parameter counts
    assert report["command"] in card  # a recorded `reap prune` command is given verbatim
    for section in SECTIONS:
        assert f"\n{section}\n" in card


def test_helpers():
    snapshot = "/home/u/.cache/huggingface/hub/models--MiniMaxAI--MiniMax-M2/snapshots/abc123"
    assert hub_id(snapshot) == "MiniMaxAI/MiniMax-M2"
    assert hub_id("/data/models/MiniMax-M2") is None
    assert reproduce_command({"command": "reap prune m --out o --ratio 0.5"}) == "reap prune m --out o --ratio 0.5"
    rebuilt = reproduce_command({"command": "reap -k test", "source": "/m", "ratio": 0.5, "method": "ean",
                                 "calibration": {"data": {"dataset": "d.jsonl", "samples": 8, "max_length": 64,
                                                          "pack": True}, "dtype": "bfloat16"}}, "/o")
    assert rebuilt == ("reap prune /m --out /o --ratio 0.5 --method ean --dataset d.jsonl --samples 8 --max-length 64 "
                       "--pack --dtype bfloat16")


def test_other_criteria_are_compared_by_the_same_grouped_cut(tmp_path):
    """With expert groups, each group drops its own share: the comparison with another criterion that ranks the
    experts the same way (here REAP, gates all equal, against EAN) is 100%, not the share a group-blind cut of the
    globally lowest experts would give (group 0 holds the four lowest, of which the grouped cut keeps two)."""
    import torch

    from reap.report.text import summary_text
    from reap.calibrate.stats import LayerAccumulator

    E = 8
    acc = LayerAccumulator(E)
    norms = torch.tensor([1.0, 2, 3, 4, 10, 11, 12, 13], dtype=torch.float64)  # group 0 | group 1
    acc.add(torch.arange(E), torch.full((E,), 0.5, dtype=torch.float64), norms)
    stats = ExpertStats(1, E, {"model": "m", "top_k": 1, "n_group": 2, "topk_group": 1})
    stats.set_layer(0, acc)
    path = tmp_path / "s.safetensors"
    stats.save(path)
    data = load_report_data(path, ratio=0.5, method="ean")
    assert data.pruned[0] == [0, 1, 4, 5]  # two of each group
    row = next(line for line in summary_text(data).splitlines() if line.startswith("    0 "))
    assert row.split()[-1] == "100%" and "reap would prune 100% of the same experts" in summary_text(data)


# -- greedy-rerouted: what the search measured (issue 26) ---------------------------------------------------------
def test_knee_of_hand_made_curves():
    from reap.report.greedy import knee, ratio_for

    flat_then_steep = [0.0, 0.01, 0.02, 0.03, 0.04, 0.54, 1.04, 1.54, 2.04]
    assert knee(flat_then_steep) == 4  # the bend: past it every removal costs far more
    # a softer turn: the knee is where a removal starts to cost more than the curve's average removal (0.3)
    assert knee([0.0, 0.01, 0.02, 0.03, 0.04, 0.3, 0.8, 1.5, 2.4]) == 5
    assert knee([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]) == 5
    assert knee([0.1 * n for n in range(10)]) is None  # a straight line has no knee
    assert knee([0.0, 0.5, 0.75, 0.875, 0.94, 0.97]) is None  # steepest at the start
    assert knee([0.0, 0.0, 0.0]) is None and knee([0.0, 1.0]) is None  # flat, too short
    convex = [n ** 3 for n in range(21)]
    assert 9 <= knee(convex) <= 13  # a smooth climb: where a removal costs the curve's average removal
    assert ratio_for(4, 16) == 0.25 and ratio_for(103, 256) == 0.403 and ratio_for(9, 16) == 0.57
    from reap.selection.choose import n_to_drop

    assert all(n_to_drop(e, ratio_for(n, e)) == n for e in (8, 60, 128, 256, 384) for n in range(1, e))


def _greedy_stats(path: Path, layers: int = 3, experts: int = 16, top_k: int = 4, errors: bool = True) -> Path:
    """A stats file whose layers have distinct greedy orders and error curves (flat, then steep from a bend that
    differs per layer)."""
    import torch

    from reap.calibrate.greedy_order import GreedyOrder
    from reap.calibrate.stats import LayerAccumulator

    stats = ExpertStats(layers, experts, {"model": "/m/tiny-moe", "top_k": top_k, "tokens": 4096})
    gen = torch.Generator().manual_seed(3)
    steps = experts - top_k
    for layer in range(layers):
        acc = LayerAccumulator(experts)
        ids = torch.randint(0, experts, (4096,), generator=gen)
        acc.add(ids, torch.rand(4096, generator=gen), torch.rand(4096, generator=gen))
        bend = 3 + 2 * layer  # layer 0 bends after 3 removals, layer 1 after 5, ...
        curve = [0.002 * n if n <= bend else 0.002 * bend + 0.08 * (n - bend) for n in range(1, steps + 1)]
        order = torch.randperm(experts, generator=gen)[:steps].tolist()
        acc.greedy_order, acc.greedy_note = GreedyOrder(order, curve) if errors else order, None
        stats.set_layer(layer, acc)
    stats.save(path)
    return path


def _rows(summary: str) -> list[str]:
    return [line for line in summary.splitlines() if line[:5].strip().isdigit()]


def test_greedy_report_shows_the_measured_error_and_the_knee(tmp_path):
    from reap.report.greedy import greedy_analysis

    path = _greedy_stats(tmp_path / "g.safetensors")
    stats = ExpertStats.load(path)
    g = greedy_analysis(stats)
    assert [r.knee for r in g.layers] == [3, 5, 7]  # each layer's bend
    written = render_report(path, out_dir=tmp_path / "r", ratio=0.25, method="greedy-rerouted", log=QUIET)
    for p in written:
        if p.suffix == ".png":
            _check_png(p)
    summary = (tmp_path / "r" / SUMMARY_NAME).read_text()
    rows = _rows(summary.split("\n\n")[1])
    assert len(rows) == 3 and len({row.split(None, 1)[1] for row in rows}) == 3  # the layers differ
    for layer, row in enumerate(rows):  # error at the cut (4 removed) and the knee with its error
        curve = stats.greedy_curve(layer)
        knee_at = 3 + 2 * layer
        assert row.split()[2:5] == [f"{100 * curve[4]:.2f}%", str(knee_at), f"{100 * curve[knee_at]:.2f}%"], row
    assert "knee of the mean curve: 5 of 16 experts removed" in summary and "suggested --ratio 0.32" in summary
    assert "this cut removes 4 per layer (before the knee)" in summary
    assert "saliency kept" not in summary  # a rank's share says nothing
    # no cut: the knee and the suggestion still
    render_report(path, out_dir=tmp_path / "nocut", method="greedy-rerouted", log=QUIET)
    nocut = (tmp_path / "nocut" / SUMMARY_NAME).read_text()
    assert "suggested --ratio 0.32" in nocut and "this cut" not in nocut
    _check_png(tmp_path / "nocut" / FIGURES["curves"])


def test_greedy_report_of_an_older_stats_file(tmp_path):
    """A stats file without greedy_error (older reap) still makes the report: the old picture and a note."""
    path = _greedy_stats(tmp_path / "old.safetensors", errors=False)
    assert not ExpertStats.load(path).has_greedy_error
    written = render_report(path, out_dir=tmp_path / "r", ratio=0.25, method="greedy-rerouted", log=QUIET)
    assert {p.name for p in written} == {*FIGURES.values(), SUMMARY_NAME}
    for name in FIGURES.values():
        _check_png(tmp_path / "r" / name)
    summary = (tmp_path / "r" / SUMMARY_NAME).read_text()
    assert "no greedy error curve" in summary and "recalibrate" in summary and len(_rows(summary)) == 3


def test_summary_differs_per_layer_when_the_stats_differ(tmp_path):
    """The text summary's rows follow each layer's statistics (issue 26: every greedy layer printed the same)."""
    path = _greedy_stats(tmp_path / "g.safetensors")
    for method in ("greedy-rerouted", "reap", "ean"):
        render_report(path, out_dir=tmp_path / method, ratio=0.25, method=method, log=QUIET)
        rows = _rows((tmp_path / method / SUMMARY_NAME).read_text().split("\n\n")[1])
        assert len({row.split(None, 1)[1] for row in rows}) == 3, (method, rows)


def test_many_layers_and_experts_stay_legible(tmp_path):
    """A large model's pictures: capped in size, titles kept inside (wrapped, never cut)."""
    from PIL import Image

    stats = tmp_path / "big.safetensors"
    _greedy_stats(stats, layers=40, experts=128, top_k=8)
    meta_long = ExpertStats.load(stats)
    meta_long.meta["model"] = "/models/" + "A-Very-Long-Model-Name-With-Wide-Capitals-WWMMWW-" * 3 + "Instruct"
    meta_long.save(stats)
    written = render_report(stats, out_dir=tmp_path / "r", ratio=0.5, method="greedy-rerouted", log=QUIET)
    for p in written:
        if p.suffix == ".png":
            _check_png(p)
            with Image.open(p) as im:
                assert im.size[0] <= 3600 and im.size[1] <= 3600, (p.name, im.size)
                rgb = im.convert("RGB")
                w, h = rgb.size
                edges = [rgb.getpixel((x, y)) for x in range(w) for y in (0, 1)]  # the top rows
                edges += [rgb.getpixel((x, y)) for x in (w - 2, w - 1) for y in range(h)]  # the right columns
                assert all(px == (255, 255, 255) for px in edges), f"{p.name}: something drawn to the edge (cut)"


@pytest.fixture(scope="module")
def pruned_greedy(tiny_fp32, data_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pruned") / "tiny-greedy"
    calibration = CalibrateOptions(model=str(tiny_fp32), data=DataOptions(dataset=str(data_file), max_length=128),
                                   engine=EngineOptions(device="cpu", dtype="float32", progress=False))
    prune_model(PruneOptions(model=str(tiny_fp32), out=out, ratio=0.25, calibration=calibration, progress=False),
                log=QUIET)
    return out


def test_greedy_pruning_report_and_card(pruned_greedy):
    """The default criterion's pruning: the stats file carries the search's error, the summary and the card state
    it per layer with the knee and a suggested ratio, and the pictures are legible."""
    report = json.loads((pruned_greedy / "reap_report.json").read_text())
    assert report["method"] == "greedy-rerouted"
    stats = ExpertStats.load(pruned_greedy / "reap_stats.safetensors")
    assert stats.has_greedy_error
    for name in FIGURES.values():
        _check_png(pruned_greedy / name)
    summary = (pruned_greedy / SUMMARY_NAME).read_text()
    rows = _rows(summary.split("\n\n")[1])
    assert len(rows) == 3 and all(row.split()[2].endswith("%") for row in rows)  # the error at the cut, per layer
    assert "knee of the mean curve" in summary or "has no knee" in summary
    for layer in range(3):  # the cut is the search's first four removals, whose error it measured
        assert set(report["layers"][str(layer)]["pruned"]) == set(stats.greedy_order(layer)[:4])
        assert f"{100 * stats.greedy_curve(layer)[4]:.2f}%" in rows[layer]
    card = (pruned_greedy / CARD_NAME).read_text()
    assert "## Output error per layer" in card and "| layer | error at this cut |" in card
    assert "This cut removes 4 per layer" in card
    assert "Per layer, the MoE output error the greedy search measured" in card
