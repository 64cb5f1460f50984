"""Calibration and evaluation data -> lists of token ids.

A *dataset spec* is a comma-separated list of items ``SOURCE[:COUNT]``:

* ``SOURCE`` is a local file or a Hugging Face datasets name.

  - Local files: ``.jsonl`` / ``.jsonl.gz`` (one JSON object per line), ``.json`` / ``.json.gz`` (a list of
    records, ``{"data": [...]}``, a single object, or JSON-lines content), ``.parquet`` (via pyarrow),
    ``.txt`` / ``.txt.gz`` (the whole file, verbatim, is ONE record ``{"text": <content>}``).
  - If the path exists it is a file. A missing path that looks like a file (known extension; starts with
    ``.``, ``/`` or ``~``; contains a backslash or two ``/``) is an error. Anything else is a Hugging Face
    datasets name, optionally followed by ``#SUBSET`` and/or ``@SPLIT`` (default split ``train``), e.g.
    ``open-r1/Mixture-of-Thoughts#code@train``. It is loaded with ``datasets.load_dataset(name, subset,
    split=split)`` from the local cache only: reap never touches the network (offline mode is forced).
* ``COUNT`` (the last ``:digits`` of the item) is how many records to take from that source: the first
  ``COUNT`` in file order, or a seeded random sample of ``COUNT`` when shuffling. Without it, all records.

Paths containing ``,`` are not supported. Records of a mixture are concatenated in spec order; then
``samples=N`` takes the first N of them. With ``shuffle`` the per-source samples are drawn with the seed,
the whole pool is permuted with the seed and the first N are taken (so the order is random too).

Each record is tokenized *without* special tokens (its ``text`` field, verbatim) or with the tokenizer's
chat template (its ``messages`` field). Records that give no tokens are dropped, not replaced by later
ones. Without ``pack`` each record is one sequence, truncated to its first ``max_length`` tokens; with
``pack`` all sequences are joined with EOS between documents and cut into ``max_length`` chunks (the last
one may be shorter). Without shuffling, files are streamed and reading stops once enough records were taken.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import json
import logging
import random
import re
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from reap.chat import to_chat
from reap.errors import UserError
from reap.options import DataOptions

logger = logging.getLogger(__name__)

FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".txt", ".txt.gz")
DEFAULT_SPLIT = "train"
_TOKENIZE_BATCH = 256  # records per tokenizer call

_COUNT_RE = re.compile(r"^(?P<source>.*):(?P<count>\d+)$")
_NAME_RE = re.compile(r"(?P<name>[^@#]+)(?P<rest>(?:[@#][^@#]*)*)")
_SUFFIX_RE = re.compile(r"([@#])([^@#]*)")


@dataclass(frozen=True)
class DataSource:
    """One item of a dataset spec. ``split``/``subset`` are None for local files."""

    source: str
    count: int | None = None
    split: str | None = None
    subset: str | None = None

    @property
    def is_file(self) -> bool:
        return self.split is None


# ----------------------------------------------------------------------------------------------- tokenizer


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False, config: dict | None = None) -> Any:
    """Load the tokenizer stored in a local model directory (never downloads).

    transformers' ``AutoTokenizer`` builds the model's config to choose the tokenizer class; for a ``model_type``
    that is remote code (Kimi-K2's ``kimi_k2``) its fallback generic config breaks on legacy rope fields
    (``AttributeError: ... max_position_embeddings``). ``config`` (config.json as a dict) is therefore built as reap
    builds it (:func:`reap.arch.build_config`: the transformers class it is an alias of) and handed over. A failure
    is a one-line error that says what helps: ``--trust-remote-code`` for a tokenizer that is the model's own code,
    the missing package it imports, or the tokenizer files themselves."""
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise UserError(f"model directory {path} not found: pass the path of a local checkpoint directory")
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {}
    if config is not None:
        try:
            from reap.arch import build_config

            kwargs["config"] = build_config(config)
        except UserError:
            pass  # transformers tries on its own
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, local_files_only=True,
                                             **kwargs)
    except Exception as err:  # transformers raises ValueError/OSError/ImportError/... for missing or broken files
        raise UserError(_tokenizer_failure(path, err, trust_remote_code)) from err


def _tokenizer_failure(path: Path, err: Exception, trust_remote_code: bool) -> str:
    """What to do about a tokenizer that does not load, from what the directory holds and what failed."""
    what = f"could not load a tokenizer from {path} ({type(err).__name__}: {_first_line(err)})"
    try:
        tok_config = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        tok_config = {}
    auto_map = tok_config.get("auto_map") if isinstance(tok_config, dict) else None
    if isinstance(auto_map, dict):
        auto_map = auto_map.get("AutoTokenizer")
    code = next((c for c in (auto_map if isinstance(auto_map, (list, tuple)) else [auto_map]) if isinstance(c, str)), None)
    module = getattr(err, "name", None) if isinstance(err, ModuleNotFoundError) else None
    if module is None:
        m = re.search(r"(?:No module named|requires the following packages[^:]*:|pip install) '?([A-Za-z0-9_.\-]+)",
                      str(err))
        module = m[1] if m else None
    if module:
        return f"{what}: the tokenizer needs the Python package {module.split('.')[0]!r}: pip install {module.split('.')[0]}"
    if code and not trust_remote_code:
        return (f"{what}: its tokenizer is the model's own code ({code.split('.')[0]}.py, named by tokenizer_config.json): "
                "pass --trust-remote-code to run it (read that file first)")
    if code:
        return (f"{what}: the model's own tokenizer code ({code.split('.')[0]}.py) failed; it may not support the "
                "installed transformers, whose tokenizer API changed in version 5: use a tokenizer.json build of it "
                "(a tokenizer saved with save_pretrained by transformers 5)")
    files = [n for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tiktoken.model")
             if (path / n).is_file()]
    if not files:
        return (f"{what}: {path} holds no tokenizer files; copy tokenizer.json and tokenizer_config.json of the "
                "original model into it")
    return f"{what}: the tokenizer files there ({', '.join(files)}) do not load; restore them from the original model"


# ------------------------------------------------------------------------------------------------ spec


def parse_dataset_spec(spec: str) -> list[DataSource]:
    """Parse ``SOURCE[:COUNT],...`` into sources (see the module docstring)."""
    if not spec or not spec.strip():
        raise UserError("the dataset spec is empty: pass a file path or a Hugging Face dataset name")
    return [_parse_item(item.strip(), spec) for item in spec.split(",")]


def _parse_item(item: str, spec: str) -> DataSource:
    if not item:
        raise UserError(f"dataset spec {spec!r} has an empty item: separate sources with single commas, "
                        "e.g. a.jsonl,b.jsonl:100")
    count: int | None = None
    match = _COUNT_RE.match(item)
    if match:
        item, count = match["source"], int(match["count"])
        if count <= 0:
            raise UserError(f"dataset spec item {item}:{count} takes {count} records: COUNT must be a positive integer")
    elif not Path(item).expanduser().exists() and ":" in item:
        tail = item.rsplit(":", 1)[1]
        if not any(c in tail for c in "/\\]"):  # not a Windows path, not a split slice like train[:100]
            raise UserError(f"dataset spec item {item!r} has a bad COUNT {tail!r}: "
                            "write SOURCE:N with N a positive integer")
    if not item:
        raise UserError(f"dataset spec item {item}:{count} has no source: write SOURCE:N, e.g. data.jsonl:{count}")

    path = Path(item).expanduser()
    if path.exists():
        _check_file(path)
        return DataSource(str(path), count)
    looks_like_path = item.startswith((".", "/", "~")) or "\\" in item or item.count("/") > 1
    if looks_like_path or item.lower().endswith(FILE_SUFFIXES):
        raise UserError(f"dataset file {item} not found: check the path (or pass a Hugging Face dataset name)")

    match = _NAME_RE.fullmatch(item)
    pairs = _SUFFIX_RE.findall(match["rest"]) if match else []
    parts = dict(pairs)
    if not match or len(parts) != len(pairs) or not all(parts.values()):
        raise UserError(f"dataset spec item {item!r} is malformed: write NAME[#SUBSET][@SPLIT][:COUNT], "
                        "e.g. org/name#subset@train:512")
    name = match["name"]
    return DataSource(name, count, split=parts.get("@", DEFAULT_SPLIT), subset=parts.get("#"))


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise UserError(f"dataset path {path} is a directory: pass a file ({', '.join(FILE_SUFFIXES)})")
    if not path.name.lower().endswith(FILE_SUFFIXES):
        raise UserError(f"dataset file {path} has an unsupported format: "
                        f"convert it to one of {', '.join(FILE_SUFFIXES)}")


# ------------------------------------------------------------------------------------------------ records


def load_records(src: DataSource, text_field: str = "text") -> Iterator[dict]:
    """Yield the records of one source in file order (lazily; ``.txt`` gives ``{text_field: content}``)."""
    if not src.is_file:
        yield from _hf_records(src)
        return
    path = Path(src.source)
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            yield from _parquet_records(path)
        elif name.endswith((".txt", ".txt.gz")):
            with _open_text(path, newline="") as f:
                yield {text_field: f.read()}
        elif name.endswith((".json", ".json.gz")):
            yield from _json_records(path)
        else:
            with _open_text(path) as f:
                yield from _jsonl_records(f, path)
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as err:
        raise UserError(f"could not read dataset file {path} ({type(err).__name__}: {_first_line(err)}): "
                        "check that it is a valid, complete, UTF-8 file") from err


def _open_text(path: Path, newline: str | None = None) -> TextIO:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline=newline)
    return open(path, encoding="utf-8-sig", newline=newline)


def _jsonl_records(lines: Iterable[str], path: Path, first_line: int = 1) -> Iterator[dict]:
    for lineno, line in enumerate(lines, first_line):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path} line {lineno} is not valid JSON ({err.msg}): fix or remove that line") from err
        yield _as_record(record, f"{path} line {lineno}")


def _json_records(path: Path) -> Iterator[dict]:
    with _open_text(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg != "Extra data":
            raise UserError(f"{path} line {err.lineno} is not valid JSON ({err.msg}): fix the file") from err
        yield from _jsonl_records(text.split("\n"), path)  # JSON-lines content in a .json file
        return
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    elif isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise UserError(f"{path} holds a JSON {type(data).__name__}: "
                        'make it a list of records or {"data": [...]}')
    for i, record in enumerate(data):
        yield _as_record(record, f"{path} record {i}")


def _parquet_records(path: Path) -> Iterator[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise UserError(f"reading {path} needs pyarrow: pip install pyarrow (or convert the file to .jsonl)") from err
    try:
        reader = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid etc. for non-parquet content
        raise UserError(f"{path} is not a readable parquet file ({_first_line(err)}): "
                        "check the file or convert it to .jsonl") from err
    for batch in reader.iter_batches(batch_size=1024):
        yield from batch.to_pylist()


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """Force Hugging Face offline mode (reap never downloads), restoring the previous settings after."""
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _hf_records(src: DataSource) -> Iterator[dict]:
    import datasets

    label = _label(src)
    try:
        with _hf_offline():
            ds = datasets.load_dataset(src.source, src.subset, split=src.split)
    except Exception as err:  # ConnectionError / FileNotFoundError / ValueError when not cached
        raise UserError(
            f"Hugging Face dataset {label} could not be loaded from the local cache ({type(err).__name__}: "
            f"{_first_line(err)}); reap runs with HF_DATASETS_OFFLINE=1 and never downloads: fetch it once on a "
            f"machine with network access with python -c \"import datasets; datasets.load_dataset({src.source!r}, "
            f"{src.subset!r}, split={src.split!r})\", or pass a local .jsonl/.parquet file"
        ) from err
    for i, record in enumerate(ds):
        yield _as_record(record, f"{label} record {i}")


def _as_record(record: Any, where: str) -> dict:
    if not isinstance(record, dict):
        raise UserError(f"{where} is a JSON {type(record).__name__}, not an object: "
                        'make each record an object like {"text": ...}')
    return record


# ------------------------------------------------------------------------------------------- selection

_Located = tuple[dict, str]  # a record and where it came from, for error messages


def _select_records(
    sources: Sequence[DataSource], samples: int | None, shuffle: bool, seed: int, text_field: str
) -> list[_Located]:
    """The mixture: per-source COUNT, concatenated in spec order, then the first ``samples`` records."""
    if not shuffle:
        stream = itertools.chain.from_iterable(_take_in_order(src, text_field) for src in sources)
        records = list(itertools.islice(stream, samples))  # stops reading as soon as enough were taken
    else:
        records = []
        for i, src in enumerate(sources):
            pool = list(_located(src, text_field))
            _check_available(src, len(pool))
            if src.count is not None:
                picks = random.Random(f"reap:{seed}:{i}").sample(range(len(pool)), min(src.count, len(pool)))
                pool = [pool[j] for j in picks]
            records.extend(pool)
        random.Random(f"reap:{seed}:mixture").shuffle(records)
        records = records[:samples]
    if samples is not None and len(records) < samples:
        logger.warning("asked for %d samples but the dataset has only %d records; using all of them",
                       samples, len(records))
    return records


def _located(src: DataSource, text_field: str) -> Iterator[_Located]:
    label = _label(src)
    for i, record in enumerate(load_records(src, text_field)):
        yield record, f"{label} record {i}"


def _take_in_order(src: DataSource, text_field: str) -> Iterator[_Located]:
    n = 0
    for item in itertools.islice(_located(src, text_field), src.count):
        n += 1
        yield item
    _check_available(src, n)  # reached only when the source ran out or gave its COUNT


def _check_available(src: DataSource, available: int) -> None:
    if available == 0:
        raise UserError(f"dataset source {src.source} has no records: check the file (or split/subset) "
                        "or remove it from the spec")
    if src.count is not None and available < src.count:
        logger.warning("dataset source %s has only %d records (asked for %d); taking all of them",
                       src.source, available, src.count)


# ------------------------------------------------------------------------------------------- tokenization


def _tokenize_records(
    records: Sequence[_Located], tokenizer: Any, text_field: str, messages_field: str, log=None
) -> list[list[int]]:
    """Token ids of each record, in order: texts without special tokens, messages via the chat template. With
    ``log``, progress: a bar on a terminal, a line at the start and the end otherwise."""
    import time

    from reap.progress import Progress

    out: list[list[int]] = []
    start = time.perf_counter()
    if log is not None:
        log(f"tokenizing {len(records)} record{'s' if len(records) != 1 else ''}")
    from reap.progress import use_bars

    # a bar on a terminal; in a log the two lines around it say enough
    with Progress(len(records), "tokenizing", unit="doc", enabled=log is not None and use_bars(), log=log,
                  leave=False) as bar:
        for start_i in range(0, len(records), _TOKENIZE_BATCH):
            batch = records[start_i:start_i + _TOKENIZE_BATCH]
            is_text = [_is_text(record, where, text_field, messages_field) for record, where in batch]
            texts = [record[text_field] for (record, _), t in zip(batch, is_text) if t]
            text_ids = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
            for (record, where), t in zip(batch, is_text):
                out.append(list(next(text_ids)) if t else _chat_ids(tokenizer, record, messages_field, where))
            bar.update(len(batch))
    if log is not None:
        log(f"tokenized {len(records)} record{'s' if len(records) != 1 else ''}: {sum(map(len, out))} tokens in "
            f"{time.perf_counter() - start:.1f} s")
    return out


def _is_text(record: dict, where: str, text_field: str, messages_field: str) -> bool:
    """True for a text record, False for a chat-shaped one (reap.chat); UserError for anything else."""
    text = record.get(text_field)
    if text is not None:
        if not isinstance(text, str):
            raise UserError(f"{where}: field {text_field!r} is a {type(text).__name__}, not a string: "
                            "name the text field with --text-field")
        return True
    if to_chat(record, where, messages_field) is not None:
        return False
    fields = ", ".join(map(str, record)) or "none"
    raise UserError(f"{where} has neither {text_field!r} nor a chat shape ({messages_field!r}, conversations, "
                    f"instruction/output, query/answers, prompt/completion; its fields: {fields}): "
                    "name the field that holds the text with --text-field")


def _chat_ids(tokenizer: Any, record: dict, messages_field: str, where: str) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{where} is a chat record but the tokenizer has no chat template: use "
                        "plain-text records (--text-field) or a model whose tokenizer defines a chat template")
    messages, tools = to_chat(record, where, messages_field)
    try:
        ids = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True)
    except Exception as err:  # jinja TemplateError, the template's raise_exception(...), ...
        raise UserError(f"the chat template failed on {where} ({type(err).__name__}: {_first_line(err)}): "
                        "fix that record's messages") from err
    if isinstance(ids, Mapping):  # transformers 5 returns a BatchEncoding by default
        ids = ids["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(t) for t in ids]


# ------------------------------------------------------------------------------------------------ public


def calibration_sequences(opts: DataOptions, tokenizer: Any, log=None) -> list[list[int]]:
    """Token-id sequences for calibration (see the module docstring for the exact semantics); ``log`` gets the
    tokenizing progress."""
    if opts.samples is not None and opts.samples <= 0:
        raise UserError(f"--samples is {opts.samples}: it must be a positive number of records (or omitted for all)")
    if opts.max_length is not None and opts.max_length <= 0:
        raise UserError(f"--max-length is {opts.max_length}: it must be a positive number of tokens")
    eos = tokenizer.eos_token_id
    if opts.pack:
        if opts.max_length is None:
            raise UserError("--pack needs --max-length: pass the chunk length in tokens, e.g. --max-length 2048")
        if eos is None:
            raise UserError("--pack needs an EOS token but the tokenizer has none: "
                            "drop --pack or set eos_token in tokenizer_config.json")

    sources = parse_dataset_spec(opts.dataset)
    records = _select_records(sources, opts.samples, opts.shuffle, opts.seed, opts.text_field)
    seqs = _tokenize_records(records, tokenizer, opts.text_field, opts.messages_field, log)
    kept = [s for s in seqs if s]
    if len(kept) < len(seqs):
        logger.warning("dropped %d of %d records that gave no tokens", len(seqs) - len(kept), len(seqs))
    if not kept:
        raise UserError(f"dataset {opts.dataset} gave no usable samples (every record is empty): "
                        "check the data and --text-field")
    if not opts.pack:
        return [s[: opts.max_length] for s in kept]
    stream = list(kept[0])
    for s in kept[1:]:
        stream.append(eos)
        stream.extend(s)
    L = opts.max_length
    assert L is not None
    return [stream[i:i + L] for i in range(0, len(stream), L)]


def eval_token_stream(
    dataset: str,
    tokenizer: Any,
    eos_id: int,
    max_docs: int | None = None,
    *,
    text_field: str = "text",
    messages_field: str = "messages",
) -> list[int]:
    """One token stream for evaluation: each of the first ``max_docs`` documents (file order) tokenized
    without special tokens and followed by ``eos_id``, all concatenated. Empty documents contribute only EOS."""
    if max_docs is not None and max_docs <= 0:
        raise UserError(f"the number of eval documents is {max_docs}: it must be positive (or omitted for all)")
    records = _select_records(parse_dataset_spec(dataset), max_docs, False, 0, text_field)
    stream: list[int] = []
    for ids in _tokenize_records(records, tokenizer, text_field, messages_field):
        stream.extend(ids)
        stream.append(eos_id)
    return stream


def _label(src: DataSource) -> str:
    if src.is_file:
        return src.source
    return src.source + (f"#{src.subset}" if src.subset else "") + f"@{src.split}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
