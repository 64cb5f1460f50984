"""Options declared once, on the fields of reap.core.options' classes: every command that takes a class lists each of its
flags with the declared names, metavar and help; recipes are typed by the fields; the parsed flags become the
frozen objects the stages take, field by field."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from reap.cli import app
from reap.recipe import option_types
from reap.core.flags import Flag, build, flag, params
from reap.core.options import CalibrateOptions, CommandOptions, DataOptions, EngineOptions, EvalOptions, PruneOptions

WIDE = {"COLUMNS": "2000"}  # help as wide as it gets (120 columns)


def declared(cls) -> dict[str, Flag]:
    """The flags ``cls`` declares on its own fields, by parameter name (no nesting)."""
    out = {}
    for f in dataclasses.fields(cls):
        found = f.metadata.get("reap.cli")
        if isinstance(found, Flag):
            out[found.param(f.name)] = found
    return out


def command(name: str):
    return typer.main.get_command(app).commands[name]


def on_command(name: str) -> dict:
    return {p.name: p for p in command(name).params}


# what each command takes: (its own class, the nested classes whose flags it lists, declared flags it leaves out)
TAKES = {
    "prune": (PruneOptions, (CalibrateOptions, DataOptions, EngineOptions, CommandOptions),
              {"resume", "checkpoint_every", "keep_checkpoint"}),
    "calibrate": (CalibrateOptions, (DataOptions, EngineOptions, CommandOptions), set()),
    "eval": (EvalOptions, (EngineOptions, CommandOptions),
             {"keep_page_cache", "weight_exchange", "greedy_tokens", "greedy_memory", "config"}),
}


@pytest.mark.parametrize("name", sorted(TAKES))
def test_every_declared_flag_is_on_the_commands_that_take_its_class(name):
    """Each flag field of the classes a command takes is one of its parameters, with the flag names, metavar and
    help of the declaration (the command's own class wins where it declares the same flag: prune's --seed)."""
    own, nested, left_out = TAKES[name]
    got = on_command(name)
    mine = declared(own)
    expected = {**{k: v for cls in reversed(nested) for k, v in declared(cls).items()}, **mine}
    assert set(got) - {"baseline", "out"} <= set(expected), set(got) - set(expected)
    for param, decl in expected.items():
        if param in left_out:
            assert param not in got, param
            continue
        assert param in got, f"{name} lacks {param}"
        p = got[param]
        assert p.help == decl.help and p.metavar == decl.metavar, (param, p.help, decl.help)
        if decl.names:
            assert [*p.opts, *p.secondary_opts] == [n for names in decl.names for n in names.split("/")], param


def test_prune_and_calibrate_list_the_same_shared_options_with_the_same_help():
    prune, calibrate = on_command("prune"), on_command("calibrate")
    shared = set(prune) & set(calibrate)
    every_data_and_engine_flag = set(declared(DataOptions)) | set(declared(EngineOptions))
    assert every_data_and_engine_flag | set(declared(CommandOptions)) <= shared
    own = {"out", "overwrite", "seed"}  # declared by each command's class with its own words
    for param in shared - own:
        a, b = prune[param], calibrate[param]
        assert (a.opts, a.help, a.metavar, a.default) == (b.opts, b.help, b.metavar, b.default), param
    assert prune["seed"].help != calibrate["seed"].help and "--method random" in prune["seed"].help
    evaluate = on_command("eval")
    for param in (set(evaluate) & every_data_and_engine_flag) - {"dataset"}:  # eval's --dataset: evaluation text
        assert evaluate[param].help == calibrate[param].help, param


def flat(help_text: str) -> str:
    """--help as one line: click's wrapping undone (words broken after a hyphen joined again)."""
    return " ".join(re.sub(r"-\n\s+", "-", help_text).split())


@pytest.mark.parametrize("columns", ["80", "2000"])
@pytest.mark.parametrize("name", sorted(TAKES))
def test_help_shows_each_option_with_its_declared_help(name, columns):
    """Each flag, whole, followed by its metavar and its declared help; at 80 columns no line is longer and nothing
    is cut short (rich's table cut `--protect-super-expe…`)."""
    res = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": columns})
    assert res.exit_code == 0, res.output
    assert all(len(line) <= int(columns) for line in res.output.splitlines()), res.output
    assert "…" not in res.output and "<str>" not in res.output and "<bool>" not in res.output
    text = flat(res.output)
    for param in params(*((TAKES[name][0], CommandOptions)), skip=tuple(TAKES[name][2])).values():
        where = re.escape(param.flag.names[0].split("/")[0]) if param.flag.names else re.escape(param.flag.metavar)
        metavar = f" {re.escape(param.flag.metavar)}" if param.flag.names and param.flag.metavar else ""
        negative = r"(?: / --no-[\w-]+)?"
        assert re.search(rf"(?:^| |, ){where}{negative}{metavar} {re.escape(flat(param.flag.help))}", text), \
            (param.name, param.flag.help)


def test_cli_defaults_that_differ_from_the_fields_are_the_declared_ones():
    calibrate = on_command("calibrate")
    assert calibrate["max_length"].default == 2048 and DataOptions("x").max_length is None
    assert calibrate["dtype"].default == "auto" and EngineOptions().dtype == "float32"
    assert calibrate["quiet"].default is False and EngineOptions().progress is True
    assert calibrate["dataset"].default is None  # required by DataOptions: checked after the recipe is merged


def test_recipe_types_come_from_the_fields():
    types = option_types(PruneOptions, CommandOptions)
    assert types["max_length"] is int and types["greedy_memory"] is float and types["workdir"] is Path
    assert types["keep"] is Path and types["weight_exchange"] is str and types["quiet"] is bool
    assert types["as_json"] is bool and types["config"] is Path and "progress" not in types
    assert set(declared(PruneOptions)) | set(declared(CommandOptions)) <= set(types)

    @dataclass(frozen=True)
    class Probe:  # a new options class: its field's type is the recipe type, whatever any command annotates
        size: float = flag("--size", "X", "A size.", default=1.0)
        data: DataOptions = DataOptions("x")

    assert option_types(Probe) == {"size": float, **option_types(DataOptions)}


@pytest.mark.parametrize("text,needle", [
    ("greedy_tokens: 2.5\n", "greedy_tokens must be int"),
    ("greedy-memory: fast\n", "greedy_memory must be float"),
    ("workdir: 3\n", "workdir must be a path"),
    ("quiet: 1\n", "quiet must be bool"),
    ("keep_page_cache: yes please\n", "keep_page_cache must be bool"),
])
def test_a_wrong_type_in_a_recipe_is_refused(tmp_path, text, needle):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: x\n" + text)
    res = CliRunner().invoke(app, ["calibrate", "--config", str(recipe), "--dataset", "d", "--out", str(tmp_path / "s")])
    assert res.exit_code == 2 and needle in res.stderr, res.output


def test_same_flag_declared_two_ways_is_refused():
    @dataclass(frozen=True)
    class Other:
        seed: float = flag("--seed", "S", "A float seed.", default=0.0)

    with pytest.raises(TypeError, match="seed"):
        params(DataOptions, Other)


# -- the parsed flags become the objects, field by field ---------------------------------------------------------
EVERY_ENGINE_FLAG = ["--device", "cpu", "--dtype", "float32", "--batch-tokens", "99", "--offload", "disk",
                     "--workdir", "w", "--keep-page-cache", "--weight-exchange", "read", "--trust-remote-code",
                     "--greedy-tokens", "11", "--greedy-memory", "0.5"]
ENGINE = EngineOptions(device="cpu", dtype="float32", batch_tokens=99, offload="disk", workdir=Path("w"),
                       keep_page_cache=True, exchange="read", progress=False, trust_remote_code=True, greedy_tokens=11,
                       greedy_memory=0.5)
EVERY_DATA_FLAG = ["--dataset", "d.jsonl", "--samples", "5", "--max-length", "7", "--shuffle", "--seed", "3", "--pack",
                   "--text-field", "body"]
DATA = DataOptions("d.jsonl", samples=5, max_length=7, shuffle=True, seed=3, pack=True, text_field="body")


@pytest.fixture
def captured(monkeypatch):
    """The options object each stage is called with (the stage itself does not run)."""
    import reap.calibrate.run
    import reap.evaluate
    import reap.prune

    got = {}

    def keep(name, result):
        def stage(opts, log=None):
            got[name] = opts
            return result
        return stage

    monkeypatch.setattr(reap.calibrate.run, "calibrate", keep("calibrate", (None, {"already_complete": True})))
    monkeypatch.setattr(reap.prune, "prune_model", keep("prune", None))
    monkeypatch.setattr(reap.evaluate, "evaluate", keep("eval", {}))
    monkeypatch.setattr(reap.evaluate, "format_result", lambda result: "")
    return got


def run(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, (res.output, res.exception)


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    """The files the flags below name, in the working directory (the command line checks that they exist)."""
    monkeypatch.chdir(tmp_path)
    for name in ("d.jsonl", "e.jsonl"):
        (tmp_path / name).write_text('{"text": "x"}\n')
    (tmp_path / "k.json").write_text("{}")
    return tmp_path


def test_calibrate_flags_become_calibrate_options(captured, inputs):
    run("calibrate", "M", "--out", "s.st", *EVERY_DATA_FLAG, *EVERY_ENGINE_FLAG, "--strict", "--drop-mtp", "--resume",
        "--checkpoint-every", "2", "--keep-checkpoint", "--overwrite", "-q")
    got = captured["calibrate"]
    assert replace(got, recipe=None) == CalibrateOptions(
        model="M", out=Path("s.st"), data=DATA, engine=ENGINE, strict=True, drop_mtp=True, resume=True,
        checkpoint_every=2, keep_checkpoint=True, overwrite=True)
    assert set(got.recipe) == set(on_command("calibrate")) and got.recipe["weight_exchange"] == "read"

    run("calibrate", "M", "--dataset", "d.jsonl", "--out", "s.st")
    assert replace(captured["calibrate"], recipe=None) == CalibrateOptions(
        model="M", out=Path("s.st"), data=DataOptions("d.jsonl", max_length=2048), engine=EngineOptions(dtype="auto"))


def test_prune_flags_become_prune_options(captured, inputs):
    run("prune", "M", "--out", "o", "--ratio", "0.5", "--method", "reap", "--multiple-of", "8",
        "--protect-super-experts", *EVERY_DATA_FLAG, *EVERY_ENGINE_FLAG, "--strict", "--drop-mtp", "--overwrite",
        "--no-fsync", "--quiet")
    got = captured["prune"]
    calibration = CalibrateOptions(model="M", data=DATA, engine=ENGINE, strict=True, drop_mtp=True, recipe=got.recipe)
    assert got == PruneOptions(model="M", out=Path("o"), ratio=0.5, method="reap", seed=3,
                               multiple_of=8, protect_super=True, calibration=calibration, strict=True, drop_mtp=True,
                               overwrite=True, fsync=False, progress=False, recipe=got.recipe)
    assert set(got.recipe) == set(on_command("prune"))

    run("prune", "M", "--out", "o", "--ratio", "0.5", "--method", "random")
    assert captured["prune"] == PruneOptions(model="M", out=Path("o"), ratio=0.5, method="random",
                                             recipe=captured["prune"].recipe)
    run("prune", "M", "--out", "o", "--keep", "k.json")
    assert captured["prune"] == PruneOptions(model="M", out=Path("o"), keep_file=Path("k.json"),
                                             recipe=captured["prune"].recipe)


def test_eval_flags_become_eval_options(captured, inputs):
    run("eval", "M", "--dataset", "e.jsonl", "--max-tokens", "10", "--seq-len", "4", "--text-field", "body",
        "--device", "cpu", "--dtype", "float32", "--batch-tokens", "99", "--offload", "disk", "--workdir", "w",
        "--trust-remote-code", "-q")
    assert captured["eval"] == EvalOptions("M", "e.jsonl", 10, 4, EngineOptions(
        device="cpu", dtype="float32", batch_tokens=99, offload="disk", workdir=Path("w"), progress=False,
        trust_remote_code=True), text_field="body")
    run("eval", "M", "--dataset", "e.jsonl")
    assert captured["eval"] == EvalOptions("M", "e.jsonl", engine=EngineOptions(dtype="auto"))


def test_build_fills_what_the_values_hold_and_leaves_the_rest_at_the_defaults():
    opts = build(CalibrateOptions, {"model": "M", "dataset": "d", "quiet": True, "weight_exchange": "share"})
    assert opts == CalibrateOptions(model="M", data=DataOptions("d"), engine=EngineOptions(exchange="share",
                                                                                            progress=False))
    only_if_given = build(PruneOptions, {"model": "M", "out": Path("o"), "dataset": "d", "ratio": 0.5,
                                         "method": "random"})
    assert only_if_given.calibration is None


def test_the_options_import_no_torch():
    probe = "import sys, reap.core.options, reap.recipe; print(json.dumps([m in sys.modules for m in ('torch', 'transformers')]))"
    out = subprocess.run([sys.executable, "-c", "import json; " + probe], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [False, False]


# -- the objects check themselves (the command line and the plain functions alike) -----------------------------------
def test_the_torch_free_lists_match_the_registries():
    """--method, --dtype: checked from reap.core.options' lists (no torch); they are the registries' names."""
    from reap.selection import criteria
    from reap.core import options
    from reap.stream import streamer as stream

    assert options.METHODS == criteria.METHODS
    assert options.DEFAULT_METHOD == criteria.DEFAULT == PruneOptions.__dataclass_fields__["method"].default
    assert options.NO_DATA_METHODS == tuple(name for name, c in criteria.CRITERIA.items() if not c.needs_data)
    assert set(options.DTYPES) == {*stream.DTYPES, "auto"}
    for name in criteria.METHODS:
        assert name in options.METHOD_HELP, name


CAL = CalibrateOptions(model="M", data=DataOptions("d.jsonl"))


@pytest.mark.parametrize("make, needles", [
    (lambda: PruneOptions("M", Path("o"), ratio=1.5, method="random"), ["--ratio", "strictly between 0 and 1"]),
    (lambda: PruneOptions("M", Path("o"), ratio=float("nan"), method="random"), ["strictly between 0 and 1"]),
    (lambda: PruneOptions("M", Path("o"), ratio=0.0, method="random"), ["strictly between 0 and 1"]),
    (lambda: PruneOptions("M", Path("o"), ratio=0.3, method="REAP", stats=Path("s")),
     ["'REAP'", "did you mean 'reap'?"]),
    (lambda: PruneOptions("M", Path("o"), ratio=0.3, method="weighted_ean", stats=Path("s")),
     ["did you mean 'weighted-ean'?"]),
    (lambda: PruneOptions("M", Path("o"), ratio=0.3, method="magic", stats=Path("s")), ["'magic'", "random"]),
    (lambda: PruneOptions("M", Path("o")), ["--ratio", "--keep", "not both or neither"]),
    (lambda: PruneOptions("M", Path("o"), ratio=0.3, keep_file=Path("k")), ["not both"]),
    (lambda: PruneOptions("M", Path("o"), ratio=0.3, method="random", multiple_of=0), ["positive whole number"]),
    (lambda: PruneOptions("M", Path("o"), keep_file=Path("k"), multiple_of=8), ["--keep names the experts"]),
    (lambda: PruneOptions("M", Path("o"), keep_file=Path("k"), stats=Path("s")), ["--stats would be ignored"]),
    (lambda: PruneOptions("M", Path("o"), ratio=0.3, method="random", calibration=CAL),
     ["--dataset would be ignored", "random uses no data"]),
    (lambda: PruneOptions("M", Path("o"), ratio=0.3, method="random", protect_super=True),
     ["--protect-super-experts needs calibration"]),
    (lambda: PruneOptions("M", Path("o"), ratio=0.3, method="reap", stats=Path("s"), calibration=CAL),
     ["either --stats", "not both"]),
    (lambda: PruneOptions("M", Path("o"), ratio=0.3), ["needs calibration", "--dataset", "--stats"]),
    # the default criterion ranks by the greedy order that --greedy-tokens 0 skips: refused before hours of calibration
    (lambda: PruneOptions("M", Path("o"), ratio=0.3, calibration=replace(CAL, engine=EngineOptions(greedy_tokens=0))),
     ["greedy-rerouted", "--greedy-tokens 0", "--method weighted-ean"]),
    (lambda: EngineOptions(offload="ram"), ["--offload", "'ram'", "auto, device, cpu, disk"]),
    (lambda: EngineOptions(offload="Disk"), ["did you mean 'disk'?"]),
    (lambda: EngineOptions(exchange="shared"), ["--weight-exchange", "did you mean 'share'?"]),
    (lambda: EngineOptions(dtype="bf16"), ["--dtype", "'bf16'", "bfloat16"]),
    (lambda: EngineOptions(device="gpu"), ["--device", "did you mean 'cuda'?"]),
    (lambda: EngineOptions(device="cuda:x"), ["--device", "cuda:N"]),
    (lambda: EngineOptions(batch_tokens=0), ["--batch-tokens", "positive"]),
    (lambda: EngineOptions(greedy_tokens=-1), ["--greedy-tokens"]),
    (lambda: EngineOptions(greedy_memory=0.0), ["--greedy-memory", "positive"]),
    (lambda: DataOptions("d", samples=0), ["--samples"]),
    (lambda: DataOptions("d", max_length=-5), ["--max-length"]),
    (lambda: replace(CAL, checkpoint_every=-1), ["--checkpoint-every"]),
    (lambda: EvalOptions("M", "e", max_tokens=0), ["--max-tokens"]),
    (lambda: EvalOptions("M", "e", seq_len=0), ["--seq-len"]),
])
def test_bad_options_are_refused_when_the_object_is_made(make, needles):
    from reap.core.errors import UserError

    with pytest.raises(UserError) as err:
        make()
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_good_options_pass():
    PruneOptions("M", Path("o"), ratio=0.3, calibration=CAL)  # greedy-rerouted with its search
    PruneOptions("M", Path("o"), ratio=0.3, method="reap",
                 calibration=replace(CAL, engine=EngineOptions(greedy_tokens=0)))
    PruneOptions("M", Path("o"), keep_file=Path("k.json"))
    EngineOptions(device="cuda:3", dtype="float16", offload="disk", exchange="read", greedy_tokens=0)
    replace(EngineOptions(), dtype="bfloat16")


def test_check_inputs_names_the_missing_file(tmp_path):
    from reap.core.errors import UserError
    from reap.cli import check_inputs

    (tmp_path / "k.json").write_text("{}")
    check_inputs(PruneOptions("M", Path("o"), keep_file=tmp_path / "k.json"))
    check_inputs(replace(CAL, data=DataOptions("org/some-hub-dataset")))  # a hub name: looked up later
    cases = [(PruneOptions("M", Path("o"), keep_file=tmp_path / "nope.json"), "keep file"),
             (PruneOptions("M", Path("o"), keep_file=tmp_path), "is a directory"),
             (PruneOptions("M", Path("o"), ratio=0.3, stats=tmp_path / "s.safetensors"), "stats file"),
             (PruneOptions("M", Path("o"), ratio=0.3,
                           calibration=replace(CAL, data=DataOptions(str(tmp_path / "d.jsonl")))), "dataset file"),
             (EvalOptions("M", str(tmp_path / "e.jsonl")), "dataset file")]
    for opts, needle in cases:
        with pytest.raises(UserError, match=needle):
            check_inputs(opts)


@pytest.mark.parametrize("word, choices, meant", [
    ("REAP", ("reap", "ean"), "reap"), ("raito", ("ratio", "keep"), "ratio"),
    ("max_lenght", ("max_length",), "max_length"),
    ("weighted_ean", ("weighted-ean", "ean"), "weighted-ean"), ("zzz", ("reap", "ean"), None),
])
def test_did_you_mean(word, choices, meant):
    from reap.core.errors import did_you_mean, suggestion

    assert did_you_mean(word, choices) == meant
    assert suggestion(word, choices) == (f"did you mean {meant!r}? " if meant else "")
