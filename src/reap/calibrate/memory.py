"""Memory for a calibration run: the one line an allocation that failed becomes (where, how much was asked and
free, the flags that help, what the stats file kept for ``--resume``), and the plan's warnings where a batch or the
greedy search likely does not fit the memory free now."""

from __future__ import annotations

from pathlib import Path

from reap.core.errors import UserError, plural
from reap.stream.streamer import LayerStreamer

def out_of_memory_error(err: BaseException, engine, *, streamer: LayerStreamer | None = None, layer: int | None = None,
                        name: str = "layer", kept: str = "") -> UserError | None:
    """The one-line UserError for an allocation that failed (a CUDA out-of-memory error, the CPU allocator's), or None
    for any other error: where (the layer, the batch; read off the traceback, on the prefetch thread too, or
    ``layer``), how much was asked and free, and what to pass (a smaller --batch-tokens, --offload cpu, a smaller
    --greedy-memory for the greedy search); ``kept``: what the run kept. ``name``: what ``layer`` counts ('MTP
    module')."""
    from reap.stream.hidden import describe_out_of_memory, out_of_memory, where_out_of_memory

    kind = out_of_memory(err)
    if kind is None:
        return None
    where = where_out_of_memory(err)
    at = layer
    if "layer" in where:  # a decoder layer's own frame
        at, name = where["layer"], "layer"
    batches = streamer.batches if streamer is not None else []
    if at is None:
        what = "before the first layer ran (loading the model's embeddings)" if streamer is None else \
            "before the first layer ran"
    elif where["phase"] == "loading":
        what = f"loading {name} {at}'s weights"
    elif where["phase"] == "greedy":
        what = f"in {name} {at}'s greedy search (its sample's cached expert outputs)"
    elif where["phase"] == "loss":
        what = "computing the loss after the last layer"
    elif "batch" in where and where["batch"] < len(batches):
        b = batches[where["batch"]]
        what = (f"in {name} {at}, batch {where['batch'] + 1} of {len(batches)} ({b.ids.shape[0]} x {b.ids.shape[1]} "
                "padded tokens)")
    else:
        what = f"in {name} {at}"
    hidden_on = streamer.store.mode if streamer is not None and streamer.store is not None else engine.offload
    line = describe_out_of_memory(err, kind=kind, what=what, batch_tokens=engine.batch_tokens, hidden_on=hidden_on,
                                  batches=batches, kept=kept, device=streamer.device if streamer is not None else None,
                                  greedy_memory=engine.greedy_memory if where["phase"] == "greedy" else None)
    return UserError(line)


def memory_warnings(plan: dict, engine) -> list[str]:
    """What :meth:`LayerStreamer.plan` shows will likely not fit, each with what to pass instead."""
    from reap.core.humanize import human_bytes
    from reap.stream.hidden import MARGIN

    out = []
    memory, room = plan["memory"], plan["room_bytes"]
    total = f" of {human_bytes(plan['total_bytes'])}" if plan.get("total_bytes") else ""
    beside = " and the hidden states" if plan["hidden_on"] == ("device" if memory == "GPU" else "cpu") else ""
    left = (f"{human_bytes(max(0, room))} of {memory} memory is left for them ({human_bytes(plan['free_bytes'])} free "
            f"now{total}, less the layers' weights{beside})")
    offload = " or --offload cpu" if memory == "GPU" and plan["hidden_on"] == "device" else \
        " or --offload disk" if memory == "CPU" and plan["hidden_on"] == "cpu" else ""
    fit = plan["batch_tokens_fit"]
    if fit is not None:
        fix = (f"pass --batch-tokens {fit} (now {engine.batch_tokens}){offload}" if fit else
               f"not even 16 tokens fit: free {memory} memory (another process may hold it"
               + (": nvidia-smi shows it)" if memory == "GPU" else ")") + (f", pass{offload[3:]}" if offload else "")
               + (", or use a larger GPU" if memory == "GPU" else ""))
        out.append(f"the batches likely do not fit: the largest ({plan['largest_batch']} padded tokens) peaks at "
                   f"~{human_bytes(plan['peak_bytes'])} of activations, but {left}; {fix}")
    if not plan["greedy_fits"] and plan["greedy_peak_bytes"]:
        # the search's outputs are what --greedy-memory bounds; the rest of its peak stays
        rest = plan["greedy_peak_bytes"] - plan["greedy_outputs_bytes"]
        gib = int((room - MARGIN - rest) / (1 << 30) * 4) / 4
        fix = (f"pass --greedy-memory {gib:g} (now {engine.greedy_memory:g} GiB) or --greedy-tokens 0 (no greedy "
               "search)" if gib >= 0.25 else "pass --greedy-tokens 0 (no greedy search)")
        out.append(f"the greedy search likely does not fit: its sample, cached expert outputs and work arrays "
                   f"takes ~{human_bytes(plan['greedy_peak_bytes'])}, but {left}; {fix}")
    return out


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _kept(out: Path | None, stats, rows: int) -> str:
    """What a calibration that ran out of memory kept, and how to continue it."""
    if out is None:
        return "nothing was kept (the statistics were in memory only)"
    done = sorted(stats.completed) if stats is not None else []
    if not done:
        return f"no layer was finished, so {out} was not written"
    nxt = next((i for i in range(rows) if i not in done), rows)
    return (f"{out} keeps {plural(len(done), 'finished layer')} of {rows}: run the command again with --resume (and "
            f"one of those) to continue at layer {nxt}")
