"""The run's plan, sized from the memory free now: what a :class:`reap.stream.streamer.LayerStreamer` run will hold
(hidden states and where they live, a batch's peak of activations, the observers' peaks) against the memory left
once the weights are placed, and roughly how long it takes. Read off the streamer's checkpoint, layout, batches,
device, loader and observers; it changes nothing.

Legend: E experts, K top-k, H hidden.
"""

from __future__ import annotations

import torch

from reap.model.moe_types import config_value


def plan(st, placing: bool = False) -> dict:
    """What the run will hold and roughly take, sized from the memory free now: tokens, batches, hidden-state bytes
    and where they live (``--offload auto``: :func:`reap.stream.hidden.offload_choice`), the largest layer's bytes
    read, a batch's peak of activations (``peak_bytes``) and the observers' (the largest of their
    :class:`reap.stream.observers.ObserverCost` peaks, each checked in its ``fits`` entry) against the memory left
    for them once the weights (and hidden states kept there) are placed (``room_bytes``; on the GPU: free now plus
    what this process's allocator holds, less the embeddings and head, two layers and two layers' reads),
    ``batch_tokens_fit`` (None when a batch fits, else the --batch-tokens to pass,
    :func:`reap.stream.hidden.suggest_batch_tokens`), and a rough time (2 FLOPs per active parameter and token at an
    assumed rate, measured on the CPU, reading every layer at an assumed 2 GB/s, and the observers' time), with
    the observers' own entries (the greedy search's: :meth:`reap.calibrate.greedy.GreedySearch.cost`).
    ``placing``: the hidden states' place is being decided (an existing store's mode does not count; on the CPU
    the time is not estimated).
    """
    from reap.formats import stored_params
    from reap.stream.hidden import MARGIN, batch_peak_bytes, host_available, offload_choice, suggest_batch_tokens

    elem = torch.finfo(st.dtype).bits // 8
    H, E, K = st.layout.hidden_size, st.layout.num_experts, st.layout.top_k
    hidden = st.tokens * H * elem
    # what the store holds: every batch's [B, S, H] (padding too), with room for what a layer hands the next
    need = hidden + sum(b.ids.numel() - sum(b.lengths) for b in st.batches) * H * 4
    active = experts = 0.0  # parameters a token meets in the layers (experts: top-k of E); all experts' parameters
    for layer, names in ((k, v) for k, v in st._stored.items() if isinstance(k, int)):
        for name in names:
            info, role = st.ckpt.infos[name], st.layout.roles[name]
            n = stored_params(name, info.dtype, info.numel, st.layout.format)
            active += n * (K / E if role.part == "experts" else 1)
            experts += n if role.part == "experts" else 0
    if st.device.type == "cuda":
        rate, bandwidth = 250e12, 2e12
    elif placing:  # the time is not needed to place the hidden states: no measuring
        rate = bandwidth = float("nan")
    else:  # measured: a CPU's rates vary tenfold with its cores, vector units and other processes' load
        from reap.stream.ranks import cpu_speed

        rate, bandwidth = cpu_speed()
    read = sum(st.ckpt.infos[n].nbytes for k, v in st._stored.items() if isinstance(k, int) for n in v)
    layer_read = max((sum(st.ckpt.infos[n].nbytes for n in v) for k, v in st._stored.items()
                      if isinstance(k, int)), default=0)
    # what the observers (the greedy search) add after each layer's batches
    costs = [obs.cost(st, experts, rate, bandwidth) for obs in st.observers]
    extra = sum(c.seconds for c in costs)
    eta = 2 * active * st.tokens / rate + read / 2e9 + extra

    # memory: a batch's activations, the observers', and what is left for them
    text = st.model.config.get_text_config()
    eager = getattr(st.model.config, "_attn_implementation", None) == "eager"
    peak = max((batch_peak_bytes(*b.ids.shape, H, elem, top_k=K,
                                 expert_intermediate=st.layout.expert_intermediate,
                                 dense_intermediate=int(config_value(text, "intermediate_size") or 0),
                                 heads=int(config_value(text, "num_attention_heads") or 0), eager=eager)
                for b in st.batches), default=0)
    extra_peak = max((c.peak_bytes for c in costs), default=0)
    # the layer computing, the next one loading, reads ahead
    layers = 2 * st.loader.layer_bytes() + 2 * layer_read
    host = host_available()
    free = total = device_room = None
    if st.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(st.device)
        kept = sum(st.ckpt.infos[n].numel for n in st._stored["base"] + st._stored["head"]) * elem
        device_room = free + torch.cuda.memory_reserved(st.device) - kept - layers
    if st.store is not None and not placing:
        on = st.store.mode
    else:
        on = st.opts.offload if st.opts.offload != "auto" else \
            offload_choice(need, max(peak, extra_peak), device_room, host)
    if device_room is not None:
        room = device_room - (need if on == "device" else 0)
    else:  # on the CPU the weights, the activations and hidden states kept in memory share what is available
        room = host - layers - (need if on == "cpu" else 0)
    largest = max((b.ids.numel() for b in st.batches), default=0)
    out = {"tokens": st.tokens, "batches": len(st.batches), "hidden_bytes": hidden, "hidden_on": on,
           "store_bytes": need, "layer_bytes": layer_read, "eta_s": eta, "assumed_flops": rate,
           "assumed_bandwidth": bandwidth, "measured": st.device.type != "cuda", "peak_bytes": peak,
           "room_bytes": room, "largest_batch": largest,
           "batch_tokens_fit": suggest_batch_tokens(largest, peak, room) if largest else None,
           "memory": "GPU" if free is not None else "CPU",
           "free_bytes": free if free is not None else host, "total_bytes": total}
    for c in costs:
        out.update(c.plan)
        if c.fits is not None:
            out[c.fits] = c.peak_bytes + MARGIN <= room
    return out
