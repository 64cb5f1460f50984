"""The ``reap`` command line: a thin typer layer over plain functions that take frozen options objects.

Each command parses its flags, builds the options, calls one function and maps user errors
(:class:`reap.errors.UserError`, and OS errors: a full disk, a read-only place) to a one-line message and exit
code 2; interrupts and termination signals to 130/143/129 after cleanup. Every command prints its result on
stdout, as human text or, with ``--json``, as one JSON object; logs and progress go to stderr. No logic of its own.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperCommand

from reap import __version__
from reap.config import effective
from reap.errors import Terminated, UserError, describe_os_error, interrupt_exit_code, signals_as_interrupts

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Prune experts from Mixture-of-Experts checkpoints with REAP (router-weighted expert activation pruning).",
)


class _Command(TyperCommand):
    """typer's command, its --help shown without a type (as every other flag here)."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(msg: str) -> None:
    if _is_rank0():
        typer.echo(msg, err=True)


_INTERRUPTED = {
    "prune": "nothing was published (the staging folder and the lock were removed)",
    "calibrate": "the stats file keeps every layer finished so far: run the same command with --resume to continue",
    "eval": "nothing was written",
    "report": "the report may be incomplete: run `reap report` again",
    "demo": "the demo folder is incomplete: run `reap demo` again",
}
_OS_ERROR_NOTE = {"prune": "; nothing was published", "eval": "", "calibrate": ""}


def user_errors(fn):
    """Run a command; a UserError or an OSError becomes one line 'reap: error: ...' on stderr and exit code 2;
    Ctrl-C, SIGTERM and SIGHUP end it with 130, 143 and 129 after the same cleanup, saying what was kept."""
    command = fn.__name__.rstrip("_")

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with signals_as_interrupts():
                return fn(*args, **kwargs)
        except UserError as err:
            typer.echo(f"reap: error: {err}", err=True)
            raise typer.Exit(2) from None
        except OSError as err:
            typer.echo(f"reap: error: {describe_os_error(err)}{_OS_ERROR_NOTE.get(command, '')}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as err:
            what = f"terminated by {err.name}" if isinstance(err, Terminated) else "interrupted"
            note = getattr(err, "reap_note", None) or _INTERRUPTED.get(command)
            typer.echo(f"reap: {what}" + (f"; {note}" if note else ""), err=True)
            raise typer.Exit(interrupt_exit_code(err)) from None

    return wrapper


def emit(result: dict, human: str, as_json: bool) -> None:
    """The command's result on stdout: JSON with --json, else the human text (rank 0 only)."""
    if _is_rank0():
        typer.echo(json.dumps(result, indent=2) if as_json else human)


# -- shared option groups ------------------------------------------------------------------------------
ModelArg = typer.Argument(None, metavar="MODEL", show_default=False,
                          help="Model directory or Hugging Face id (from the local cache).")
DatasetOpt = typer.Option(None, "--dataset", metavar="DATA", help="Calibration data: a .jsonl/.jsonl.gz/.json/.parquet/"
                          ".txt file or a Hugging Face dataset (local cache), or a mixture 'specA:count,specB:count'.")
SamplesOpt = typer.Option(None, "--samples", metavar="N", help="Use the first N records (or N sampled with --shuffle).")
MaxLenOpt = typer.Option(2048, "--max-length", metavar="L", help="Truncate each sample to its first L tokens.")
ShuffleOpt = typer.Option(False, "--shuffle", metavar="", help="Sample records at random (seeded by --seed) instead of "
                          "file order.")
PackOpt = typer.Option(False, "--pack", metavar="", help="Concatenate samples (EOS between) into --max-length chunks.")
TextFieldOpt = typer.Option("text", "--text-field", metavar="FIELD", help="Record field holding plain text.")
DeviceOpt = typer.Option("auto", "--device", metavar="DEVICE", help="cpu, cuda, cuda:N or auto (cuda when available).")
DtypeOpt = typer.Option("auto", "--dtype", metavar="DTYPE", help="Compute dtype: float32, bfloat16 or auto (bf16 on GPU, "
                        "fp32 on CPU).")
BatchOpt = typer.Option(16384, "--batch-tokens", metavar="N", help="Padded tokens per forward batch.")
OffloadOpt = typer.Option("auto", "--offload", metavar="MODE", help="Hidden states between layers: auto, device, cpu or "
                          "disk.")
WorkdirOpt = typer.Option(None, "--workdir", metavar="DIR", help="Folder for hidden states with --offload disk.")
RemoteOpt = typer.Option(False, "--trust-remote-code", metavar="", help="Allow the model's own Python code (its "
                         "tokenizer, say; off by default).")
QuietOpt = typer.Option(False, "--quiet", "-q", metavar="", help="No progress bars or progress lines.")
JsonOpt = typer.Option(False, "--json", metavar="", help="Print the result as one JSON object on stdout (human text "
                       "otherwise).")
DropMtpOpt = typer.Option(False, "--drop-mtp", metavar="", help="Leave multi-token-prediction modules out (smaller "
                          "output, no MTP speculative decoding) instead of calibrating and pruning them like every "
                          "layer.")
StrictOpt = typer.Option(False, "--strict", metavar="", help="Make thin calibration data an error instead of a warning "
                         "(fewer than 4 routed tokens per expert, or over a quarter of a layer's experts never routed).")
OverwriteOpt = typer.Option(False, "--overwrite", metavar="", help="Replace an existing output.")
ExchangeOpt = typer.Option("auto", "--weight-exchange", metavar="MODE", help="Several ranks: share (each rank reads "
                           "1/N of a layer, the ranks all-gather the rest), read (every rank reads all of it), auto "
                           "(share on GPUs).")
PageCacheOpt = typer.Option(False, "--keep-page-cache", metavar="", help="Leave the checkpoint's pages in the page "
                            "cache after reading a layer (faster re-runs; job memory limits may count them).")


GreedyTokensOpt = typer.Option(65536, "--greedy-tokens", metavar="N", help="Tokens per MoE layer in the sample the "
                               "greedy-rerouted search runs on (every ceil(T/N)-th; 0: skip the search).")
GreedyMemoryOpt = typer.Option(4.0, "--greedy-memory", metavar="GIB", help="Memory for every expert's output on the "
                               "greedy sample (tokens x experts x hidden); fewer tokens are sampled where N would not fit.")
#: the names --method accepts (reap.criteria.METHODS; listed here so that the CLI starts without torch)
METHOD_HELP = ("greedy-rerouted (default), reap, frequency, weighted-frequency, ean, weighted-ean, ean-mean, ean-sq, "
               "max-activation, reap-prior or random (docs/criteria.md).")

ConfigOpt = typer.Option(None, "--config", metavar="RECIPE.yaml", help="YAML recipe with any of these options; flags "
                         "override it.")


def _with_config(ctx, params: dict, command, required: tuple[str, ...]) -> dict:
    """The command's options merged with its --config recipe; required ones checked after the merge."""
    from reap.config import apply_config, option_types

    params = apply_config(ctx, {k: v for k, v in params.items() if k != "ctx"}, option_types(command))
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
                           progress=not p["quiet"], greedy_tokens=p["greedy_tokens"], greedy_memory=p["greedy_memory"],
                           trust_remote_code=p["trust_remote_code"])
    return CalibrateOptions(model=p["model"], data=data, out=out, engine=engine, resume=resume, overwrite=overwrite,
                            recipe=effective(p), strict=p["strict"], checkpoint_every=p.get("checkpoint_every"),
                            drop_mtp=bool(p.get("drop_mtp")),
                            keep_checkpoint=bool(p.get("keep_checkpoint")))


# -- commands --------------------------------------------------------------------------------------------
@app.command(cls=_Command)
@user_errors
def prune(
    ctx: typer.Context,
    model: Optional[str] = ModelArg,
    out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="DIR", help="Output directory for the pruned "
                                       "checkpoint."),
    ratio: Optional[float] = typer.Option(None, "--ratio", metavar="R", help="Fraction of experts to drop per layer "
                                          "(0 < R < 1)."),
    keep: Optional[Path] = typer.Option(None, "--keep", metavar="KEEP.json", help='JSON {"<layer>": \\[kept expert ids]} '
                                        "instead of --ratio."),
    method: str = typer.Option("greedy-rerouted", "--method", metavar="METHOD", help=METHOD_HELP),
    multiple_of: int = typer.Option(1, "--multiple-of", metavar="N", help="Round the kept experts per layer down to a "
                                    "multiple of N (e.g. 8 for expert parallelism on 8 GPUs)."),
    protect_super_experts: bool = typer.Option(False, "--protect-super-experts", metavar="", help="Never prune an "
                                               "expert whose max output norm exceeds max(99.5th percentile, max/10) of "
                                               "its layer."),
    stats: Optional[Path] = typer.Option(None, "--stats", metavar="STATS", help="Reuse a stats file from `reap "
                                         "calibrate`."),
    dataset: Optional[str] = DatasetOpt,
    samples: Optional[int] = SamplesOpt,
    max_length: int = MaxLenOpt,
    shuffle: bool = ShuffleOpt,
    seed: int = typer.Option(0, "--seed", metavar="S", help="Seed for --shuffle and --method random."),
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
    strict: bool = StrictOpt,
    drop_mtp: bool = DropMtpOpt,
    greedy_tokens: int = GreedyTokensOpt,
    greedy_memory: float = GreedyMemoryOpt,
    overwrite: bool = OverwriteOpt,
    fsync: bool = typer.Option(True, "--fsync/--no-fsync", metavar="", help="Flush the output to disk before publishing "
                               "it (--no-fsync leaves that to the OS, as cp does: faster, not crash-safe)."),
    quiet: bool = QuietOpt,
    as_json: bool = JsonOpt,
    config: Optional[Path] = ConfigOpt,
):
    """Drop experts and write a checkpoint that serving engines load unchanged (calibrating first if needed)."""
    p = _with_config(ctx, locals(), prune, required=("model", "out"))  # first: locals() = the options
    from reap.arch import human_bytes
    from reap.names import REPORT_NAME
    from reap.prune import PruneOptions, prune_model

    typed = ctx.get_parameter_source("dataset")
    if (typed is None or typed.name != "COMMANDLINE") and (p["stats"] or p["keep"] or p["method"] == "random"):
        p["dataset"] = None  # a recipe's data is not needed when the stats, the keep list or chance decide
    calibration = None
    if p["dataset"] is not None:
        calibration = _calibration_options(p)
    opts = PruneOptions(model=p["model"], out=p["out"], ratio=p["ratio"], keep_file=p["keep"], method=p["method"],
                        seed=p["seed"], stats=p["stats"], calibration=calibration, overwrite=p["overwrite"],
                        multiple_of=p["multiple_of"], protect_super=p["protect_super_experts"],
                        fsync=p["fsync"], progress=not p["quiet"], recipe=effective(p), strict=p["strict"],
                        drop_mtp=p["drop_mtp"])
    result = prune_model(opts, log=log)
    if result is None:  # another rank of a torchrun job: rank 0 writes
        return
    report = json.loads((result.out / REPORT_NAME).read_text())
    layers = len(report["layers"])
    info = {"out": str(result.out), "method": report["method"], "ratio": report["ratio"],
            "experts_before": report["num_experts"], "experts_after": result.kept_per_layer, "moe_layers": layers,
            "bytes_before": report["bytes_before"], "bytes_after": result.bytes_written,
            "dropped_mtp_tensors": result.dropped_mtp, "seconds": round(result.seconds, 3)}
    emit(info, f"wrote {result.out}: {report['num_experts']} -> {result.kept_per_layer} experts per layer in {layers} "
               f"MoE layer{'s' if layers != 1 else ''} ({report['method']}), {human_bytes(result.bytes_written)} of "
               f"tensors (was {human_bytes(report['bytes_before'])}), in {result.seconds:.1f} s; verified",
         p["as_json"])


@app.command(cls=_Command)
@user_errors
def calibrate(
    ctx: typer.Context,
    model: Optional[str] = ModelArg,
    dataset: Optional[str] = DatasetOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="STATS", help="Stats file to write (safetensors), "
                                       "updated after every layer."),
    samples: Optional[int] = SamplesOpt,
    max_length: int = MaxLenOpt,
    shuffle: bool = ShuffleOpt,
    seed: int = typer.Option(0, "--seed", metavar="S", help="Seed for --shuffle."),
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
    strict: bool = StrictOpt,
    drop_mtp: bool = DropMtpOpt,
    greedy_tokens: int = GreedyTokensOpt,
    greedy_memory: float = GreedyMemoryOpt,
    resume: bool = typer.Option(False, "--resume", metavar="", help="Continue an interrupted run at its next layer (a "
                                "complete stats file is left as it is)."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", metavar="N", help="Write the hidden "
                                                   "states beside the stats file every N layers, so --resume replays "
                                                   "no layer (0: never; default: as often as costs under ~10% of the "
                                                   "time)."),
    keep_checkpoint: bool = typer.Option(False, "--keep-checkpoint", metavar="", help="Keep those hidden states after "
                                         "the run."),
    overwrite: bool = typer.Option(False, "--overwrite", metavar="", help="Replace an existing stats file."),
    quiet: bool = QuietOpt,
    as_json: bool = JsonOpt,
    config: Optional[Path] = ConfigOpt,
):
    """Measure every expert's saliency by streaming calibration data through the model layer by layer."""
    p = _with_config(ctx, locals(), calibrate, required=("model", "dataset", "out"))  # first: locals() = the options
    from reap.calibrate import calibrate as run

    _, summary = run(_calibration_options(p, out=p["out"], resume=p["resume"], overwrite=p["overwrite"]), log=log)
    done = summary.get("layers", 0)
    human = (f"{p['out']} was already complete; nothing to do" if summary.get("already_complete") else
             f"wrote {p['out']}: {summary['tokens']} tokens through {done} layer{'s' if done != 1 else ''} in "
             f"{summary['seconds']:.1f} s")
    emit({"stats": str(p["out"]), **summary}, human, p["as_json"])


@app.command("eval", cls=_Command)
@user_errors
def eval_(
    model: Optional[str] = typer.Argument(None, metavar="MODEL", show_default=False, help="Model directory (e.g. a "
                                          "pruned output) or Hugging Face id (from the local cache)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", metavar="DATA", help="Evaluation text: a .jsonl/.jsonl.gz/"
                                          ".json/.parquet/.txt file or a Hugging Face dataset (local cache); each "
                                          "document is followed by EOS, all concatenated."),
    baseline: Optional[str] = typer.Option(None, "--baseline", metavar="MODEL", help="Also evaluate this model (e.g. the "
                                           "original) on the same tokens and report the difference."),
    max_tokens: int = typer.Option(65536, "--max-tokens", metavar="N", help="Number of predicted tokens to score."),
    seq_len: int = typer.Option(1024, "--seq-len", metavar="S", help="Window length: windows of S+1 tokens at stride S, "
                                "no context carried over between windows."),
    text_field: str = TextFieldOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    batch_tokens: int = BatchOpt,
    offload: str = OffloadOpt,
    workdir: Optional[Path] = WorkdirOpt,
    trust_remote_code: bool = RemoteOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="RESULT.json", help="Also write the result as JSON "
                                       "(for `reap report --eval`); checked writable before the evaluation starts."),
    quiet: bool = QuietOpt,
    as_json: bool = JsonOpt,
):
    """Next-token loss and perplexity, streamed layer by layer (models larger than memory work too)."""
    from dataclasses import replace

    from reap.evaluate import EvalOptions, check_writable, compare, evaluate, format_result, write_json
    from reap.stream import EngineOptions

    missing = [flag for flag, value in (("MODEL", model), ("--dataset", dataset)) if value is None]
    if missing:
        raise UserError(f"missing {', '.join(missing)}: e.g. `reap eval PRUNED --dataset eval.jsonl --baseline ORIGINAL`")
    if out is not None:
        check_writable(out)
    engine = EngineOptions(device=device, dtype=dtype, batch_tokens=batch_tokens, offload=offload, workdir=workdir,
                           progress=not quiet, trust_remote_code=trust_remote_code)
    opts = EvalOptions(model=model, dataset=dataset, max_tokens=max_tokens, seq_len=seq_len, engine=engine,
                       text_field=text_field)
    result = compare(replace(opts, model=baseline), opts, log=log) if baseline else evaluate(opts, log=log)
    emit(result, format_result(result), as_json)  # first: a failing --out below must not lose the result
    if out is not None:
        write_json(out, result)
        log(f"wrote {out}")


@app.command(cls=_Command)
@user_errors
def report(
    path: Optional[Path] = typer.Argument(None, metavar="DIR_OR_STATS", show_default=False, help="A pruned output "
                                          "directory (with reap_report.json) or a stats file from `reap calibrate`."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="DIR", help="Folder for the pictures and summary "
                                       "(default: the pruned directory itself, or <stats>-report/ beside a stats file)."),
    ratio: Optional[float] = typer.Option(None, "--ratio", metavar="R", help="For a stats file: show the cut at this "
                                          "ratio."),
    method: str = typer.Option("greedy-rerouted", "--method", metavar="METHOD", help="For a stats file: the criterion "
                               "to show and cut by, any but random: " + METHOD_HELP),
    eval_file: Optional[Path] = typer.Option(None, "--eval", metavar="RESULT.json", help="A `reap eval --out` result of "
                                             "this pruned model (or of it against its original) for the model card."),
    as_json: bool = JsonOpt,
):
    """Pictures (saliency heat map, sorted saliency per layer, frequency vs REAP), a summary and the model card."""
    from reap.names import SUMMARY_NAME
    from reap.report import read_evaluation, render_report

    if path is None:
        raise UserError("missing DIR_OR_STATS: pass a pruned output directory or a stats file from `reap calibrate`")
    evaluation = read_evaluation(eval_file) if eval_file is not None else None
    written = render_report(path, out, ratio, method, evaluation=evaluation, log=log)
    summary = next((p for p in written if p.name == SUMMARY_NAME), None)
    text = summary.read_text() if summary is not None else ""
    emit({"written": [str(p) for p in written], "summary": text}, text.rstrip("\n"), as_json)


@app.command(cls=_Command)
@user_errors
def inspect(
    model: Optional[str] = ModelArg,
    ratio: Optional[float] = typer.Option(None, "--ratio", metavar="R", help="Also show the model after pruning at this "
                                          "ratio."),
    families: bool = typer.Option(False, "--families", metavar="", help="List the supported model families and what "
                                  "was verified."),
    drop_mtp: bool = typer.Option(False, "--drop-mtp", metavar="", help="Predict the sizes with the multi-token-"
                                  "prediction modules left out (as prune --drop-mtp does)."),
    as_json: bool = JsonOpt,
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

    info = describe(Checkpoint(model), ratio, keep_mtp=not drop_mtp)
    typer.echo(json.dumps(info, indent=2) if as_json else format_description(info))


@app.command(cls=_Command)
@user_errors
def demo(
    workdir: Path = typer.Option(Path("reap-demo"), "--dir", metavar="DIR", help="Where to put the demo model and its "
                                 "pruned copy."),
    ratio: float = typer.Option(0.25, "--ratio", metavar="R", help="Fraction of experts to drop."),
    quiet: bool = QuietOpt,
    as_json: bool = JsonOpt,
):
    """Generate a tiny MiniMax-M2 checkpoint, calibrate it on reap's own source code, prune it, check it."""
    from reap.demo import run_demo

    result = run_demo(workdir, ratio, progress=not quiet, log=log)
    emit(result, f"demo done: {result['pruned']} ({result['experts_before']} -> {result['experts_after']} experts per "
                 f"layer); max |logit difference| to the original with those experts masked: "
                 f"{result['max_logit_gap']:.2e}", as_json)


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
