"""The pictures of a report, one PNG file each from a :class:`~reap.report.data.ReportData`.

* :func:`heatmap`: layer x expert saliency (per layer, relative to its largest score), pruned experts in grey;
* :func:`curves`: per layer, the sorted saliency curve with the cut (small multiples); for ``greedy-rerouted``
  (whose scores are a rank) the output error the greedy search measured after each removal, with the knee and the
  cut, where the stats file has it (:func:`error_curves`; an older one: the sorted ranks and a note);
* :func:`scatter`: routing frequency against REAP score (needs the statistics).

Drawn with matplotlib's object-oriented API on the Agg canvas (no pyplot, no global backend change); matplotlib,
numpy and torch are imported when a picture is drawn, so importing this module costs nothing. At 150 dpi every
picture is at least 1080 px wide; titles are wrapped to the figure's width and placed in a reserved margin
(constrained layout for the single-plot pictures, fixed margins in inches for the small multiples, where constrained
layout would cost seconds per dozen panels).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from reap.report.data import ReportData, spearman

if TYPE_CHECKING:
    import torch


_DPI = 150  # with the sizes below: every picture at least ~1000 px wide
_MIN_WIDTH = 7.2  # inches (1080 px)
_MAX_WIDTH = 24.0
KEPT_CMAP = "viridis"  # the kept experts' colour map in the heat map
PRUNED_GREYS = ("#a6a6a6", "#ededed")  # the pruned experts' grey scale: low -> high saliency
GREEDY = "greedy-rerouted"


def _figure(width: float, height: float, layout: str | None = None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _fit_text(fig, artist, text: str, width_in: float, fontsize: float) -> None:
    """Set ``artist``'s text to ``text`` wrapped to ``width_in`` inches (its length along the text, for a vertical
    label), measured: rewrapped narrower until the rendered lines fit (a character-count estimate alone cuts titles
    of wide letters)."""
    renderer = fig.canvas.get_renderer()
    limit = width_in * fig.dpi
    chars = max(16, int(width_in * 72 / (fontsize * 0.5)))
    while True:
        wrapped = "\n".join(textwrap.fill(line, chars, break_on_hyphens=False) if line else ""
                             for line in text.split("\n"))
        artist.set_text(wrapped)
        box = artist.get_window_extent(renderer)
        if (box.height if artist.get_rotation() % 180 == 90 else box.width) <= limit or chars <= 16:
            return
        chars = max(16, int(chars * 0.92))


def _relative(scores: torch.Tensor) -> torch.Tensor:
    """Each layer's scores divided by that layer's largest (rows of zeros stay zero)."""
    import torch

    top = scores.abs().amax(dim=1, keepdim=True)
    return scores / torch.where(top > 0, top, torch.ones_like(top))


def _score_label(data: ReportData) -> str:
    """What the colour of the heat map and the y axis of the sorted curves are."""
    if data.method == GREEDY:
        return "position in the greedy removal order / layer max (low: removed first)"
    return f"{data.method} score / layer max"


def pruned_cmap():
    """The light grey scale of pruned experts in the heat map (far from every colour of the kept ones' viridis)."""
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list("reap_pruned", PRUNED_GREYS)


def heatmap(data: ReportData, path: Path) -> Path:
    """Layer x expert saliency, each layer relative to its largest score; pruned experts drawn in grey."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    L, E = data.num_layers, data.num_experts
    width = min(max(3.5 + E * 0.06, _MIN_WIDTH), _MAX_WIDTH)
    fig = _figure(width, min(max(2.4 + L * 0.17, 4.0), 16.0), layout="constrained")
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
        bar = fig.colorbar(kept_img, ax=ax, fraction=min(0.04, 0.35 / width), pad=0.01, aspect=30)
        bar.set_label("", fontsize=9)
        _fit_text(fig, bar.ax.yaxis.label, _score_label(data), fig.get_figheight() - 1.6, 9)
        bar.ax.tick_params(labelsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=8)
    ax.set_xlabel("expert", fontsize=9)
    ax.set_ylabel("layer", fontsize=9)
    what = "colour: kept experts" + ("; grey: pruned" if pruned.any() else "")
    if data.scores is None:
        what = "colour: kept; grey: pruned" if pruned.any() else "kept experts"
    _fit_text(fig, fig.suptitle("", fontsize=11, x=0.15 / width, ha="left"), f"{data.title}\n{what}", width - 0.35, 11)
    fig.savefig(path, format="png")
    return path


def _grid(n: int, panel_w: float, panel_h: float, margins: tuple[float, float, float], title: list[str],
          extra_top: float = 0.0):
    """(figure, axes [rows, cols], cols, top margin in inches) of n small panels under a wrapped, left-aligned title,
    with fixed margins (left, right, bottom) in inches (tight or constrained layout costs seconds per dozen axes);
    ``extra_top`` inches are left free between the title and the panels' titles (a legend's row)."""
    cols = max(1, math.ceil(math.sqrt(n * 1.5)))
    rows = math.ceil(n / cols)
    left, right, bottom = margins
    panel_w = min(panel_w, (_MAX_WIDTH - left - right) / cols)
    width = max(left + right + cols * panel_w, _MIN_WIDTH)
    fig = _figure(width, bottom + rows * panel_h + 1.0)
    head = fig.text(0, 0, "", fontsize=11, ha="left", va="top")
    _fit_text(fig, head, "\n".join(title), width - 0.4, 11)
    top = 0.12 + head.get_window_extent(fig.canvas.get_renderer()).height / fig.dpi + 0.15 + extra_top + 0.3
    height = bottom + top + rows * panel_h
    fig.set_size_inches(width, height)
    head.set_position((0.2 / width, 1 - 0.12 / height))
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=0.3, hspace=0.45)
    return fig, axes, cols, top


def _panel_fontsize(fig, cols: int) -> float:
    """The panels' title size: 9 points, 8 where the panels are narrow (at the width cap)."""
    return 9 if fig.get_figwidth() / cols >= 2.45 else 8


def _nice_ticks(top: float, count: int, integer: bool = False) -> list[float]:
    """Ticks 0, step, 2 step, ... up to ``top`` with a 1/2/2.5/5 x 10^k step giving at most ``count`` + 1 of them."""
    if not top > 0:
        return [0]
    raw = top / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1, math.ceil(step))
    ticks = [i * step for i in range(int(top / step + 1e-9) + 1)]
    return [int(t) for t in ticks] if integer else ticks


def _pct_label(value: float, step: float) -> str:
    """A tick label in percent, with the decimals the tick step needs."""
    digits, scaled = 0, step * 100
    while digits < 6 and abs(scaled * 10 ** digits - round(scaled * 10 ** digits)) > 1e-6:
        digits += 1
    return f"{value * 100:.{digits}f}%"


def curves(data: ReportData, path: Path) -> Path:
    """Per layer: for ``greedy-rerouted`` with the search's measured error, the MoE output error after each removal
    with the knee and the cut (:func:`error_curves`); otherwise the saliency sorted from high to low (relative to the
    largest) and the cut."""
    if data.method == GREEDY:
        from reap.report.greedy import greedy_analysis

        g = greedy_analysis(data.stats, data.pruned, data.layers)
        if g is not None:
            return error_curves(data, g, path)
    return _sorted_curves(data, path)


def _sorted_curves(data: ReportData, path: Path) -> Path:
    layers = data.layers
    n = max(len(layers), 1)
    title = [data.title, "each layer's experts sorted by saliency; red dashed line and shading: the cut (pruned)"]
    if data.method == GREEDY:
        from reap.report.greedy import NO_CURVE_NOTE

        title.append("note: " + NO_CURVE_NOTE)
    fig, axes, cols, top = _grid(n, 2.4, 1.8, (0.9, 0.25, 0.7), title)
    bottom = 0.7
    rel = _relative(data.scores) if data.scores is not None else None
    low = float(rel[layers].min()) if rel is not None and layers else 0.0
    ylim = (min(0.0, low) - 0.05, 1.05)
    xticks = sorted({0, data.num_experts // 2, data.num_experts - 1})
    yticks = [t for t in (0.0, 0.5, 1.0) if ylim[0] <= t]
    # no shared axes and fixed limits: with dozens of panels, matplotlib's shared autoscaling takes seconds
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
        ax.set_title(f"layer {layer}", fontsize=_panel_fontsize(fig, cols), pad=3)
        ax.set_xticks(xticks)
        ax.set_yticks(yticks)
        ax.tick_params(labelsize=8, labelleft=i % cols == 0, labelbottom=i + cols >= len(layers))
        ax.grid(alpha=0.3, lw=0.5)
    w, h = fig.get_figwidth(), fig.get_figheight()
    fig.supxlabel("experts, sorted by saliency from high to low", fontsize=9, y=0.12 / h, va="bottom")
    _fit_text(fig, fig.supylabel("", fontsize=9, x=0.1 / w, ha="left", y=(bottom + (h - top)) / 2 / h),
              _score_label(data), h - top - bottom, 9)
    fig.savefig(path, format="png")
    return path


def error_curves(data: ReportData, g, path: Path) -> Path:
    """Per layer, the MoE output error the greedy search measured after each removal (``g``: a
    :class:`reap.report.greedy.GreedyAnalysis`), its knee (black dot) and the cut (red dashed line)."""
    from matplotlib.lines import Line2D

    from reap.report.greedy import pct

    rows = g.layers
    n = max(len(rows), 1)
    E = data.num_experts
    knee_text = (f"knee of the layers' mean curve: {g.knee} removed, suggested --ratio {g.suggested_ratio:g} or lower"
                 if g.knee else "the layers' mean curve has no knee")
    title = [data.title,
             "greedy-rerouted: the MoE layer's output error ||y - y'||² / ||y||² on the search's token sample after "
             f"each removal (the experts' tokens re-routed); {knee_text}"]
    if g.no_curve:
        title.append(f"not drawn: layer{'s' if len(g.no_curve) != 1 else ''} {', '.join(map(str, g.no_curve))} "
                     "(no greedy order: weighted-ean stands in there)")
    fig, axes, cols, top = _grid(n, 2.5, 1.9, (0.95, 0.25, 0.7), title, extra_top=0.3)
    bottom = 0.7
    xticks = _nice_ticks(rows[0].steps, 5, integer=True) if rows else []
    for i, ax in enumerate(axes.flat):
        if i >= len(rows):
            ax.set_visible(False)
            continue
        r = rows[i]
        xs = range(len(r.curve))
        top_y = max(max(r.curve), 1e-12) * 1.08
        ax.set_autoscale_on(False)
        ax.set_xlim(-0.3, r.steps + 0.3)
        ax.set_ylim(-0.04 * top_y, top_y)
        ax.plot(xs, r.curve, lw=1.3, color="tab:blue", marker="o" if r.steps <= 64 else None, ms=2.2)
        label = f"layer {r.layer}"
        if r.cut is not None and r.cut <= r.steps:
            ax.axvline(r.cut, color="tab:red", lw=1.0, ls="--")
            label += f": cut {pct(r.cut_error if r.cut_error is not None else None, 1)}"
        if r.knee is not None:
            ax.plot([r.knee], [r.curve[r.knee]], "o", color="black", ms=5, zorder=5)
            label += f", knee {r.knee}" if r.cut is not None else f": knee {r.knee}"
        ax.set_title(label, fontsize=_panel_fontsize(fig, cols), pad=3)
        # fixed ticks (tick locators and formatters per panel cost seconds with dozens of panels)
        ax.set_xticks(xticks if r.steps == rows[0].steps else _nice_ticks(r.steps, 5, integer=True))
        yt = _nice_ticks(top_y / 1.08, 4)
        ax.set_yticks(yt, [_pct_label(t, yt[1] - yt[0] if len(yt) > 1 else t) for t in yt])
        ax.tick_params(labelsize=8, labelbottom=i + cols >= len(rows))
        ax.grid(alpha=0.3, lw=0.5)
    w, h = fig.get_figwidth(), fig.get_figheight()
    fig.supxlabel(f"experts removed per layer (of {E}), in the greedy order", fontsize=9, y=0.12 / h, va="bottom")
    _fit_text(fig, fig.supylabel("", fontsize=9, x=0.1 / w, ha="left", y=(bottom + (h - top)) / 2 / h),
              "output error (% of ||y||²)", h - top - bottom, 9)
    handles = [Line2D([], [], color="tab:blue", lw=1.3, marker="o", ms=3, label="error after n removals"),
               Line2D([], [], color="black", lw=0, marker="o", ms=5, label="knee (error starts to climb fast)")]
    if any(r.cut is not None for r in rows):
        handles.append(Line2D([], [], color="tab:red", lw=1.0, ls="--", label="this pruning's cut"))
    fig.legend(handles=handles, loc="lower left", ncol=len(handles), fontsize=8, frameon=False, borderaxespad=0,
               bbox_to_anchor=(0.2 / w, 1 - (top - 0.3) / h))
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
    fig = _figure(8.0, 5.6, layout="constrained")
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
    ax.set_xlabel(xlabel, fontsize=10)
    ax.set_ylabel("REAP score / layer mean", fontsize=10)
    ax.tick_params(labelsize=9)
    title = f"{data.title}\nrouting frequency vs REAP score, every expert of every layer" + (
        f" (Spearman per layer, mean {sum(rho) / len(rho):.2f})" if rho else "")
    width = fig.get_figwidth()
    _fit_text(fig, fig.suptitle("", fontsize=11, x=0.15 / width, ha="left"), title, width - 0.35, 11)
    ax.grid(alpha=0.3, lw=0.5)
    ax.legend(fontsize=9)
    fig.savefig(path, format="png")
    return path
