"""``prompt-fragments report --compare latest --gate thresholds.yaml``: the regression gate.

Picks the run to check (default: the newest report) and its baseline
(default ``latest``: the report just before it; ``latest-valid`` skips
INVALID runs), compares their ``metrics`` with the ``regression`` rules,
rewrites the run's ``regression_diff.json`` and prints one line per
regression: which metric moved, from what to what, and the limit.

Exit status: 0 when nothing regressed, 1 on a regression (or, with
``require_valid``, when the checked run is INVALID); FragmentError (exit 2
from the CLI) when a report or the thresholds file cannot be found.
"""
from __future__ import annotations

import json
import logging
import os

from ..defaults import DEFAULT_THRESHOLDS
from ..judge.thresholds import load_thresholds
from .regression import format_regressions, read_summary, regression_diff, resolve_report

log = logging.getLogger(__name__)


def run_gate(
    reports_dir: str | os.PathLike,
    *,
    run: str = "latest",
    compare: str = "latest",
    gate: str | os.PathLike | None = None,
    require_valid: bool = False,
) -> int:
    """Compare, print and return the exit status (0 pass, 1 regression).

    >>> run_gate("reports", compare="latest", gate="thresholds.yaml")  # doctest: +SKIP
    0
    """
    thresholds = load_thresholds(gate if gate is not None else DEFAULT_THRESHOLDS)
    current_dir = resolve_report(run, reports_dir)
    baseline_dir = resolve_report(compare, reports_dir, before=current_dir)
    current, baseline = read_summary(current_dir), read_summary(baseline_dir)
    diff = regression_diff(current, baseline, thresholds, baseline_id=baseline_dir.name)
    (current_dir / "regression_diff.json").write_text(json.dumps(diff, indent=2, default=str))
    print(f"run {current_dir.name} ({current.get('status')}) vs baseline {baseline_dir.name} ({baseline.get('status')}): "
          f"{len(diff['rows'])} metrics compared, {len(diff['regressions'])} regressed")
    if diff["regressions"]:
        print(format_regressions(diff))
    status = 1 if diff["regressions"] else 0
    if current.get("status") == "INVALID":
        print(f"note: run {current_dir.name} is INVALID (not measured: {', '.join(current.get('missing', [])) or '?'}); "
              "it must not become a baseline")
        if require_valid:
            status = 1
    return status
