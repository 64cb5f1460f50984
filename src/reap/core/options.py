"""The options objects every stage takes, and each command-line option declared once, on its field.

A field that is a CLI option carries its declaration (:func:`reap.core.flags.flag`: the flag names, metavar, help):
the commands that take an options object get a parameter for each such field (``reap.cli``), a ``--config``
recipe's value is typed by the field (``reap.recipe``), and the parsed values become the frozen object again
(:func:`reap.core.flags.build`). A
field holding another options object (``CalibrateOptions.data``, ``.engine``) brings that object's flags along.

A new flag is one field here: ``name: type = flag("--name", "METAVAR", "Help.", default=...)``; every command
that takes the object (or an object holding it) lists it, recipes accept it, and :func:`build` fills it.

Each object checks its own values when it is made (``__post_init__``: ranges, choices, options that contradict each
other), so a mistake is refused before any work, whether the options come from the command line, a recipe or a
caller of the plain functions; :func:`reap.cli.check_inputs` checks that the files they name exist.

No torch here (nor anything heavy): ``reap --help`` imports this module, and every check here answers before torch
is imported.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from reap.core.errors import UserError, suggestion
from reap.core.flags import argument, flag, negation, same_as

#: the names --method accepts, in the order of reap.selection.criteria's registry (its METHODS): listed here so that --method is
#: checked before torch is imported (tests/test_options.py checks that the two agree)
METHODS = ("reap", "ean", "frequency", "weighted-frequency", "random", "weighted-ean", "ean-mean", "ean-sq",
           "max-activation", "reap-prior", "greedy-rerouted")
#: the criterion `reap prune` uses unless --method says otherwise (reap.selection.criteria.DEFAULT); it ranks experts by the
#: greedy re-routing order that calibration computes (unless --greedy-tokens is 0)
DEFAULT_METHOD = "greedy-rerouted"
#: the criteria that read no statistics (reap.selection.criteria: ``needs_data=False``)
NO_DATA_METHODS = ("random",)
#: --merge (reap.recover.methods.MERGE_METHODS; a test holds the two lists equal)
MERGE_METHODS = ("fold", "ream")
METHOD_HELP = ("greedy-rerouted (default), reap, frequency, weighted-frequency, ean, weighted-ean, ean-mean, ean-sq, "
               "max-activation, reap-prior or random (docs/criteria.md).")
#: --offload, --weight-exchange and --dtype (reap.stream.streamer.DTYPES, and auto)
OFFLOAD_MODES = ("auto", "device", "cpu", "disk")
EXCHANGE_MODES = ("auto", "read", "share")
DTYPES = ("float32", "bfloat16", "float16", "auto")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


# -- checks: one line saying what is wrong and how to fix it (reap.core.errors.UserError) ------------------------
def check_choice(flag: str, value: Any, choices: tuple[str, ...]) -> None:
    """UserError unless ``value`` is one of ``choices``: the known values, and the one meant where it is a typo."""
    if value not in choices:
        raise UserError(f"unknown {flag} {value!r}; {suggestion(value, choices)}choose one of: {', '.join(choices)}")


def _whole(flag: str, value: Any, least: int, what: str, example: int) -> None:
    """UserError unless ``value`` is a whole number >= ``least``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise UserError(f"{flag} is {value!r}: it must be {what}, e.g. {flag} {example}")


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)


def input_file(what: str, path: Path | None, fix: str) -> None:
    if path is None:
        return
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {path} does not exist; {fix}")
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory; {fix}")


# -- the options objects -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataOptions:
    """How to turn a dataset spec into calibration sequences."""

    dataset: str = flag("--dataset", "DATA", "Calibration data: a .jsonl/.jsonl.gz/.json/.parquet/.txt file or a "
                        "Hugging Face dataset (local cache), or a mixture 'specA:count,specB:count'.")
    # the first N records overall (after the mixture); None = all
    samples: int | None = flag("--samples", "N", "Use the first N records (or N sampled with --shuffle).",
                               default=None)
    # truncate each sample to its first L tokens (chunk size with pack); None: no limit (the CLI's default: 2048)
    max_length: int | None = flag("--max-length", "L", "Truncate each sample to its first L tokens.", default=None,
                                  cli_default=2048)
    # sample records at random (seeded) instead of taking them in file order
    shuffle: bool = flag("--shuffle", "", "Sample records at random (seeded by --seed) instead of file order.",
                         default=False)
    seed: int = flag("--seed", "S", "Seed for --shuffle.", default=0)
    # join all samples with EOS between documents and cut into max_length chunks
    pack: bool = flag("--pack", "", "Concatenate samples (EOS between) into --max-length chunks.", default=False)
    text_field: str = flag("--text-field", "FIELD", "Record field holding plain text.", default="text")
    messages_field: str = "messages"

    def __post_init__(self) -> None:
        if self.samples is not None:
            _whole("--samples", self.samples, 1, "a positive number of records (or omitted for all)", 512)
        if self.max_length is not None:
            _whole("--max-length", self.max_length, 1, "a positive number of tokens", 2048)


@dataclass(frozen=True)
class EngineOptions:
    """How to run the layer streamer."""

    device: str = flag("--device", "DEVICE", "cpu, cuda, cuda:N or auto (cuda when available).", default="auto")
    # compute dtype: float32 | bfloat16 | float16 | auto (the CLI's default: bfloat16 on a GPU, float32 on the CPU)
    dtype: str = flag("--dtype", "DTYPE", "Compute dtype: float32, bfloat16 or auto (bf16 on GPU, fp32 on CPU).",
                      default="float32", cli_default="auto")
    batch_tokens: int = flag("--batch-tokens", "N", "Padded tokens per forward batch.", default=16384)
    # where hidden states live between layers
    offload: str = flag("--offload", "MODE", "Hidden states between layers: auto, device, cpu or disk.",
                        default="auto")
    # for offload=disk (default: a temporary directory)
    workdir: Path | None = flag("--workdir", "DIR", "Folder for hidden states with --offload disk.", default=None)
    # leave what was read in the page cache (faster re-runs, memory counted by cgroups)
    keep_page_cache: bool = flag("--keep-page-cache", "", "Leave the checkpoint's pages in the page cache after "
                                 "reading a layer (faster re-runs; job memory limits may count them).", default=False)
    # several ranks: "share" reads 1/N of each layer per rank and all-gathers the rest (NCCL), "read" has every rank
    # read it all; "auto" shares on GPUs
    exchange: str = flag("--weight-exchange", "MODE", "Several ranks: share (each rank reads 1/N of a layer, the ranks "
                         "all-gather the rest), read (every rank reads all of it), auto (share on GPUs).",
                         default="auto")
    progress: bool = negation("quiet")
    trust_remote_code: bool = flag("--trust-remote-code", "", "Allow the model's own Python code (its tokenizer, say; "
                                   "off by default).", default=False)
    # greedy re-routing order (the default criterion): per MoE layer a strided sample of at most this many of its
    # input tokens (0: not computed); the search keeps C >= K+1 expert outputs per token ([S, C, H]) and its float64
    # arrays within greedy_memory GiB (reap.calibrate.greedy_order.greedy_sample_tokens)
    greedy_tokens: int = flag("--greedy-tokens", "N", "Tokens per MoE layer in the sample the greedy-rerouted search "
                              "runs on (every ceil(T/N)-th; 0: skip the search).", default=65536)
    greedy_memory: float = flag("--greedy-memory", "GIB", "Memory for the greedy search: its sample, top-k+1 to "
                                "2(top-k+1) expert outputs per sampled token, its float64 arrays; fewer tokens are "
                                "sampled where N would not fit (MiniMax-M2 width: ~43K tokens in 4 GiB).",
                                default=4.0)

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            near = "did you mean 'cuda'? " if "gpu" in str(self.device).lower() else \
                suggestion(self.device, ("auto", "cpu", "cuda"))
            raise UserError(f"--device {self.device!r} is not supported; {near}use cpu, cuda, cuda:N or auto")
        check_choice("--dtype", self.dtype, DTYPES)
        check_choice("--offload", self.offload, OFFLOAD_MODES)
        check_choice("--weight-exchange", self.exchange, EXCHANGE_MODES)
        _whole("--batch-tokens", self.batch_tokens, 1, "a positive number of tokens", 16384)
        _whole("--greedy-tokens", self.greedy_tokens, 0, "a number of tokens (0: no greedy search)", 65536)
        if not _number(self.greedy_memory) or not 0 < self.greedy_memory < math.inf:
            raise UserError(f"--greedy-memory is {self.greedy_memory!r}: it must be a positive number of GiB, e.g. "
                            "--greedy-memory 4")

    def resolved(self) -> "EngineOptions":
        """These options with ``dtype="auto"`` made concrete: bfloat16 on a GPU, float32 on the CPU."""
        if self.dtype != "auto":
            return self
        import torch

        gpu = self.device.startswith("cuda") or (self.device == "auto" and torch.cuda.is_available())
        return replace(self, dtype="bfloat16" if gpu else "float32")


@dataclass(frozen=True, kw_only=True)  # keywords only: the fields in the order of `reap calibrate --help`
class CalibrateOptions:
    model: str = argument("MODEL", "Model directory or Hugging Face id (from the local cache).")
    # stats file (safetensors); None = keep in memory
    out: Path | None = flag("--out -o", "STATS", "Stats file to write (safetensors), updated after every layer.",
                            default=None)
    data: DataOptions
    engine: EngineOptions = EngineOptions()
    # thin calibration data is an error, not a warning
    strict: bool = flag("--strict", "", "Make thin calibration data an error instead of a warning (fewer than 4 "
                        "routed tokens per expert, or over a quarter of a layer's experts never routed).",
                        default=False)
    # leave multi-token-prediction modules out (not calibrated, dropped by the pruner)
    drop_mtp: bool = flag("--drop-mtp", "", "Leave multi-token-prediction modules out (smaller output, no MTP "
                          "speculative decoding) instead of calibrating and pruning them like every layer.",
                          default=False)
    resume: bool = flag("--resume", "", "Continue an interrupted run at its next layer (a complete stats file is "
                        "left as it is).", default=False)
    # hidden states written beside the stats file every N layers so that --resume replays none (0: never; None:
    # automatically, as often as keeps the writing under ~10% of the compute); kept after the run if asked
    checkpoint_every: int | None = flag("--checkpoint-every", "N", "Write the hidden states beside the stats file "
                                        "every N layers, so --resume replays no layer (0: never; default: as often "
                                        "as costs under ~10% of the time).", default=None)
    keep_checkpoint: bool = flag("--keep-checkpoint", "", "Keep those hidden states after the run.", default=False)
    overwrite: bool = flag("--overwrite", "", "Replace an existing stats file.", default=False)
    recipe: dict[str, Any] | None = None  # the effective CLI options, recorded in the stats metadata

    def __post_init__(self) -> None:
        if self.checkpoint_every is not None:
            _whole("--checkpoint-every", self.checkpoint_every, 0, "a number of layers (0: never)", 4)


@dataclass(frozen=True)
class PruneOptions:
    """Everything ``reap prune`` needs. Exactly one of keep_file / ratio."""

    model: str = same_as(CalibrateOptions, "model")
    out: Path = flag("--out -o", "DIR", "Output directory for the pruned checkpoint.")
    ratio: float | None = flag("--ratio", "R", "Fraction of experts to drop per layer (0 < R < 1).", default=None)
    keep_file: Path | None = flag("--keep", "KEEP.json", 'JSON {"<layer>": [kept expert ids]} instead of --ratio.',
                                  default=None)
    method: str = flag("--method", "METHOD", METHOD_HELP, default=DEFAULT_METHOD)
    # round the kept count per layer down to a multiple of this (expert parallelism)
    multiple_of: int = flag("--multiple-of", "N", "Round the kept experts per layer down to a multiple of N (e.g. 8 "
                            "for expert parallelism on 8 GPUs).", default=1)
    # never prune super experts (reap.selection.choose.super_experts)
    protect_super: bool = flag("--protect-super-experts", "", "Never prune a super expert (Su et al. 2025): one whose "
                               "largest output magnitude is above both the 99.5th percentile and a tenth of the "
                               "maximum of those of all experts in the first 3/4 of the layers.", default=False)
    stats: Path | None = flag("--stats", "STATS", "Reuse a stats file from `reap calibrate`.", default=None)
    # recovery (reap.recover): merge pruned experts into kept ones, re-fit the kept router rows; both need --dataset
    merge: str | None = flag("--merge", "METHOD", "Merge pruned experts into kept ones where that lowers each layer's "
                             "output error on a sample: fold or ream (docs/criteria.md); needs --dataset.", default=None)
    refit_router: bool = flag("--refit-router", "", "Re-fit the kept router rows to the unpruned layer's output "
                              "(kept only where a held-out part of the sample improves); needs --dataset.",
                              default=False)
    recover_tokens: int = flag("--recover-tokens", "N", "Tokens per layer in the sample --merge and --refit-router "
                               "work on.", default=4096)
    calibration: CalibrateOptions | None = None  # when calibrating here (its model and out are ignored)
    seed: int = flag("--seed", "S", "Seed for --shuffle and --method random.", default=0)
    # thin calibration statistics (reap.calibrate.run.thin_data) are an error, not a warning
    strict: bool = same_as(CalibrateOptions, "strict")
    # leave multi-token-prediction modules out instead of pruning them like every layer
    drop_mtp: bool = same_as(CalibrateOptions, "drop_mtp")
    overwrite: bool = flag("--overwrite", "", "Replace an existing output.", default=False)
    # flush the output to disk before publishing it (False: leave it to the OS, like cp)
    fsync: bool = flag("--fsync/--no-fsync", "", "Flush the output to disk before publishing it (--no-fsync leaves "
                       "that to the OS, as cp does: faster, not crash-safe).", default=True)
    progress: bool = negation("quiet")
    recipe: dict[str, Any] | None = None  # the effective options (flags + --config), recorded in the report

    def __post_init__(self) -> None:
        """What can be refused without the model: the choice of experts (exactly one of --ratio and --keep, a
        ratio in (0, 1), a known --method) and options that the choice would ignore or that contradict it."""
        check_choice("--method", self.method, METHODS)
        if (self.keep_file is None) == (self.ratio is None):
            raise UserError("pass either --ratio R (choose experts by --method) or --keep KEEP.json, not both or "
                            "neither")
        if self.ratio is not None and (not _number(self.ratio) or not 0 < self.ratio < 1):
            raise UserError(f"--ratio must be a number strictly between 0 and 1 (got {self.ratio}); e.g. --ratio 0.3")
        if isinstance(self.multiple_of, bool) or not isinstance(self.multiple_of, int) or self.multiple_of < 1:
            raise UserError(f"--multiple-of must be a positive whole number (got {self.multiple_of!r}); e.g. "
                            "--multiple-of 8")
        if self.keep_file is not None and (self.multiple_of != 1 or self.protect_super):
            raise UserError("--multiple-of and --protect-super-experts choose among scored experts; --keep names the "
                            "experts itself: drop them or pass --ratio")
        uses_data = self.keep_file is None and self.method not in NO_DATA_METHODS
        unused = [flag for flag, given in (("--stats", self.stats is not None),
                                           ("--dataset", self.calibration is not None)) if given and not uses_data]
        if unused:
            why = "--keep names the experts itself" if self.keep_file is not None else \
                f"--method {self.method} uses no data"
            raise UserError(f"{' and '.join(unused)} would be ignored: {why}; drop it or choose a saliency --method")
        recovering = [f for f, on in (("--merge", self.merge is not None), ("--refit-router", self.refit_router)) if on]
        if self.merge is not None:
            check_choice("--merge", self.merge, MERGE_METHODS)
        _whole("--recover-tokens", self.recover_tokens, 16, "a number of tokens", 4096)
        if recovering and self.protect_super:
            raise UserError(f"--protect-super-experts pools the statistics of every layer, which {recovering[0]} (run "
                            "on each layer while it is calibrated) does not have yet: drop one of them")
        if recovering and self.calibration is None:
            raise UserError(f"{' and '.join(recovering)} work on each layer's inputs while it is calibrated: pass "
                            "--dataset DATA (not --stats or --keep)" + ("" if uses_data else
                            f", with a saliency --method (--method {self.method} reads no data)"))
        if self.keep_file is not None:
            return
        if not uses_data and self.protect_super:
            raise UserError(f"--protect-super-experts needs calibration statistics; --method {self.method} has none")
        if uses_data and self.stats is not None and self.calibration is not None:
            raise UserError("pass either --stats STATS or --dataset DATA, not both")
        if uses_data and self.stats is None and self.calibration is None:
            raise UserError(f"--method {self.method} needs calibration: pass --dataset DATA (e.g. a .jsonl file) or "
                            "--stats STATS from `reap calibrate`; or use --method random")
        greedy = self.calibration.engine.greedy_tokens if self.calibration is not None else None
        if self.method == DEFAULT_METHOD and greedy == 0:
            raise UserError("--method greedy-rerouted (the default) ranks experts by the greedy re-routing order that "
                            "calibration computes, which --greedy-tokens 0 skips: drop --greedy-tokens 0 (or pass a "
                            "positive N), or choose another --method, e.g. --method weighted-ean or --method reap")


@dataclass(frozen=True)
class EvalOptions:
    """Everything ``reap eval`` needs for one model."""

    model: str = argument("MODEL", "Model directory (e.g. a pruned output) or Hugging Face id (from the local "
                          "cache).")
    dataset: str = flag("--dataset", "DATA", "Evaluation text: a .jsonl/.jsonl.gz/.json/.parquet/.txt file or a "
                        "Hugging Face dataset (local cache); each document is followed by EOS, all concatenated.")
    # number of predicted (target) tokens that are scored
    max_tokens: int = flag("--max-tokens", "N", "Number of predicted tokens to score.", default=65536)
    # window length S (inputs per window)
    seq_len: int = flag("--seq-len", "S", "Window length: windows of S+1 tokens at stride S, no context carried over "
                        "between windows.", default=1024)
    # a keyword (EvalOptions(model, dataset, max_tokens, seq_len, engine) as before), listed before the engine's
    # flags in `reap eval --help`
    text_field: str = same_as(DataOptions, "text_field", kw_only=True)
    engine: EngineOptions = EngineOptions()

    def __post_init__(self) -> None:
        _whole("--max-tokens", self.max_tokens, 1, "a positive number of tokens", 65536)
        _whole("--seq-len", self.seq_len, 1, "a positive number of tokens", 1024)


@dataclass(frozen=True)
class CommandOptions:
    """What the commands take besides their job's options: how they talk, and the recipe."""

    quiet: bool = flag("--quiet -q", "", "Print only warnings, errors and the result: no progress, plan or status "
                       "lines.", default=False)
    as_json: bool = flag("--json", "", "Print the result as one JSON object on stdout (human text otherwise).",
                         default=False, name="as_json")
    config: Path | None = flag("--config", "RECIPE.yaml", "YAML recipe with any of these options; flags override it.",
                               default=None)


