"""Test helpers shared by several test files (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import torch


def random_sequences(vocab: int, lengths, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def reference_layers(model_dir: Path, dtype: torch.dtype, sequences) -> dict[int, list]:
    """transformers' own model: per decoder layer, the (input, output) hidden states for each sequence."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
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
