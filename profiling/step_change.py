"""How much the deep UNet features change from one denoising step to the next, per step.

This is what a step-reuse schedule is calibrated from: where the output of
the deepest block that feeds the shallow up path (``BlockLayout.cache_point``)
barely moves between steps, replaying it costs little quality.  The probe
hooks that one block and the model root (for the timestep), and records the
relative change ``||h_s - h_{s-1}|| / ||h_{s-1}||`` per step, averaged over
sampling runs, and the timestep of each step (what a schedule is matched by at
run time).  Steps are counted like ``ScheduleState`` counts them: a lower
timestep is the next step, a higher one a new run.  Averaging by step index
only means something over runs with the same timesteps, so a run whose
timesteps differ from the first run's (other step count, scheduler or
denoise) is left out of the averages and counted in ``skipped_runs``.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn as nn

from .discovery import block_layout
from .hooks import HookContext
from .profiler import timestep_from_call

log = logging.getLogger(__name__)


class StepChangeProbe(HookContext):
    """Hook context recording the per-step relative change of the deep features.

    >>> with StepChangeProbe(unet, shallow=1) as probe:  # doctest: +SKIP
    ...     for seed in range(4):
    ...         run_sampler(unet, seed)
    >>> probe.changes()  # doctest: +SKIP
    [None, 0.41, 0.18, 0.09, ...]
    """

    def __init__(self, model: nn.Module, shallow: int = 1) -> None:
        super().__init__()
        self.model = model
        self.shallow = shallow
        layout = block_layout(model)
        self.point = layout.cache_point(shallow)
        self._module = model.get_submodule(self.point)
        if layout.kind == "comfy":  # ComfyUI iterates a block's layers without calling it: its last layer's output is the block's
            self._module = self._module[-1]
        self._sums: list[Any] = []  # per step: a float, or a device scalar once a change was added
        self._counts: list[int] = []
        self._last_t: float | None = None
        self._step = -1
        self._call = 0
        self._previous: dict[int, torch.Tensor] = {}
        self._current: dict[int, torch.Tensor] = {}
        self._timesteps: list[float] = []  # per step, from the first run
        self._run_timesteps: list[float] = []
        self._run_changes: list[tuple[int, Any]] = []  # this run's additions, to take back if it turns out foreign
        self._counting = True
        self.runs = 0
        self.skipped_runs = 0

    def _on_model_call(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = timestep_from_call(args, kwargs)
        if t is None:
            return
        if self._last_t is None or t > self._last_t + 1e-4:
            self._end_run()
            self.runs += 1
            self._step, self._call = 0, 0
            self._previous, self._current = {}, {}
            self._run_timesteps, self._run_changes = [], []
            self._counting = True
        elif t < self._last_t - 1e-4:
            self._step, self._call = self._step + 1, 0
            self._previous, self._current = self._current, {}
        else:
            self._call += 1
        self._last_t = t
        if self._call == 0:
            self._run_timesteps.append(t)
            if self.runs == 1:
                self._timesteps.append(t)
            elif self._counting and (self._step >= len(self._timesteps) or abs(self._timesteps[self._step] - t) > 0.5):
                self._counting = False  # another noise schedule: its changes would land on the wrong steps
                self._drop_run()

    def _end_run(self) -> None:
        if self.runs > 1 and self._counting and len(self._run_timesteps) != len(self._timesteps):
            self._counting = False  # a shorter run (fewer steps): same reason
            self._drop_run()

    def _drop_run(self) -> None:
        for step, change in self._run_changes:
            self._sums[step] -= change
            self._counts[step] -= 1
        self._run_changes = []
        self.skipped_runs += 1
        log.warning("step-change probe: run %d has other timesteps than the first run (another step count, scheduler "
                    "or denoise); its changes are left out of the step-reuse calibration", self.runs)

    def _on_output(self, _module: nn.Module, _inp: Any, out: Any) -> None:
        h = out[0] if isinstance(out, (tuple, list)) else out
        h = h.detach().to(torch.float32)
        self._current[self._call] = h
        before = self._previous.get(self._call)
        while len(self._sums) <= self._step:
            self._sums.append(0.0)
            self._counts.append(0)
        if before is not None and before.shape == h.shape and self._counting:
            # A device scalar: turning it into a float here would wait for the device on every call.
            diff = h - before
            change = (diff * diff).sum().sqrt() / (before * before).sum().sqrt().clamp_min(1e-12)
            self._sums[self._step] += change
            self._counts[self._step] += 1
            self._run_changes.append((self._step, change))

    def _install(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        self._handles.append(self._module.register_forward_hook(self._on_output))

    def clear_activations(self) -> None:
        """Drop the held block outputs (the sums stay); hosts that install the hooks per call keep them between calls."""
        self._previous, self._current = {}, {}

    def changes(self) -> list[float | None]:
        """Mean relative change per step (``None`` for step 0 and steps never seen twice), over the finished runs."""
        self._end_run()  # the last run may have been a shorter one
        steps = len(self._timesteps) or len(self._sums)
        return [float(self._sums[i]) / self._counts[i] if i < len(self._sums) and self._counts[i] else None
                for i in range(steps)]

    def timesteps(self) -> list[float]:
        """The first run's timestep per step: what a schedule calibrated from these changes is matched by."""
        return list(self._timesteps)

    def record(self) -> dict[str, Any]:
        """Plain data for the manifest's calibration record."""
        return {"cache_point": self.point, "shallow": self.shallow, "runs": self.runs, "skipped_runs": self.skipped_runs,
                "change_per_step": [None if c is None or not math.isfinite(c) else round(c, 5) for c in self.changes()],
                "timesteps": [round(t, 4) for t in self._timesteps]}


def reuse_steps_for_budget(changes: list[float | None], budget: float) -> list[int]:
    """Steps to reuse so that the change accumulated since the last computed step stays within ``budget``.

    Walks the steps in order; a step whose change, added to the drift since the
    last computed step, stays within the budget reuses, otherwise it computes
    and the drift restarts.  Step 0 always computes; so does the last step (it
    sets the final detail).

    >>> reuse_steps_for_budget([None, 0.5, 0.1, 0.1, 0.1, 0.05], 0.25)
    [2, 3]
    """
    reuse: list[int] = []
    drift = 0.0
    for step in range(1, len(changes) - 1):
        change = changes[step]
        if change is None:
            drift = 0.0
            continue
        if drift + change <= budget + 1e-9:  # budgets are sums of these same changes: no rounding misses
            reuse.append(step)
            drift += change
        else:
            drift = 0.0
    return reuse


def reuse_steps_for_count(changes: list[float | None], count: int) -> tuple[list[int], float]:
    """The drift budget that reuses at most ``count`` steps (the largest such schedule) and its steps.

    >>> reuse_steps_for_count([None, 0.5, 0.1, 0.1, 0.1, 0.05], 2)
    ([2, 3], 0.25)
    """
    candidates = sorted({round(sum(c for c in changes[a:b] if c is not None), 9)
                         for a in range(1, len(changes)) for b in range(a + 1, len(changes) + 1)})
    best: tuple[list[int], float] = ([], 0.0)
    for budget in candidates:
        steps = reuse_steps_for_budget(changes, budget)
        if len(steps) > count:
            break
        best = (steps, budget)
    return best
