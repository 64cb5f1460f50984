"""Rewrite (surgery) benchmark at MiniMax-M2 width: `reap prune --keep` against `cp -r`, on this machine.

    python benchmarks/rewrite_bench.py [--workdir /tmp/reap-rewrite-bench] [--layers 1 2] [--repeats 3] [--cold]
                                       [--naive] [--out results.json]

1. Generates a MiniMax-M2-shaped FP8 checkpoint of N full-width decoder layers (hidden 3072, 256 experts of
   intermediate 1536, 48 query heads x 128, 8 KV heads, float8_e4m3fn weights with 128x128 float32
   ``weight_scale_inv``, float32 router and ``e_score_correction_bias``, bf16 norms, vocab 4096): about
   3.7 GB and 4 shards per layer, written with reap.io.writer.write_safetensors (one tensor in memory at a
   time), with a real ``config.json`` and ``model.safetensors.index.json``.
2. Times ``python -m reap prune MODEL --keep KEEP.json --out OUT --overwrite -q`` (180 of 256 experts kept per
   layer; by default reap flushes its output to disk before publishing it) against ``cp -r MODEL OUT2``
   followed by an fsync of every copied file (the same durability), and ``reap prune ... --no-fsync``
   against a plain ``cp -r`` (neither waits for the disk): one warm-up each, then the median of
   ``--repeats``, alternating. The model fits in
   the page cache, so every timed run reads it from memory (warm cache; caches cannot be dropped here).
   Outputs are deleted and ``sync`` is run before every timed command (neither is timed). Peak RSS of the
   reap process comes from wait4's rusage of that child.
3. ``--naive``: transformers ``from_pretrained`` + expert slicing + ``save_pretrained`` on the 1-layer model,
   under an RSS watchdog (FP8 on CPU is dequantized to bf16 by transformers, so it needs > 7 GB per layer and
   writes a bf16 checkpoint twice the size: a reference point, not an equivalent output).

The generator :func:`make_m2_checkpoint` is shared with benchmarks/m2_layer_bench.py (the H200 benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np  # noqa: F401  (the FP8 pool)
import torch

from reap.io.checkpoint import DTYPE_NAMES
from reap.io.writer import Entry, write_json, write_safetensors

# Released MiniMax-M2 dimensions (config.json of MiniMaxAI/MiniMax-M2)
M2 = dict(hidden=3072, experts=256, inter=1536, heads=48, kv_heads=8, head_dim=128, top_k=8, num_layers=62)


def m2_config(num_layers: int, vocab: int, dims: dict) -> dict:
    """A config.json shaped like the released MiniMax-M2 one (fewer layers, small vocab)."""
    return {
        "architectures": ["MiniMaxM2ForCausalLM"],
        "model_type": "minimax_m2",
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_minimax_m2.MiniMaxM2Config",
                     "AutoModelForCausalLM": "modeling_minimax_m2.MiniMaxM2ForCausalLM"},
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": dims["head_dim"],
        "hidden_act": "silu",
        "hidden_size": dims["hidden"],
        "intermediate_size": dims["inter"],
        "max_position_embeddings": 196608,
        "num_attention_heads": dims["heads"],
        "num_experts_per_tok": dims["top_k"],
        "num_hidden_layers": num_layers,
        "num_key_value_heads": dims["kv_heads"],
        "num_local_experts": dims["experts"],
        "num_mtp_modules": 3,
        "output_router_logits": False,
        "qk_norm_type": "per_layer",
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "float8_e4m3fn",
            "quant_method": "fp8",
            "weight_block_size": [128, 128],
            "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"],
        },
        "rms_norm_eps": 1e-06,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "partial_rotary_factor": 0.5},
        "rotary_dim": 64,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "scoring_func": "sigmoid",
        "shared_intermediate_size": 0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_mtp": True,
        "use_qk_norm": True,
        "use_routing_bias": True,
        "vocab_size": vocab,
    }


class _FP8Pool:
    """Random valid float8_e4m3fn codes (bit 6 cleared: |value| <= 1.875, never NaN; random sign), served as
    slices of one pool at random offsets: generating 3.6 GB per layer byte by byte would take minutes."""

    def __init__(self, seed: int, size: int = 256 << 20):
        import numpy as np

        self.rng = np.random.default_rng(seed)
        self.pool = self.rng.integers(0, 256, size, dtype=np.uint8)
        np.bitwise_and(self.pool, 0xBF, out=self.pool)

    def take(self, shape: tuple[int, ...]):
        n = 1
        for d in shape:
            n *= d
        if n > self.pool.size:
            raise ValueError(f"FP8 tensor of {n} bytes is larger than the pool")
        start = int(self.rng.integers(0, self.pool.size - n + 1))
        return self.pool[start : start + n]  # a numpy view; write_safetensors takes any buffer


def _float_bytes(shape, dtype, std, gen, mean=0.0) -> bytes:
    t = (torch.randn(shape, generator=gen) * std + mean).to(dtype)
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _entry(name, shape, dtype, fetch) -> Entry:
    n = 1
    for d in shape:
        n *= d
    return Entry(name, DTYPE_NAMES[dtype], tuple(shape), n * torch.empty((), dtype=dtype).element_size(), fetch)


def checkpoint_entries(num_layers: int, vocab: int, dims: dict, seed: int) -> list[Entry]:
    """Every tensor of the model, in the released layout's names, with lazy random contents."""
    H, E, I = dims["hidden"], dims["experts"], dims["inter"]
    q_out, kv_out = dims["heads"] * dims["head_dim"], dims["kv_heads"] * dims["head_dim"]
    gen = torch.Generator().manual_seed(seed)
    pool = _FP8Pool(seed)
    f8, f32, bf16 = torch.float8_e4m3fn, torch.float32, torch.bfloat16
    sc = lambda o, i: (-(-o // 128), -(-i // 128))  # noqa: E731

    def fp8(name, o, i):
        # scale ~ 1/32: dequantized weights of std ~0.02, like a trained model's
        return [_entry(name, (o, i), f8, lambda: pool.take((o, i))),
                _entry(name + "_scale_inv", sc(o, i), f32, lambda: _float_bytes(sc(o, i), f32, 0.003, gen, 1 / 32))]

    out = [_entry("model.embed_tokens.weight", (vocab, H), bf16, lambda: _float_bytes((vocab, H), bf16, 1.0, gen))]
    for L in range(num_layers):
        p = f"model.layers.{L}."
        out += [_entry(p + "input_layernorm.weight", (H,), bf16, lambda: _float_bytes((H,), bf16, 0.0, gen, 1.0)),
                _entry(p + "post_attention_layernorm.weight", (H,), bf16,
                       lambda: _float_bytes((H,), bf16, 0.0, gen, 1.0))]
        for proj, o, i in (("q_proj", q_out, H), ("k_proj", kv_out, H), ("v_proj", kv_out, H), ("o_proj", H, q_out)):
            out += fp8(p + f"self_attn.{proj}.weight", o, i)
        out += [_entry(p + "self_attn.q_norm.weight", (q_out,), bf16, lambda: _float_bytes((q_out,), bf16, 0.0, gen, 1.0)),
                _entry(p + "self_attn.k_norm.weight", (kv_out,), bf16,
                       lambda: _float_bytes((kv_out,), bf16, 0.0, gen, 1.0))]
        m = p + "block_sparse_moe."
        out += [_entry(m + "gate.weight", (E, H), f32, lambda: _float_bytes((E, H), f32, 0.02, gen)),
                _entry(m + "e_score_correction_bias", (E,), f32, lambda: _float_bytes((E,), f32, 0.01, gen))]
        for e in range(E):
            for w, o, i in (("w1", I, H), ("w2", H, I), ("w3", I, H)):
                out += fp8(m + f"experts.{e}.{w}.weight", o, i)
    out += [_entry("model.norm.weight", (H,), bf16, lambda: _float_bytes((H,), bf16, 0.0, gen, 1.0)),
            _entry("lm_head.weight", (vocab, H), bf16, lambda: _float_bytes((vocab, H), bf16, 0.02, gen))]
    return out


def make_m2_checkpoint(path: str | Path, num_layers: int = 1, vocab: int = 4096, shards_per_layer: int = 4,
                       seed: int = 0, dims: dict | None = None, log=print) -> Path:
    """Write a MiniMax-M2-shaped FP8 checkpoint (random values) to ``path``; return it.

    Tensors are cut into ``shards_per_layer * num_layers`` shards of about equal size, in file order, with
    the released checkpoint's zero-based shard names. Memory: one tensor at a time (~5 MB).
    """
    dims = {**M2, **(dims or {})}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    entries = checkpoint_entries(num_layers, vocab, dims, seed)
    n_shards = max(1, shards_per_layer * num_layers)
    total = sum(e.nbytes for e in entries)
    groups: list[list[Entry]] = [[]]
    acc = 0
    for e in entries:
        if acc >= total * len(groups) / n_shards and len(groups) < n_shards:
            groups.append([])
        groups[-1].append(e)
        acc += e.nbytes
    weight_map, written, params = {}, 0, 0
    t0 = time.perf_counter()
    for i, group in enumerate(groups):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        written += write_safetensors(path / name, group, {"format": "pt"})
        weight_map.update({e.name: name for e in group})
        params += sum(e.nbytes // ITEM[e.dtype] for e in group
                      if not e.name.endswith(("_scale_inv", "e_score_correction_bias")))
    write_json(path / "model.safetensors.index.json",
               {"metadata": {"total_size": written, "total_parameters": params}, "weight_map": weight_map})
    write_json(path / "config.json", m2_config(num_layers, vocab, dims))
    write_json(path / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
    (path / "configuration_minimax_m2.py").write_text("# remote-code stand-in (reap copies it, never runs it)\n")
    log(f"generated {path} ({num_layers} layer(s), {len(groups)} shards, {written / 1e9:.2f} GB) in "
        f"{time.perf_counter() - t0:.1f}s")
    return path


ITEM = {"F8_E4M3": 1, "F32": 4, "BF16": 2}


def keep_file(path: Path, num_layers: int, experts: int, kept: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    write_json(path, {str(L): sorted(rng.sample(range(experts), kept)) for L in range(num_layers)})
    return path


# -- timing ---------------------------------------------------------------------------------------------
def run_child(cmd: list[str], env=None) -> tuple[float, int, int]:
    """Run cmd; return (wall seconds, exit code, peak RSS of that child in bytes)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]}... failed ({proc.returncode}): {err[-2000:]}")
    return wall, proc.returncode, usage.ru_maxrss * 1024


def fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def clear(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


def evict(root: Path) -> None:
    """Drop root's files from the page cache (clean pages only: call after a sync)."""
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def bench_layers(workdir: Path, num_layers: int, repeats: int, log=print, cold: bool = False) -> dict:
    model = make_m2_checkpoint(workdir / f"m2-{num_layers}L", num_layers, log=log)
    keep = keep_file(workdir / f"keep-{num_layers}L.json", num_layers, M2["experts"], 180)
    out_reap, out_cp = workdir / f"pruned-{num_layers}L", workdir / f"copy-{num_layers}L"
    reap_cmd = [sys.executable, "-m", "reap", "prune", str(model), "--keep", str(keep), "--out", str(out_reap),
                "--overwrite", "-q"]
    cp_cmd = ["cp", "-r", str(model), str(out_cp)]
    os.sync()
    times = {"reap": [], "reap --no-fsync": [], "cp": [], "cp+fsync": []}
    rss = []
    commands = {"reap": reap_cmd, "reap --no-fsync": reap_cmd + ["--no-fsync"], "cp": cp_cmd, "cp+fsync": cp_cmd}
    for rep in range(repeats + 1):  # rep 0 = warm-up (fills the page cache with the model)
        for what, cmd in commands.items():
            out = out_cp if cmd is cp_cmd else out_reap
            clear(out)
            if cold:
                evict(model)
            t0 = time.perf_counter()
            _, _, peak = run_child(cmd)
            if what == "cp+fsync":
                fsync_tree(out_cp)
            wall = time.perf_counter() - t0
            if rep:
                times[what].append(wall)
                if what.startswith("reap"):
                    rss.append(peak)
        if rep:
            log(f"  {num_layers}L rep {rep}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    # the fixed cost of a reap process: interpreter + the imports of the --keep path (torch is not among them)
    imports = [run_child([sys.executable, "-c", "import reap.cli, reap.prune"])[0] for _ in range(repeats)]
    sizes = {"model_bytes": sum(p.stat().st_size for p in model.glob("*.safetensors")),
             "pruned_bytes": sum(p.stat().st_size for p in out_reap.glob("*.safetensors"))}
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {
        "layers": num_layers, **sizes, "repeats": repeats, "page_cache": "cold" if cold else "warm",
        "reap_s": times["reap"], "reap_no_fsync_s": times["reap --no-fsync"], "cp_s": times["cp"],
        "cp_fsync_s": times["cp+fsync"],
        "reap_median_s": med["reap"], "reap_no_fsync_median_s": med["reap --no-fsync"], "cp_median_s": med["cp"],
        "cp_fsync_median_s": med["cp+fsync"],
        "ratio_reap_over_cp_fsync": med["reap"] / med["cp+fsync"],  # both flushed to disk
        "ratio_reap_no_fsync_over_cp": med["reap --no-fsync"] / med["cp"],  # neither waits for the disk
        "ratio_reap_over_cp": med["reap"] / med["cp"],
        "import_median_s": statistics.median(imports),
        "reap_peak_rss_bytes": max(rss),
        "reap_GBps": sizes["model_bytes"] / med["reap"] / 1e9,
        "cp_GBps": sizes["model_bytes"] / med["cp"] / 1e9,
    }
    clear(out_reap)
    clear(out_cp)
    return res


# -- the naive baseline ------------------------------------------------------------------------------------
NAIVE = r"""
import sys, time, json, torch
from transformers import AutoModelForCausalLM
src, dst, keep = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
t0 = time.perf_counter()
m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
t1 = time.perf_counter()
for L, layer in enumerate(m.model.layers):
    ids = torch.tensor(keep[str(L)])
    moe = layer.mlp
    moe.experts.gate_up_proj = torch.nn.Parameter(moe.experts.gate_up_proj.data[ids].clone())
    moe.experts.down_proj = torch.nn.Parameter(moe.experts.down_proj.data[ids].clone())
    moe.gate.weight = torch.nn.Parameter(moe.gate.weight.data[ids].clone())
    moe.e_score_correction_bias = moe.e_score_correction_bias[ids].clone()
    moe.experts.num_experts = moe.gate.num_experts = len(ids)
m.config.num_local_experts = len(ids)
try:
    m.save_pretrained(dst)
    original = True
except ValueError as err:  # transformers 5.17 cannot revert its conversion of a dequantized FP8 model
    print("save_pretrained(original format) failed:", err, file=sys.stderr)
    m.save_pretrained(dst, save_original_format=False)
    original = False
print(json.dumps({"load_s": t1 - t0, "total_s": time.perf_counter() - t0, "saved_original_format": original}))
"""


def naive_baseline(workdir: Path, limit_bytes: int, log=print) -> dict:
    model = workdir / "m2-1L"
    if not model.exists():
        make_m2_checkpoint(model, 1, log=log)
    keep = keep_file(workdir / "keep-1L.json", 1, M2["experts"], 180)
    dst = workdir / "naive-1L"
    clear(dst)
    proc = subprocess.Popen([sys.executable, "-c", NAIVE, str(model), str(dst), str(keep)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed = []

    def watchdog():
        while proc.poll() is None:
            try:
                rss = int(next(line for line in open(f"/proc/{proc.pid}/status") if line.startswith("VmRSS")).split()[1]) * 1024
            except (OSError, StopIteration, ValueError):
                rss = 0
            if rss > limit_bytes:
                killed.append(rss)
                proc.kill()
                return
            time.sleep(0.2)

    threading.Thread(target=watchdog, daemon=True).start()
    t0 = time.perf_counter()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode(errors="replace")
    size = sum(p.stat().st_size for p in dst.glob("*.safetensors")) if dst.exists() else 0
    clear(dst)
    res = {"wall_s": wall, "exit": proc.returncode, "peak_rss_bytes": usage.ru_maxrss * 1024, "out_bytes": size,
           "killed_over_limit": bool(killed), "limit_bytes": limit_bytes}
    if proc.returncode == 0 and out.strip():
        res.update(json.loads(out.strip().splitlines()[-1]))
    else:
        res["stderr_tail"] = err[-1500:]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/reap-rewrite-bench"))
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--naive", action="store_true", help="also run transformers from_pretrained + save_pretrained (1 layer)")
    ap.add_argument("--naive-limit-gb", type=float, default=14.0)
    ap.add_argument("--cold", action="store_true", help="evict the model from the page cache before every timed command")
    ap.add_argument("--keep-files", action="store_true", help="do not delete the generated checkpoints")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.workdir).free
    need = int(max(args.layers) * 3.7e9 * 2.75) + (8e9 if args.naive else 0)
    print(f"free disk at {args.workdir}: {free / 1e9:.1f} GB (need about {need / 1e9:.1f} GB)", flush=True)
    if free < need:
        sys.exit(f"not enough disk space in {args.workdir}")
    result = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "torch": torch.__version__,
                          "load_avg_start": os.getloadavg()}, "runs": []}
    try:
        for n in args.layers:
            r = bench_layers(args.workdir, n, args.repeats, cold=args.cold)
            print(json.dumps(r), flush=True)
            result["runs"].append(r)
            if args.naive and n == 1:
                result["naive_1L"] = naive_baseline(args.workdir, int(args.naive_limit_gb * 1e9))
                print("naive", json.dumps(result["naive_1L"]), flush=True)
            if not args.keep_files:
                clear(args.workdir / f"m2-{n}L")
    finally:
        if not args.keep_files:
            shutil.rmtree(args.workdir, ignore_errors=True)
    result["machine"]["load_avg_end"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
