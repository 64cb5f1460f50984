"""Tests for reap.data.tokens and reap.data.records: dataset specs, file formats, mixtures, sampling, truncation, packing, chat
templates, user errors, and the reference calibration protocol of mini-m2 (checked against an independent loop)."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest

from reap.data.tokens import DataOptions, calibration_sequences, eval_token_stream, load_tokenizer
from reap.core.errors import UserError
from reap.data.records import DataSource, load_records, parse_dataset_spec

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MINI_M2 = SHARED / "fixtures" / "mini-m2"
CALIBRATION = SHARED / "data" / "calibration.jsonl.gz"
EVAL = SHARED / "data" / "eval.jsonl.gz"

CHAT_TEMPLATE = "{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}"
WORDS = "the quick brown fox jumps over the lazy dog def return import class self lambda yield".split()


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tok():
    """A tiny byte-level BPE tokenizer built in-process: adds <bos> when asked for special tokens, has a
    chat template, EOS id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>", "<bos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator([" ".join(WORDS)] * 20 + ["def f(x):\n    return x\n"] * 5, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", bos_token="<bos>")
    tokenizer.chat_template = CHAT_TEMPLATE
    assert tokenizer.eos_token_id == 0
    assert tokenizer("the fox")["input_ids"][0] == 1  # special tokens exist, so "no special tokens" is tested
    return tokenizer


@pytest.fixture(scope="session")
def mini_tok():
    if not (MINI_M2 / "tokenizer.json").exists():
        pytest.skip(f"shared fixture {MINI_M2} is absent (expected ../shared beside the checkout)")
    return load_tokenizer(MINI_M2)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def docs(n: int, prefix: str = "") -> list[dict]:
    words = lambda i: " ".join(WORDS[(i + k) % len(WORDS)] for k in range(3 + i % 5))  # noqa: E731
    return [{"text": f"{prefix}{i} {words(i)}", "id": i} for i in range(n)]


def user_error(fn, *match: str) -> str:
    with pytest.raises(UserError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg
    for m in match:
        assert m in msg, msg
    return msg


# --------------------------------------------------------------------------------------------- formats


RECORDS = docs(7)


def _make(tmp_path: Path, kind: str) -> Path:
    if kind in ("jsonl", "jsonl.gz"):
        return write_jsonl(tmp_path / f"d.{kind}", RECORDS)
    if kind == "json-list":
        (p := tmp_path / "d.json").write_text(json.dumps(RECORDS, indent=2))
    elif kind == "json-data":
        (p := tmp_path / "d.json").write_text(json.dumps({"data": RECORDS}))
    elif kind == "json.gz":
        with gzip.open(p := tmp_path / "d.json.gz", "wt", encoding="utf-8") as f:
            json.dump(RECORDS, f)
    elif kind == "json-lines":
        p = write_jsonl(tmp_path / "d.json", RECORDS)
    elif kind == "parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        p = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(RECORDS), p, row_group_size=3)
    else:
        raise AssertionError(kind)
    return p


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "json-list", "json-data", "json.gz", "json-lines", "parquet"])
def test_record_formats(tmp_path, tok, kind):
    path = _make(tmp_path, kind)
    assert list(load_records(DataSource(str(path)))) == RECORDS
    seqs = calibration_sequences(DataOptions(str(path), samples=5), tok)
    assert seqs == [ids(tok, r["text"]) for r in RECORDS[:5]]


def test_txt_is_one_record_kept_verbatim(tmp_path, tok):
    text = "  the quick fox\r\n\n\ndef f(x):\n    return x  \n\n"
    path = tmp_path / "notes.txt"
    path.write_bytes(text.encode())
    assert list(load_records(DataSource(str(path)))) == [{"text": text}]
    assert list(load_records(DataSource(str(path)), text_field="body")) == [{"body": text}]
    assert calibration_sequences(DataOptions(str(path)), tok) == [ids(tok, text)]


def test_blank_lines_in_jsonl_are_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n   \n{"text": "b"}')
    assert [r["text"] for r in load_records(DataSource(str(path)))] == ["a", "b"]


# ----------------------------------------------------------------------------------------------- specs


def test_parse_spec(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", docs(3))
    b = write_jsonl(tmp_path / "b.jsonl.gz", docs(3))
    assert parse_dataset_spec(f"{a}:2, {b}") == [DataSource(str(a), 2), DataSource(str(b), None)]
    assert parse_dataset_spec("open-r1/Mixture-of-Thoughts#code@train:4096") == [
        DataSource("open-r1/Mixture-of-Thoughts", 4096, split="train", subset="code")
    ]
    assert parse_dataset_spec("org/ds") == [DataSource("org/ds", None, split="train", subset=None)]
    assert parse_dataset_spec("org/ds@validation#en") == [DataSource("org/ds", None, split="validation", subset="en")]
    assert parse_dataset_spec("ds@train[:100]:5") == [DataSource("ds", 5, split="train[:100]", subset=None)]


def test_relative_paths_and_tilde(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "rel.jsonl", docs(2))
    monkeypatch.chdir(tmp_path)
    assert parse_dataset_spec("rel.jsonl:1") == [DataSource("rel.jsonl", 1)]
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_dataset_spec("~/rel.jsonl") == [DataSource(str(tmp_path / "rel.jsonl"), None)]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("{a},", "empty item"),
        ("{a},,{a}", "empty item"),
        ("{a}:0", "COUNT must be a positive integer"),
        ("{a}:abc", "bad COUNT 'abc'"),
        ("{a}:-3", "bad COUNT '-3'"),
        ("{a}:", "bad COUNT ''"),
        (":5", "no source"),
        ("{missing}", "not found"),
        ("./nope", "not found"),
        ("data/nope.parquet:3", "dataset file data/nope.parquet not found"),
        ("{dir}", "is a directory"),
        ("{csv}", "unsupported format"),
        ("org/ds@@train", "malformed"),
        ("org/ds@train@test", "malformed"),
        ("org/ds#", "malformed"),
        ("@train", "malformed"),
    ],
)
def test_bad_specs(tmp_path, spec, match):
    a = write_jsonl(tmp_path / "a.jsonl", docs(2))
    (tmp_path / "d").mkdir()
    (tmp_path / "x.csv").write_text("text\nhello\n")
    spec = spec.format(a=a, missing=tmp_path / "missing.jsonl", dir=tmp_path / "d", csv=tmp_path / "x.csv")
    user_error(lambda: parse_dataset_spec(spec), match)


# ------------------------------------------------------------------------------------------- selection


def test_mixture_counts_and_order(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", docs(5, "a"))
    b = write_jsonl(tmp_path / "b.jsonl.gz", docs(5, "b"))
    c = tmp_path / "c.json"
    c.write_text(json.dumps(docs(4, "c")))
    spec = f"{a}:2,{b}:3,{c}"
    expected = docs(5, "a")[:2] + docs(5, "b")[:3] + docs(4, "c")
    assert calibration_sequences(DataOptions(spec), tok) == [ids(tok, r["text"]) for r in expected]
    # samples counts over the whole mixture, in spec order
    assert calibration_sequences(DataOptions(spec, samples=4), tok) == [ids(tok, r["text"]) for r in expected[:4]]


def test_count_larger_than_source_takes_all(tmp_path, tok, caplog):
    a = write_jsonl(tmp_path / "a.jsonl", docs(3))
    with caplog.at_level(logging.WARNING, logger="reap.data.records"):
        seqs = calibration_sequences(DataOptions(f"{a}:10", samples=50), tok)
    assert seqs == [ids(tok, r["text"]) for r in docs(3)]
    assert "only 3 records" in caplog.text


def test_samples_takes_first_n_in_file_order(tmp_path, tok):
    records = docs(40)
    path = write_jsonl(tmp_path / "d.jsonl", records)
    seqs = calibration_sequences(DataOptions(str(path), samples=13), tok)
    assert seqs == [tok(r["text"], add_special_tokens=False)["input_ids"] for r in records[:13]]
    assert all(s[0] != 1 for s in seqs)  # no <bos>


def test_reading_stops_once_enough_records(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "the fox"}\n{"text": "the dog"}\n{not json\n')
    assert len(calibration_sequences(DataOptions(str(path), samples=2), tok)) == 2
    assert len(calibration_sequences(DataOptions(f"{path}:2"), tok)) == 2
    more = lambda: calibration_sequences(DataOptions(str(path), samples=3), tok)  # noqa: E731
    user_error(more, str(path), "line 3", "not valid JSON")


def test_empty_records_are_dropped_not_replaced(tmp_path, tok, caplog):
    records = [{"text": "the fox"}, {"text": ""}, {"text": "lazy dog"}, {"text": "jumps"}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with caplog.at_level(logging.WARNING, logger="reap.data.tokens"):
        seqs = calibration_sequences(DataOptions(str(path), samples=3), tok)
    assert seqs == [ids(tok, "the fox"), ids(tok, "lazy dog")]
    assert "dropped 1 of 3" in caplog.text


def test_max_length_truncates(tmp_path, tok):
    records = docs(10)
    path = write_jsonl(tmp_path / "d.jsonl", records)
    seqs = calibration_sequences(DataOptions(str(path), max_length=4), tok)
    full = [ids(tok, r["text"]) for r in records]
    assert seqs == [f[:4] for f in full]
    assert any(len(f) > 4 for f in full)


def test_shuffle_is_seeded_sample(tmp_path, tok):
    records = docs(60)
    path = write_jsonl(tmp_path / "d.jsonl", records)
    in_order = calibration_sequences(DataOptions(str(path), samples=20), tok)
    first = calibration_sequences(DataOptions(str(path), samples=20, shuffle=True, seed=3), tok)
    again = calibration_sequences(DataOptions(str(path), samples=20, shuffle=True, seed=3), tok)
    other = calibration_sequences(DataOptions(str(path), samples=20, shuffle=True, seed=4), tok)
    assert first == again
    assert first != in_order and first != other
    everything = [ids(tok, r["text"]) for r in records]
    assert all(s in everything for s in first) and len({tuple(s) for s in first}) == 20


def test_shuffle_with_mixture_counts(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", docs(30, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", docs(30, "b"))
    opts = DataOptions(f"{a}:5,{b}:7", shuffle=True, seed=11)
    seqs = calibration_sequences(opts, tok)
    assert seqs == calibration_sequences(opts, tok)
    from_a = {tuple(ids(tok, r["text"])) for r in docs(30, "a")}
    from_b = {tuple(ids(tok, r["text"])) for r in docs(30, "b")}
    assert sum(tuple(s) in from_a for s in seqs) == 5 and sum(tuple(s) in from_b for s in seqs) == 7
    assert [tuple(s) for s in seqs if tuple(s) in from_a] != [tuple(ids(tok, r["text"])) for r in docs(5, "a")]


def test_pack(tmp_path, tok):
    records = docs(9)
    path = write_jsonl(tmp_path / "d.jsonl", records)
    chunks = calibration_sequences(DataOptions(str(path), max_length=7, pack=True), tok)
    stream: list[int] = []
    for i, r in enumerate(records):
        stream += ([0] if i else []) + ids(tok, r["text"])
    assert [t for c in chunks for t in c] == stream
    assert all(len(c) == 7 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 7
    assert len(chunks) == -(-len(stream) // 7)
    user_error(lambda: calibration_sequences(DataOptions(str(path), pack=True), tok), "--max-length")


# ---------------------------------------------------------------------------------------------- chat


def test_messages_use_chat_template(tmp_path, tok):
    chat = [{"role": "user", "content": "the quick fox"}, {"role": "assistant", "content": "lazy dog"}]
    records = [{"text": "def f"}, {"messages": chat}, {"text": "return x"}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    direct = tok.apply_chat_template(chat, tokenize=True)
    direct = list(direct["input_ids"]) if not isinstance(direct, list) else direct
    assert direct[0] == 1 and direct[-1] == 0  # the template's own <bos>/<eos> are kept
    seqs = calibration_sequences(DataOptions(str(path)), tok)
    assert seqs == [ids(tok, "def f"), direct, ids(tok, "return x")]


def test_custom_fields(tmp_path, tok):
    records = [{"body": "the fox", "conv": None}, {"conv": [{"role": "user", "content": "dog"}]}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    seqs = calibration_sequences(DataOptions(str(path), text_field="body", messages_field="conv"), tok)
    chat = tok.apply_chat_template(records[1]["conv"], tokenize=True, return_dict=False)
    assert seqs == [ids(tok, "the fox"), chat]


def test_many_records_mixed_kinds_keep_order(tmp_path, tok):
    """More records than one tokenizer batch (and than the progress-bar threshold), text and chat mixed."""
    records = [
        {"messages": [{"role": "user", "content": f"fox {i}"}]} if i % 7 == 0 else {"text": f"dog {i} lazy"}
        for i in range(700)
    ]
    path = write_jsonl(tmp_path / "d.jsonl.gz", records)
    expected = [
        tok.apply_chat_template(r["messages"], tokenize=True, return_dict=False) if "messages" in r
        else ids(tok, r["text"])
        for r in records
    ]
    assert calibration_sequences(DataOptions(str(path)), tok) == expected


def test_messages_without_chat_template(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    bare = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<eos>")
    assert not getattr(bare, "chat_template", None)
    user_error(lambda: calibration_sequences(DataOptions(str(path)), bare), "no chat template")


# -------------------------------------------------------------------------------------------- errors


def test_user_errors(tmp_path, tok):
    good = write_jsonl(tmp_path / "good.jsonl", docs(3))
    cal = lambda spec, **kw: (lambda: calibration_sequences(DataOptions(str(spec), **kw), tok))  # noqa: E731

    user_error(cal(good, samples=0), "--samples")
    user_error(cal(good, samples=-1), "--samples")
    user_error(cal(good, max_length=0), "--max-length")
    (empty := tmp_path / "empty.jsonl").write_text("\n")
    user_error(cal(empty), "has no records")
    user_error(cal(f"{good},{empty}"), "has no records", str(empty))
    (empty_json := tmp_path / "empty.json").write_text("[]")
    user_error(cal(empty_json), "has no records")
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": ""}])
    user_error(cal(blank), "no usable samples")
    other = write_jsonl(tmp_path / "other.jsonl", [{"content": "x", "meta": 1}])
    user_error(cal(other), f"{other} record 0", "'text'", "'messages'", "content, meta", "--text-field")
    nonstr = write_jsonl(tmp_path / "nonstr.jsonl", [{"text": ["a", "b"]}])
    user_error(cal(nonstr), "'text' is a list", "--text-field")
    badmsg = write_jsonl(tmp_path / "badmsg.jsonl", [{"messages": "hello"}])
    user_error(cal(badmsg), "'messages' must be a list")
    (badline := tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c",}\n')
    user_error(cal(badline), str(badline), "line 3")
    (badjson := tmp_path / "bad.json").write_text('[\n{"text": "a"},\n{"text": }\n]')
    user_error(cal(badjson), str(badjson), "line 3")
    (scalar := tmp_path / "scalar.jsonl").write_text('{"text": "a"}\n[1, 2]\n')
    user_error(cal(scalar), "line 2", "not an object")
    (corrupt := tmp_path / "corrupt.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage" * 4)
    user_error(cal(corrupt), str(corrupt))
    (notgz := tmp_path / "plain.jsonl.gz").write_text('{"text": "a"}\n')
    user_error(cal(notgz), str(notgz))
    (latin := tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    user_error(cal(latin), "UTF-8")
    (badpq := tmp_path / "bad.parquet").write_text("not parquet")
    user_error(cal(badpq), "parquet")
    user_error(lambda: eval_token_stream(str(good), tok, 0, max_docs=0), "positive")


def test_load_tokenizer(tmp_path, tok):
    tok.save_pretrained(tmp_path / "model")
    loaded = load_tokenizer(tmp_path / "model")
    assert ids(loaded, "the quick brown fox") == ids(tok, "the quick brown fox")
    assert loaded.eos_token_id == 0 and loaded.chat_template == CHAT_TEMPLATE
    (tmp_path / "empty").mkdir()
    user_error(lambda: load_tokenizer(tmp_path / "empty"), "could not load a tokenizer", "tokenizer.json")
    user_error(lambda: load_tokenizer(tmp_path / "absent"), "not found")


# ------------------------------------------------------------------------------------ Hugging Face names


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty datasets cache, offline (so nothing here can touch the network)."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_missing_hf_dataset_is_user_error(hf_cache, tok):
    import datasets

    before = datasets.config.HF_HUB_OFFLINE
    msg = user_error(
        lambda: calibration_sequences(DataOptions("nonexistent-org/nonexistent-ds:4"), tok),
        "nonexistent-org/nonexistent-ds", "HF_DATASETS_OFFLINE", "load_dataset(",
    )
    assert "split='train'" in msg
    assert datasets.config.HF_HUB_OFFLINE == before  # the forced offline mode is restored


def test_cached_hf_dataset(hf_cache, tmp_path, tok):
    """Build a cache entry the way `datasets` writes one, then load it by name through the spec."""
    from datasets.packaged_modules.json.json import Json

    train = write_jsonl(tmp_path / "train.jsonl", docs(6, "t"))
    valid = write_jsonl(tmp_path / "valid.jsonl", docs(4, "v"))
    builder = Json(cache_dir=str(hf_cache), dataset_name="reap_tiny", hash="0" * 16,
                   data_files={"train": str(train), "validation": str(valid)})
    builder.download_and_prepare()
    config_dir = Path(builder.cache_dir).parents[1]  # .../reap_tiny/default-<hash>/0.0.0/<hash>
    config_dir.rename(config_dir.parent / "default")

    assert calibration_sequences(DataOptions("reap_tiny:3"), tok) == [ids(tok, r["text"]) for r in docs(6, "t")[:3]]
    seqs = calibration_sequences(DataOptions(f"reap_tiny@validation,{train}:1"), tok)
    assert seqs == [ids(tok, r["text"]) for r in docs(4, "v") + docs(6, "t")[:1]]
    user_error(lambda: calibration_sequences(DataOptions("reap_tiny@nosuchsplit"), tok), "reap_tiny@nosuchsplit")


# --------------------------------------------------------------------------------------- shared fixtures


def test_reference_calibration_protocol(mini_tok):
    """The first 256 docs of calibration.jsonl.gz, no special tokens, first 1024 tokens, one doc per sequence."""
    if not CALIBRATION.exists():
        pytest.skip(f"shared data {CALIBRATION} is absent")
    seqs = calibration_sequences(DataOptions(str(CALIBRATION), samples=256, max_length=1024), mini_tok)
    texts = []
    with gzip.open(CALIBRATION, "rt", encoding="utf-8") as f:
        for line in f:
            if len(texts) == 256:
                break
            texts.append(json.loads(line)["text"])
    # the Rust tokenizer directly (one batch: the test must stay fast), bypassing transformers' wrapper
    expected = [e.ids[:1024] for e in mini_tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    assert len(seqs) == 256 and seqs == expected
    assert max(map(len, seqs)) == 1024 and min(map(len, seqs)) < 1024


def test_eval_token_stream(mini_tok, tok, tmp_path):
    if not EVAL.exists():
        pytest.skip(f"shared data {EVAL} is absent")
    eos = mini_tok.eos_token_id
    stream = eval_token_stream(str(EVAL), mini_tok, eos, max_docs=20)
    expected: list[int] = []
    with gzip.open(EVAL, "rt", encoding="utf-8") as f:
        for _, line in zip(range(20), f):
            expected += mini_tok.encode(json.loads(line)["text"], add_special_tokens=False) + [eos]
    assert stream == expected
    # empty documents still contribute their EOS
    path = write_jsonl(tmp_path / "e.jsonl", [{"text": "the fox"}, {"text": ""}, {"text": "dog"}])
    assert eval_token_stream(str(path), tok, 0) == ids(tok, "the fox") + [0, 0] + ids(tok, "dog") + [0]

