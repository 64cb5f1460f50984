"""Test helpers shared by several test files (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import torch

#: Kimi-K2-Thinking's quantization_config as released (compressed-tensors pack-quantized INT4, group 32)
KIMI_INT4_QUANT = {
    "config_groups": {"group_0": {"input_activations": None, "output_activations": None, "targets": ["Linear"],
                                  "weights": {"actorder": None, "block_structure": None, "dynamic": False,
                                              "group_size": 32, "num_bits": 4, "observer": "minmax",
                                              "observer_kwargs": {}, "strategy": "group", "symmetric": True,
                                              "type": "int"}}},
    "format": "pack-quantized", "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                                           "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
    "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed"}


def random_sequences(vocab: int, lengths, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def python_snippets(count: int, lines=lambda n: 8 + 3 * n, seed: int = 7) -> list[str]:
    """``count`` fixed Python-like snippets (random keywords, seeded; not the repository's own files, which change),
    snippet n with ``lines(n)`` lines of 12 words."""
    g = torch.Generator().manual_seed(seed)
    words = ["def", "return", "self", "import", "for", "in", "if", "else", "value", "items", "print", "(", ")", ":"]
    return ["\n".join(" ".join(words[int(i)] for i in torch.randint(0, len(words), (12,), generator=g))
                      for _ in range(lines(n))) for n in range(count)]


def calibrate_one_and_two_ranks(model: Path, data: Path, out_dir: Path, *extra: str) -> tuple[Path, Path, str]:
    """``reap calibrate`` in one process and under ``torchrun --nproc-per-node 2`` (gloo, CPU) on the same data:
    (single stats file, two-rank stats file, the two-rank run's stderr)."""
    import os
    import subprocess
    import sys

    single, two = out_dir / "one.safetensors", out_dir / "two.safetensors"
    common = ["calibrate", str(model), "--dataset", str(data), "--max-length", "96", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "reap", *common, "--out", str(single)], check=True, env=env,
                   capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run([*torchrun, "-m", "reap", *common, "--out", str(two), *extra], env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return single, two, proc.stderr


def load_causal_lm(model_dir: Path, config_only: dict | None = None, **kwargs):
    """transformers' own model for the checkpoint (``from_pretrained`` kwargs pass through), as the class its
    config.json's ``architectures`` names (else the causal-LM class). Kimi-K2's model_type "kimi_k2" is remote
    code for DeepSeek-V3: it loads with transformers' DeepSeek-V3 classes. With ``config_only`` (a config.json
    dict), a freshly initialized model of that config instead (no weights read)."""
    import json

    import transformers
    from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING, PretrainedConfig

    config = config_only or json.loads((Path(model_dir) / "config.json").read_text())
    config = PretrainedConfig._decode_special_floats(config)  # {"__float__": "Infinity"}, as transformers saves
    model_type = "deepseek_v3" if config.get("model_type") == "kimi_k2" else config["model_type"]
    drop = ("model_type", "auto_map") + (("quantization_config",) if config_only is not None else ())
    cfg = CONFIG_MAPPING[model_type].from_dict({k: v for k, v in config.items() if k not in drop})
    cls = next((getattr(transformers, a) for a in config.get("architectures") or ()
                if getattr(getattr(transformers, a, None), "config_class", None) is type(cfg)),
               None) or MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)]
    if config_only is not None:
        torch.manual_seed(0)
        return cls._from_config(cfg, dtype=kwargs.get("dtype", torch.float32))
    if model_type == config["model_type"]:
        return cls.from_pretrained(model_dir, **kwargs)
    return cls.from_pretrained(model_dir, config=cfg, **kwargs)


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
        h = torch.zeros(*batch.ids.shape, streamer.layout.hidden_size, dtype=dtype)
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


def _layer_of(path: str) -> int:
    import re

    return int(re.search(r"layers\.(\d+)\.", path + ".")[1])


def hooked_stats(model_dir: Path, sequences, num_experts: int | None = None,
                 batches: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Per-layer, per-expert statistics recomputed independently of reap: transformers' own model (fp32, its
    eager experts), hooks on every experts module record what the MoE block passes it (tokens, chosen experts,
    weights), and each (token, expert) pair's output is the experts module's own forward for that single expert
    with weight 1. ``batches`` (lists of sequence indices) runs right-padded batches as given, counting real tokens
    only; by default one sequence at a time. Returns [L, E] float64 tables of count, gate_sum, ean_sum, reap_sum,
    max_norm, ean_sq_sum, max_abs (the largest |element| of a pair's output)."""
    model = load_causal_lm(model_dir, dtype=torch.float32, experts_implementation="eager")
    experts = {name: m for name, m in model.named_modules()
               if all(hasattr(m, a) for a in ("has_gate", "is_transposed", "num_experts"))}
    L = model.config.get_text_config().num_hidden_layers
    E = num_experts or next(iter(experts.values())).num_experts
    acc = {f: torch.zeros(L, E, dtype=torch.float64) for f in ("count", "gate_sum", "ean_sum", "reap_sum", "max_norm",
                                                                 "ean_sq_sum", "max_abs")}
    calls: list = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, kw, n=name: calls.append((n, mod, args, kw)), with_kwargs=True)
             for name, m in experts.items()]
    real = []  # per call: which rows are real tokens
    with torch.no_grad():
        for group in batches or [[i] for i in range(len(sequences))]:
            width = max(len(sequences[i]) for i in group)
            ids = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros(len(group), width, dtype=torch.long)
            for r, i in enumerate(group):
                ids[r, : len(sequences[i])] = torch.tensor(sequences[i])
                mask[r, : len(sequences[i])] = 1
            before = len(calls)
            model(ids, attention_mask=mask if not bool(mask.all()) else None, use_cache=False)
            real += [mask.reshape(-1).bool()] * (len(calls) - before)
        for h in hooks:
            h.remove()
        for (name, mod, args, kw), rows in zip(calls, real):
            x, index, weights = (list(args) + [kw.get(k) for k in ("hidden_states", "top_k_index", "top_k_weights")
                                               [len(args):]])[:3]
            if rows.numel() == x.shape[0]:
                x, index, weights = x[rows], index[rows], weights[rows]
            layer = _layer_of(name)
            for k in range(index.shape[1]):
                # a routed pair: an expert (id < E) with a weight (a zero-computation expert or skip class mapped onto
                # a real expert with weight 0, as LongCat-Flash and ZAYA do, is no traffic of that expert)
                routed = (index[:, k] < E) & (weights[:, k] != 0)
                xk, ik, wk = x[routed], index[routed, k : k + 1], weights[routed, k]
                f = mod(xk, ik, torch.ones_like(wk[:, None]))  # [T, H]: f_e(x) per token
                norm = f.double().norm(dim=-1)
                e, w = ik[:, 0], wk.double()
                acc["count"][layer].index_add_(0, e, torch.ones_like(norm))
                acc["gate_sum"][layer].index_add_(0, e, w)
                acc["ean_sum"][layer].index_add_(0, e, norm)
                acc["reap_sum"][layer].index_add_(0, e, w * norm)
                acc["max_norm"][layer].scatter_reduce_(0, e, norm, reduce="amax")
                acc["ean_sq_sum"][layer].index_add_(0, e, norm * norm)
                acc["max_abs"][layer].scatter_reduce_(0, e, f.double().abs().amax(dim=-1), reduce="amax")
    return acc


def kept_slots(kept: list[int], before: int, after: int) -> torch.Tensor:
    """Indices along an expert axis of ``before`` entries that a pruned tensor of ``after`` entries holds: the kept
    experts, then the slots after the experts that are not experts (zero-computation experts, a skip class,
    shared-expert gates: ``after - len(kept)`` of them, the last of the axis), as the modeling code reads indices
    >= the expert count as those slots."""
    extra = after - len(kept)
    assert extra >= 0, (kept, before, after)
    return torch.tensor(list(kept) + list(range(before - extra, before)))


def removed_in_memory(original_dir: Path, pruned_dir: Path, kept: dict[int, list[int]],
                      id_remap: dict[int, list[int]] | None = None):
    """The original model with the pruned experts removed in memory: a model built from the pruned config.json
    whose every tensor is the original's, with the kept indices selected along the one dimension where the two
    models' shapes differ (router rows, bias entries, expert slices); expert-id tables renumbered by ``id_remap``."""
    import json

    original = load_causal_lm(original_dir, dtype=torch.float32)
    pruned_config = json.loads((Path(pruned_dir) / "config.json").read_text())
    small_model = load_causal_lm(pruned_dir, dtype=torch.float32, config_only=pruned_config)
    big = original.state_dict()
    state = {}
    for name, t in small_model.state_dict().items():
        b = big[name]
        if b.shape != t.shape:
            dims = [d for d in range(b.dim()) if b.shape[d] != t.shape[d]]
            assert len(dims) == 1, (name, b.shape, t.shape)
            b = b.index_select(dims[0], kept_slots(kept[_layer_of(name)], b.shape[dims[0]], t.shape[dims[0]]))
        elif not b.is_floating_point() and id_remap and _layer_of(name) in id_remap and ".mlp." in name:
            b = torch.tensor(id_remap[_layer_of(name)], dtype=b.dtype)[b]
        state[name] = b
    small_model.load_state_dict(state, strict=True)
    return original.eval(), small_model.eval()


def snapshot(path: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file and folder under path (dotfiles included): (size, mtime_ns, bytes)."""
    snap = {}
    for p in sorted(path.rglob("*")):
        st = p.stat()
        snap[p.relative_to(path).as_posix()] = (st.st_size, st.st_mtime_ns, p.read_bytes() if p.is_file() else b"")
    return snap


def stored_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, read with safetensors (the index must list exactly what is stored)."""
    import json

    from safetensors import safe_open

    weight_map = json.loads((Path(path) / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(str(Path(path) / shard), "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    assert set(out) == set(weight_map)
    return out


def assert_exact_surgery(src: Path, out: Path, kept: dict[int, list[int]],
                         id_remap: dict[int, list[int]] | None = None) -> None:
    """Every output tensor is a source tensor byte for byte: the same name, a kept expert renamed to its new index
    (names with ``.experts.{e}.``), a source tensor with the kept indices selected along the one dimension where the
    shapes differ, or an integer expert-id table with every id renumbered by ``id_remap``."""
    import re

    expert = re.compile(r"\.experts\.(\d+)\.")
    before, after = stored_tensors(src), stored_tensors(out)
    for name, t in after.items():
        layer = _layer_of(name) if re.search(r"layers\.\d+\.", name) else None
        m = expert.search(name)
        if m and layer in kept:
            source = before[name[: m.start(1)] + str(kept[layer][int(m[1])]) + name[m.end(1):]]
        else:
            source = before[name]
            if source.shape != t.shape:
                dims = [d for d in range(t.dim()) if source.shape[d] != t.shape[d]]
                assert len(dims) == 1, name
                source = source.index_select(dims[0], kept_slots(kept[layer], source.shape[dims[0]], t.shape[dims[0]]))
            elif id_remap and layer in id_remap and not source.is_floating_point() and not torch.equal(source, t):
                source = torch.tensor(id_remap[layer], dtype=source.dtype)[source.long()]
        assert source.dtype == t.dtype and torch.equal(source.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name
    dropped = [n for n in before if expert.search(n) and _layer_of(n) in kept
               and int(expert.search(n)[1]) not in kept[_layer_of(n)]]
    assert len(after) == len(before) - len(dropped)


# -- the general guard: config.json changes in the expert counts only ------------------------------------------------
def assert_config_changed_only_in_counts(src: Path, out: Path) -> None:
    """config.json of the pruned ``out`` equals ``src``'s (compared after JSON parsing) except the expert-count keys
    (reap.model.arch's Layout.count_keys of the source, nested text_config included), which hold the kept count, and,
    when the multi-token-prediction module was left out, the MTP count keys present in the source (reap.model.arch.MTP_KEYS),
    which hold 0. Nothing added, nothing removed, nothing else rewritten (legacy rope fields included)."""
    import copy
    import json

    from reap.model.arch import MTP_KEYS
    from reap.io.checkpoint import Checkpoint
    from reap.model.derive import derive

    before = json.loads((Path(src) / "config.json").read_text())
    after = json.loads((Path(out) / "config.json").read_text())
    report = json.loads((Path(out) / "reap_report.json").read_text())
    expected = copy.deepcopy(before)
    for path in derive(Checkpoint(src)).count_keys:
        node = expected
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = report["kept_per_layer"]
    if report.get("dropped_mtp_tensors"):
        expected.update({key: 0 for key in MTP_KEYS if before.get(key)})
    if after != expected:
        keys = sorted(set(after) | set(expected))
        diff = {k: (expected.get(k, "<absent>"), after.get(k, "<absent>")) for k in keys if after.get(k) != expected.get(k)}
        raise AssertionError(f"config.json of {out} differs beyond the expert counts: {{key: (expected, got)}} = {diff}")


# -- tiny checkpoints with the exact config of a released one ----------------------------------------------------
def tiny_release(config_path: Path, out: Path, shrink: dict, fmt: str | None = None, seed: int = 0) -> Path:
    """A tiny random checkpoint whose config.json is the released ``config_path`` with only the sizes in ``shrink``
    changed (every other field, quirks included, verbatim: legacy rope_scaling + rope_theta, remote-code model_type
    and auto_map, ...). Weights: transformers' own class for that config (as reap builds it), routers spread, saved in
    several shards; ``fmt`` "fp8" or "mxfp4" rewrites them in that released format (the release's own
    quantization_config is kept), None drops the release's quantization_config. A byte-level tokenizer."""
    import copy
    import json
    import shutil
    import tempfile

    from reap.model.arch import build_config, model_class
    from reap.testing.tiny import make_byte_tokenizer
    from reap.testing.tiny_formats import convert_to_fp8, convert_to_mxfp4

    config = {**copy.deepcopy(json.loads(Path(config_path).read_text())), **shrink}
    if fmt is None:
        config.pop("quantization_config", None)
    cfg = build_config(config)
    torch.manual_seed(seed)
    model = model_class(cfg, config)._from_config(cfg, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if not t.is_floating_point():
                continue
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                t.normal_(0.0, 0.5, generator=g)
            elif name.endswith(("e_score_correction_bias", "mlp.router.bias")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif ".experts." in name or name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                t.normal_(0.0, 0.1, generator=g)
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        dense = Path(tmp) / "dense"
        model.to(torch.bfloat16 if fmt else torch.float32).save_pretrained(dense, max_shard_size="60KB")
        if fmt == "fp8":
            convert_to_fp8(dense, out)
        elif fmt == "mxfp4":
            convert_to_mxfp4(dense, out)
        else:
            shutil.copytree(dense, out)
    make_byte_tokenizer(out)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def add_tensors(path: Path, tensors: dict[str, torch.Tensor], shard: str) -> None:
    """Store ``tensors`` in a new shard ``shard`` of the checkpoint at ``path`` and list them in its index."""
    import json

    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(path) / shard), metadata={"format": "pt"})
    index_path = Path(path) / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"].update({k: shard for k in tensors})
    index["metadata"]["total_size"] = index["metadata"].get("total_size", 0) + sum(
        t.numel() * t.element_size() for t in tensors.values())
    if isinstance(index["metadata"].get("total_parameters"), int):  # parameters, as transformers counts them
        index["metadata"]["total_parameters"] += sum(t.numel() for t in tensors.values() if t.is_floating_point())
    index_path.write_text(json.dumps(index, indent=2))


def write_sparse_shards(path: Path, tensors: list[tuple[str, str, list[int]]], sizes: dict[str, int], n_shards: int,
                        shard_name) -> int:
    """Shards of real safetensors headers with holes for data (each file os.truncate'd to its full size: no weight
    is written or read), ``tensors`` (name, dtype, shape; ``sizes``: bytes per element of each dtype) spread over
    ``n_shards`` files named ``shard_name(i)``, and their index. Returns the total data bytes."""
    import json
    import math
    import os
    import struct

    per = -(-len(tensors) // n_shards)
    weight_map, total = {}, 0
    for i in range(n_shards):
        name = shard_name(i)
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for tname, dtype, shape in tensors[i * per : (i + 1) * per]:
            n = math.prod(shape) * sizes[dtype]
            header[tname] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[tname] = name
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        with open(path / name, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
        os.truncate(path / name, 8 + len(blob) + offset)
        total += offset
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    return total


def assert_recipe_load_equals_transformers(streamer, layer: int) -> bool:
    """Decoder layer ``layer`` loaded the streamer's way (by a learned recipe where it has one for the layer's
    kind) == loaded by transformers' own loader from the same stored tensors, bit for bit; True when a recipe
    was used."""
    from reap.stream import load_recipe
    from reap.stream.weights import load_into, to_meta

    raw = streamer.loader._read_layer(layer).views()
    state = streamer.loader.materialize(raw)
    used = load_recipe.signature(state, load_recipe.normalized(state, layer)) in streamer.loader._recipes
    module = streamer.layers[layer]

    def loaded():
        out = {n: t.clone() for n, t in [*module.named_parameters(), *module.named_buffers()]}
        to_meta(module)
        return out

    streamer.loader._load_layer(raw, layer)
    ours = loaded()
    load_into(streamer.model, streamer.loader.materialize(raw), streamer.device, streamer.dtype, f"layer {layer}")
    theirs = loaded()
    assert ours.keys() == theirs.keys()
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), f"layer {layer} {name}"
    return used
