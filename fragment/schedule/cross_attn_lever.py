"""The cross-attention cache lever: below a timestep, cross-attention replays its last computed output.

Its record is the manifest's ``schedule.cross_attn_cache`` block; it stores no
tensors, and ``fragment.schedule.cross_attn`` puts it on a model.  Like T-GATE
it goes with the CFG cut-off: the calibration tries each cut-off with the cache
on below ``min(cut-off, predicted gate)``, in the same judged try, so it costs no
judged image of its own.  The gate is predicted from the profile: the first
timestep (from the most noise down) at which the cross-attention outputs change
by at most ``CROSS_ATTN_LIMIT`` from one step to the next
(``profiling.cross_attn_change``).

Why only with a cut-off: on the reference model (default prompt, 32 seeds, 25
DDIM steps) the cache below t = 600 alone gave SSIM 0.960 against the full
model (min 0.927), with CFG at every step; with CFG off below t = 700 it cost
nothing (SSIM 0.965 with it, 0.964 without) and ran 1.55x against 1.45x.  With
both passes the replayed cond and uncond outputs differ by less than the live
ones, and the guidance multiplies that error.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch.nn as nn

from .cfg_lever import predicted_cutoff
from .state import Schedule
from .timestep_lever import BelowTimestepLever

#: The step-to-step relative change at which the cross-attention counts as converged.  On the reference model
#: (4 prompts, 25 DDIM steps) it first falls to 0.07 between t = 800 and 760, after 0.1-0.6 on the first steps.
CROSS_ATTN_LIMIT = 0.07
GATE_STEP = 50.0  # predicted gates are multiples of this (as the CFG cut-off's)


@dataclass(frozen=True)
class CrossAttnEvidence:
    """The profiled relative step-to-step change of the cross-attention outputs, per timestep (highest first)."""

    changes: Mapping[float, float]


def predicted_gate(changes: Mapping[float, float], limit: float = CROSS_ATTN_LIMIT, step: float = GATE_STEP) -> float | None:
    """The gate: the first timestep, from the most noise down, whose change is within ``limit``, rounded down to
    a multiple of ``step`` (759 -> 750: that step still computes, and the cache starts on the steps below it);
    ``None`` when it never gets there or when fewer than two profiled timesteps lie below.  The rule is the CFG
    cut-off's (``cfg_lever.predicted_cutoff``), which also keeps the first profiled timestep above the gate, so
    the cache is always filled by a computed call before it replays.

    >>> predicted_gate({959.0: 0.6, 879.0: 0.15, 799.0: 0.08, 759.0: 0.05, 719.0: 0.06, 40.0: 0.04})
    750.0
    >>> predicted_gate({959.0: 0.6, 40.0: 0.2}) is None
    True
    """
    return predicted_cutoff(changes, limit, step)


@dataclass(frozen=True)
class CrossAttnCacheLever(BelowTimestepLever):
    """A planned gate (``timestep``): below it, cross-attention replays.

    >>> CrossAttnCacheLever.label(600.0), CrossAttnCacheLever(600.0).extend(Schedule()).cross_attn_cache
    ('cross-attention cached below t=600', 600.0)
    """

    name: ClassVar[str] = "cross_attn_cache"
    evidence: ClassVar[tuple[str, ...]] = ("cross_attn_changes",)

    @classmethod
    def label(cls, amount: Any, settings: Any = None) -> str:
        return f"cross-attention cached below t={amount:g}"

    @classmethod
    def predictor(cls, evidence: Any, model: nn.Module, settings: Any) -> CrossAttnEvidence | None:
        changes = getattr(evidence, "cross_attn_changes", None)
        return CrossAttnEvidence(dict(changes)) if changes else None  # not offered without a profiled change

    @classmethod
    def offers(cls, data: Any) -> bool:
        return isinstance(data, CrossAttnEvidence) and predicted_gate(data.changes) is not None
