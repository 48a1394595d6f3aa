"""Paired timing: several methods timed interleaved, so that a load that changes during a run cannot fool the ratio.

Timing stock once and a method later compares two moments of the machine as
much as two methods: on a shared machine one run reported 2.05x raw for a
fragment that paired timing puts at 1.53x.  Here each *unit* renders the same
seeds with every method back to back, and the ratio reference / method is
taken within the unit, where the load was about the same for both.  The
order rotates per unit (unit k starts at method k mod m), so no method is
always the first after a pause or the last before one.  The median of the
per-unit ratios is the figure; its range (min, max) says how much the load
moved it.
"""
from __future__ import annotations

import logging
import statistics
import time
from typing import Any, Callable, Mapping

import torch

from ..errors import FragmentError

log = logging.getLogger(__name__)


def rotated_order(names: list[str], unit: int) -> list[str]:
    """The order unit ``unit`` runs ``names`` in: starting at ``names[unit % len(names)]``, then on, wrapping.

    >>> rotated_order(["stock", "a", "b"], 4)
    ['a', 'b', 'stock']
    """
    if not names:
        raise FragmentError("bench.paired rotated_order: expected at least one method name, found none")
    k = unit % len(names)
    return names[k:] + names[:k]


def paired_timing(methods: Mapping[str, Callable[[], Any]], units: int = 3, *, reference: str = "stock",
                  clock: Callable[[], float] = time.perf_counter,
                  sync: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Time ``methods`` (name -> a call that renders the same seeds) in ``units`` paired units; a JSON-ready record.

    Each unit calls every method once, in ``rotated_order``; ``sync`` runs before the clock is read on either side of
    a call (``metrics.performance.synchronize`` on a device that queues work).  The record has ``units``,
    ``reference``, ``order`` (the names per unit, as run), ``seconds`` (per method, per unit), ``ratios`` (per
    method, per unit: the reference's seconds / the method's, in the same unit), ``median`` (per method, the median
    ratio) and ``range`` (per method, ``[min, max]`` of its ratios).

    >>> now = [0.0]
    >>> def takes(s): return lambda: now.__setitem__(0, now[0] + s)
    >>> t = paired_timing({"stock": takes(2.0), "fast": takes(1.0)}, units=3, clock=lambda: now[0])
    >>> t["median"]["fast"], t["range"]["fast"], t["order"][1]
    (2.0, [2.0, 2.0], ['fast', 'stock'])
    """
    names = list(methods)
    if not isinstance(units, int) or isinstance(units, bool) or units < 1:
        raise FragmentError(f"bench.paired paired_timing units: expected an integer >= 1, found {units!r}")
    if not names:
        raise FragmentError("bench.paired paired_timing methods: expected at least one method, found none")
    if reference not in methods:
        raise FragmentError(f"bench.paired paired_timing reference: expected one of the methods "
                            f"({', '.join(names)}), found {reference!r}")
    seconds: dict[str, list[float]] = {name: [] for name in names}
    order: list[list[str]] = []
    for unit in range(units):
        order.append(rotated_order(names, unit))
        for name in order[-1]:
            sync()
            started = clock()
            with torch.no_grad():  # a render needs no autograd graph; a method that built one would pay for it
                methods[name]()
            sync()
            elapsed = clock() - started
            if elapsed <= 0:
                raise FragmentError(f"bench.paired paired_timing method {name!r}, unit {unit}: expected a positive "
                                    f"duration from the clock, found {elapsed!r} s")
            seconds[name].append(float(elapsed))
    ratios = {name: [ref / s for ref, s in zip(seconds[reference], seconds[name])] for name in names}
    median = {name: float(statistics.median(r)) for name, r in ratios.items()}
    spread = {name: [min(r), max(r)] for name, r in ratios.items()}
    for name in names:
        if name != reference:
            log.info("paired timing %s: %.2fx (median of %d units, range %.2f-%.2fx)", name, median[name], units,
                     *spread[name])
    return {"units": units, "reference": reference, "order": order, "seconds": seconds, "ratios": ratios,
            "median": median, "range": spread}
