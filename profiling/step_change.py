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

Depth 0 (``skips=0``, whole-step reuse) watches the model's own output: the
change of the whole call, what a step that skips the UNet entirely replays.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ..errors import FragmentError
from .discovery import block_layout
from .hooks import HookContext
from .profiler import timestep_from_call

log = logging.getLogger(__name__)


# The reuse depths profiled besides the block depth: DeepCache's shallowest branches.  The whole call (0,
# whole-step reuse) is measured only when asked (``WHOLE_STEP_SKIPS``): in the calibration's search it was tried
# first (it saves the most per predicted damage) and failed where a deep cut of more steps passed, so on `bench
# peers --prompts 4` (64 fresh seeds, 2026-12-07) the fragments it chose were 0.51-0.94x the fastest passing
# peer; its damage predictor is not yet comparable with the deep depths' (see the CHANGELOG).
DEFAULT_SKIPS = (1, 2, 3)
WHOLE_STEP_SKIPS = (0, 1, 2, 3)  # DEFAULT_SKIPS plus the whole call: offers whole-step reuse to the calibration
WHOLE_OUTPUT = ""  # the cache point of depth 0: the model itself (``get_submodule("")``)
TIMED_CALLS = 8  # model calls timed per skip unit for the cost of each depth (CUDA syncs after every unit)
_clock = time.perf_counter  # a module name, so a test can drive the timing with a clock of its own


@dataclass(frozen=True)
class ReuseDepth:
    """One depth a reuse step can cut at, in skip connections (``BlockLayout.replay_paths``): how much its
    cached feature changes per step, and the share of a full call's time a reuse step at that depth still spends.

    >>> ReuseDepth(skips=1, cache_point="up_blocks.2.attentions.0", changes=(None, 0.2), cost=0.21).saving(0.5)
    0.395
    """

    skips: int
    cache_point: str
    changes: tuple[float | None, ...]
    cost: float | None  # None: no call was timed

    def saving(self, share: float) -> float:
        """The share of a run's time saved by reusing ``share`` of its steps at this depth (0 without a cost)."""
        return round(share * (1.0 - self.cost), 9) if self.cost is not None else 0.0


class StepChangeProbe(HookContext):
    """Hook context recording the per-step relative change of the deep features.

    It watches the block depth ``shallow`` (``changes()``) and, for the
    calibration's choice of depth, the finer cuts ``skips``
    (``depths()``).  A few calls after the first are also timed per skip unit:
    what a reuse step at each depth would still spend.

    >>> with StepChangeProbe(unet, shallow=1) as probe:  # doctest: +SKIP
    ...     for seed in range(4):
    ...         run_sampler(unet, seed)
    >>> probe.changes()  # doctest: +SKIP
    [None, 0.41, 0.18, 0.09, ...]
    >>> {k: round(d.cost, 2) for k, d in probe.depths().items()}  # doctest: +SKIP
    {1: 0.21, 2: 0.55, 3: 0.62}
    """

    def __init__(self, model: nn.Module, shallow: int = 1, skips: Sequence[int] = DEFAULT_SKIPS) -> None:
        super().__init__()
        self.model = model
        self.shallow = shallow
        self.layout = block_layout(model)
        self.point = self.layout.cache_point(shallow)
        # depths this UNet lacks are left out (the defaults ask for three; a small UNet may have fewer)
        self.skips = tuple(k for k in skips if isinstance(k, int) and not isinstance(k, bool)
                           and (k == 0 or 1 <= k <= self.layout.max_skips))
        # key None: the block depth; an int: that many skips.  Several keys may watch one tensor.
        self._points: dict[int | None, str] = {None: self.point}
        self._points.update({k: WHOLE_OUTPUT if k == 0 else self.layout.skips_cache_point(k) for k in self.skips})
        self._modules = {key: self._output_module(path) for key, path in self._points.items()}
        self._sums: dict[int | None, list[Any]] = {key: [] for key in self._points}  # a float, or a device scalar
        self._counts: dict[int | None, list[int]] = {key: [] for key in self._points}
        self._last_t: float | None = None
        self._step = -1
        self._call = 0
        self._previous: dict[tuple[int | None, int], torch.Tensor] = {}
        self._current: dict[tuple[int | None, int], torch.Tensor] = {}
        self._timesteps: list[float] = []  # per step, from the first run
        self._run_timesteps: list[float] = []
        self._run_changes: list[tuple[int | None, int, Any]] = []  # this run's additions, to take back if foreign
        self._counting = True
        self.runs = 0
        self.skipped_runs = 0
        units = [*self.layout.down_units, (self.layout.mid,), *self.layout.up_units] if any(self.skips) else []
        try:  # resolved once here: a failure inside a forward hook would abort the user's model call
            self._unit_modules = {unit: self._unit_ends(unit) for unit in units}
        except (AttributeError, IndexError, TypeError) as exc:
            log.warning("step-change probe: %s: skip units not found (%s); reuse depths get no measured cost",
                        type(model).__name__, exc)
            self._unit_modules = {}
        self._seen_calls = 0
        self._timed_calls = 0
        self._total_seconds = 0.0
        self._unit_seconds: dict[tuple[str, ...], float] = {}
        self._timing: tuple[float, Callable[[], float], dict[tuple[str, ...], float]] | None = None
        self._unit_handles: list[torch.utils.hooks.RemovableHandle] = []

    def _output_module(self, path: str) -> nn.Module:
        module = self.model.get_submodule(path)  # "": the model itself (depth 0)
        if self.layout.kind == "comfy" and path.startswith(("input_blocks.", "output_blocks.", "middle_block")):
            return module[-1]  # ComfyUI iterates a block's layers without calling it: its last layer's output is the block's
        return module

    def _unit_ends(self, unit: tuple[str, ...]) -> tuple[nn.Module, nn.Module]:
        first, last = self.model.get_submodule(unit[0]), self.model.get_submodule(unit[-1])
        if self.layout.kind == "comfy":
            return first[0], last[-1]
        return first, last

    def _on_model_call(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = timestep_from_call(args, kwargs)
        if t is None:
            return
        self._seen_calls += 1
        if self._timing is not None:  # the last call raised before it finished: its times are not a call's
            self._stop_timing(finished=False)
        # the first call pays for allocation and warm-up, not the model: the next ones are timed
        if self._unit_modules and 2 <= self._seen_calls <= TIMED_CALLS + 1:
            self._start_timing(_device_of(args, kwargs))
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

    def _start_timing(self, device: torch.device | None) -> None:
        """Time this call per skip unit (the units run one after another, never nested)."""
        cuda = device is not None and device.type == "cuda"

        def now() -> float:
            if cuda:  # kernels run asynchronously: a unit's time is only known once the device is done with it
                torch.cuda.synchronize(device)
            return _clock()

        starts: dict[tuple[str, ...], float] = {}
        seconds: dict[tuple[str, ...], float] = {}

        def begin(unit: tuple[str, ...]) -> Any:
            return lambda *_: starts.__setitem__(unit, now())

        def finish(unit: tuple[str, ...]) -> Any:
            def record(*_: Any) -> None:
                started = starts.pop(unit, None)
                if started is not None:
                    seconds[unit] = now() - started
            return record

        for unit, (first, last) in self._unit_modules.items():
            self._unit_handles.append(first.register_forward_pre_hook(begin(unit)))
            self._unit_handles.append(last.register_forward_hook(finish(unit)))
        self._timing = (now(), now, seconds)

    def _stop_timing(self, finished: bool) -> None:
        timing, self._timing = self._timing, None
        for handle in self._unit_handles:
            handle.remove()
        self._unit_handles.clear()
        if timing is None:
            return
        started, now, seconds = timing
        total = now() - started
        if finished and total > 0 and len(seconds) == len(self._unit_modules):  # else it failed or a unit never ran
            self._timed_calls += 1
            self._total_seconds += total
            for unit, spent in seconds.items():
                self._unit_seconds[unit] = self._unit_seconds.get(unit, 0.0) + spent

    def _on_model_output(self, *_: Any) -> None:
        self._stop_timing(finished=True)

    def _end_run(self) -> None:
        if self.runs > 1 and self._counting and len(self._run_timesteps) != len(self._timesteps):
            self._counting = False  # a shorter run (fewer steps): same reason
            self._drop_run()

    def _drop_run(self) -> None:
        for key, step, change in self._run_changes:
            self._sums[key][step] -= change
            self._counts[key][step] -= 1
        self._run_changes = []
        self.skipped_runs += 1
        log.warning("step-change probe: run %d has other timesteps than the first run (another step count, scheduler "
                    "or denoise); its changes are left out of the step-reuse calibration", self.runs)

    def _watch(self, keys: list[int | None]) -> Any:
        """One hook per watched module: keys that share it (skips 2 and the block depth on diffusers, skips 1 and
        the block depth on ComfyUI) share its float copy and its change, which are computed once per call."""
        first = keys[0]

        def on_output(_module: nn.Module, _inp: Any, out: Any) -> None:
            # a block returns a tensor or a tuple; the whole model (depth 0) may return diffusers' ModelOutput
            h = out if isinstance(out, torch.Tensor) else out[0]
            h = h.detach().to(torch.float32)
            self._current[first, self._call] = h
            before = self._previous.get((first, self._call))
            change = None
            if before is not None and before.shape == h.shape and self._counting:
                # A device scalar: turning it into a float here would wait for the device on every call.
                diff = h - before
                change = (diff * diff).sum().sqrt() / (before * before).sum().sqrt().clamp_min(1e-12)
            for key in keys:
                sums, counts = self._sums[key], self._counts[key]
                while len(sums) <= self._step:
                    sums.append(0.0)
                    counts.append(0)
                if change is not None:
                    sums[self._step] += change
                    counts[self._step] += 1
                    self._run_changes.append((key, self._step, change))
        return on_output

    def _install(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._on_model_output))
        shared: dict[int, tuple[nn.Module, list[int | None]]] = {}
        for key, module in self._modules.items():
            shared.setdefault(id(module), (module, []))[1].append(key)
        for module, keys in shared.values():
            self._handles.append(module.register_forward_hook(self._watch(keys)))

    def _on_remove(self) -> None:
        self._stop_timing(finished=False)

    def clear_activations(self) -> None:
        """Drop the held block outputs (the sums stay); hosts that install the hooks per call keep them between calls."""
        self._previous, self._current = {}, {}

    def changes(self, skips: int | None = None) -> list[float | None]:
        """Mean relative change per step (``None`` for step 0 and steps never seen twice), over the finished runs,
        at the block depth, or at ``skips`` when given."""
        self._end_run()  # the last run may have been a shorter one
        if skips not in self._sums:
            raise FragmentError(f"step-change probe on {type(self.model).__name__}: no changes at skips={skips!r}; "
                                f"profiled depths: {list(self.skips)} (and None, the block depth {self.shallow})")
        sums, counts = self._sums[skips], self._counts[skips]
        steps = len(self._timesteps) or len(sums)
        return [float(sums[i]) / counts[i] if i < len(sums) and counts[i] else None for i in range(steps)]

    def timesteps(self) -> list[float]:
        """The first run's timestep per step: what a schedule calibrated from these changes is matched by."""
        return list(self._timesteps)

    def reuse_cost(self, skips: int) -> float | None:
        """The share of a full call's time that a reuse step at ``skips`` still spends (``None`` before a timed call).

        Measured, not counted: on a small model the fixed cost of every module
        call outweighs its FLOPs, and the cheapest depth is the one that skips
        the most calls.  Depth 0 skips the whole call: it costs nothing of it, timed or not."""
        if skips == 0:
            return 0.0
        if not self._timed_calls:
            return None
        replayed = sum(self._unit_seconds.get(unit, 0.0) for unit in self.layout.replay_units(skips))
        return min(1.0, max(0.0, 1.0 - replayed / self._total_seconds))

    def depths(self) -> dict[int, ReuseDepth]:
        """Every profiled depth in skips, with its changes and its cost (what the calibration chooses among)."""
        return {k: ReuseDepth(k, self._points[k], tuple(self.changes(k)), self.reuse_cost(k)) for k in self.skips}

    def record(self) -> dict[str, Any]:
        """Plain data for the manifest's calibration record."""
        return {"cache_point": self.point, "shallow": self.shallow, "runs": self.runs, "skipped_runs": self.skipped_runs,
                "change_per_step": _rounded(self.changes()),
                "timesteps": [round(t, 4) for t in self._timesteps],
                "depths": {str(k): {"cache_point": d.cache_point, "cost": None if d.cost is None else round(d.cost, 4),
                                    "change_per_step": _rounded(d.changes)} for k, d in self.depths().items()}}


def _device_of(args: tuple, kwargs: dict) -> torch.device | None:
    """The device the call runs on: a CUDA tensor's if any (a timestep may sit on the CPU), else the first one's."""
    tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
    return next((t.device for t in tensors if t.device.type == "cuda"), tensors[0].device if tensors else None)


def _rounded(changes: Sequence[float | None]) -> list[float | None]:
    return [None if c is None or not math.isfinite(c) else round(c, 5) for c in changes]


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
