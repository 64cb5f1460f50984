"""Per-expert saliency statistics and the choice of experts to prune.

Calibration streams prompts through the model layer by layer. For every routed (token x, expert j) pair
we know g_j(x), the routing weight the model applies to expert j's output, and ||f_j(x)||, the L2 norm of
that output. A :class:`LayerAccumulator` sums these on the compute device (float64, no host sync per
batch): tokens routed, sum of g, sum of ||f||, sum of g ||f||, max ||f||, (stats format version 2) sum
of ||f||^2 and (version 3) ``max_abs``, the largest magnitude of any element of f, max_x max_h |f_j(x)_h| (the
"maximum output magnitude of down_proj" by which :func:`reap.selection.choose.super_experts` finds super experts).
:class:`ExpertStats` holds the final [L, E] tables, saves/loads them as safetensors (version 1 and 2
files still load; the fields they lack are listed in ``ExpertStats.missing``) and turns them into scores
through the criterion registry in :mod:`reap.selection.criteria` (``reap``, ``ean``, ``frequency``, ...; ``METHODS``
is re-exported here). Beside the sums, the greedy re-routing search's results per layer: its removal order
(``greedy_rank``) and, optionally (files written before it lack it and still load), the MoE output error it measured
after each removal step (``greedy_error``, see :meth:`ExpertStats.greedy_curve`).

:mod:`reap.selection.choose` turns scores into the experts kept. Experts that were never routed have count 0 and
score 0 under every criterion except ``random``.
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from reap.selection.criteria import CRITERIA, METHODS  # noqa: F401  (re-exported: the names --method accepts)
from reap.core.errors import UserError

# Shape legend: N routed (token, expert) pairs, E experts, L layers.

FIELDS = ("count", "gate_sum", "ean_sum", "reap_sum", "max_norm", "ean_sq_sum", "max_abs")
_SUM_FIELDS = ("count", "gate_sum", "ean_sum", "reap_sum", "ean_sq_sum")
_MAX_FIELDS = ("max_norm", "max_abs")
RANK_FIELDS = ("greedy_rank",)  # per-layer results, not sums: never merged, NaN until computed
#: optional per-layer results written only where computed (absent in older files, never listed in ``missing``):
#: ``greedy_error`` [L, E], column i = the layer's relative output error after the greedy search's first i + 1 removals
CURVE_FIELDS = ("greedy_error",)
_REQUIRED = FIELDS[:5]  # version 1 had exactly these; later fields are optional on load
_FORMAT = "reap-stats"
# 2 added ean_sq_sum and greedy_rank (and later the optional greedy_error, which older readers skip); 3 added max_abs
_VERSION = "3"
_READS = ("1", "2", "3")
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
        self.ean_sq_sum = zeros()  # [E]
        self.max_abs = zeros()  # [E] max |f_h| over the routed pairs and the H output elements (>= 0, like max_norm)
        self.peaks = True  # every add so far that had pairs brought their peaks (else max_abs is unknown: missing)

    def add(self, expert_idx: Tensor, gate: Tensor, norm: Tensor, peak: Tensor | None = None) -> None:
        """Accumulate N routed pairs: ``expert_idx`` [N] long, ``gate`` [N] and ``norm`` [N] of any float dtype,
        ``peak`` [N] each pair's largest output magnitude max_h |f_h| (reap's experts implementation always passes
        it; an accumulator given pairs without it has no ``max_abs``, which the stats then list as missing).

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
        if peak is not None and peak.numel() != idx.numel():
            raise ValueError(f"peak must have one element per pair ({idx.numel()}), got {peak.numel()}")
        if idx.numel() == 0:
            return
        if peak is None:
            self.peaks = False
        else:
            top = peak.reshape(-1).to(device=self.device, dtype=torch.float64)  # [N]
            self.max_abs.scatter_reduce_(0, idx, top, reduce="amax", include_self=True)
        self.count.index_add_(0, idx, torch.ones_like(g))
        self.gate_sum.index_add_(0, idx, g)
        self.ean_sum.index_add_(0, idx, nrm)
        self.reap_sum.index_add_(0, idx, g * nrm)
        self.max_norm.scatter_reduce_(0, idx, nrm, reduce="amax", include_self=True)
        self.ean_sq_sum.index_add_(0, idx, nrm * nrm)

    def all_reduce(self) -> None:
        """Combine accumulators across ranks: SUM for the five sums, MAX for ``max_norm`` and ``max_abs`` (and
        whether every rank had the peaks: MIN).

        A no-op when torch.distributed is unavailable, not initialized, or has world size 1.
        """
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
            return
        sums = torch.stack([getattr(self, f) for f in _SUM_FIELDS])  # [4, E]
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        for i, f in enumerate(_SUM_FIELDS):
            setattr(self, f, sums[i].clone())
        maxima = torch.stack([getattr(self, f) for f in _MAX_FIELDS] +  # [3, E]: the two maxima, then peaks (0/1)
                             [torch.full_like(self.max_abs, 1.0 if self.peaks else 0.0)])
        maxima[-1].neg_()  # MAX of -peaks = -(MIN of peaks)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
        for i, f in enumerate(_MAX_FIELDS):
            setattr(self, f, maxima[i].clone())
        self.peaks = bool(maxima[-1][0] < -0.5)  # -MIN of the ranks' peaks: -1 where every rank had them

    def to_dict(self) -> dict[str, Tensor]:
        """The accumulators as CPU float64 tensors [E], keyed by FIELDS."""
        return {f: getattr(self, f).detach().to("cpu", torch.float64).clone() for f in FIELDS}


class ExpertStats:
    """Per-layer, per-expert statistics, float64 [L, E] each, plus JSON metadata and the set of completed
    layers.

    ``missing`` names the fields the source did not have (a version-1 file has no ``ean_sq_sum``, files before
    version 3 no ``max_abs``); they are held as zeros, are not written back by :meth:`save`, and a criterion that
    needs one raises a UserError (:meth:`require`; for ``max_abs``: :func:`reap.selection.choose.super_experts`).
    """

    def __init__(self, num_layers: int, num_experts: int, meta: dict[str, Any] | None = None):
        if num_layers <= 0 or num_experts <= 0:
            raise ValueError(f"num_layers and num_experts must be positive, got {num_layers}, {num_experts}")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.meta: dict[str, Any] = dict(meta or {})
        self.completed: set[int] = set()
        self.missing: set[str] = set()
        self.source: str | None = None  # the file it was loaded from, for error messages
        self.version = _VERSION  # the stats format version of that file
        for f in FIELDS:
            setattr(self, f, torch.zeros(num_layers, num_experts, dtype=torch.float64))  # [L, E]
        # [L, E] position of each expert in the greedy re-routing removal order (0 = removed first); NaN where
        # not computed; "missing" until a layer's order is set (set_greedy_order)
        self.greedy_rank = torch.full((num_layers, num_experts), float("nan"), dtype=torch.float64)
        self.missing.add("greedy_rank")
        # [L, E] the greedy search's measured error: greedy_error[layer, i] = sum_t ||y_t - y_t'||^2 / sum_t ||y_t||^2
        # on its token sample (y: the unpruned MoE output, y': after removing the first i + 1 experts of the order,
        # tokens re-routed); NaN for steps not taken and layers without it (older files: all NaN, see has_greedy_error)
        self.greedy_error = torch.full((num_layers, num_experts), float("nan"), dtype=torch.float64)
        self.count: Tensor
        self.gate_sum: Tensor
        self.ean_sum: Tensor
        self.reap_sum: Tensor
        self.max_norm: Tensor
        self.ean_sq_sum: Tensor
        self.max_abs: Tensor

    def require(self, fields: tuple[str, ...], what: str, instead: str = "choose another criterion") -> None:
        """UserError naming ``what`` (e.g. "criterion 'ean-sq'") if any of ``fields`` is missing, or (for
        ``greedy_rank``) not computed for every completed layer; the line ends with ``instead``, the other way out."""
        lacking = [f for f in fields if f in self.missing]
        where = f"stats file {self.source}" if self.source else "these statistics"
        if lacking:
            why = (f"written by an older reap, stats format version {self.version}" if self.version != _VERSION
                   else "not computed by that calibration")
            raise UserError(
                f"{what} needs {', '.join(lacking)}, which {where} lacks ({why}); rerun `reap calibrate` with this "
                f"reap to produce it, or {instead}"
            )
        for f in set(fields) & set(RANK_FIELDS):
            done = sorted(self.completed)
            bad = [layer for layer in done if torch.isnan(getattr(self, f)[layer]).any()]
            if bad:
                raise UserError(f"{what} needs {f} for every layer, {where} lacks it for layers {bad[:5]}; "
                                f"rerun `reap calibrate` with this reap to produce it, or {instead}")

    def set_greedy_order(self, layer: int, order: list[int], errors: list[float] | None = None) -> None:
        """Record ``layer``'s greedy removal order (expert ids, first removed first; see
        :func:`reap.calibrate.greedy_order.greedy_rerouted_order`): ``greedy_rank[layer, order[i]] = i``, and every
        expert not in ``order`` (never removed) gets ``len(order)``. ``errors`` (default: ``order.errors`` when the
        search returned a :class:`reap.calibrate.greedy_order.GreedyOrder`): the relative output error after each
        step, stored in ``greedy_error[layer]``."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.num_layers})")
        if len(set(order)) != len(order) or not all(0 <= e < self.num_experts for e in order):
            raise ValueError(f"greedy order must name distinct experts in [0, {self.num_experts}), got {order}")
        if errors is None:
            errors = getattr(order, "errors", None)
        if errors is not None and len(errors) != len(order):
            raise ValueError(f"greedy errors must have one value per removal step ({len(order)}), got {len(errors)}")
        rank = torch.full((self.num_experts,), float(len(order)), dtype=torch.float64)
        rank[list(order)] = torch.arange(len(order), dtype=torch.float64)
        self.greedy_rank[layer] = rank
        self.missing.discard("greedy_rank")
        self.greedy_error[layer] = float("nan")
        if errors is not None and len(errors):
            self.greedy_error[layer, : len(errors)] = torch.tensor([float(x) for x in errors], dtype=torch.float64)

    @property
    def has_greedy_error(self) -> bool:
        """Whether any layer has the greedy search's measured error curve (files before it was recorded: no)."""
        return bool((~torch.isnan(self.greedy_error)).any())

    def greedy_curve(self, layer: int) -> list[float] | None:
        """``layer``'s measured error curve, index n = the relative output error with the first n experts of the
        greedy order removed (n = 0: 0.0), or None where the search recorded none."""
        row = self.greedy_error[layer]
        steps = int((~torch.isnan(row)).sum())
        if steps == 0 or bool(torch.isnan(self.greedy_rank[layer]).any()):
            return None
        return [0.0, *(float(x) for x in row[:steps])]

    def greedy_order(self, layer: int) -> list[int] | None:
        """``layer``'s greedy removal order (first removed first; the never-removed experts left out), or None."""
        rank = self.greedy_rank[layer]
        if bool(torch.isnan(rank).any()):
            return None
        steps = int((rank < rank.max()).sum())  # the removed ones rank 0..n-1, the rest n
        return [int(e) for e in torch.argsort(rank, stable=True)[:steps]]

    def set_layer(self, layer: int, acc: LayerAccumulator) -> None:
        """Store the accumulators of ``layer`` (overwriting) and mark it completed."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.num_layers})")
        if acc.num_experts != self.num_experts:
            raise ValueError(f"accumulator has {acc.num_experts} experts, stats have {self.num_experts}")
        for f, t in acc.to_dict().items():
            getattr(self, f)[layer] = t
        if not getattr(acc, "peaks", True):  # never discarded: an earlier layer (a resumed old file) may lack it too
            self.missing.add("max_abs")
        self.completed.add(layer)
        if hasattr(acc, "greedy_order"):  # the calibrator ran the greedy search (or said why not) for this layer
            greedy = self.meta.setdefault("greedy", {"sample_tokens": {}, "fallback": {}})
            greedy["sample_tokens"][str(layer)] = int(getattr(acc, "greedy_sample", 0))
            if acc.greedy_order is not None:
                self.set_greedy_order(layer, acc.greedy_order, getattr(acc, "greedy_error", None))
                greedy["fallback"].pop(str(layer), None)
            else:
                self.greedy_rank[layer] = float("nan")
                self.greedy_error[layer] = float("nan")
                self.missing.discard("greedy_rank")  # searched: the note says why this layer has no order
                greedy["fallback"][str(layer)] = acc.greedy_note or "not computed"

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a safetensors file atomically (temporary file in the same folder, then ``os.replace``).

        Fields in ``missing`` are left out, so a file re-saved from an old one still says what it lacks.
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        mask = torch.zeros(self.num_layers, dtype=torch.int64)  # [L] 0/1
        if self.completed:
            mask[sorted(self.completed)] = 1
        tensors = {f: getattr(self, f).to(torch.float64).contiguous()
                   for f in (*FIELDS, *RANK_FIELDS) if f not in self.missing}
        if self.has_greedy_error:  # written only where measured: a file without it reads as before
            tensors["greedy_error"] = self.greedy_error.to(torch.float64).contiguous()
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
        """Read a file written by :meth:`save` (any version in ``_READS``); UserError if it is missing, foreign,
        or corrupt. Optional fields the file lacks are zeros and listed in ``missing``."""
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
                version = metadata.get("version")
                if version not in _READS:
                    raise UserError(
                        f"{path} has stats format version {version!r}, this reap reads versions "
                        f"{', '.join(_READS)}; {_FIX}"
                    )
                missing = [k for k in (*_REQUIRED, "completed") if k not in keys]
                if missing:
                    raise UserError(f"{path} lacks tensors {', '.join(missing)}; {_FIX}")
                tensors = {k: fh.get_tensor(k) for k in (*FIELDS, *RANK_FIELDS, *CURVE_FIELDS, "completed")
                           if k in keys}
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
        stats.source, stats.version = str(path), version
        stats.missing = set()
        for f in (*FIELDS, *RANK_FIELDS):
            if f not in tensors:
                stats.missing.add(f)
                continue
            t = tensors[f]
            if t.shape != count.shape or not t.dtype.is_floating_point:
                raise UserError(f"{path}: tensor {f!r} has shape {list(t.shape)}, expected "
                                f"{list(count.shape)}; {_FIX}")
            setattr(stats, f, t.to(torch.float64).clone())
        for f in CURVE_FIELDS:  # optional: absent (older files) stays all NaN
            t = tensors.get(f)
            if t is not None:
                if t.shape != count.shape or not t.dtype.is_floating_point:
                    raise UserError(f"{path}: tensor {f!r} has shape {list(t.shape)}, expected "
                                    f"{list(count.shape)}; {_FIX}")
                setattr(stats, f, t.to(torch.float64).clone())
        stats.completed = {int(i) for i in torch.nonzero(mask).flatten().tolist()}
        return stats

    def scores(self, method: str, seed: int = 0) -> Tensor:
        """Saliency [L, E] float64 under criterion ``method`` (a name in :data:`reap.selection.criteria.CRITERIA`);
        higher means more important. UserError for an unknown name or a field these statistics lack."""
        from reap.selection.criteria import get_criterion

        return get_criterion(method).scores(self, seed)
