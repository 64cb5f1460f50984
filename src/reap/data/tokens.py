"""Calibration and evaluation data -> lists of token ids.

The records come from a dataset spec (:mod:`reap.data.records`: files, Hugging Face datasets from the cache, mixtures,
per-source counts, ``samples``, ``shuffle``). Each record is tokenized *without* special tokens (its ``text``
field, verbatim) or with the tokenizer's chat template (its ``messages`` field, or another chat shape of
:mod:`reap.data.chat`). Records that give no tokens are dropped, not replaced by later ones. Without ``pack`` each
record is one sequence, truncated to its first ``max_length`` tokens; with ``pack`` all sequences are joined with
EOS between documents and cut into ``max_length`` chunks (the last one may be shorter). This module also loads
the model's tokenizer.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from reap.data.chat import to_chat
from reap.core.errors import UserError
from reap.core.options import DataOptions
from reap.data.records import Located, first_line, select_records, parse_dataset_spec

logger = logging.getLogger(__name__)

_TOKENIZE_BATCH = 256  # records per tokenizer call


# ----------------------------------------------------------------------------------------------- tokenizer


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False, config: dict | None = None) -> Any:
    """Load the tokenizer stored in a local model directory (never downloads).

    transformers' ``AutoTokenizer`` builds the model's config to choose the tokenizer class; for a ``model_type``
    that is remote code (Kimi-K2's ``kimi_k2``) its fallback generic config breaks on legacy rope fields
    (``AttributeError: ... max_position_embeddings``). ``config`` (config.json as a dict) is therefore built as reap
    builds it (:func:`reap.model.arch.build_config`: the transformers class it is an alias of) and handed over. A failure
    is a one-line error that says what helps: ``--trust-remote-code`` for a tokenizer that is the model's own code,
    the missing package it imports, or the tokenizer files themselves."""
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise UserError(f"model directory {path} not found: pass the path of a local checkpoint directory")
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {}
    if config is not None:
        try:
            from reap.model.arch import build_config

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
    what = f"could not load a tokenizer from {path} ({type(err).__name__}: {first_line(err)})"
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


# ------------------------------------------------------------------------------------------- tokenization


def _tokenize_records(
    records: Sequence[Located], tokenizer: Any, text_field: str, messages_field: str, log=None
) -> list[list[int]]:
    """Token ids of each record, in order: texts without special tokens, messages via the chat template. With
    ``log``, progress: a bar on a terminal, a line at the start and the end otherwise."""
    import time

    from reap.core.progress import Progress

    out: list[list[int]] = []
    start = time.perf_counter()
    if log is not None:
        log(f"tokenizing {len(records)} record{'s' if len(records) != 1 else ''}")
    from reap.core.progress import use_bars

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
    """True for a text record, False for a chat-shaped one (reap.data.chat); UserError for anything else."""
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
        raise UserError(f"the chat template failed on {where} ({type(err).__name__}: {first_line(err)}): "
                        "fix that record's messages") from err
    if isinstance(ids, Mapping):  # transformers 5 returns a BatchEncoding by default
        ids = ids["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(t) for t in ids]


# ------------------------------------------------------------------------------------------------ public


def calibration_sequences(opts: DataOptions, tokenizer: Any, log=None) -> list[list[int]]:
    """Token-id sequences for calibration (see the module docstrings of this module and :mod:`reap.data.records` for
    the exact semantics); ``log`` gets the tokenizing progress."""
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
    records = select_records(sources, opts.samples, opts.shuffle, opts.seed, opts.text_field)
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
    records = select_records(parse_dataset_spec(dataset), max_docs, False, 0, text_field)
    stream: list[int] = []
    for ids in _tokenize_records(records, tokenizer, text_field, messages_field):
        stream.extend(ids)
        stream.append(eos_id)
    return stream
