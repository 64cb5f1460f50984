"""``reap report``: pictures, a text summary and the model card of a pruning.

Input is either a stats file (``reap calibrate`` output or ``reap_stats.safetensors``; with a ratio the cut
is shown) or a pruned output directory (``reap_report.json``, plus ``reap_stats.safetensors`` when the
experts were chosen from calibration). Output, into the pruned directory by default:

* ``reap_saliency_heatmap.png``  layer x expert saliency (per layer, relative to its largest score), pruned
  experts in grey;
* ``reap_saliency_curves.png``   per layer, the sorted saliency curve with the cut (small multiples);
* ``reap_frequency_vs_reap.png`` routing frequency against REAP score (needs the statistics);
* ``reap_summary.txt``           the numbers in text;
* ``README.md``                  the model card of the pruned checkpoint (:func:`write_model_card`).

Pictures are drawn with matplotlib's object-oriented API on the Agg canvas (no pyplot, no global backend
change). Without matplotlib the card and the summary are written and a note logged; in the pruner
(``strict``) any other failure to write a side file fails the run, so an output never holds a short or missing
card, summary or picture. A ``--method random`` pruning is drawn as kept/pruned only: its draw is no score.
``reap report --eval`` takes only a ``reap eval`` result of the pruned model itself (and of its source).

Legend: L layers, E experts, K kept experts per layer.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reap import __version__
from reap.errors import UserError
from reap.names import CARD_NAME, FIGURES, GENERATED, REPORT_NAME, STATS_NAME, SUMMARY_NAME  # noqa: F401 - GENERATED: re-exported
from reap.staging import write_text

if TYPE_CHECKING:  # torch is imported where scores are computed: a keep file without statistics needs none, so the
    import torch   # pictures drawn beside `reap prune --keep`'s copy do not spend seconds of CPU importing it

logger = logging.getLogger(__name__)

_DPI = 100


# -- what the pictures show ----------------------------------------------------------------------------
@dataclass
class ReportData:
    """Everything the pictures and the summary need, from a stats file or a pruned directory."""

    num_layers: int
    num_experts: int
    method: str  # the saliency shown (and used for the choice, when there is one)
    scores: torch.Tensor | None  # [L, E] float64, NaN rows for layers without scores
    pruned: dict[int, list[int]] = field(default_factory=dict)  # layer -> pruned original ids ({} = no cut)
    ratio: float | None = None
    stats: Any = None  # reap.saliency.ExpertStats
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


def _criterion_card(method: str) -> str:
    from reap.criteria import CRITERIA

    return CRITERIA[method].card.rstrip(".") if method in CRITERIA else method


def _selection_rows(report: dict) -> list[str]:
    """Model-card rows for --multiple-of, super experts and greedy fallback layers (where the report has them)."""
    rows = []
    if report.get("multiple_of"):
        rows.append(f"| Kept count | rounded down to a multiple of {report['multiple_of']} (--multiple-of) |")
    sup = report.get("super_experts")
    if sup is not None:
        n = sum(len(v) for v in sup.values())
        state = "never pruned (--protect-super-experts)" if report.get("protect_super_experts") else "not protected"
        rows.append(f"| Super experts | {n} (max output norm > max(99.5th percentile, max/10) of the layer), {state} |")
    fb = report.get("greedy_fallback")
    if fb:
        rows.append(f"| Greedy fallback | {fb['criterion']} in layers {', '.join(sorted(fb['layers'], key=int))} |")
    return rows


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
            from reap.saliency import ExpertStats

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
    from reap.saliency import METHODS, ExpertStats, choose_experts, n_to_drop

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
    if ratio is not None:
        n_drop = n_to_drop(stats.num_experts, ratio)
        if n_drop == 0 or n_drop >= stats.num_experts:
            raise UserError(f"--ratio {ratio} drops {n_drop} of {stats.num_experts} experts; pass a ratio that "
                            "drops at least one and keeps at least one")
        pruned = {layer: choose_experts(scores[layer], n_drop)[1] for layer in sorted(stats.completed)}
    return ReportData(stats.num_layers, stats.num_experts, method, scores, pruned, ratio, stats, None,
                      str(stats.meta.get("model", "")))


# -- pictures ---------------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _relative(scores: torch.Tensor) -> torch.Tensor:
    """Each layer's scores divided by that layer's largest (rows of zeros stay zero)."""
    import torch

    top = scores.abs().amax(dim=1, keepdim=True)
    return scores / torch.where(top > 0, top, torch.ones_like(top))


def _title(data: ReportData) -> str:
    cut = ""
    if data.pruned:
        k = {data.kept_count(layer) for layer in data.layers}
        cut = f", {data.num_experts} -> {'/'.join(map(str, sorted(k)))} experts" + (
            f" (ratio {data.ratio:g})" if data.ratio is not None else "")
    name = Path(data.source).name if data.source else "model"
    return f"{name}: {data.method}{cut}"


KEPT_CMAP = "viridis"
PRUNED_GREYS = ("#a6a6a6", "#ededed")  # the pruned experts' grey scale: low -> high saliency


def pruned_cmap():
    """The light grey scale of pruned experts in the heat map (far from every colour of the kept ones' viridis)."""
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list("reap_pruned", PRUNED_GREYS)


def heatmap(data: ReportData, path: Path) -> Path:
    """Layer x expert saliency, each layer relative to its largest score; pruned experts drawn in grey."""
    import numpy as np

    L, E = data.num_layers, data.num_experts
    fig = _figure(min(3.0 + E * 0.07, 24.0), min(1.6 + L * 0.22, 18.0))
    ax = fig.add_subplot(1, 1, 1)
    pruned = np.zeros((L, E), dtype=bool)
    for layer, ids in data.pruned.items():
        pruned[layer, ids] = True
    if data.scores is not None:
        values = _relative(data.scores).numpy()
        vmin = float(np.nanmin(values)) if not np.isnan(values).all() else 0.0
        vmin = min(vmin, 0.999)
    else:  # a keep file without statistics: only kept (colour) / pruned (grey)
        values, vmin = np.full((L, E), 0.8), 0.0
    kept_img = ax.imshow(np.ma.masked_array(values, pruned | np.isnan(values)), aspect="auto",
                         interpolation="nearest", cmap=KEPT_CMAP, vmin=vmin, vmax=1.0)
    if pruned.any():  # the same values in light grey (darker = lower), never as dark as viridis' low end
        ax.imshow(np.ma.masked_array(values, ~pruned | np.isnan(values)), aspect="auto", interpolation="nearest",
                  cmap=pruned_cmap(), vmin=vmin, vmax=1.0)
    if data.scores is not None:
        fig.colorbar(kept_img, ax=ax, label=f"{data.method} score / layer max", fraction=0.03, pad=0.01)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(_title(data) + (" (grey: pruned)" if pruned.any() else ""), fontsize=10, loc="left")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def curves(data: ReportData, path: Path) -> Path:
    """Per layer, the saliency sorted from high to low (relative to the largest) and the cut."""
    layers = data.layers
    n = max(len(layers), 1)
    cols = math.ceil(math.sqrt(n * 1.5))
    rows = math.ceil(n / cols)
    fig = _figure(1.0 + 2.0 * cols, 0.8 + 1.5 * rows)
    rel = _relative(data.scores) if data.scores is not None else None
    low = float(rel[layers].min()) if rel is not None and layers else 0.0
    ylim = (min(0.0, low) - 0.05, 1.05)
    xticks = sorted({0, data.num_experts // 2, data.num_experts - 1})
    yticks = [t for t in (0.0, 0.5, 1.0) if ylim[0] <= t]
    # no shared axes and fixed limits: with dozens of panels, matplotlib's shared autoscaling takes seconds
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(layers):
            ax.set_visible(False)
            continue
        layer = layers[i]
        ax.set_autoscale_on(False)
        ax.set_xlim(-0.5, data.num_experts - 0.5)
        ax.set_ylim(*ylim)
        if rel is not None:
            values = rel[layer].sort(descending=True).values.numpy()
            ax.plot(range(len(values)), values, lw=1.2, color="tab:blue")
        k = data.kept_count(layer)
        if k is not None:
            ax.axvline(k - 0.5, color="tab:red", lw=0.9, ls="--")
            ax.axvspan(k - 0.5, data.num_experts - 0.5, color="tab:red", alpha=0.12, lw=0)
        ax.set_title(f"layer {layer}", fontsize=8, pad=2)
        ax.set_xticks(xticks)
        ax.set_yticks(yticks)
        ax.tick_params(labelsize=7, labelleft=i % cols == 0, labelbottom=i + cols >= len(layers))
        ax.grid(alpha=0.3, lw=0.5)
    # fixed margins in inches (tight_layout costs seconds per dozen axes)
    w, h = fig.get_figwidth(), fig.get_figheight()
    fig.subplots_adjust(left=0.75 / w, right=1 - 0.15 / w, bottom=0.65 / h, top=1 - 0.55 / h,
                        wspace=0.12, hspace=0.35)
    fig.supxlabel("experts, sorted by saliency (shaded: pruned)", fontsize=9, y=0.1 / h)
    fig.supylabel(f"{data.method} / layer max", fontsize=9, x=0.1 / w)
    fig.suptitle(_title(data), fontsize=10, y=1 - 0.12 / h)
    fig.savefig(path, format="png")
    return path


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two vectors (ties broken by position); NaN when either is constant."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else float("nan")


def _frequency(stats) -> tuple[torch.Tensor, str]:
    tokens = stats.meta.get("tokens")
    if isinstance(tokens, (int, float)) and tokens > 0:
        return stats.count * 100.0 / tokens, "tokens routed to the expert (%)"
    return stats.count.clone(), "tokens routed to the expert"


def scatter(data: ReportData, path: Path) -> Path:
    """Routing frequency against REAP score, every (layer, expert); pruned experts in red."""
    import torch

    stats = data.stats
    freq, xlabel = _frequency(stats)
    reap = stats.scores("reap")
    rel = reap / reap.mean(dim=1, keepdim=True).clamp_min(1e-30)  # REAP score relative to its layer's mean
    layers = sorted(stats.completed)
    fig = _figure(6.4, 4.8)
    ax = fig.add_subplot(1, 1, 1)
    pruned = torch.zeros(stats.num_layers, stats.num_experts, dtype=torch.bool)
    for layer, ids in data.pruned.items():
        pruned[layer, ids] = True
    mask = torch.zeros_like(pruned)
    mask[layers] = True
    kept = mask & ~pruned
    size = max(3.0, min(18.0, 3000.0 / max(int(mask.sum()), 1)))
    ax.scatter(freq[kept].numpy(), rel[kept].numpy(), s=size, alpha=0.6, c="tab:blue", lw=0,
               label="kept" if data.pruned else "experts")
    if data.pruned:
        ax.scatter(freq[mask & pruned].numpy(), rel[mask & pruned].numpy(), s=size, alpha=0.8, c="tab:red", lw=0,
                   label=f"pruned ({data.method})")
    rho = [spearman(freq[layer], reap[layer]) for layer in layers]
    rho = [r for r in rho if not math.isnan(r)]
    ax.set_xlabel(xlabel)
    ax.set_ylabel("REAP score / layer mean")
    ax.set_title(f"{_title(data)}\nrouting frequency vs REAP score"
                 + (f" (Spearman per layer, mean {sum(rho) / len(rho):.2f})" if rho else ""), fontsize=9, loc="left")
    ax.grid(alpha=0.3, lw=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def render_figures(data: ReportData, out_dir: Path) -> list[Path]:
    """The PNG pictures (ImportError when matplotlib is missing)."""
    import matplotlib  # noqa: F401 - fail early and clearly

    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [(heatmap, "heatmap")]
    if data.scores is not None:
        todo.append((curves, "curves"))
    if data.stats is not None and data.stats.completed:
        todo.append((scatter, "scatter"))
    paths = []
    for draw, key in todo:
        path = out_dir / FIGURES[key]
        try:
            paths.append(draw(data, path))
        except OSError as err:  # a full disk mid-picture: say which file
            if err.filename is None:
                raise OSError(err.errno, err.strerror or str(err), str(path)) from None
            raise
    return paths


# -- the text summary ---------------------------------------------------------------------------------
def summary_text(data: ReportData) -> str:
    """Per layer: experts kept, share of the saliency kept, the margin at the cut, never-routed experts, and
    how far other criteria agree with the choice."""
    lines = [f"reap {__version__} report: {_title(data)}"]
    if data.source:
        lines.append(f"source       {data.source}")
    meta = (data.stats.meta if data.stats is not None else None) or (data.report or {}).get("calibration")
    if meta:
        d = meta.get("data") or {}
        lines.append(f"calibration  {d.get('dataset', '?')}: {meta.get('samples', '?')} samples, "
                     f"{meta.get('tokens', '?')} tokens (max length {d.get('max_length')}), {meta.get('dtype', '?')}")
    lines.append(f"layers       {data.num_layers}, {data.num_experts} experts each")
    others = ("frequency", "ean", "reap") if data.stats is not None else ()
    others = tuple(m for m in others if m != data.method)
    head = f"{'layer':>5} {'kept':>5} {'saliency kept':>13} {'min kept/max pruned':>19} {'never routed':>12}"
    head += "".join(f" {'same as ' + m:>{max(13, len(m) + 8)}}" for m in others)
    lines += ["", head]
    shares, agree = [], {m: [] for m in others}
    for layer in data.layers:
        s = data.scores[layer] if data.scores is not None else None
        pruned = data.pruned.get(layer, [])
        row = f"{layer:>5} {data.num_experts - len(set(pruned)):>5}"
        if s is not None and pruned and float(s.sum()) > 0:
            kept_mask = s.new_ones(data.num_experts).bool()
            kept_mask[pruned] = False
            share = float(s[kept_mask].sum() / s.sum())
            shares.append(share)
            lo, hi = float(s[kept_mask].min()), float(s[~kept_mask].max())
            row += f" {100 * share:>12.1f}% {lo / hi if hi > 0 else float('inf'):>19.3f}"
        else:
            row += f" {'-':>13} {'-':>19}"
        never = int((data.stats.count[layer] == 0).sum()) if data.stats is not None else None
        row += f" {never if never is not None else '-':>12}"
        for m in others:
            width = max(13, len(m) + 8)
            if pruned:
                from reap.saliency import choose_experts  # others are only there with statistics (and torch)

                theirs = set(choose_experts(data.stats.scores(m)[layer], len(pruned))[1])
                overlap = len(theirs & set(pruned)) / len(pruned)
                agree[m].append(overlap)
                row += f" {100 * overlap:>{width - 1}.0f}%"
            else:
                row += f" {'-':>{width}}"
        lines.append(row)
    lines.append("")
    if shares:
        lines.append(f"saliency kept: {100 * sum(shares) / len(shares):.1f}% on average (min "
                     f"{100 * min(shares):.1f}%) of each layer's total {data.method} score")
    for m, values in agree.items():
        if values:
            lines.append(f"{m} would prune {100 * sum(values) / len(values):.0f}% of the same experts")
    if data.stats is not None:
        freq = data.stats.scores("frequency")
        reap = data.stats.scores("reap")
        rho = [spearman(freq[layer], reap[layer]) for layer in sorted(data.stats.completed)]
        rho = [r for r in rho if not math.isnan(r)]
        if rho:
            lines.append(f"Spearman(frequency, REAP) per layer: mean {sum(rho) / len(rho):.2f}, "
                         f"min {min(rho):.2f}, max {max(rho):.2f}")
    return "\n".join(lines).rstrip() + "\n"


# -- the model card ----------------------------------------------------------------------------------
def _hub_id(path: str) -> str | None:
    """'org/name' when ``path`` is a Hugging Face cache snapshot (models--org--name/snapshots/...)."""
    from reap.checkpoint import hub_id

    return hub_id(path)


def _front_matter(readme: Path | None) -> dict[str, Any]:
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


def _describe(path: str | Path | None) -> dict[str, Any] | None:
    """reap.summary.describe's numbers for a checkpoint, or None when it cannot be read."""
    if not path:
        return None
    try:
        from reap.checkpoint import Checkpoint
        from reap.summary import describe

        ckpt = Checkpoint(path)
        try:
            return describe(ckpt)["before"]
        finally:
            ckpt.close()
    except Exception:  # noqa: BLE001 - the source may be gone or elsewhere; sizes then come from the report
        return None


def _fmt_count(n: int | None) -> str:
    from reap.arch import human_count

    return "-" if n is None else f"{human_count(n)} ({n:,})"


def _fmt_bytes(n: int | None) -> str:
    from reap.arch import human_bytes

    return "-" if n is None else f"{human_bytes(n)} ({n:,} bytes)"


def _change(a: int | None, b: int | None) -> str:
    return f"-{100 * (1 - b / a):.1f}%" if a and b is not None else "-"


def reproduce_command(report: dict[str, Any], out_dir: str | Path | None = None) -> str:
    """The command that made this pruning: the recorded one when it was ``reap prune``, else rebuilt."""
    cmd = str(report.get("command") or "")
    if cmd.startswith("reap prune "):
        return cmd
    parts = ["reap", "prune", str(report.get("source", "MODEL")), "--out", str(out_dir or "OUT")]
    if report.get("keep_file"):
        parts += ["--keep", str(report["keep_file"])]
    else:
        parts += ["--ratio", f"{report.get('ratio')}", "--method", str(report.get("method", "reap"))]
        if report.get("method") == "random":
            parts += ["--seed", str(report.get("seed", 0))]
        cal = report.get("calibration") or {}
        data = cal.get("data") or {}
        if data.get("dataset"):
            parts += ["--dataset", str(data["dataset"])]
            if data.get("samples") is not None:
                parts += ["--samples", str(data["samples"])]
            if data.get("max_length") is not None:
                parts += ["--max-length", str(data["max_length"])]
            if data.get("shuffle"):
                parts += ["--shuffle", "--seed", str(data.get("seed", 0))]
            if data.get("pack"):
                parts.append("--pack")
            if data.get("text_field", "text") != "text":
                parts += ["--text-field", str(data["text_field"])]
            if cal.get("dtype"):
                parts += ["--dtype", str(cal["dtype"])]
    return shlex.join(parts)


def _pruned_ids(ids: list[int]) -> str:
    return ", ".join(map(str, ids)) if ids else "none"


def model_card(
    report: dict[str, Any],
    *,
    name: str | None = None,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
    figures: list[str] | tuple[str, ...] = (),
    source_front_matter: dict[str, Any] | None = None,
    out_dir: str | Path | None = None,
) -> str:
    """The README.md text for a pruned checkpoint (see :func:`write_model_card`)."""
    source = str(report.get("source", ""))
    source_name = _hub_id(source) or Path(source).name or "the source model"
    name = name or f"{Path(source).name or 'model'}-reap"
    method, ratio = report.get("method", "?"), report.get("ratio")
    E, K = report.get("num_experts"), report.get("kept_per_layer")
    layers = {int(k): v for k, v in (report.get("layers") or {}).items()}
    if K is None and layers:
        K = len(next(iter(layers.values()))["kept"])
    created = report.get("created") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    fm: dict[str, Any] = {}
    src_fm = source_front_matter or {}
    for key in ("license", "license_name", "license_link", "library_name", "pipeline_tag", "language"):
        if src_fm.get(key) is not None:
            fm[key] = src_fm[key]
    fm.setdefault("library_name", "transformers")
    if _hub_id(source):
        fm["base_model"] = _hub_id(source)
    fm["tags"] = ["moe", "expert-pruning", "reap"]
    lines = ["---"]
    for key, value in fm.items():
        lines.append(f"{key}: {json.dumps(value)}")
    lines += ["---", "", f"# {name}", ""]
    method_text = {
        "reap": "REAP (router-weighted expert activation pruning, "
                "[arXiv 2510.13999](https://arxiv.org/abs/2510.13999)): "
                "each expert scored by the mean over the calibration tokens routed to it of gate weight x "
                "output norm",
        "ean": "expert activation norm: each expert scored by the sum of its output norms over the calibration tokens",
        "frequency": "routing frequency: each expert scored by the number of calibration tokens routed to it",
        "weighted-frequency": "weighted frequency: each expert scored by the sum of its gate weights over the "
                              "calibration tokens",
        "random": f"random choice (seed {report.get('seed', 0)}), a baseline",
        "keep-file": f"an explicit list of kept experts ({report.get('keep_file', 'keep file')})",
    }.get(method) or _criterion_card(method)
    chosen_by = {"reap": "by REAP saliency", "ean": "by expert activation norm", "frequency": "by routing frequency",
                 "weighted-frequency": "by weighted routing frequency", "random": "at random (a baseline)",
                 "greedy-rerouted": "by a greedy search that removes, one at a time, the expert whose removal least "
                                    "changes the MoE layers' output with its tokens re-routed",
                 "keep-file": "from an explicit keep list"}.get(method, f"by {method}")
    lines += [
        f"This is **{source_name}** with {E - K if E and K else '?'} of its {E} routed experts removed from every "
        f"MoE layer by reap, chosen {chosen_by}. Nothing else was changed: the kept experts' "
        "weights are copied byte for byte, the router rows (and the correction bias) are sliced to match, "
        "`config.json` gets the new expert count, and the checkpoint loads in the same serving engines as the "
        "original.",
        "",
        "## Pruning",
        "",
        "| | |",
        "|---|---|",
        f"| Source model | `{source}` |",
        f"| Method | {method_text} |",
        *_selection_rows(report),
        f"| Ratio | {ratio if ratio is not None else '-'} |",
        f"| Experts per layer | {E} -> {K} (top-{report.get('top_k', '?')} routing unchanged) |",
    ]
    mtp = report.get("mtp") or {}
    if mtp.get("kept"):
        lines.append(f"| Multi-token prediction | kept: {mtp['modules']} MTP module{'s' if mtp['modules'] != 1 else ''} "
                     f"(layer{'s' if mtp['modules'] != 1 else ''} {', '.join(map(str, mtp['layers']))} below) pruned "
                     f"to {K} experts {chosen_by.replace('by ', 'by their own ', 1) if chosen_by.startswith('by ') else chosen_by}"
                     "; MTP speculative decoding works as before |")
    elif report.get("dropped_mtp_tensors"):
        lines.append(f"| Multi-token prediction | left out ({report['dropped_mtp_tensors']} tensors, `--drop-mtp`): "
                     "serve without MTP speculative decoding |")
    cal = report.get("calibration") or {}
    if cal:
        data = cal.get("data") or {}
        opts = ", ".join(f"{k} {data[k]}" for k in ("samples", "max_length", "shuffle", "pack", "seed")
                         if data.get(k) not in (None, False))
        lines.append(f"| Calibration data | `{data.get('dataset', '?')}`" + (f" ({opts})" if opts else "") + " |")
        lines.append(f"| Calibration tokens | {cal.get('tokens', '?'):,} in {cal.get('samples', '?')} samples, "
                     f"{cal.get('dtype', '?')} |" if isinstance(cal.get("tokens"), int) else
                     f"| Calibration tokens | {cal.get('tokens', '?')} |")
    else:
        lines.append("| Calibration data | none (the choice does not use calibration) |")
    lines += [
        f"| Date | {created} |",
        f"| Tool | reap {report.get('version', __version__)} |",
        "",
        "## Size",
        "",
        "| | before | after | change |",
        "|---|---|---|---|",
    ]
    b_params = before.get("total_params") if before else None
    a_params = after.get("total_params") if after else None
    b_active = before.get("active_params") if before else None
    a_active = after.get("active_params") if after else None
    b_disk = (before or {}).get("disk_bytes", report.get("bytes_before"))
    a_disk = (after or {}).get("disk_bytes", report.get("bytes_after"))
    lines += [
        f"| Parameters | {_fmt_count(b_params)} | {_fmt_count(a_params)} | {_change(b_params, a_params)} |",
        f"| Active parameters per token | {_fmt_count(b_active)} | {_fmt_count(a_active)} | "
        f"{_change(b_active, a_active)} |",
        f"| Tensor bytes on disk | {_fmt_bytes(b_disk)} | {_fmt_bytes(a_disk)} | {_change(b_disk, a_disk)} |",
        "",
    ]
    if evaluation:
        lines += _evaluation_lines(evaluation)
    lines += [
        "## Experts kept per layer",
        "",
        f"Each MoE layer keeps {K} of its {E} expert{'s' if E != 1 else ''}, renumbered 0..{(K or 1) - 1} in their "
        "original order. "
        "The removed experts (original ids):",
        "",
        "| layer | kept | removed experts |",
        "|---|---|---|",
    ]
    for layer, v in sorted(layers.items()):
        lines.append(f"| {layer} | {len(v['kept'])} | {_pruned_ids(v['pruned'])} |")
    lines += ["", "<details><summary>Kept experts (original ids) per layer</summary>", "",
              "| layer | kept experts |", "|---|---|"]
    for layer, v in sorted(layers.items()):
        lines.append(f"| {layer} | {', '.join(map(str, v['kept']))} |")
    lines += ["", "</details>", ""]
    if figures:
        captions = {
            FIGURES["heatmap"]: "Saliency of every expert (per layer, relative to the layer's largest); "
                                "the removed experts are drawn in grey.",
            FIGURES["curves"]: "Per layer, the experts' saliency sorted from high to low; the dashed line is the cut.",
            FIGURES["scatter"]: "Routing frequency against REAP score; red: removed experts.",
        }
        lines += ["## Pictures", ""]
        for fig in figures:
            lines += [f"![{fig}]({fig})", "", captions.get(fig, ""), ""]
    lines += [
        "## Reproduce",
        "",
        "```bash",
        reproduce_command(report, out_dir),
        "```",
        "",
        f"`{REPORT_NAME}` holds the full record (kept and removed experts, every expert's score, the "
        "calibration settings)" + (f"; `{STATS_NAME}` the calibration statistics" if cal else "") + ".",
        "",
    ]
    return "\n".join(lines)


def _evaluation_lines(evaluation: dict[str, Any]) -> list[str]:
    """A table of ``reap eval`` results: a comparison (original/pruned) or one model's evaluation."""
    if "original" in evaluation and "pruned" in evaluation:
        a, b = evaluation["original"], evaluation["pruned"]
        rows = [("original", a), ("pruned", b)]
    else:
        a = b = evaluation
        rows = [("this model", evaluation)]
    lines = ["## Evaluation", "",
             f"Next-token loss on `{a.get('dataset', '?')}`: {a.get('tokens', '?')} tokens, windows of "
             f"{a.get('seq_len', '?')} tokens (`reap eval`).", "",
             "| model | loss | perplexity |", "|---|---|---|"]
    for label, r in rows:
        lines.append(f"| {label} | {r['loss']:.4f} | {r['perplexity']:.3f} |")
    if a is not b:
        lines.append(f"| change | {b['loss'] - a['loss']:+.4f} | x{b['perplexity'] / a['perplexity']:.4f} |")
    return lines + [""]


def write_model_card(
    out_dir: str | Path,
    report: dict[str, Any] | None = None,
    *,
    source: str | Path | None = None,
    evaluation: dict[str, Any] | None = None,
    figures: list[str] | tuple[str, ...] | None = None,
    published_as: str | Path | None = None,
) -> Path:
    """Write ``README.md`` into a pruned output directory.

    ``report`` defaults to the directory's ``reap_report.json``; ``source`` (default: the report's source)
    is read with :func:`reap.summary.describe` for the sizes before, the directory itself for the sizes
    after (the report's byte counts when a checkpoint cannot be read). ``figures`` defaults to the pictures
    present in the directory; ``published_as`` is the final path when ``out_dir`` is a staging directory.
    """
    out_dir = Path(out_dir)
    if report is None:
        try:
            report = json.loads((out_dir / REPORT_NAME).read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{out_dir} has no readable {REPORT_NAME} ({err}); "
                            "pass a pruned output directory") from None
    src = source if source is not None else report.get("source")
    if figures is None:
        figures = [name for name in FIGURES.values() if (out_dir / name).is_file()]
    final = Path(published_as) if published_as is not None else out_dir
    text = model_card(
        report,
        name=final.resolve().name,
        before=_describe(src),
        after=_describe(out_dir),
        evaluation=evaluation,
        figures=figures,
        source_front_matter=_front_matter(Path(src) / CARD_NAME) if src else None,
        out_dir=final,
    )
    return write_text(out_dir / CARD_NAME, text)


# -- entry points ---------------------------------------------------------------------------------------
def render_report(
    path: str | Path,
    out_dir: str | Path | None = None,
    ratio: float | None = None,
    method: str = "reap",
    *,
    card: bool | None = None,
    evaluation: dict[str, Any] | None = None,
    log=print,
) -> list[Path]:
    """Pictures and text summary (and, for a pruned directory, the model card) of ``path``.

    ``path`` is a pruned output directory or a stats file; ``ratio``/``method`` set the cut for a stats
    file (a pruned directory's own report decides for it). ``out_dir`` defaults to the pruned directory, or
    ``<stats file without suffix>-report/`` beside a stats file. ``card`` (default: for a pruned directory
    written into itself) writes README.md, with ``evaluation`` (a ``reap eval`` result) when given.
    """
    path = Path(path).expanduser()
    data = load_report_data(path, ratio, method)
    pruned_dir = data.report is not None
    if out_dir is None:
        if pruned_dir:
            out_dir = path
        else:
            stats_file = path / STATS_NAME if path.is_dir() else path
            out_dir = stats_file.with_name(stats_file.name.removesuffix(".safetensors") + "-report")
    out_dir = Path(out_dir)
    same_dir = out_dir.resolve() == path.resolve()
    if card is None:
        card = pruned_dir and same_dir
    if card and not pruned_dir:
        raise UserError(f"a model card needs a pruned output directory (with {REPORT_NAME}), not {path}")
    if evaluation is not None and not card:
        raise UserError("--eval results go into the model card, which is written only into a pruned output directory "
                        f"(with {REPORT_NAME}); pass that directory and no --out")
    if evaluation is not None:
        check_evaluation(evaluation, data.report, path)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        written = render_figures(data, out_dir)
    except ImportError:
        raise UserError("drawing the pictures needs matplotlib: pip install matplotlib") from None
    written.append(write_text(out_dir / SUMMARY_NAME, summary_text(data)))
    if card:  # links the pictures that lie beside it
        figures = [p.name for p in written if p.suffix == ".png"] if same_dir else None
        written.append(write_model_card(path, data.report, evaluation=evaluation, figures=figures))
    log(f"wrote {', '.join(p.name for p in written)} to {out_dir}")
    return written


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


def publish(out_dir: str | Path, report: dict[str, Any], stats=None, source: str | Path | None = None,
            published_as: str | Path | None = None, log=None) -> list[Path]:
    """Pictures, summary and model card of a pruning just written to ``out_dir``; never raises.

    A failure here (matplotlib missing, anything else) is logged and skipped. The pruner itself calls
    :func:`publish_assets` and :func:`publish_card` with ``strict``: there a side file that cannot be written fails the
    run (nothing is published), only a missing matplotlib is a note.
    """
    written = publish_assets(out_dir, stats, log)
    return written + publish_card(out_dir, report, source, [p.name for p in written if p.suffix == ".png"],
                                  published_as, log)


def _side_file_failed(what: str, err: Exception) -> Exception:
    """The exception a strict side file raises: an OSError as it is (a full disk: one line from the CLI), anything
    else a UserError that names the step."""
    if isinstance(err, (OSError, UserError)):
        return err
    return UserError(f"{what} failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); nothing "
                     "was published; this is a bug in reap: please report it")


def publish_assets(out_dir: str | Path, stats=None, log=None, strict: bool = False) -> list[Path]:
    """The pictures and text summary of ``out_dir``'s ``reap_report.json`` (they do not read the weights, so
    the pruner draws them while it copies the shards). Without matplotlib: no pictures, a note. Any other failure is
    a note too, or with ``strict`` raised."""
    note = log or logger.warning
    out_dir = Path(out_dir)
    written: list[Path] = []
    try:
        data = load_report_data(out_dir)
        if stats is not None and data.stats is None:
            data.stats = stats
        try:
            written += render_figures(data, out_dir)
        except ImportError:
            note("note: matplotlib is not installed, so the pruning report has no pictures "
                 "(pip install matplotlib, then `reap report <output dir>`)")
        except Exception as err:  # noqa: BLE001 - pictures are a convenience, unless strict
            if strict:
                raise _side_file_failed("drawing the pictures", err) from None
            note(f"note: the pruning report's pictures failed ({type(err).__name__}: {err}); skipped")
        written.append(write_text(out_dir / SUMMARY_NAME, summary_text(data)))
    except Exception as err:  # noqa: BLE001
        if strict:
            raise _side_file_failed("writing the pruning summary", err) from None
        note(f"note: the pruning summary failed ({type(err).__name__}: {err}); skipped")
    return written


def publish_card(out_dir: str | Path, report: dict[str, Any], source: str | Path | None = None,
                 figures: list[str] | None = None, published_as: str | Path | None = None, log=None,
                 strict: bool = False) -> list[Path]:
    """The model card of a finished output directory (it reads the shard headers for the sizes); a failure is a
    note, or with ``strict`` raised."""
    note = log or logger.warning
    try:
        return [write_model_card(Path(out_dir), report, source=source, figures=figures or [],
                                 published_as=published_as)]
    except Exception as err:  # noqa: BLE001
        if strict:
            raise _side_file_failed("writing the model card", err) from None
        note(f"note: the model card failed ({type(err).__name__}: {err}); skipped")
        return []
