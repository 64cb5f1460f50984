"""Where calibration and evaluation records come from: a dataset spec -> records (dicts), in order.

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
Without shuffling, files are streamed and reading stops once enough records were taken. Turning the records into
token ids is :mod:`reap.data.tokens`.
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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from reap.core.errors import UserError

logger = logging.getLogger(__name__)

FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".txt", ".txt.gz")
DEFAULT_SPLIT = "train"

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
        raise UserError(f"could not read dataset file {path} ({type(err).__name__}: {first_line(err)}): "
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
        raise UserError(f"{path} is not a readable parquet file ({first_line(err)}): "
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
            f"{first_line(err)}); reap runs with HF_DATASETS_OFFLINE=1 and never downloads: fetch it once on a "
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

Located = tuple[dict, str]  # a record and where it came from, for error messages


def select_records(
    sources: Sequence[DataSource], samples: int | None, shuffle: bool, seed: int, text_field: str
) -> list[Located]:
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


def _located(src: DataSource, text_field: str) -> Iterator[Located]:
    label = _label(src)
    for i, record in enumerate(load_records(src, text_field)):
        yield record, f"{label} record {i}"


def _take_in_order(src: DataSource, text_field: str) -> Iterator[Located]:
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


def _label(src: DataSource) -> str:
    if src.is_file:
        return src.source
    return src.source + (f"#{src.subset}" if src.subset else "") + f"@{src.split}"


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
