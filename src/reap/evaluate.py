"""``reap eval``: next-token loss and perplexity of a checkpoint, streamed layer by layer.

The evaluation runs through the same :class:`reap.calibrate.run.LayerStreamer` as calibration (no statistics
are collected), so a model larger than host or GPU memory can be evaluated: only one decoder layer is
materialized at a time. After the last layer, each batch goes through the final norm and ``lm_head``
and the cross-entropy is summed in float32, a slice of tokens at a time (logits are never held for a whole
batch at once, which matters for 200K-token vocabularies).

Protocol (fixed, so numbers from different runs and tools are comparable):

1. Each document (file order) is tokenized with no special tokens and followed by EOS; all are
   concatenated into one stream (:func:`reap.data.tokens.eval_token_stream`). Only as many documents are read
   as needed to cover ``max_tokens`` targets.
2. Windows of S+1 tokens at stride S: window i is ``stream[i*S : i*S+S+1]``; its first S tokens are the
   inputs, its last S the targets. Every target is scored exactly once, with up to S-1 tokens of context
   (no context carries over between windows).
3. The loss is the mean over the first N = min(max_tokens, len(stream) - 1) targets: windows are taken
   until N targets are covered, the last one only in part.

Legend: B sequences in a batch, S window length, H hidden, V vocabulary, T tokens.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from reap import __version__
from reap.stream.streamer import DTYPES, LayerStreamer, peak_memory
from reap.core.errors import UserError
from reap.core.options import EvalOptions

_LOGIT_BYTES = 512 << 20  # float32 logits computed at once (per slice of tokens) in the loss


# -- data --------------------------------------------------------------------------------------------------
def eval_stream(dataset: str, tokenizer: Any, eos_id: int, need: int,
                text_field: str = "text") -> tuple[list[int], int]:
    """(token stream, documents read): enough documents, in file order, for ``need`` tokens, or all of them.

    Reads a few documents, then more in proportion to the tokens still missing (so a large dataset is not
    tokenized in full for a small ``need``); stops when the stream is long enough or the dataset ran out.
    """
    from reap.data.tokens import eval_token_stream

    docs, stream = 16, []
    while True:
        longer = eval_token_stream(dataset, tokenizer, eos_id, max_docs=docs, text_field=text_field)
        # every document adds at least its EOS: a stream that did not grow means the dataset is exhausted
        exhausted = len(longer) <= len(stream) or longer.count(eos_id) < docs
        stream = longer
        if len(stream) >= need or exhausted:
            return stream, stream.count(eos_id) if exhausted else docs
        per_doc = max(len(stream) / docs, 1.0)
        docs = max(docs * 2, math.ceil(need / per_doc * 1.25))


def windows(stream: list[int], seq_len: int, max_tokens: int) -> tuple[list[list[int]], list[list[int]]]:
    """(inputs, targets) per window, covering the first min(max_tokens, len(stream) - 1) targets.

    Window i covers ``stream[i*S : i*S+S+1]``; the last window is cut to the targets that are still needed
    (its inputs too: with causal attention the later inputs cannot change the earlier predictions).
    """
    if seq_len <= 0:
        raise UserError(f"--seq-len is {seq_len}: it must be a positive number of tokens, e.g. 1024")
    if max_tokens <= 0:
        raise UserError(f"--max-tokens is {max_tokens}: it must be a positive number of tokens, e.g. 65536")
    n = min(max_tokens, len(stream) - 1)
    if n <= 0:
        raise UserError("the evaluation data gave fewer than 2 tokens; pass a dataset with some text in it")
    inputs, targets = [], []
    for start in range(0, n, seq_len):
        used = min(seq_len, n - start)
        inputs.append(stream[start : start + used])
        targets.append(stream[start + 1 : start + used + 1])
    return inputs, targets


# -- evaluation --------------------------------------------------------------------------------------------
def _fingerprint(inputs: list[list[int]], targets: list[list[int]]) -> str:
    """A short hash of the scored windows: two evaluations with equal fingerprints saw the same tokens."""
    h = hashlib.sha256()
    for inp, tgt in zip(inputs, targets):
        h.update(torch.tensor(inp + [-1] + tgt, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


def summed_loss(streamer: LayerStreamer, i: int, targets: torch.Tensor) -> torch.Tensor:
    """Sum of float32 cross-entropy of batch i's ``targets`` [B, S] (-100 = not scored) under the model's own
    logits, computed for a slice of positions at a time (at most about 512 MiB of float32 logits)."""
    output = streamer.final_output(i)
    B, S = targets.shape
    vocab = streamer.model.get_output_embeddings().weight.shape[0]
    step = max(1, _LOGIT_BYTES // (4 * vocab * B))
    total = torch.zeros((), dtype=torch.float64, device=targets.device)
    for start in range(0, S, step):
        cols = torch.arange(start, min(start + step, S))
        logits = streamer.logits(i, output, cols).float()  # [B, P, V]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[:, cols.to(targets.device)].reshape(-1),
                                 reduction="sum", ignore_index=-100).double()
    return total


def evaluate(opts: EvalOptions, log=print) -> dict[str, Any]:
    """Mean next-token loss (nats), perplexity and token count of ``opts.model`` on ``opts.dataset``."""
    from dataclasses import replace

    from reap.io.checkpoint import Checkpoint
    from reap.data.tokens import load_tokenizer
    from reap.core.progress import Progress, use_bars
    from reap.model.validate import derive_checked

    engine = opts.engine.resolved()
    if engine.dtype not in DTYPES:
        raise UserError(f"--dtype {engine.dtype!r} is not supported; use one of {', '.join(DTYPES)} or auto")
    ckpt = Checkpoint(opts.model)
    spec = derive_checked(ckpt, keep_mtp=False)  # the loss is the main model's: MTP modules are not run
    tokenizer = load_tokenizer(ckpt.path, trust_remote_code=engine.trust_remote_code, config=ckpt.config)
    eos = tokenizer.eos_token_id
    if eos is None:
        eos = ckpt.config.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
    if not isinstance(eos, int):
        raise UserError(f"the tokenizer of {ckpt.path} has no EOS token (and config.json no eos_token_id); "
                        "set eos_token in tokenizer_config.json")
    if opts.max_tokens <= 0 or opts.seq_len <= 0:
        windows([], opts.seq_len, opts.max_tokens)  # raises the UserError that explains it
    stream, docs = eval_stream(opts.dataset, tokenizer, eos, opts.max_tokens + 1, opts.text_field)
    inputs, targets = windows(stream, opts.seq_len, opts.max_tokens)
    n_targets = sum(len(t) for t in targets)
    if n_targets < opts.max_tokens:
        log(f"note: {opts.dataset} has only {len(stream)} tokens; scoring {n_targets} instead of {opts.max_tokens}")

    lines = engine.progress and not use_bars()  # in a log: one line per layer instead of the streamer's bars
    # no greedy search here (no observers): its memory does not count where the hidden states go (--offload auto)
    streamer_engine = replace(engine, greedy_tokens=0, progress=engine.progress and not lines)
    try:
        streamer = LayerStreamer(ckpt, spec, inputs, streamer_engine)
    except RuntimeError as err:  # torch.OutOfMemoryError among them: one line with the fix
        _raise_out_of_memory(err, engine, None, None, ckpt.name)
        raise
    log(f"evaluating {ckpt.name}: {n_targets} tokens in {len(inputs)} windows of {opts.seq_len} "
        f"({docs} documents), {spec.num_layers} layers, {streamer.device} {engine.dtype}, "
        f"hidden states on {streamer.store.mode}")
    t0 = time.perf_counter()
    layer = None
    try:
        with torch.inference_mode():
            streamer.loader.prefetch(0)
            streamer.embed()
            bar = Progress(spec.num_layers, f"evaluating {ckpt.name}", unit="layer", enabled=lines, log=log, every=0.0)
            for layer in range(spec.num_layers):
                streamer.run_layer(layer, None)
                bar.update()
            bar.close()
            streamer.load_head()
            total = torch.zeros((), dtype=torch.float64, device=streamer.device)
            row = 0
            for i, batch in enumerate(streamer.batches):
                B, S = batch.ids.shape
                tgt = torch.full((B, S), -100, dtype=torch.long)  # [B, S]; -100 = padding, not scored
                for r, n in enumerate(batch.lengths):
                    tgt[r, :n] = torch.tensor(targets[row + r], dtype=torch.long)
                total += summed_loss(streamer, i, tgt.to(streamer.device))
                row += len(batch.lengths)
            loss_sum = float(total.item())
    except RuntimeError as err:  # torch.OutOfMemoryError among them: one line with the fix
        _raise_out_of_memory(err, engine, streamer, layer, ckpt.name)
        raise
    finally:
        streamer.close()
    seconds = time.perf_counter() - t0
    loss = loss_sum / n_targets
    result = {
        "model": str(ckpt.path),
        "dataset": opts.dataset,
        "tokens": n_targets,
        "loss": loss,
        "perplexity": math.exp(loss),
        "loss_sum": loss_sum,
        "seq_len": opts.seq_len,
        "windows": len(inputs),
        "documents": docs,
        "data_fingerprint": _fingerprint(inputs, targets),
        "num_experts": spec.num_experts,
        "top_k": spec.top_k,
        "device": str(streamer.device),
        "dtype": engine.dtype,
        "seconds": round(seconds, 3),
        "tool_version": __version__,
        **{k: round(v, 3) for k, v in peak_memory(streamer.device).items()},
    }
    return result


def _raise_out_of_memory(err: RuntimeError, engine, streamer: LayerStreamer | None, layer: int | None,
                         name: str) -> None:
    """Raise the one-line UserError for an allocation that failed (:func:`reap.calibrate.memory.out_of_memory_error`);
    return for any other error."""
    from reap.calibrate.memory import out_of_memory_error

    oom = out_of_memory_error(err, engine, streamer=streamer, layer=layer,
                              kept=f"nothing was written (evaluating {name})")
    if oom is not None:
        raise oom from None


def compare(original: EvalOptions, pruned: EvalOptions, log=print) -> dict[str, Any]:
    """Evaluate two models (e.g. the original and its pruned copy) on the same tokens; return both and the
    difference (``pruned - original`` in loss, ``pruned / original`` in perplexity)."""
    try:
        a = evaluate(original, log=log)
    except UserError as err:  # say which of the two models is the problem
        raise UserError(f"--baseline {original.model}: {err}") from None
    b = evaluate(pruned, log=log)
    if a["data_fingerprint"] != b["data_fingerprint"]:
        raise UserError(
            f"the two models did not see the same evaluation tokens ({a['tokens']} vs {b['tokens']} tokens, "
            "different tokenizers or options); compare models that share a tokenizer, with the same "
            "--dataset, --max-tokens and --seq-len"
        )
    diff = {
        "loss_delta": b["loss"] - a["loss"],
        "loss_relative": (b["loss"] - a["loss"]) / a["loss"] if a["loss"] else float("nan"),
        "perplexity_ratio": b["perplexity"] / a["perplexity"],
    }
    return {"original": a, "pruned": b, **diff}


def format_result(result: dict[str, Any]) -> str:
    """The human form of an evaluation (:func:`evaluate`) or a comparison (:func:`compare`)."""
    def one(r: dict[str, Any]) -> str:
        return (f"{Path(r['model']).name}: loss {r['loss']:.4f}, perplexity {r['perplexity']:.3f} over {r['tokens']} "
                f"tokens in {r['seconds']:.1f} s")

    if "original" not in result:
        return one(result)
    a, b = result["original"], result["pruned"]
    return "\n".join([one(a), one(b),
                      f"loss {a['loss']:.4f} -> {b['loss']:.4f} ({result['loss_delta']:+.4f}, "
                      f"{100 * result['loss_relative']:+.2f}%); perplexity {a['perplexity']:.3f} -> "
                      f"{b['perplexity']:.3f} (x{result['perplexity_ratio']:.4f})"])


def check_writable(path: str | Path) -> Path:
    """UserError unless ``path`` can be written (checked before an evaluation that may take hours, by creating and
    removing a file beside it)."""
    import os

    path = Path(path)
    if path.is_dir():
        raise UserError(f"--out {path} is a directory; pass a file name such as {path / 'eval.json'}")
    if not path.parent.is_dir():
        raise UserError(f"the folder of --out ({path.parent}) does not exist; create it first")
    probe = path.parent / f".{path.name}.reap-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"x")
        probe.unlink()
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(13, "Permission denied", str(path))
    except OSError as err:
        from reap.core.errors import describe_os_error

        raise UserError(f"--out {path} cannot be written ({describe_os_error(err)}); nothing was evaluated") from None
    return path


def write_json(path: str | Path, result: dict[str, Any]) -> Path:
    """Save an evaluation (or comparison) result as JSON (flushed, its size checked)."""
    import json

    from reap.io.staging import write_text

    path = Path(path)
    if not path.parent.exists():
        raise UserError(f"the folder of --out ({path.parent}) does not exist; create it first")
    return write_text(path, json.dumps(result, indent=2) + "\n")
