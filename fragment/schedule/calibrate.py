"""Calibrating a schedule against the quality gate.

Plain search over candidates, each judged by a caller-given ``passes``
function (the reference bench renders images and applies the
``quality_gate`` limits): the most reuse that passes, then the earliest CFG
cut-off that passes with it.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

from ...profiling.step_change import reuse_steps_for_count
from .state import Schedule

log = logging.getLogger(__name__)


Judge = Callable[[Schedule], tuple[bool, dict[str, Any]]]


def calibrate_reuse(changes: Sequence[float | None], base: Schedule, passes: Judge,
                    fractions: Sequence[float] = (0.6, 0.5, 0.4, 0.3, 0.2)) -> tuple[Schedule, list[dict[str, Any]]]:
    """The schedule with the most reused steps (of ``fractions`` of the steps) that ``passes``; every try recorded.

    ``changes`` is ``StepChangeProbe.changes()`` for ``len(changes)`` steps. When
    nothing passes, ``base`` comes back unchanged (no reuse).

    >>> s, tries = calibrate_reuse([None, .3, .1, .1, .1, .1], Schedule(), lambda s: (len(s.reuse_steps) <= 2, {}))
    >>> s.reuse_steps, [t["reuse_steps"] for t in tries]
    ((2, 3), [[1, 2, 3], [2, 3]])
    """
    total = len(changes)
    tries: list[dict[str, Any]] = []
    seen: set[tuple[int, ...]] = set()
    for fraction in fractions:
        steps, budget = reuse_steps_for_count(list(changes), int(fraction * total))
        key = tuple(steps)
        if not steps or key in seen:
            continue
        seen.add(key)
        candidate = dataclasses.replace(base, reuse_steps=key, total_steps=total)
        ok, info = passes(candidate)
        tries.append({"fraction": fraction, "budget": round(budget, 5), "reuse_steps": list(key), "passed": ok, **info})
        log.info("step reuse: %d of %d steps reused (budget %.3f): %s", len(key), total, budget, "pass" if ok else "fail")
        if ok:
            return candidate, tries
    return base, tries


def calibrate_cfg_cutoff(base: Schedule, passes: Judge,
                         cutoffs: Sequence[float] = (500.0, 350.0, 200.0)) -> tuple[Schedule, list[dict[str, Any]]]:
    """The highest CFG cut-off (most steps without the uncond pass) of ``cutoffs`` that ``passes``.

    >>> s, tries = calibrate_cfg_cutoff(Schedule(), lambda s: (s.cfg_cutoff <= 350, {}))
    >>> s.cfg_cutoff, len(tries)
    (350.0, 2)
    """
    tries: list[dict[str, Any]] = []
    for cutoff in sorted(cutoffs, reverse=True):
        candidate = dataclasses.replace(base, cfg_cutoff=float(cutoff))
        ok, info = passes(candidate)
        tries.append({"cfg_cutoff": cutoff, "passed": ok, **info})
        log.info("CFG truncation below t=%.0f: %s", cutoff, "pass" if ok else "fail")
        if ok:
            return candidate, tries
    return base, tries
