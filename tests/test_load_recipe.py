"""Loading layers by a recipe learned from transformers' own load of the first layer of each kind.

The reference is transformers' loader itself (``REAP_LOADER=transformers`` sends every layer through it): every
parameter and buffer a recipe builds equals, bit for bit, what transformers loads for the same layer, in several
families' stored layouts (per-expert tensors merged and concatenated, fused tensors, FP8 dequantized first); a
recipe is refused where no candidate, or more than one, reproduces what transformers did.
"""

from __future__ import annotations

import pytest
import torch

from reap.stream import load_recipe
from reap.io.checkpoint import Checkpoint
from reap.model.derive import derive
from reap.core.options import EngineOptions
from reap.stream.streamer import LayerStreamer


def _loaded(path, monkeypatch, loader: str | None):
    if loader:
        monkeypatch.setenv(load_recipe.ENV, loader)
    else:
        monkeypatch.delenv(load_recipe.ENV, raising=False)
    ckpt = Checkpoint(path)
    layout = derive(ckpt)
    st = LayerStreamer(ckpt, layout, None, EngineOptions(device="cpu", dtype="float32", progress=False))
    out = {}
    try:
        for layer in range(layout.num_layers):
            module = st.loader.load_layer(layer)
            out.update({f"{layer}.{n}": (t.clone(), t.is_contiguous()) for n, t in module.named_parameters()})
            out.update({f"{layer}.{n}": (t.clone(), t.is_contiguous()) for n, t in module.named_buffers()})
            st.loader.free_layer(layer)
        return out, dict(st.loader._recipes)
    finally:
        st.close()


@pytest.fixture(scope="module")
def family_model(tmp_path_factory):
    from reap.testing.tiny import make_tiny_model

    made = {}

    def make(family: str):
        if family not in made:
            made[family] = make_tiny_model(tmp_path_factory.mktemp(family) / "m", family=family, seed=3,
                                           num_hidden_layers=3)
        return made[family]

    return make


@pytest.mark.parametrize("family", ["minimax_m2", "qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "qwen3_next"])
def test_recipe_loads_what_transformers_loads(family, family_model, monkeypatch):
    path = family_model(family)
    want, none = _loaded(path, monkeypatch, "transformers")
    got, recipes = _loaded(path, monkeypatch, None)
    assert not none and recipes, "no layer was loaded by a recipe: the comparison would test nothing"
    assert got.keys() == want.keys()
    for name, (t, contiguous) in want.items():
        assert got[name][0].dtype == t.dtype and torch.equal(got[name][0], t), name
        assert got[name][1] == contiguous, name


def test_fp8_layers_by_recipe_equal_transformers(tiny_fp8, monkeypatch):
    want, _ = _loaded(tiny_fp8, monkeypatch, "transformers")
    got, recipes = _loaded(tiny_fp8, monkeypatch, None)
    assert recipes and got.keys() == want.keys()
    assert all(torch.equal(got[k][0], want[k][0]) for k in want)


def _template(tiny_fp32):
    """Layer 0 of the tiny model loaded by transformers, with what learn() needs."""
    ckpt = Checkpoint(tiny_fp32)
    st = LayerStreamer(ckpt, derive(ckpt), None, EngineOptions(device="cpu", dtype="float32", progress=False))
    raw = st.loader._read_layer(0).views()
    state = st.loader.materialize(raw)
    from reap.stream.weights import load_into

    load_into(st.model, state, st.device, st.dtype, "layer 0")
    return st, state, st.loader._targets(raw), f"{st.layout.layers_path}.0."


def test_a_tensor_no_candidate_reproduces_keeps_transformers_loader(tiny_fp32):
    st, state, targets, prefix = _template(tiny_fp32)
    try:
        recipe, why = load_recipe.learn(st.layers[0], prefix, state, targets, 0)
        assert recipe is not None, why
        experts = next(n for n, _ in st.layers[0].named_parameters() if n.endswith("gate_up_proj"))
        with torch.no_grad():
            st.layers[0].get_submodule(experts.rpartition(".")[0]).gate_up_proj.add_(1.0)  # not what was stored
        recipe, why = load_recipe.learn(st.layers[0], prefix, state, targets, 0)
        assert recipe is None and "no recipe reproduces" in why and "gate_up_proj" in why
    finally:
        st.close()


def test_values_that_cannot_tell_candidates_apart_keep_transformers_loader(tiny_fp32):
    """Zeros: stacking the gate and up projections in either order gives the same tensor, so which one
    transformers did is unknown; no recipe is kept rather than a guess."""
    st, state, targets, prefix = _template(tiny_fp32)
    try:
        zeros = {k: torch.zeros_like(v) if ".experts." in k else v for k, v in state.items()}
        from reap.stream.weights import load_into

        load_into(st.model, zeros, st.device, st.dtype, "layer 0")
        recipe, why = load_recipe.learn(st.layers[0], prefix, zeros, targets, 0)
        assert recipe is None and "recipes reproduce" in why
    finally:
        st.close()


def test_layer_index_normalized_once():
    name = "model.layers.3.mlp.experts.3.w1.weight"
    assert load_recipe.normalize(name, 3) == "model.layers.#.mlp.experts.3.w1.weight"
    assert load_recipe.normalize("model.layers.0.mlp.experts.0.w1", 0) == "model.layers.#.mlp.experts.0.w1"
    assert load_recipe.normalize("model.layers.12.x", 1) == "model.layers.12.x"  # 12 is not 1


def test_layers_of_other_shapes_have_other_signatures():
    a = {"model.layers.1.mlp.w": torch.zeros(4, 2)}
    b = {"model.layers.2.mlp.w": torch.zeros(4, 2)}
    c = {"model.layers.3.mlp.w": torch.zeros(4, 3)}
    sig = [load_recipe.signature(s, load_recipe.normalized(s, layer)) for s, layer in ((a, 1), (b, 2), (c, 3))]
    assert sig[0] == sig[1] != sig[2]
