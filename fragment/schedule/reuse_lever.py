"""The step-reuse lever: on a share of the profiled steps the deep blocks replay their last output.

Its record is the manifest's ``schedule.step_reuse`` block; it stores no
tensors.  It is planned from the profiled per-step change of the deep features
(``ProfileEvidence.step_changes``, or ``reuse_depths`` for a cut in skip
connections), and its damage is the drift budget the reused steps replay over.

The deepest rung is ``skips=0``, whole-step reuse: a reuse step skips the
whole UNet call.  Its predicted damage is the drift budget of the profiled
per-step change of the whole call's output (``StepChangeProbe`` watches the
model's own output as depth 0 when profiled with ``WHOLE_STEP_SKIPS``; it is
measured, not proxied by skips=1), and a reuse step at that depth costs
nothing of the call (``ReuseDepth.cost`` 0).  The default profile leaves depth
0 out (``profiling.step_change.DEFAULT_SKIPS`` says why), so the calibration
offers whole steps only when the profile measured them.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch.nn as nn

from ...errors import FragmentError
from ...profiling.discovery import block_layout
from ...profiling.step_change import ReuseDepth, reuse_steps_for_count
from ..surgery.lever import LeverBase
from .state import Schedule

REUSE_GRID = tuple(round(0.05 * i, 2) for i in range(0, 17))  # 0 .. 80 % of steps


@dataclass(frozen=True)
class ReuseEvidence:
    """What step reuse predicts from: the block-depth changes per step and the finer profiled cuts."""

    changes: Sequence[float | None] | None = None
    reuse_depths: Mapping[int, ReuseDepth] | None = None

    @property
    def depths(self) -> dict[int, ReuseDepth]:
        """The reuse depths with enough profiled steps and a counted cost."""
        return {k: d for k, d in (self.reuse_depths or {}).items() if d.cost is not None and len(d.changes) >= 3}


@dataclass(frozen=True)
class StepReuseLever(LeverBase):
    """A planned reuse schedule (``schedule``: the steps, depth and timesteps it stores).

    >>> StepReuseLever.label(0.3), StepReuseLever.predict(ReuseEvidence([None, 0.5, 0.1, 0.1]), 0.25)
    ('step reuse 30%', 0.5)
    >>> from types import SimpleNamespace
    >>> StepReuseLever.label(0.3, SimpleNamespace(reuse_skips=0))
    'step reuse 30% of whole steps'
    """

    schedule: Schedule
    name: ClassVar[str] = "step_reuse"
    stage: ClassVar[str] = "schedule"
    grid: ClassVar[tuple[Any, ...]] = REUSE_GRID
    goals: ClassVar[tuple[str, ...]] = ("speed", "both")
    evidence: ClassVar[tuple[str, ...]] = ("step_changes", "reuse_depths")

    @classmethod
    def check_amount(cls, amount: Any, settings: Any = None) -> str | None:
        ok = super().check_amount(amount, settings) is None
        return None if ok else "a share of steps in [0, 1)"

    @classmethod
    def label(cls, amount: Any, settings: Any = None) -> str:
        skips = getattr(settings, "reuse_skips", None)
        depth = "" if skips is None else " of whole steps" if skips == 0 else f" below skip {skips}"
        return f"step reuse {amount:.0%}{depth}"

    @classmethod
    def plan(cls, evidence: Any, settings: Any, model: nn.Module, name: str) -> "StepReuseLever | None":
        """The steps where the deep features changed least; with ``settings.reuse_skips`` the cut falls at
        that many skip connections and the changes are that depth's (``evidence.reuse_depths``; at 0, the
        whole call's output)."""
        share = settings.amount(cls.name)
        if not share > 0:
            return None
        skips, depths = settings.reuse_skips, evidence.reuse_depths
        if skips is not None and (not depths or skips not in depths):
            raise FragmentError(f"fragment {name!r}: step_reuse below skip {skips}: the profile has no per-step changes "
                                f"at that depth (profiled: {sorted(depths or {})}); profile with "
                                f"StepChangeProbe(..., skips=[{skips}]) or leave reuse_skips unset")
        changes = evidence.step_changes if skips is None else depths[skips].changes
        if skips is None:  # the block depth, stored as the same cut in skips: one meaning on every host
            skips = block_depth_in_skips(model)
        return cls(reuse_schedule(name, changes, share, timesteps=evidence.step_timesteps, skips=skips))

    def extend(self, schedule: Schedule) -> Schedule:
        """``schedule`` with this reuse in it."""
        s = self.schedule
        return dataclasses.replace(schedule, total_steps=s.total_steps, reuse_steps=s.reuse_steps, shallow=s.shallow,
                                   skips=s.skips, step_timesteps=s.step_timesteps, calibration=s.calibration)

    @classmethod
    def record_in(cls, manifest: Mapping[str, Any]) -> Any | None:
        return (manifest.get("schedule") or {}).get("step_reuse") or None

    @classmethod
    def predictor(cls, evidence: Any, model: nn.Module, settings: Any) -> ReuseEvidence:
        return ReuseEvidence(evidence.step_changes, evidence.reuse_depths)

    @classmethod
    def offers(cls, data: ReuseEvidence) -> bool:
        return bool(data.depths) or (bool(data.changes) and len(data.changes) >= 3)

    @classmethod
    def predict(cls, data: ReuseEvidence, amount: float) -> float:
        return reuse_damage(list(data.changes), amount) if amount > 0 else 0.0

    @classmethod
    def depth_damage(cls, data: ReuseEvidence, skips: int, amount: float) -> float:
        """Predicted damage of reusing ``amount`` of the steps at depth ``skips`` (its drift budget)."""
        return reuse_damage(list(data.depths[skips].changes), amount) if amount > 0 else 0.0


def reuse_damage(changes: list[float | None], amount: float) -> float:
    """The drift budget (the relative change the reused steps replay over) of reusing ``amount`` of the steps.

    A share that reuses no step (it rounds to none, or no run of steps fits) is no candidate: infinite damage,
    where a budget of 0 made it look free at every level (a "step reuse 5 %" fragment that was the full model).

    >>> reuse_damage([None, 0.5, 0.1, 0.1], 0.2)
    inf
    """
    steps, budget = reuse_steps_for_count(changes, int(amount * len(changes)))
    return float(budget) if steps else math.inf


def block_depth_in_skips(model: nn.Module) -> int | None:
    """The block depth (``shallow=1``) as a cut in skip connections, ``None`` for an unknown block layout."""
    try:
        return block_layout(model).skips_for_shallow(1)
    except FragmentError:  # no known block layout: the schedule keeps the block depth alone
        return None


def reuse_schedule(name: str, changes: Sequence[float | None] | None, share: float, shallow: int = 1,
                   timesteps: Sequence[float] | None = None, skips: int | None = None) -> Schedule:
    """A step-reuse schedule for ``share`` of the steps, from the profiled per-step changes.

    ``timesteps`` (the profiled run's, one per step) let the loaded schedule
    follow the noise level when the sampler runs another step count.  This
    path has no quality judge (ComfyUI has no analyzer for arbitrary prompts):
    the manifest says the schedule is ungated; ``prompt-fragments bench batch``
    gates it on the reference model.

    >>> reuse_schedule("dog", [None, 0.5, 0.1, 0.1, 0.1, 0.05], 0.34).reuse_steps
    (2, 3)
    """
    if not 0.0 < share < 1.0:
        raise FragmentError(f"fragment {name!r}: step_reuse: expected a share of steps in (0, 1), found {share}")
    if not changes or len(changes) < 3:
        raise FragmentError(f"fragment {name!r}: step_reuse needs per-step changes of at least 3 profiled steps, "
                            f"found {len(changes or [])}; profile a full sampler run first")
    if timesteps is not None and len(timesteps) != len(changes):
        raise FragmentError(f"fragment {name!r}: step_reuse: expected one timestep per profiled step ({len(changes)}), "
                            f"found {len(timesteps)}")
    steps, budget = reuse_steps_for_count(list(changes), int(share * len(changes)))
    return Schedule(total_steps=len(changes), reuse_steps=tuple(steps), shallow=shallow, skips=skips,
                    step_timesteps=tuple(float(t) for t in timesteps or ()),
                    calibration={"method": "drift_budget", "share": share, "budget": round(budget, 5),
                                 "quality_gate": "not run: no judge in this path (see prompt-fragments bench batch)",
                                 "change_per_step": [None if c is None else round(c, 5) for c in changes]})
