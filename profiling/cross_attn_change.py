"""How much the cross-attention outputs still change from one denoising step to the next, per timestep.

Cross-attention (``attn2``) brings the prompt into the image.  T-GATE (Zhang et
al. 2024) observed that its output converges early in sampling: once it stops
changing, replaying the last computed output costs almost nothing, and the
query projection, the attention over the text tokens and the output projection
are all saved.  The cross-attention cache lever (``fragment.schedule.cross_attn``)
predicts where to start replaying from this probe, measured on the profiled runs.

For each call the probe compares every cross-attention output with the same
module's output at the same call of the previous step (cond and uncond may run
as separate calls) and records the energy-weighted relative change
``sqrt(sum ||o - o_prev||^2) / sqrt(sum ||o_prev||^2)`` over all modules, averaged
per timestep.  Steps are counted as ``ScheduleState`` counts them: a lower
timestep is the next step, a higher one a new run, an equal one another call.
Changes are kept per timestep, not per step index; a change between two steps
grows with the noise the step removes, so the gate predicted from it holds for
the step count profiled (``CROSS_ATTN_LIMIT`` was set at 25 steps).

Each output is kept for the next step's comparison as a copy of at most
``KEPT_PER_ROW`` of its elements per row (a strided subsample): the full
outputs of SD1.5 at 512² would hold 23 MB per row for as long as a ComfyUI
profiling session lives; on the small reference model every element is kept.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..errors import ProfilingError
from .discovery import CROSS, describe, iter_attention
from .hooks import HookContext
from .profiler import timestep_from_call

KEPT_PER_ROW = 16_384  # elements per row of each output kept for the next step's comparison


def cross_attention_paths(model: nn.Module) -> list[str]:
    """The paths of ``model``'s cross-attention modules (diffusers' and ComfyUI's ``attn2``), in forward order.

    >>> cross_attention_paths(nn.Linear(1, 1))
    []
    """
    return [path for path, module in iter_attention(model) if describe(path, module).kind == CROSS]


class CrossAttnChangeProbe(HookContext):
    """Hook context recording the relative step-to-step change of the cross-attention outputs per timestep.

    Hooks are removed on exit but the previous step's outputs are kept, so a host that installs the
    probe around each model call (ComfyUI's profiling session) still measures changes across calls.

    >>> probe = CrossAttnChangeProbe(unet)  # doctest: +SKIP
    >>> with probe: ...                     # doctest: +SKIP
    >>> probe.changes()                     # doctest: +SKIP
    {959.0: 0.41, 919.0: 0.16, ...}
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.paths = cross_attention_paths(model)
        if not self.paths:
            raise ProfilingError(f"{type(model).__name__}: no cross-attention modules to profile")
        self._previous: dict[tuple[int, str], torch.Tensor] = {}  # (call of the step, path) -> output
        self._current: dict[tuple[int, str], torch.Tensor] = {}
        self._diff = self._base = 0.0
        self._compared = False
        self._sums: dict[float, Any] = {}  # a float, or a device scalar (no sync per call)
        self._counts: dict[float, int] = {}
        self._last_t: float | None = None
        self._t = 0.0
        self._call = 0
        self.calls = 0

    def _install(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._on_call, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._on_call_end))
        for path in self.paths:
            self._handles.append(self.model.get_submodule(path).register_forward_hook(self._watch(path)))

    def _on_call(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = timestep_from_call(args, kwargs)
        if t is None:
            return
        if self._last_t is None or t > self._last_t + 1e-4:  # a new run: nothing to compare with
            self._previous, self._current, self._call = {}, {}, 0
        elif t < self._last_t - 1e-4:  # the next step
            self._previous, self._current, self._call = self._current, {}, 0
        else:
            self._call += 1
        self._last_t, self._t = t, t
        self._diff, self._base, self._compared = 0.0, 0.0, False

    def _watch(self, path: str) -> Any:
        def on_output(_module: nn.Module, _inp: Any, out: Any) -> None:
            h = (out if isinstance(out, torch.Tensor) else out[0]).detach()
            h = h.reshape(h.shape[0], -1)
            h = h[:, :: max(1, h.shape[1] // KEPT_PER_ROW)].clone()  # a copy: the host may change its output in place
            key = (self._call, path)
            self._current[key] = h
            before = self._previous.get(key)
            if before is not None and before.shape == h.shape:
                b = before.to(torch.float32)
                self._diff = self._diff + (h.to(torch.float32) - b).square().sum()
                self._base = self._base + b.square().sum()
                self._compared = True
        return on_output

    def _on_call_end(self, *_: Any) -> None:
        if not self._compared:
            return
        key = round(self._t, 2)
        change = (self._diff / torch.as_tensor(self._base).clamp_min(1e-24)).sqrt()
        self._sums[key] = self._sums.get(key, 0.0) + change
        self._counts[key] = self._counts.get(key, 0) + 1
        self._compared = False
        self.calls += 1

    def clear_activations(self) -> None:
        """Drop the held outputs (the averages stay)."""
        self._previous, self._current = {}, {}

    def changes(self) -> dict[float, float]:
        """Mean relative change per timestep that had a previous step to compare with, most noise first."""
        return {t: float(self._sums[t]) / self._counts[t] for t in sorted(self._sums, reverse=True)}
