"""The CFG cut-off lever: below a timestep the sampler skips the unconditional pass.

Its record is the manifest's ``schedule.cfg_cutoff`` block (``cfg_truncation`` in schema v1); it stores no
tensors.  No profiled quantity measures what the unconditional pass adds, so
it is not predicted: the calibration tries it after the ladder, latest cut-off first.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch.nn as nn

from ..surgery.lever import LeverBase, finite
from .state import Schedule

CFG_CUTOFFS = (500.0, 350.0, 200.0)


@dataclass(frozen=True)
class CfgCutoffLever(LeverBase):
    """A planned cut-off (``timestep``).

    >>> CfgCutoffLever.label(350.0), CfgCutoffLever.is_on(None), CfgCutoffLever(200.0).extend(Schedule()).cfg_cutoff
    ('CFG off below t=350', False, 200.0)
    """

    timestep: float
    name: ClassVar[str] = "cfg_cutoff"
    stage: ClassVar[str] = "schedule"
    grid: ClassVar[tuple[Any, ...]] = CFG_CUTOFFS
    goals: ClassVar[tuple[str, ...]] = ("speed", "both")
    ladder: ClassVar[str] = "after"
    off: ClassVar[Any] = None

    @classmethod
    def is_on(cls, amount: Any) -> bool:
        return amount is not None

    @classmethod
    def check_amount(cls, amount: Any, settings: Any = None) -> str | None:
        return None if amount is None or (finite(amount) and amount >= 0) else "None or a timestep >= 0"

    @classmethod
    def label(cls, amount: Any, settings: Any = None) -> str:
        return f"CFG off below t={amount:g}"

    @classmethod
    def plan(cls, evidence: Any, settings: Any, model: nn.Module, name: str) -> "CfgCutoffLever | None":
        return cls(float(settings.amount(cls.name))) if settings.on(cls.name) else None

    def extend(self, schedule: Schedule) -> Schedule:
        return dataclasses.replace(schedule, cfg_cutoff=self.timestep)

    @classmethod
    def record_in(cls, manifest: Mapping[str, Any]) -> Any | None:
        return (manifest.get("schedule") or {}).get("cfg_cutoff") or None

    @classmethod
    def predictor(cls, evidence: Any, model: nn.Module, settings: Any) -> bool:
        return True
