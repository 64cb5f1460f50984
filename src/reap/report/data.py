"""What a report shows, read from disk: the per-layer scores and cuts of a pruning, and the card's inputs.

:func:`load_report_data` reads a pruned output directory (``reap_report.json``, with ``reap_stats.safetensors`` when
the experts were chosen from calibration) or a stats file (``reap calibrate``'s output; ``ratio``/``method`` choose
the cut) into a :class:`ReportData`: per layer, the scores shown and the pruned experts. Beside it, what the model
card reads: a ``reap eval`` result, checked to be of this model (:func:`read_evaluation`,
:func:`check_evaluation`), the sizes of a checkpoint (:func:`checkpoint_sizes`) and the header of the source's
card (:func:`card_front_matter`). :func:`spearman` compares two criteria's rankings.

torch is imported only where scores are computed: a keep file without statistics needs none, so the pictures drawn
beside ``reap prune --keep``'s copy do not spend seconds of CPU importing it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reap.core.errors import UserError
from reap.core.names import REPORT_NAME, STATS_NAME

if TYPE_CHECKING:
    import torch


@dataclass
class ReportData:
    """Everything the pictures and the text summary need, from a stats file or a pruned directory."""

    num_layers: int
    num_experts: int
    method: str  # the saliency shown (and used for the choice, when there is one)
    scores: torch.Tensor | None  # [L, E] float64, NaN rows for layers without scores
    pruned: dict[int, list[int]] = field(default_factory=dict)  # layer -> pruned original ids ({} = no cut)
    ratio: float | None = None
    stats: Any = None  # reap.calibrate.stats.ExpertStats
    report: dict[str, Any] | None = None
    source: str = ""

    @property
    def layers(self) -> list[int]:
        if self.pruned:
            return sorted(self.pruned)
        if self.scores is None:
            return []
        return [i for i in range(self.num_layers) if not self.scores[i].isnan().any()]

    def kept_count(self, layer: int) -> int | None:
        return self.num_experts - len(self.pruned[layer]) if layer in self.pruned else None

    @property
    def title(self) -> str:
        """The pictures' and the text summary's title: model, criterion and cut."""
        cut = ""
        if self.pruned:
            k = {self.kept_count(layer) for layer in self.layers}
            cut = f", {self.num_experts} -> {'/'.join(map(str, sorted(k)))} experts" + (
                f" (ratio {self.ratio:g})" if self.ratio is not None else "")
        name = Path(self.source).name if self.source else "model"
        return f"{name}: {self.method}{cut}"


def _stats_scores(stats, method: str) -> torch.Tensor:
    scores = stats.scores(method).clone()  # [L, E]
    for layer in range(stats.num_layers):
        if layer not in stats.completed:
            scores[layer] = float("nan")
    return scores


def load_report_data(path: str | Path, ratio: float | None = None, method: str = "reap") -> ReportData:
    """Read a pruned output directory or a stats file (``ratio``/``method`` choose the cut for a stats file)."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / REPORT_NAME).is_file():
        try:
            report = json.loads((path / REPORT_NAME).read_text())
            layers = {int(k): v for k, v in report["layers"].items()}
            num_experts = int(report["num_experts"])
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise UserError(f"{path / REPORT_NAME} is not a valid reap report ({type(err).__name__}: {err}); "
                            "prune again to regenerate it") from None
        stats = None
        if (path / STATS_NAME).is_file():
            from reap.calibrate.stats import ExpertStats

            stats = ExpertStats.load(path / STATS_NAME)
        num_layers = stats.num_layers if stats is not None else max(layers) + 1
        shown = report.get("method", "reap")
        scores = None
        if shown == "random":  # a seeded draw, not a measurement: drawn as kept/pruned only, never as scores
            shown = f"random choice (seed {report.get('seed', 0)})"
        elif all("saliency" in v for v in layers.values()):
            import torch

            scores = torch.full((num_layers, num_experts), float("nan"), dtype=torch.float64)
            for layer, v in layers.items():
                scores[layer] = torch.tensor(v["saliency"], dtype=torch.float64)
        elif stats is not None:  # a keep file: show the REAP scores of the statistics next to the choice
            shown, scores = "reap", _stats_scores(stats, "reap")
        return ReportData(num_layers, num_experts, shown, scores, {k: list(v["pruned"]) for k, v in layers.items()},
                          report.get("ratio"), stats, report, str(report.get("source", "")))
    from reap.calibrate.stats import METHODS, ExpertStats

    if path.is_dir() and (path / STATS_NAME).is_file():
        path = path / STATS_NAME
    if not path.exists():
        raise UserError(f"{path} does not exist; pass a pruned output directory (with {REPORT_NAME}) or a stats "
                        "file from `reap calibrate`")
    if path.is_dir():
        raise UserError(f"{path} has neither {REPORT_NAME} nor {STATS_NAME}; pass a pruned output directory or a "
                        "stats file from `reap calibrate`")
    if method not in METHODS or method == "random":
        raise UserError(f"--method {method!r} cannot be drawn from statistics; use one of "
                        f"{', '.join(m for m in METHODS if m != 'random')}")
    stats = ExpertStats.load(path)
    scores = _stats_scores(stats, method)
    pruned: dict[int, list[int]] = {}
    if ratio is not None:  # the cut reap prune --ratio would make (top-k and groups from the stats' metadata)
        from reap.selection.choose import experts_to_drop, plan_from_scores

        routing = routing_of(stats)
        layers = sorted(stats.completed)
        plan = plan_from_scores(scores, routing, layers, experts_to_drop(routing, ratio), method)
        pruned = {layer: plan.pruned(layer) for layer in layers}
    return ReportData(stats.num_layers, stats.num_experts, method, scores, pruned, ratio, stats, None,
                      str(stats.meta.get("model", "")))


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two vectors (ties broken by position); NaN when either is constant."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else float("nan")


def _valid_result(r: Any) -> bool:
    """One model's `reap eval` result: a model, finite loss and perplexity, a positive token count."""
    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    return (isinstance(r, dict) and isinstance(r.get("model"), str) and number(r.get("loss"))
            and number(r.get("perplexity")) and isinstance(r.get("tokens"), int) and r["tokens"] > 0)


def read_evaluation(path: str | Path) -> dict[str, Any]:
    """A ``reap eval --out`` JSON file (one model's result, or a comparison), checked to be one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"evaluation file {path} does not exist; write one with `reap eval ... --out FILE`") from None
    except (OSError, ValueError) as err:
        raise UserError(f"evaluation file {path} is not readable JSON ({err}); "
                        "write it with `reap eval ... --out FILE`") from None
    comparison = isinstance(data, dict) and ("original" in data or "pruned" in data)
    ok = _valid_result(data) or (comparison and _valid_result(data.get("original")) and _valid_result(data.get("pruned")))
    if not ok:
        raise UserError(f"{path} is not a `reap eval` result (each model needs its model, loss, perplexity and tokens); "
                        "write it with `reap eval PRUNED --dataset DATA [--baseline ORIGINAL] --out FILE`")
    return data


def _same_model(recorded: str, path: str | Path) -> bool:
    a, b = Path(recorded), Path(path)
    try:
        if a.exists() and b.exists() and a.resolve() == b.resolve():
            return True
    except OSError:
        pass
    return a.name == b.name  # evaluated where it was written (a staging name aside), or on another machine


def check_evaluation(evaluation: dict[str, Any], report: dict[str, Any] | None, pruned_dir: Path) -> None:
    """The evaluation is of this pruned model (and, for a comparison, of its source): names and expert counts."""
    report = report or {}
    pruned = evaluation.get("pruned", evaluation)
    k, e = report.get("kept_per_layer"), report.get("num_experts")
    fix = (f"pass the result of `reap eval {pruned_dir} --dataset DATA --baseline {report.get('source', 'ORIGINAL')} "
           "--out FILE`")
    if not _same_model(pruned["model"], pruned_dir) or (k is not None and pruned.get("num_experts") not in (None, k)):
        raise UserError(f"the --eval result is of {pruned['model']} ({pruned.get('num_experts', '?')} experts), not of "
                        f"this pruned model {pruned_dir} ({k} experts); {fix}")
    original = evaluation.get("original")
    if original is not None:
        source = report.get("source", "")
        if not _same_model(original["model"], source) or (e is not None and original.get("num_experts") not in (None, e)):
            raise UserError(f"the --eval baseline is {original['model']} ({original.get('num_experts', '?')} experts), "
                            f"not this model's source {source} ({e} experts); {fix}")


def card_front_matter(readme: Path | None) -> dict[str, Any]:
    """The YAML header of a model card (``---`` ... ``---``), or {}."""
    if readme is None or not readme.is_file():
        return {}
    try:
        text = readme.read_text(encoding="utf-8", errors="replace")
        m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
        if not m:
            return {}
        import yaml

        data = yaml.safe_load(m[1])
        return data if isinstance(data, dict) else {}
    except Exception:  # noqa: BLE001 - a broken header in someone else's card is not our failure
        return {}


def checkpoint_sizes(path: str | Path | None) -> dict[str, Any] | None:
    """The sizes :func:`reap.report.inspect.describe` gives a checkpoint (its ``"before"``), or None when it cannot be read."""
    if not path:
        return None
    try:
        from reap.io.checkpoint import Checkpoint
        from reap.report.inspect import describe

        ckpt = Checkpoint(path)
        try:
            return describe(ckpt)["before"]
        finally:
            ckpt.close()
    except Exception:  # noqa: BLE001 - the source may be gone or elsewhere; sizes then come from the report
        return None


def routing_of(stats):
    """The router's constraints a stats file records (top-k, expert groups), as :class:`reap.selection.plan.Routing`."""
    from reap.selection.plan import Routing

    meta = stats.meta
    return Routing(str(meta.get("family", "model")), stats.num_experts, int(meta.get("top_k") or 1),
                   int(meta.get("n_group") or 1), int(meta.get("topk_group") or 1))
