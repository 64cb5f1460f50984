"""This process among torchrun's ranks, for the layer streamer (:mod:`reap.stream.streamer`).

* :class:`Dist`: this process's rank, world size and local rank (rank 0 of 1 when run plainly), the process group
  (NCCL on GPUs, gloo on the CPU), integer sums and barriers across ranks;
* :func:`resolve_device`: the compute device that ``--device`` names for this rank (``cuda`` is the rank's local
  GPU); :func:`cpu_speed`: the CPU's matmul and memory rates now (the rough ETA of a run on the CPU);
* :class:`WeightShare`: the ranks of one node sharing the reading of each layer's bytes (each reads 1/N, the ranks
  all-gather the rest), which :class:`reap.stream.weights.LayerReader` uses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from reap.core.errors import UserError


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, device: str) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend=backend)
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def sum_int(self, value: int, device: torch.device) -> int:
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t)
        return int(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


_CPU_SPEED: tuple[float, float] | None = None


def cpu_speed() -> tuple[float, float]:
    """(FLOP/s of a float32 matmul, bytes/s of a float64 elementwise product of fresh 80 MiB tensors) of this
    process's CPU threads now (other processes' load included), measured once (~0.3 s), for the calibration's
    rough ETA on the CPU."""
    global _CPU_SPEED
    if _CPU_SPEED is None:
        import time

        def rate(fn, work: float) -> float:
            fn()  # first call: allocations, thread pool
            t0, n = time.perf_counter(), 0
            while n < 2 or time.perf_counter() - t0 < 0.12:
                fn()
                n += 1
            return n * work / max(time.perf_counter() - t0, 1e-9)

        with torch.inference_mode():
            a, b = torch.full((2048, 512), 0.5), torch.full((512, 512), 0.5)
            x = torch.full((4096, 5, 512), 0.5, dtype=torch.float64)
            y = torch.full((4096, 5, 512), 2.0, dtype=torch.float64)
            _CPU_SPEED = (rate(lambda: a @ b, 2 * 2048 * 512 * 512), rate(lambda: x * y, 3 * x.numel() * 8))
    return _CPU_SPEED


def resolve_device(device: str, dist: Dist) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
        if device == "cuda":
            device = f"cuda:{dist.local_rank}"
    elif device != "cpu":
        raise UserError(f"--device {device!r} is not supported; use cpu, cuda or cuda:N")
    return torch.device(device)


@dataclass
class WeightShare:
    """The ranks of one node sharing the reading of each layer: rank r reads bytes [r, r + 1) x size / N of the
    layer's buffer, the ranks all-gather the rest (on the GPU over NCCL on a stream of its own; gloo on the CPU)."""

    group: object  # torch.distributed process group of the node's ranks
    rank: int
    world: int
    stream: object = None  # torch.cuda.Stream for the exchange

    @classmethod
    def for_node(cls, device: torch.device) -> "WeightShare":
        import torch.distributed as dist

        world, local = dist.get_world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
        group, _ = dist.new_subgroups(group_size=local) if local < world else (dist.new_group(), None)
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        return cls(group, dist.get_rank(group), dist.get_world_size(group), stream)

    def gather(self, host: torch.Tensor, lo: int, hi: int, device: torch.device | None) -> torch.Tensor:
        """``host`` [size] with this rank's bytes [lo, hi) filled -> every rank's bytes, on ``device``."""
        import torch.distributed as dist

        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                full = torch.empty(host.numel(), dtype=torch.uint8, device=device)
                dist.all_gather_into_tensor(full, host[lo:hi].to(device, non_blocking=True), group=self.group)
            self.stream.synchronize()
            return full
        chunks = list(host.split(hi - lo))
        dist.all_gather(chunks, host[lo:hi].clone(), group=self.group)
        return host if device is None or device.type == "cpu" else host.to(device, non_blocking=True)

