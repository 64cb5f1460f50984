"""The pictures of a report, one PNG file each from a :class:`~reap.report.data.ReportData`.

* :func:`heatmap`: layer x expert saliency (per layer, relative to its largest score), pruned experts in grey;
* :func:`curves`: per layer, the sorted saliency curve with the cut (small multiples);
* :func:`scatter`: routing frequency against REAP score (needs the statistics).

Drawn with matplotlib's object-oriented API on the Agg canvas (no pyplot, no global backend change); matplotlib,
numpy and torch are imported when a picture is drawn, so importing this module costs nothing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from reap.report.data import ReportData, spearman

if TYPE_CHECKING:
    import torch


_DPI = 100
KEPT_CMAP = "viridis"  # the kept experts' colour map in the heat map
PRUNED_GREYS = ("#a6a6a6", "#ededed")  # the pruned experts' grey scale: low -> high saliency


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
    ax.set_title(data.title + (" (grey: pruned)" if pruned.any() else ""), fontsize=10, loc="left")
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
    fig.suptitle(data.title, fontsize=10, y=1 - 0.12 / h)
    fig.savefig(path, format="png")
    return path


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
    ax.set_title(f"{data.title}\nrouting frequency vs REAP score"
                 + (f" (Spearman per layer, mean {sum(rho) / len(rho):.2f})" if rho else ""), fontsize=9, loc="left")
    ax.grid(alpha=0.3, lw=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
