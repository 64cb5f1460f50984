"""Layer observers: work a caller hands the layer streamer to do around each MoE layer it runs.

The streamer (:meth:`reap.stream.streamer.LayerStreamer.run_layer`, and :meth:`reap.stream.mtp.MtpRunner.run` for
the multi-token-prediction modules) knows nothing of what an observer does: for every MoE layer it calls each
observer's :meth:`LayerObserver.start` before the layer's batches (where it may hook the layer's modules), its
:meth:`LayerObserver.finish` after them, before the layer goes back to the meta device (where it may run the layer
again on what it kept), and :meth:`LayerObserver.close` always, also when the layer failed. What an observer adds
to the run's time and memory enters the plan (:meth:`reap.stream.streamer.LayerStreamer.plan`) through
:meth:`LayerObserver.cost`. Calibration's greedy re-routing search is one (:mod:`reap.calibrate.greedy`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class ObserverCost:
    """What an observer adds to a run, per rank: ``seconds`` over the whole run (added to the plan's ETA),
    ``peak_bytes`` its memory at its peak after a layer's batches (beside the weights, not beside a batch's
    activations), ``plan``: entries of its own for the plan (named by the observer), ``fits``: the name of the plan
    entry the streamer sets to whether ``peak_bytes`` fits the memory left (None: none)."""

    seconds: float = 0.0
    peak_bytes: int = 0
    plan: dict[str, Any] = field(default_factory=dict)
    fits: str | None = None


class LayerObserver(Protocol):
    """See the module docstring. ``streamer``: the :class:`reap.stream.streamer.LayerStreamer` running the layer
    (its ``layout``, ``opts``, ``dtype``, ``device``, ``dist`` and ``tokens``); ``module``: the decoder layer,
    loaded; ``moe``: its :class:`reap.model.arch.MoeLayer`; ``experts``: its experts module, with the streamer's
    :class:`reap.stream.experts.ExpertsProbe` attached; ``accumulator``: where the layer's statistics go (None:
    none are taken)."""

    def start(self, streamer, layer: int, module, moe, experts, accumulator) -> Any:
        """Before the layer's batches; returns the state :meth:`finish` and :meth:`close` get (None: nothing to do
        for this layer)."""

    def finish(self, state) -> None:
        """After the layer's batches (not called where they failed)."""

    def close(self, state) -> None:
        """Always last: undo what :meth:`start` hooked."""

    def cost(self, streamer, expert_params: float, flops: float, bandwidth: float) -> ObserverCost:
        """What it adds to the run: ``expert_params`` all layers' expert parameters, at ``flops`` FLOP/s and
        ``bandwidth`` bytes/s."""


def start_all(observers, streamer, layer: int, module, moe, experts, accumulator) -> list[tuple[Any, Any]]:
    """Start every observer on this layer: [(observer, state)] of those with something to do."""
    started = []
    try:
        for obs in observers:
            state = obs.start(streamer, layer, module, moe, experts, accumulator)
            if state is not None:
                started.append((obs, state))
    except BaseException:
        close_all(started)
        raise
    return started


def finish_all(started: list[tuple[Any, Any]]) -> None:
    for obs, state in started:
        obs.finish(state)


def close_all(started: list[tuple[Any, Any]]) -> None:
    for obs, state in started:
        obs.close(state)
