"""The CFG cut-off lever: below a timestep the sampler skips the unconditional pass.

Its record is the manifest's ``schedule.cfg_cutoff`` block (``cfg_truncation`` in schema v1); it stores no
tensors.  The calibration tries it after the ladder, latest cut-off first.  Where
it starts is predicted from the profile: the relative gap between the
conditional and unconditional predictions per timestep
(``profiling.cfg_gap``), the signal Adaptive Guidance watches.  Once the gap
has fallen to ``CFG_GAP_LIMIT`` the guidance has done its work, so the first
try cuts there; weaker cut-offs follow if the judge refuses it.  The gap does
not tell how a judge weighs the last steps (on a dark, flat image SSIM
punishes small changes the gap calls converged), so the prediction only
orders the tries: each one is still judged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch.nn as nn

from .state import Schedule
from .timestep_lever import BelowTimestepLever

CFG_CUTOFFS = (500.0, 350.0, 200.0)  # the tries without a profiled gap, and the fallbacks below a prediction
CFG_STEP = 50.0  # predicted cut-offs are multiples of this (labels stay readable; finer buys nothing measurable)
#: The relative cond/uncond gap at which guidance counts as converged.  On the reference model the gap of the
#: default prompt falls to 0.1 near t = 680 and SSIM against the full model is then 0.947 with CFG off below 700.
CFG_GAP_LIMIT = 0.1
MAX_CFG_TRIES = 3


@dataclass(frozen=True)
class CfgEvidence:
    """The profiled relative gap between the cond and uncond predictions, per timestep (highest first)."""

    gaps: Mapping[float, float]


def predicted_cutoff(gaps: Mapping[float, float], limit: float = CFG_GAP_LIMIT, step: float = CFG_STEP) -> float | None:
    """The latest cut-off (a multiple of ``step``) that drops the uncond pass only on steps at or below the first
    timestep whose gap is within ``limit``, scanning from the most noise down.  The first profiled step always
    keeps it (guidance sets the composition there, and a random-weight model's gap is "converged" from the
    start); ``None`` when the gap never gets within ``limit``, or when fewer than two steps would be cut.

    >>> predicted_cutoff({999.0: 0.9, 800.0: 0.3, 680.0: 0.09, 500.0: 0.08, 40.0: 0.2})
    650.0
    >>> predicted_cutoff({999.0: 0.9, 800.0: 0.3, 680.0: 0.2, 500.0: 0.15, 40.0: 0.2}) is None
    True
    """
    times = sorted(gaps, reverse=True)
    first = next((t for t in times if gaps[t] <= limit), None)
    if first is None:
        return None
    # steps below the cut-off drop the uncond pass: it sits just above ``first``, on the grid below it
    cutoff = min(math.floor((first + 1.0) / step), math.floor(times[0] / step)) * step
    return cutoff if sum(1 for t in times if t < cutoff) >= 2 else None


def cutoff_tries(data: Any, fallbacks: Sequence[float] = CFG_CUTOFFS, most: int = MAX_CFG_TRIES) -> tuple[float, ...]:
    """The cut-offs the calibration tries, latest first: the predicted one, then the fallbacks below it
    (without a profiled gap, or when it never converges, the fallbacks alone).

    >>> cutoff_tries(CfgEvidence({999.0: 0.9, 680.0: 0.09, 360.0: 0.08, 40.0: 0.2}))
    (650.0, 500.0, 350.0)
    >>> cutoff_tries(True)
    (500.0, 350.0, 200.0)
    """
    first = predicted_cutoff(data.gaps) if isinstance(data, CfgEvidence) else None
    below = [float(c) for c in sorted(fallbacks, reverse=True) if first is None or c < first]
    return tuple(([first] if first is not None else []) + below)[:most]


@dataclass(frozen=True)
class CfgCutoffLever(BelowTimestepLever):
    """A planned cut-off (``timestep``).

    >>> CfgCutoffLever.label(350.0), CfgCutoffLever.is_on(None), CfgCutoffLever(200.0).extend(Schedule()).cfg_cutoff
    ('CFG off below t=350', False, 200.0)
    """

    name: ClassVar[str] = "cfg_cutoff"
    evidence: ClassVar[tuple[str, ...]] = ("cfg_gaps",)
    grid: ClassVar[tuple[Any, ...]] = CFG_CUTOFFS

    @classmethod
    def label(cls, amount: Any, settings: Any = None) -> str:
        return f"CFG off below t={amount:g}"

    @classmethod
    def predictor(cls, evidence: Any, model: nn.Module, settings: Any) -> CfgEvidence | bool:
        gaps = getattr(evidence, "cfg_gaps", None)
        return CfgEvidence(dict(gaps)) if gaps else True  # True: offered, with the blind tries
