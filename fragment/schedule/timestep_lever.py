"""The shape both "below a timestep" schedule levers share: the CFG cut-off and the cross-attention cache.

Each is one timestep (``None``: off) stored as ``schedule.<name>.timestep``,
tried after the ladder rather than moved by predicted damage, and set on the
``Schedule`` field of the lever's own name.  A subclass names itself, says how
it reads in a label and what it predicts from.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch.nn as nn

from ..surgery.lever import LeverBase, finite
from .state import Schedule


@dataclass(frozen=True)
class BelowTimestepLever(LeverBase):
    """A planned timestep (training scale, 0..1000) below which the lever acts.

    >>> class Toy(BelowTimestepLever):
    ...     name = "cfg_cutoff"
    >>> Toy.is_on(None), Toy.check_amount(1e4), Toy(350.0).extend(Schedule()).cfg_cutoff
    (False, 'None or a timestep in 0..1000', 350.0)
    """

    timestep: float
    stage: ClassVar[str] = "schedule"
    goals: ClassVar[tuple[str, ...]] = ("speed", "both")
    ladder: ClassVar[str] = "after"
    off: ClassVar[Any] = None

    @classmethod
    def is_on(cls, amount: Any) -> bool:
        return amount is not None

    @classmethod
    def check_amount(cls, amount: Any, settings: Any = None) -> str | None:
        return None if amount is None or (finite(amount) and 0 <= amount <= 1000) else "None or a timestep in 0..1000"

    @classmethod
    def plan(cls, evidence: Any, settings: Any, model: nn.Module, name: str) -> "BelowTimestepLever | None":
        return cls(float(settings.amount(cls.name))) if settings.on(cls.name) else None

    def extend(self, schedule: Schedule) -> Schedule:
        return dataclasses.replace(schedule, **{self.name: self.timestep})

    @classmethod
    def record_in(cls, manifest: Mapping[str, Any]) -> Any | None:
        return (manifest.get("schedule") or {}).get(cls.name) or None
