"""Per-expert saliency statistics and the choice of experts to prune.

Calibration streams prompts through the model layer by layer. For every routed (token x, expert j) pair
we know g_j(x), the routing weight the model applies to expert j's output, and ||f_j(x)||, the L2 norm of
that output. A :class:`LayerAccumulator` sums these on the compute device (float64, no host sync per
batch); :class:`ExpertStats` holds the final [L, E] tables, saves/loads them as safetensors, and turns
them into scores:

* ``reap``               mean over routed tokens of g_j(x) * ||f_j(x)||   (REAP, arXiv 2510.13999)
* ``ean``                sum over routed tokens of ||f_j(x)||              (expert activation norm)
* ``frequency``          number of routed tokens
* ``weighted-frequency`` sum over routed tokens of g_j(x)
* ``random``             uniform noise from a seeded CPU generator (a baseline)

:func:`choose_experts` drops the lowest-scoring experts of a layer; :func:`n_to_drop` turns a ratio into a
count. Experts that were never routed have count 0 and score 0 under every method except ``random``.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from reap.errors import UserError

# Shape legend: N routed (token, expert) pairs, E experts, L layers.

METHODS = ("reap", "ean", "frequency", "weighted-frequency", "random")
FIELDS = ("count", "gate_sum", "ean_sum", "reap_sum", "max_norm")
_SUM_FIELDS = FIELDS[:4]
_FORMAT = "reap-stats"
_VERSION = "1"
_FIX = "rerun `reap calibrate` to produce it"


def _umask() -> int:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it (and back)
    os.umask(mask)
    return mask


class LayerAccumulator:
    """float64 per-expert accumulators for one layer, living on the compute device (GPU-friendly: no host
    sync per batch)."""

    def __init__(self, num_experts: int, device: torch.device | str = "cpu"):
        if num_experts <= 0:
            raise ValueError(f"num_experts must be positive, got {num_experts}")
        self.num_experts = num_experts
        self.device = torch.device(device)
        zeros = lambda: torch.zeros(num_experts, dtype=torch.float64, device=self.device)  # noqa: E731
        self.count = zeros()  # [E]
        self.gate_sum = zeros()  # [E]
        self.ean_sum = zeros()  # [E]
        self.reap_sum = zeros()  # [E]
        self.max_norm = zeros()  # [E]; norms are >= 0, so 0 is the identity of max

    def add(self, expert_idx: Tensor, gate: Tensor, norm: Tensor) -> None:
        """Accumulate N routed pairs: ``expert_idx`` [N] long, ``gate`` [N] and ``norm`` [N] of any float dtype.

        Inputs are cast to float64 *before* any arithmetic, so bf16/fp32 inputs do not lose precision in
        the products or the sums. Inputs may have any shape with N elements; they are flattened.
        """
        idx = expert_idx.reshape(-1).to(device=self.device, dtype=torch.long)  # [N]
        g = gate.reshape(-1).to(device=self.device, dtype=torch.float64)  # [N]
        nrm = norm.reshape(-1).to(device=self.device, dtype=torch.float64)  # [N]
        if not (idx.numel() == g.numel() == nrm.numel()):
            raise ValueError(
                f"expert_idx, gate and norm must have the same number of elements, "
                f"got {idx.numel()}, {g.numel()}, {nrm.numel()}"
            )
        if idx.numel() == 0:
            return
        self.count.index_add_(0, idx, torch.ones_like(g))
        self.gate_sum.index_add_(0, idx, g)
        self.ean_sum.index_add_(0, idx, nrm)
        self.reap_sum.index_add_(0, idx, g * nrm)
        self.max_norm.scatter_reduce_(0, idx, nrm, reduce="amax", include_self=True)

    def all_reduce(self) -> None:
        """Combine accumulators across ranks: SUM for the four sums, MAX for ``max_norm``.

        A no-op when torch.distributed is unavailable, not initialized, or has world size 1.
        """
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
            return
        sums = torch.stack([getattr(self, f) for f in _SUM_FIELDS])  # [4, E]
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        for i, f in enumerate(_SUM_FIELDS):
            setattr(self, f, sums[i].clone())
        dist.all_reduce(self.max_norm, op=dist.ReduceOp.MAX)

    def to_dict(self) -> dict[str, Tensor]:
        """The accumulators as CPU float64 tensors [E], keyed by FIELDS."""
        return {f: getattr(self, f).detach().to("cpu", torch.float64).clone() for f in FIELDS}


class ExpertStats:
    """Per-layer, per-expert statistics, float64 [L, E] each, plus JSON metadata and the set of completed
    layers."""

    def __init__(self, num_layers: int, num_experts: int, meta: dict[str, Any] | None = None):
        if num_layers <= 0 or num_experts <= 0:
            raise ValueError(f"num_layers and num_experts must be positive, got {num_layers}, {num_experts}")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.meta: dict[str, Any] = dict(meta or {})
        self.completed: set[int] = set()
        for f in FIELDS:
            setattr(self, f, torch.zeros(num_layers, num_experts, dtype=torch.float64))  # [L, E]
        self.count: Tensor
        self.gate_sum: Tensor
        self.ean_sum: Tensor
        self.reap_sum: Tensor
        self.max_norm: Tensor

    def set_layer(self, layer: int, acc: LayerAccumulator) -> None:
        """Store the accumulators of ``layer`` (overwriting) and mark it completed."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.num_layers})")
        if acc.num_experts != self.num_experts:
            raise ValueError(f"accumulator has {acc.num_experts} experts, stats have {self.num_experts}")
        for f, t in acc.to_dict().items():
            getattr(self, f)[layer] = t
        self.completed.add(layer)

    def merge(self, other: ExpertStats) -> None:
        """Add ``other`` into ``self`` (sums add, ``max_norm`` takes the max, ``completed`` is the union).

        ``self.meta`` is kept unchanged; the caller decides how to combine metadata.
        """
        if (other.num_layers, other.num_experts) != (self.num_layers, self.num_experts):
            raise UserError(
                f"cannot merge expert stats of shape [{other.num_layers}, {other.num_experts}] into "
                f"[{self.num_layers}, {self.num_experts}]; merge only stats calibrated on the same model"
            )
        for f in _SUM_FIELDS:
            getattr(self, f).add_(getattr(other, f))
        torch.maximum(self.max_norm, other.max_norm, out=self.max_norm)
        self.completed |= other.completed

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a safetensors file atomically (temporary file in the same folder, then ``os.replace``)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        mask = torch.zeros(self.num_layers, dtype=torch.int64)  # [L] 0/1
        if self.completed:
            mask[sorted(self.completed)] = 1
        tensors = {f: getattr(self, f).to(torch.float64).contiguous() for f in FIELDS}
        tensors["completed"] = mask
        metadata = {"format": _FORMAT, "version": _VERSION, "meta": json.dumps(self.meta, sort_keys=True)}
        tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
        try:
            try:
                save_file(tensors, str(tmp), metadata=metadata)
            except Exception as err:  # safetensors reports a failed write (a full disk) as its own error: an OSError
                code = re.search(r"code: (\d+)", str(err))
                raise OSError(int(code[1]) if code else errno.EIO, str(err).splitlines()[0], str(path)) from None
            os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600 files; as any other file the user writes
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ExpertStats:
        """Read a file written by :meth:`save`; UserError if it is missing, foreign, or corrupt."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise UserError(f"expert stats file {path} does not exist; {_FIX}, or pass the right path")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                metadata = fh.metadata() or {}
                keys = set(fh.keys())
                if metadata.get("format") != _FORMAT:
                    raise UserError(f"{path} is not a reap expert stats file; {_FIX}")
                if metadata.get("version") != _VERSION:
                    raise UserError(
                        f"{path} has stats format version {metadata.get('version')!r}, this reap reads "
                        f"version {_VERSION}; {_FIX}"
                    )
                missing = [k for k in (*FIELDS, "completed") if k not in keys]
                if missing:
                    raise UserError(f"{path} lacks tensors {', '.join(missing)}; {_FIX}")
                tensors = {k: fh.get_tensor(k) for k in (*FIELDS, "completed")}
            meta = json.loads(metadata.get("meta", "{}"))
        except UserError:
            raise
        except Exception as err:  # safetensors header errors, truncated data, bad JSON
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"{path} is corrupt or unreadable ({msg}); {_FIX}") from None
        count, mask = tensors["count"], tensors["completed"]
        if count.dim() != 2 or mask.shape != (count.shape[0],) or not isinstance(meta, dict):
            raise UserError(f"{path} has inconsistent tensor shapes or metadata; {_FIX}")
        stats = cls(count.shape[0], count.shape[1], meta=meta)
        for f in FIELDS:
            t = tensors[f]
            if t.shape != count.shape or not t.dtype.is_floating_point:
                raise UserError(f"{path}: tensor {f!r} has shape {list(t.shape)}, expected "
                                f"{list(count.shape)}; {_FIX}")
            setattr(stats, f, t.to(torch.float64).clone())
        stats.completed = {int(i) for i in torch.nonzero(mask).flatten().tolist()}
        return stats

    def scores(self, method: str, seed: int = 0) -> Tensor:
        """Saliency [L, E] float64 for ``method`` (one of METHODS); higher means more important."""
        if method == "reap":
            # mean of g*||f|| over routed tokens; never-routed experts (count 0) score 0
            return torch.where(self.count > 0, self.reap_sum / self.count.clamp_min(1.0), 0.0)
        if method == "ean":
            return self.ean_sum.clone()
        if method == "frequency":
            return self.count.clone()
        if method == "weighted-frequency":
            return self.gate_sum.clone()
        if method == "random":
            gen = torch.Generator(device="cpu").manual_seed(int(seed))
            return torch.rand(self.num_layers, self.num_experts, generator=gen, dtype=torch.float64)
        raise UserError(f"unknown saliency method {method!r}; use one of: {', '.join(METHODS)}")

    def summary(self) -> dict[str, Any]:
        """A small JSON-able summary: shape, completed layers, per-layer routed pair counts, etc."""
        return {
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "completed_layers": sorted(self.completed),
            "routed_pairs_per_layer": [int(round(x)) for x in self.count.sum(1).tolist()],  # [L]
            "never_routed_per_layer": [int(x) for x in (self.count == 0).sum(1).tolist()],  # [L]
            "max_norm": float(self.max_norm.max()),
            "meta": self.meta,
        }


def choose_experts(scores: Tensor, n_drop: int) -> tuple[list[int], list[int]]:
    """Split experts into (kept, pruned), both sorted ascending, dropping the ``n_drop`` lowest scores.

    Experts are ranked by (score descending, index ascending) and the first E - n_drop are kept, so among
    equal scores the higher index is pruned first. NaN scores raise ValueError.
    """
    s = scores.detach().reshape(-1).to("cpu", torch.float64)  # [E]
    num_experts = s.numel()
    if torch.isnan(s).any():
        raise ValueError("expert scores contain NaN")
    if not 0 <= n_drop < max(num_experts, 1):
        raise ValueError(f"n_drop must be in [0, {num_experts}), got {n_drop}")
    vals = s.tolist()
    order = sorted(range(num_experts), key=lambda i: (-vals[i], i))
    keep_n = num_experts - n_drop
    return sorted(order[:keep_n]), sorted(order[keep_n:])


def n_to_drop(num_experts: int, ratio: float) -> int:
    """floor(num_experts * ratio), robust to float representation (256*0.3 -> 76, 100*0.29 -> 29).

    The ratio is read through its shortest decimal repr (an exact Fraction), and a small epsilon absorbs
    values such as 0.29999999999999999 that come out of arithmetic.
    """
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and 0.0 <= ratio < 1.0):
        raise UserError(f"prune ratio must be a number in [0, 1), got {ratio!r}; e.g. --ratio 0.5")
    exact = Fraction(repr(float(ratio))) * num_experts
    return int(math.floor(exact + Fraction(1, 10**9)))
