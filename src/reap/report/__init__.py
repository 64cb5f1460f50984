"""``reap report``: pictures, a text summary and the model card of a pruning.

Input is either a stats file (``reap calibrate`` output or ``reap_stats.safetensors``; with a ratio the cut
is shown) or a pruned output directory (``reap_report.json``, plus ``reap_stats.safetensors`` when the
experts were chosen from calibration). Output, into the pruned directory by default:

* ``reap_saliency_heatmap.png``  layer x expert saliency (per layer, relative to its largest score), pruned
  experts in grey;
* ``reap_saliency_curves.png``   per layer, the sorted saliency curve with the cut (small multiples); for the
  default ``greedy-rerouted`` (whose scores are a rank) the MoE output error the greedy search measured after
  each removal, with the cut and the knee (stats files written before that was recorded: the sorted ranks, a note);
* ``reap_frequency_vs_reap.png`` routing frequency against REAP score (needs the statistics);
* ``reap_summary.txt``           the text summary: the numbers per layer, in text;
* ``README.md``                  the model card of the pruned checkpoint (:func:`write_model_card`).

The modules: :mod:`reap.report.data` (reading the inputs into per-layer data), :mod:`reap.report.figures` (the
pictures), :mod:`reap.report.text` (the text summary), :mod:`reap.report.card` (the model card),
:mod:`reap.report.greedy` (the greedy search's error curves, their knees, the suggested ratio); the file names
are :mod:`reap.core.names`'. This package holds the entry points, :func:`render_report` (``reap report``) and
:func:`publish_assets` / :func:`publish_card` (the pruner), and re-exports the names callers use; the entry points
call the drawing and writing functions through this namespace.

Without matplotlib the card and the text summary are written and a note logged; in the pruner any other failure
to write one of these side files fails the run, so an output never holds a short or missing card, summary or
picture. A ``--method random`` pruning is drawn as kept/pruned only: its draw is no score. ``reap report
--eval`` takes only a ``reap eval`` result of the pruned model itself (and of its source).

Legend: L layers, E experts, K kept experts per layer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from reap.core.errors import UserError
from reap.core.names import CARD_NAME, FIGURES, GENERATED, REPORT_NAME, STATS_NAME, SUMMARY_NAME
from reap.report.card import model_card, reproduce_command, write_model_card
from reap.report.data import ReportData, check_evaluation, load_report_data, read_evaluation, spearman
from reap.report.figures import KEPT_CMAP, PRUNED_GREYS, curves, heatmap, pruned_cmap, scatter
from reap.report.text import summary_text
from reap.io.staging import write_text

__all__ = [
    "CARD_NAME", "FIGURES", "GENERATED", "KEPT_CMAP", "PRUNED_GREYS", "REPORT_NAME", "STATS_NAME", "SUMMARY_NAME",
    "ReportData", "check_evaluation", "curves", "heatmap", "load_report_data", "model_card", "publish_assets",
    "publish_card", "pruned_cmap", "read_evaluation", "render_figures", "render_report",
    "reproduce_command", "scatter", "spearman", "summary_text", "write_model_card",
]

logger = logging.getLogger(__name__)


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


def _side_file_failed(what: str, err: Exception) -> Exception:
    """The exception a side file's failure raises: an OSError as it is (a full disk: one line from the CLI), anything
    else a UserError that names the step."""
    if isinstance(err, (OSError, UserError)):
        return err
    return UserError(f"{what} failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); nothing "
                     "was published; this is a bug in reap: please report it")


def publish_assets(out_dir: str | Path, stats=None, log=None, strict: bool = True) -> list[Path]:
    """The pictures and text summary of ``out_dir``'s ``reap_report.json`` (they do not read the weights, so
    the pruner draws them while it copies the shards). Without matplotlib: no pictures, a note to ``log``. Any other
    failure raises (:func:`_side_file_failed`): the pruner publishes nothing then. ``strict`` is the only
    behaviour (the note-and-skip mode had no caller); the keyword stays for the pruner's call."""
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
        except Exception as err:  # noqa: BLE001 - named and re-raised
            raise _side_file_failed("drawing the pictures", err) from None
        written.append(write_text(out_dir / SUMMARY_NAME, summary_text(data)))
    except Exception as err:  # noqa: BLE001 - named and re-raised
        raise _side_file_failed("writing the pruning summary", err) from None
    return written


def publish_card(out_dir: str | Path, report: dict[str, Any], source: str | Path | None = None,
                 figures: list[str] | None = None, published_as: str | Path | None = None,
                 strict: bool = True) -> list[Path]:
    """The model card of a finished output directory (it reads the shard headers for the sizes), as a one-item list;
    a failure raises (:func:`_side_file_failed`). ``strict``: as in :func:`publish_assets`."""
    try:
        return [write_model_card(Path(out_dir), report, source=source, figures=figures or [],
                                 published_as=published_as)]
    except Exception as err:  # noqa: BLE001 - named and re-raised
        raise _side_file_failed("writing the model card", err) from None
