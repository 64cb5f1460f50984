"""Recipes (--config), the shipped configs, and calibration records of the common chat shapes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from reap.data.chat import to_chat
from reap.data.tokens import calibration_sequences
from reap.core.errors import UserError
from reap.core.options import DataOptions
from reap.data.records import parse_dataset_spec

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs").glob("minimax-m2-*.yaml"))


def reap(*args, cwd=REPO, env=None):
    return subprocess.run([sys.executable, "-m", "reap", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env=env)


def test_published_recipes_parse_and_describe_the_mix():
    import yaml

    assert [p.name for p in RECIPES] == ["minimax-m2-reap-0.25.yaml", "minimax-m2-reap-0.30.yaml",
                                         "minimax-m2-reap-0.40.yaml"]
    for path, ratio in zip(RECIPES, (0.25, 0.30, 0.40)):
        recipe = yaml.safe_load(path.read_text())
        assert recipe["ratio"] == ratio and recipe["method"] == "reap" and recipe["max_length"] == 16384
        sources = parse_dataset_spec(",".join(recipe["dataset"]))
        assert sum(s.count for s in sources) == 24576
        named = {(s.source, s.subset, s.split) for s in sources}
        assert ("open-r1/Mixture-of-Thoughts", "math", "train") in named
        assert ("SWE-bench/SWE-smith-trajectories", None, "tool") in named
        assert ("Salesforce/xlam-function-calling-60k", None, "train") in named


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_keys_are_valid_options(recipe, tmp_path):
    """Every key is accepted: the run gets as far as looking for the model in the (empty) HF cache."""
    import os

    proc = reap("prune", "--config", recipe, "--out", tmp_path / "out",
                env={**os.environ, "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2
    assert "MiniMaxAI/MiniMax-M2" in proc.stderr and "cache" in proc.stderr, proc.stderr
    assert "--config" not in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_ci_recipe_runs_and_is_recorded(mini_m2, tmp_path):
    out = tmp_path / "pruned"
    proc = reap("prune", "--config", "configs/mini-m2-ci.yaml", "--out", out, "--ratio", "0.25", "-q")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "reap_report.json").read_text())
    assert report["ratio"] == 0.25  # the flag overrides the file's 0.30
    assert report["method"] == "reap" and report["kept_per_layer"] == 64 - 16
    assert report["options"]["max_length"] == 256 and report["options"]["config"] == "configs/mini-m2-ci.yaml"
    assert report["calibration"]["samples"] == 24 and report["calibration"]["options"]["ratio"] == 0.25
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 48


@pytest.mark.parametrize("text,needle", [
    ("model: x\nbogus_key: 1\n", "unknown key 'bogus_key'"),
    ("model: x\nration: 0.3\n", "unknown key 'ration'; did you mean 'ratio'?"),
    ("model: x\nmax-lenght: 64\n", "unknown key 'max-lenght'; did you mean 'max_length'?"),
    ("model: x\nratio: 0.3\nmethod: REAP\n", "unknown --method 'REAP'; did you mean 'reap'?"),
    ("model: x\nratio: 0.3\nmethod: reap\ndataset: d.jsonl\noffload: ram\n", "unknown --offload 'ram'"),
    ("model: x\nratio: fast\n", "ratio must be float"),
    ("model: x\nsamples: 1.5\n", "samples must be int"),
    ("model: x\nshuffle: 3\n", "shuffle must be bool"),
    ("- just\n- a list\n", "must be a mapping"),
    ("model: [unclosed\n", "not valid YAML"),
])
def test_bad_recipes_are_one_line_errors_before_any_weight_is_read(tmp_path, text, needle):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    proc = reap("prune", "--config", recipe, "--out", tmp_path / "out")
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_missing_required_option_says_where_to_give_it(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("ratio: 0.3\n")
    proc = reap("prune", "--config", recipe)
    assert proc.returncode == 2 and "MODEL, --out" in proc.stderr and "--config" in proc.stderr


@pytest.mark.slow  # two calibrations through the CLI
def test_calibrate_config_records_options(tiny_fp32, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) + "\n" for i in range(5)))
    recipe = tmp_path / "c.yaml"
    recipe.write_text(f"model: {tiny_fp32}\ndataset:\n  - {data}:3\nmax-length: 64\ndevice: cpu\n")
    proc = reap("calibrate", "--config", recipe, "--out", tmp_path / "s.safetensors", "-q")
    assert proc.returncode == 0, proc.stderr
    from reap.calibrate.stats import ExpertStats

    stats = ExpertStats.load(tmp_path / "s.safetensors")
    assert stats.meta["samples"] == 3 and stats.meta["options"]["max_length"] == 64
    assert stats.meta["data"]["dataset"] == f"{data}:3"


# -- chat shapes ------------------------------------------------------------------------------------------
TEMPLATE = ("{% if tools %}TOOLS{{ tools | tojson }}\n{% endif %}{% for m in messages %}<{{ m['role'] }}>"
            "{{ m['content'] }}{% if m.get('tool_calls') %}CALLS{{ m['tool_calls'] | tojson }}{% endif %}\n{% endfor %}")

SHAPES = [
    ({"instruction": "Reverse a list", "input": "[1, 2]", "output": "x[::-1]"},
     [{"role": "user", "content": "Reverse a list\n\n[1, 2]"}, {"role": "assistant", "content": "x[::-1]"}], None),
    ({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
     [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], None),
    ({"messages": json.dumps([{"role": "user", "content": "ls"}]), "tools": json.dumps([{"name": "bash"}])},
     [{"role": "user", "content": "ls"}], [{"type": "function", "function": {"name": "bash"}}]),
    ({"query": "Weather in Paris?", "tools": json.dumps([{"name": "weather", "parameters": {}}]),
      "answers": json.dumps([{"name": "weather", "arguments": {"city": "Paris"}}])},
     [{"role": "user", "content": "Weather in Paris?"},
      {"role": "assistant", "content": "", "tool_calls": [
          {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]}],
     [{"type": "function", "function": {"name": "weather", "parameters": {}}}]),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
     [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], None),
    ({"prompt": "p", "completion": "c"}, [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}], None),
]


@pytest.mark.parametrize("record,messages,tools", SHAPES)
def test_record_shapes_become_chat_messages(record, messages, tools):
    assert to_chat(record, "rec") == (messages, tools)


def test_chat_records_go_through_the_chat_template(tmp_path):
    from transformers import AutoTokenizer

    from reap.testing.tiny import make_byte_tokenizer

    make_byte_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    tok.chat_template = TEMPLATE
    data = tmp_path / "mix.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r, _, _ in SHAPES))
    got = calibration_sequences(DataOptions(dataset=str(data)), tok)
    for ids, (_, messages, tools) in zip(got, SHAPES):
        rendered = tok.apply_chat_template(messages, tools=tools, tokenize=False)
        assert ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert "CALLS" in tok.decode(got[3]) and "TOOLS" in tok.decode(got[3])


def test_unshaped_and_broken_records_are_user_errors():
    with pytest.raises(UserError, match="neither"):
        from reap.data.tokens import _is_text

        _is_text({"foo": 1}, "rec 0", "text", "messages")
    with pytest.raises(UserError, match="not JSON"):
        to_chat({"query": "q", "answers": "[not json"}, "rec 1")
    with pytest.raises(UserError, match="not one of"):
        to_chat({"conversations": [{"from": "robot", "value": "x"}]}, "rec 2")
