"""Test helpers shared by several test files (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import torch


def random_sequences(vocab: int, lengths, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def load_causal_lm(model_dir: Path, **kwargs):
    """transformers' own model for the checkpoint (``from_pretrained`` kwargs pass through). Kimi-K2's model_type
    "kimi_k2" is remote code for DeepSeek-V3: it loads with transformers' DeepSeek-V3 classes, from its config.json
    under model_type deepseek_v3 (transformers picks the checkpoint conversion by the config's model_type)."""
    import json

    from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    config = json.loads((Path(model_dir) / "config.json").read_text())
    if config.get("model_type") == "kimi_k2":
        config = {k: v for k, v in config.items() if k not in ("model_type", "auto_map")}
        return DeepseekV3ForCausalLM.from_pretrained(model_dir, config=DeepseekV3Config(**config), **kwargs)
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)


def reference_layers(model_dir: Path, dtype: torch.dtype, sequences) -> dict[int, list]:
    """transformers' own model: per decoder layer, the (input, output) hidden states for each sequence."""
    model = load_causal_lm(model_dir, dtype=dtype)
    captured: dict[int, list] = {}
    hooks = [
        layer.register_forward_hook(
            lambda mod, args, kwargs, out, i=i: captured.setdefault(i, []).append(
                ((args[0] if args else kwargs["hidden_states"]).detach().clone(), out.detach().clone())),
            with_kwargs=True)
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        for seq in sequences:
            model.model(torch.tensor([seq]))
    for h in hooks:
        h.remove()
    return captured


def feed_reference_inputs(streamer, ref: dict[int, list], layer: int, dtype: torch.dtype) -> None:
    """Put transformers' own inputs of decoder layer ``layer`` (from :func:`reference_layers`) into the streamer's
    hidden-state store, batch by batch (padded rows stay zero)."""
    row = 0
    for i, batch in enumerate(streamer.batches):
        h = torch.zeros(*batch.ids.shape, streamer.spec.hidden_size, dtype=dtype)
        for r, n in enumerate(batch.lengths):
            h[r, :n] = ref[layer][row + r][0][0]
        streamer.store.put(i, h)
        row += len(batch.lengths)


def assert_reference_outputs(streamer, ref: dict[int, list], layer: int, atol: float) -> None:
    """The streamer's hidden states after ``layer`` equal transformers' outputs of that layer (real tokens only)."""
    row = 0
    for i, batch in enumerate(streamer.batches):
        out = streamer.store.get(i)
        for r, n in enumerate(batch.lengths):
            torch.testing.assert_close(out[r, :n].float(), ref[layer][row + r][1][0].float(), atol=atol, rtol=atol)
        row += len(batch.lengths)
