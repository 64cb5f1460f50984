"""The ``reap`` command line: a thin typer layer over plain functions that take frozen options objects.

Each command parses its flags, builds the options, calls one function and maps user errors
(:class:`reap.errors.UserError`) to a one-line message and exit code 2. No logic of its own.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from reap import __version__
from reap.config import effective
from reap.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Prune experts from Mixture-of-Experts checkpoints with REAP (router-weighted expert activation pruning).",
)


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(msg: str) -> None:
    if _is_rank0():
        typer.echo(msg, err=True)


def user_errors(fn):
    """Run a command; a UserError becomes 'reap: error: ...' on stderr and exit code 2, Ctrl-C exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            typer.echo(f"reap: error: {err}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("reap: interrupted; nothing was published (partial outputs are removed)", err=True)
            raise typer.Exit(130) from None

    return wrapper


# -- shared option groups ------------------------------------------------------------------------------
DatasetOpt = typer.Option(None, "--dataset", help="Calibration data: a .jsonl/.jsonl.gz/.json/.parquet/.txt file or a "
                          "Hugging Face dataset (local cache), or a mixture 'specA:count,specB:count'.")
SamplesOpt = typer.Option(None, "--samples", help="Use the first N records (or N sampled with --shuffle).")
MaxLenOpt = typer.Option(2048, "--max-length", help="Truncate each sample to its first L tokens.")
ShuffleOpt = typer.Option(False, "--shuffle", help="Sample records at random (seeded by --seed) instead of file order.")
PackOpt = typer.Option(False, "--pack", help="Concatenate samples (EOS between) into --max-length chunks.")
TextFieldOpt = typer.Option("text", "--text-field", help="Record field holding plain text.")
SeedOpt = typer.Option(0, "--seed", help="Seed for --shuffle and --method random.")
DeviceOpt = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto (cuda when available).")
DtypeOpt = typer.Option("auto", "--dtype", help="Compute dtype: float32, bfloat16 or auto (bf16 on GPU, fp32 on CPU).")
BatchOpt = typer.Option(16384, "--batch-tokens", help="Padded tokens per forward batch.")
OffloadOpt = typer.Option("auto", "--offload", help="Hidden states between layers: auto, device, cpu or disk.")
WorkdirOpt = typer.Option(None, "--workdir", help="Folder for hidden states with --offload disk.")
ExchangeOpt = typer.Option("auto", "--weight-exchange", help="Several ranks: share (each rank reads 1/N of a layer, "
                           "the ranks all-gather the rest), read (every rank reads all of it), auto (share on GPUs).")
PageCacheOpt = typer.Option(False, "--keep-page-cache", help="Leave the checkpoint's pages in the page cache after "
                            "reading a layer (faster re-runs; job memory limits may count them).")
RemoteOpt = typer.Option(False, "--trust-remote-code", help="Allow the model's own Python code (off by default).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars.")


ConfigOpt = typer.Option(None, "--config", help="YAML recipe with any of these options; flags override it.")


def _with_config(ctx, params: dict, command, required: tuple[str, ...]) -> dict:
    """The command's options merged with its --config recipe; required ones checked after the merge."""
    from reap.config import apply_config

    params = apply_config(ctx, {k: v for k, v in params.items() if k != "ctx"}, command.__annotations__)
    missing = [name for name in required if params.get(name) is None]
    if missing:
        flags = ", ".join("MODEL" if m == "model" else "--" + m.replace("_", "-") for m in missing)
        raise UserError(f"missing {flags}: give it on the command line or in the --config recipe")
    return params


def _calibration_options(p: dict, out=None, resume: bool = False, overwrite: bool = False):
    from reap.calibrate import CalibrateOptions
    from reap.data import DataOptions
    from reap.stream import EngineOptions

    data = DataOptions(dataset=p["dataset"], samples=p["samples"], max_length=p["max_length"], shuffle=p["shuffle"],
                       seed=p["seed"], pack=p["pack"], text_field=p["text_field"])
    engine = EngineOptions(device=p["device"], dtype=p["dtype"], batch_tokens=p["batch_tokens"], offload=p["offload"],
                           workdir=p["workdir"], keep_page_cache=p["keep_page_cache"], exchange=p["weight_exchange"],
                           progress=not p["quiet"],
                           trust_remote_code=p["trust_remote_code"])
    return CalibrateOptions(model=p["model"], data=data, out=out, engine=engine, resume=resume, overwrite=overwrite,
                            recipe=effective(p), checkpoint_every=p.get("checkpoint_every"),
                            keep_checkpoint=bool(p.get("keep_checkpoint")))


# -- commands --------------------------------------------------------------------------------------------
@app.command()
@user_errors
def prune(
    ctx: typer.Context,
    model: Optional[str] = typer.Argument(None, help="Model directory or Hugging Face id (from the local cache)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory for the pruned checkpoint."),
    ratio: Optional[float] = typer.Option(None, "--ratio", help="Fraction of experts to drop per layer (0 < R < 1)."),
    keep: Optional[Path] = typer.Option(None, "--keep", help='JSON {"<layer>": [kept expert ids]} instead of --ratio.'),
    method: str = typer.Option("reap", "--method", help="reap, ean, frequency, weighted-frequency or random."),
    stats: Optional[Path] = typer.Option(None, "--stats", help="Reuse a stats file from `reap calibrate`."),
    dataset: Optional[str] = DatasetOpt,
    samples: Optional[int] = SamplesOpt,
    max_length: int = MaxLenOpt,
    shuffle: bool = ShuffleOpt,
    seed: int = SeedOpt,
    pack: bool = PackOpt,
    text_field: str = TextFieldOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    batch_tokens: int = BatchOpt,
    offload: str = OffloadOpt,
    workdir: Optional[Path] = WorkdirOpt,
    keep_page_cache: bool = PageCacheOpt,
    weight_exchange: str = ExchangeOpt,
    trust_remote_code: bool = RemoteOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
    fsync: bool = typer.Option(True, "--fsync/--no-fsync", help="Flush the output to disk before publishing it "
                               "(--no-fsync leaves that to the OS, as cp does: faster, not crash-safe)."),
    quiet: bool = QuietOpt,
    config: Optional[Path] = ConfigOpt,
):
    """Drop experts and write a checkpoint that serving engines load unchanged (calibrating first if needed)."""
    p = _with_config(ctx, locals(), prune, required=("model", "out"))  # first: locals() = the options
    from reap.prune import PruneOptions, prune_model

    typed = ctx.get_parameter_source("dataset")
    if (typed is None or typed.name != "COMMANDLINE") and (p["stats"] or p["keep"] or p["method"] == "random"):
        p["dataset"] = None  # a recipe's data is not needed when the stats, the keep list or chance decide
    calibration = None
    if p["dataset"] is not None:
        calibration = _calibration_options(p)
    opts = PruneOptions(model=p["model"], out=p["out"], ratio=p["ratio"], keep_file=p["keep"], method=p["method"],
                        seed=p["seed"], stats=p["stats"], calibration=calibration, overwrite=p["overwrite"],
                        fsync=p["fsync"], progress=not p["quiet"], recipe=effective(p))
    result = prune_model(opts, log=log)
    if result is not None:
        typer.echo(str(result.out))


@app.command()
@user_errors
def calibrate(
    ctx: typer.Context,
    model: Optional[str] = typer.Argument(None, help="Model directory or Hugging Face id (from the local cache)."),
    dataset: Optional[str] = DatasetOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Stats file to write (safetensors), updated after every layer."),
    samples: Optional[int] = SamplesOpt,
    max_length: int = MaxLenOpt,
    shuffle: bool = ShuffleOpt,
    seed: int = SeedOpt,
    pack: bool = PackOpt,
    text_field: str = TextFieldOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    batch_tokens: int = BatchOpt,
    offload: str = OffloadOpt,
    workdir: Optional[Path] = WorkdirOpt,
    keep_page_cache: bool = PageCacheOpt,
    weight_exchange: str = ExchangeOpt,
    trust_remote_code: bool = RemoteOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run at its next layer."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Write the hidden states beside "
                                                   "the stats file every N layers, so --resume replays no layer "
                                                   "(0: never; default: as often as costs under ~10% of the time)."),
    keep_checkpoint: bool = typer.Option(False, "--keep-checkpoint", help="Keep those hidden states after the run."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing stats file."),
    quiet: bool = QuietOpt,
    config: Optional[Path] = ConfigOpt,
):
    """Measure every expert's saliency by streaming calibration data through the model layer by layer."""
    p = _with_config(ctx, locals(), calibrate, required=("model", "dataset", "out"))  # first: locals() = the options
    from reap.calibrate import calibrate as run

    _, summary = run(_calibration_options(p, out=p["out"], resume=p["resume"], overwrite=p["overwrite"]), log=log)
    if _is_rank0():
        typer.echo(json.dumps({"stats": str(p["out"]), **summary}))


@app.command("eval")
@user_errors
def eval_(
    model: str = typer.Argument(..., help="Model directory (e.g. a pruned output) or Hugging Face id (from the local cache)."),
    dataset: str = typer.Option(..., "--dataset", help="Evaluation text: a .jsonl/.jsonl.gz/.json/.parquet/.txt file or a "
                                "Hugging Face dataset (local cache); each document is followed by EOS, all concatenated."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Also evaluate this model (e.g. the original) on the "
                                           "same tokens and report the difference."),
    max_tokens: int = typer.Option(65536, "--max-tokens", help="Number of predicted tokens to score."),
    seq_len: int = typer.Option(1024, "--seq-len", help="Window length: windows of S+1 tokens at stride S, no context "
                                "carried over between windows."),
    text_field: str = TextFieldOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    batch_tokens: int = BatchOpt,
    offload: str = OffloadOpt,
    workdir: Optional[Path] = WorkdirOpt,
    trust_remote_code: bool = RemoteOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the result as JSON (for `reap report --eval`)."),
    quiet: bool = QuietOpt,
):
    """Next-token loss and perplexity, streamed layer by layer (models larger than memory work too)."""
    from dataclasses import replace

    from reap.evaluate import EvalOptions, compare, evaluate, write_json
    from reap.stream import EngineOptions

    engine = EngineOptions(device=device, dtype=dtype, batch_tokens=batch_tokens, offload=offload, workdir=workdir,
                           progress=not quiet, trust_remote_code=trust_remote_code)
    opts = EvalOptions(model=model, dataset=dataset, max_tokens=max_tokens, seq_len=seq_len, engine=engine,
                       text_field=text_field)
    result = compare(replace(opts, model=baseline), opts, log=log) if baseline else evaluate(opts, log=log)
    if out is not None:
        write_json(out, result)
    typer.echo(json.dumps(result, indent=2))


@app.command()
@user_errors
def report(
    path: Path = typer.Argument(..., help="A pruned output directory (with reap_report.json) or a stats file from "
                                "`reap calibrate`."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the pictures and summary (default: the "
                                       "pruned directory itself, or <stats>-report/ beside a stats file)."),
    ratio: Optional[float] = typer.Option(None, "--ratio", help="For a stats file: show the cut at this ratio."),
    method: str = typer.Option("reap", "--method", help="For a stats file: the saliency to show (reap, ean, frequency, "
                               "weighted-frequency)."),
    eval_file: Optional[Path] = typer.Option(None, "--eval", help="A `reap eval --out` result to add to the model card."),
):
    """Pictures (saliency heat map, sorted saliency per layer, frequency vs REAP), a summary and the model card."""
    from reap.report import SUMMARY_NAME, read_evaluation, render_report

    evaluation = read_evaluation(eval_file) if eval_file is not None else None
    written = render_report(path, out, ratio, method, evaluation=evaluation, log=log)
    summary = next((p for p in written if p.name == SUMMARY_NAME), None)
    if summary is not None:
        typer.echo(summary.read_text(), nl=False)


@app.command()
@user_errors
def inspect(
    model: Optional[str] = typer.Argument(None, help="Model directory or Hugging Face id (from the local cache)."),
    ratio: Optional[float] = typer.Option(None, "--ratio", help="Also show the model after pruning at this ratio."),
    families: bool = typer.Option(False, "--families", help="List the supported model families and what was verified."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Family, experts, top-k, dtypes, parameters (total and active) and disk size; after pruning with --ratio."""
    from reap.families import describe_families, format_families
    from reap.summary import describe, format_description

    if families:
        if model is not None or ratio is not None:
            raise UserError("--families lists the supported families; it takes no model or --ratio")
        rows = describe_families()
        typer.echo(json.dumps(rows, indent=2) if as_json else format_families(rows))
        return
    if model is None:
        raise UserError("pass a model directory (or Hugging Face id) to inspect, or --families to list the families")
    from reap.checkpoint import Checkpoint

    info = describe(Checkpoint(model), ratio)
    typer.echo(json.dumps(info, indent=2) if as_json else format_description(info))


@app.command()
@user_errors
def demo(
    workdir: Path = typer.Option(Path("reap-demo"), "--dir", help="Where to put the demo model and its pruned copy."),
    ratio: float = typer.Option(0.25, "--ratio", help="Fraction of experts to drop."),
    quiet: bool = QuietOpt,
):
    """Generate a tiny MiniMax-M2 checkpoint, calibrate it on reap's own source code, prune it, check it."""
    from reap.demo import run_demo

    run_demo(workdir, ratio, progress=not quiet, log=log)


def version_callback(value: bool):
    if value:
        typer.echo(f"reap {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                       help="Show the version and exit.")):
    """reap: one-shot expert pruning for Mixture-of-Experts checkpoints."""


def main() -> None:
    """Entry point: typer/click usage errors (unknown flag, bad number) also end as one line and exit code 2.

    Recent typer vendors its own click, so its exceptions are recognised by shape, not by class.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        code = app(prog_name="reap", standalone_mode=False)
    except Exception as err:  # noqa: BLE001 - re-raised unless it is one of click's own
        kind = type(err).__name__
        if kind == "NoArgsIsHelpError":
            typer.echo(err.ctx.get_help())
            code = 0
        elif kind == "Abort":
            typer.echo("reap: interrupted", err=True)
            code = 130
        elif hasattr(err, "format_message") and isinstance(getattr(err, "exit_code", None), int):
            ctx = getattr(err, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            typer.echo(f"reap: error: {err.format_message()}{hint}", err=True)
            code = err.exit_code
        else:
            raise
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
