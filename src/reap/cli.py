"""The ``reap`` command line: a thin typer layer over plain functions that take frozen options objects.

Each command parses its flags, builds the options, calls one function and maps user errors
(:class:`reap.core.errors.UserError`, and OS errors: a full disk, a read-only place) to a one-line message and exit
code 2; interrupts and termination signals to 130/143/129 after cleanup. Every command prints its result on
stdout, as human text or, with ``--json``, as one JSON object; logs and progress go to stderr (with ``--quiet`` only
warnings and notices, :func:`reap.core.progress.quiet_log`). No logic of its own.

Bad options are refused before torch or transformers is imported: the options objects check themselves when they
are built (:mod:`reap.core.options`), their files are checked right after (:func:`check_inputs`), and only
then does a command import the stage that does the work. Help is click's plain layout (no rich panels): readable,
and no option name cut, at 80 columns.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import typing
from inspect import Parameter, Signature, signature
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperCommand

from reap import __version__
from reap.recipe import effective
from reap.core.errors import Terminated, UserError, describe_os_error, interrupt_exit_code, signals_as_interrupts
from reap.core.flags import Param, build, params
from reap.core.options import (METHOD_HELP, METHODS, CalibrateOptions, CommandOptions, EvalOptions, PruneOptions,
                               check_choice, input_file)
from reap.core.progress import quiet_log

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: rich's table cut long flags (--protect-super-expe…) at 80 columns
    context_settings={"max_content_width": 120},  # as wide as the terminal, up to 120 columns
    help="Prune experts from Mixture-of-Experts checkpoints with REAP (router-weighted expert activation pruning).",
)



def check_inputs(opts) -> None:
    """UserError if a file the options name is not there: the keep file, the stats file, a dataset file (a Hugging
    Face dataset name is looked up later). The command line calls it right after building the options, before
    anything heavy is imported; the stages check the same again when they read the files."""
    if isinstance(opts, PruneOptions):
        input_file("keep file", opts.keep_file, 'pass a JSON file {"<layer>": [expert ids]}')
        input_file("expert stats file", opts.stats, "pass a stats file from `reap calibrate` (or --dataset DATA "
                    "to calibrate here)")
        if opts.calibration is not None:
            check_inputs(opts.calibration)
    elif isinstance(opts, (CalibrateOptions, EvalOptions)):
        from reap.data.records import parse_dataset_spec  # no torch: it checks the spec and that its files exist

        parse_dataset_spec(opts.data.dataset if isinstance(opts, CalibrateOptions) else opts.dataset)


def _no_type(ctx) -> None:
    return None


class _Command(TyperCommand):
    """typer's command, its --help shown without types: the positional argument is ``MODEL``, not ``MODEL <str>``,
    and --help has no metavar (as every other flag here)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.param_type_name == "argument":
                param.display_type_rich = _no_type

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


def _logger(quiet: bool):
    """The log a stage gets: every line, or with --quiet only warnings and notices."""
    return quiet_log(log) if quiet else log


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


# -- options: declared on the fields of reap.core.options' classes ---------------------------------------------
def _declared(param: Param):
    """typer's parameter for one declared option (reap.core.flags.flag)."""
    flag = param.flag
    if not flag.names:
        return typer.Argument(param.default, metavar=flag.metavar, show_default=False, help=flag.help)
    return typer.Option(param.default, *flag.names, metavar=flag.metavar, help=flag.help)


def takes(*parts, skip: tuple[str, ...] = ()):
    """A command whose parameters come from the options classes it takes (:func:`reap.core.flags.params`).

    ``parts`` in the order of ``--help``: options classes, or names of the command's own parameters; its other own
    parameters (the context, say) come first. ``skip``: declared options the command does not take. The command
    gets every value as a keyword argument (``**p``); ``command.takes`` says what it takes (for its recipe types).
    """
    classes = tuple(part for part in parts if not isinstance(part, str))
    declared = params(*classes, skip=skip)

    def decorate(fn):
        hints = typing.get_type_hints(fn)
        own = {name: prm.replace(kind=prm.KEYWORD_ONLY, annotation=hints.get(name, prm.annotation))
               for name, prm in signature(fn).parameters.items() if prm.kind is not prm.VAR_KEYWORD}
        layout = [prm for name, prm in own.items() if name not in parts]
        for part in parts:
            if isinstance(part, str):
                layout.append(own[part])
                continue
            layout += [Parameter(p.name, Parameter.KEYWORD_ONLY, default=_declared(p), annotation=p.annotation)
                       for p in declared.values() if p.part == classes.index(part)]
        fn.__signature__ = Signature(layout)
        fn.__annotations__ = {prm.name: prm.annotation for prm in layout}
        fn.takes = (classes, skip)
        return fn

    return decorate


ModelArg = _declared(params(CalibrateOptions)["model"])
QuietOpt = _declared(params(CommandOptions)["quiet"])
JsonOpt = _declared(params(CommandOptions)["as_json"])
#: calibrate's own flags: `reap prune` calibrates (CalibrateOptions) without them
_CALIBRATE_ONLY = ("resume", "checkpoint_every", "keep_checkpoint")
#: what `reap eval` does not take: the engine's flags for calibrating (page cache, several ranks, greedy search), a
#: recipe
_NOT_FOR_EVAL = ("keep_page_cache", "weight_exchange", "greedy_tokens", "greedy_memory", "config")


def _with_config(ctx, p: dict, command, required: tuple[str, ...]) -> dict:
    """The command's options merged with its --config recipe (typed by the option fields); required ones checked
    after the merge."""
    from reap.recipe import apply_config, option_types

    classes, skip = command.takes
    p = apply_config(ctx, p, option_types(*classes, skip=skip))
    missing = [name for name in required if p.get(name) is None]
    if missing:
        flags = ", ".join("MODEL" if m == "model" else "--" + m.replace("_", "-") for m in missing)
        raise UserError(f"missing {flags}: give it on the command line or in the --config recipe")
    return p


# -- commands --------------------------------------------------------------------------------------------
@app.command(cls=_Command, short_help="Drop experts; write a checkpoint serving engines load unchanged.")
@user_errors
@takes(PruneOptions, CommandOptions, skip=_CALIBRATE_ONLY)
def prune(ctx: typer.Context, **p):
    """Drop experts and write a checkpoint that serving engines load unchanged (calibrating first if needed)."""
    p = _with_config(ctx, p, prune, required=("model", "out"))
    typed = ctx.get_parameter_source("dataset")
    if (typed is None or typed.name != "COMMANDLINE") and (p["stats"] or p["keep"] or p["method"] == "random"):
        p["dataset"] = None  # a recipe's data is not needed when the stats, the keep list or chance decide
    recipe = effective(p)
    calibration = None
    if p["dataset"] is not None:
        calibration = build(CalibrateOptions, p, out=None, resume=False, overwrite=False, recipe=recipe)
    opts = build(PruneOptions, p, calibration=calibration, recipe=recipe)  # refuses bad options
    check_inputs(opts)  # and missing files: all before torch is imported
    from reap.core.humanize import human_bytes
    from reap.core.names import REPORT_NAME
    from reap.prune import prune_model

    result = prune_model(opts, log=_logger(p["quiet"]))
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


@app.command(cls=_Command, short_help="Measure every expert's saliency on calibration data.")
@user_errors
@takes(CalibrateOptions, CommandOptions)
def calibrate(ctx: typer.Context, **p):
    """Measure every expert's saliency by streaming calibration data through the model layer by layer."""
    p = _with_config(ctx, p, calibrate, required=("model", "dataset", "out"))
    opts = build(CalibrateOptions, p, recipe=effective(p))
    check_inputs(opts)
    from reap.calibrate.run import calibrate as run

    _, summary = run(opts, log=_logger(p["quiet"]))
    done = summary.get("layers", 0)
    human = (f"{p['out']} was already complete; nothing to do" if summary.get("already_complete") else
             f"wrote {p['out']}: {summary['tokens']} tokens through {done} layer{'s' if done != 1 else ''} in "
             f"{summary['seconds']:.1f} s")
    emit({"stats": str(p["out"]), **summary}, human, p["as_json"])


@app.command("eval", cls=_Command, short_help="Next-token loss and perplexity, streamed layer by layer.")
@user_errors
@takes(EvalOptions, "out", CommandOptions, skip=_NOT_FOR_EVAL)
def eval_(
    baseline: Optional[str] = typer.Option(None, "--baseline", metavar="MODEL", help="Also evaluate this model (e.g. the "
                                           "original) on the same tokens and report the difference."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="RESULT.json", help="Also write the result as JSON "
                                       "(for `reap report --eval`); checked writable before the evaluation starts."),
    **p,
):
    """Next-token loss and perplexity, streamed layer by layer (models larger than memory work too)."""
    from dataclasses import replace

    missing = [flag for flag, value in (("MODEL", p["model"]), ("--dataset", p["dataset"])) if value is None]
    if missing:
        raise UserError(f"missing {', '.join(missing)}: e.g. `reap eval PRUNED --dataset eval.jsonl --baseline ORIGINAL`")
    opts = build(EvalOptions, p)
    check_inputs(opts)
    from reap.evaluate import check_writable, compare, evaluate, format_result, write_json

    if out is not None:
        check_writable(out)
    say = _logger(p["quiet"])
    result = compare(replace(opts, model=baseline), opts, log=say) if baseline else evaluate(opts, log=say)
    emit(result, format_result(result), p["as_json"])  # first: a failing --out below must not lose the result
    if out is not None:
        write_json(out, result)
        say(f"wrote {out}")


@app.command(cls=_Command, short_help="Pictures, a summary and the model card of a pruned model.")
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
    if path is None:
        raise UserError("missing DIR_OR_STATS: pass a pruned output directory or a stats file from `reap calibrate`")
    check_choice("--method", method, METHODS)
    from reap.core.names import SUMMARY_NAME
    from reap.report import read_evaluation, render_report

    evaluation = read_evaluation(eval_file) if eval_file is not None else None
    written = render_report(path, out, ratio, method, evaluation=evaluation, log=log)
    summary = next((p for p in written if p.name == SUMMARY_NAME), None)
    text = summary.read_text() if summary is not None else ""
    emit({"written": [str(p) for p in written], "summary": text}, text.rstrip("\n"), as_json)


@app.command(cls=_Command, short_help="Family, experts, top-k, sizes; after pruning with --ratio.")
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
    from reap.model.families import describe_families, format_families
    from reap.report.inspect import describe, format_description

    if families:
        if model is not None or ratio is not None:
            raise UserError("--families lists the supported families; it takes no model or --ratio")
        rows = describe_families()
        typer.echo(json.dumps(rows, indent=2) if as_json else format_families(rows))
        return
    if model is None:
        raise UserError("pass a model directory (or Hugging Face id) to inspect, or --families to list the families")
    from reap.io.checkpoint import Checkpoint

    info = describe(Checkpoint(model), ratio, keep_mtp=not drop_mtp)
    typer.echo(json.dumps(info, indent=2) if as_json else format_description(info))


@app.command(cls=_Command, short_help="Prune a generated tiny MiniMax-M2 checkpoint end to end.")
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

    result = run_demo(workdir, ratio, progress=not quiet, log=_logger(quiet))
    emit(result, f"demo done: {result['pruned']} ({result['experts_before']} -> {result['experts_after']} experts per "
                 f"layer); max |logit difference| to the original with those experts masked: "
                 f"{result['max_logit_gap']:.2e}", as_json)


def version_callback(value: bool):
    if value:
        typer.echo(f"reap {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True, metavar="",
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
