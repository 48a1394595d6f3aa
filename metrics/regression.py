"""Compare a report with a baseline report and decide whether the change is a regression.

Each rule in ``thresholds.yaml``'s ``regression`` block names a metric and
how far it may move in its bad direction (seed 003 "Regression Detection
Logic")::

    lpips_mean: {max_increase: 0.01}          # absolute
    batch_speedup: {max_decrease_rel: 0.15}   # fraction of the baseline value

A metric the baseline had but the current run lost is a regression too: a
gate that silently skips missing numbers would pass a broken run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from ..errors import FragmentError

SUMMARY = "metrics_summary.json"


def compare_metrics(current: Mapping[str, Any], baseline: Mapping[str, Any], rules: Mapping[str, Mapping[str, float]]) -> list[dict[str, Any]]:
    """One record per rule: baseline, current, delta, the limit and whether it regressed.

    >>> rows = compare_metrics({"lpips_mean": 0.05}, {"lpips_mean": 0.02}, {"lpips_mean": {"max_increase": 0.01}})
    >>> rows[0]["regressed"], round(rows[0]["delta"], 3)
    (True, 0.03)
    """
    rows = []
    for metric, rule in rules.items():
        kind, limit = next(iter(rule.items()))
        base, cur = baseline.get(metric), current.get(metric)
        row: dict[str, Any] = {"metric": metric, "baseline": base, "current": cur, "rule": kind, "limit": limit}
        if base is None:
            row.update(delta=None, regressed=False, note="not in baseline")
        elif cur is None:
            row.update(delta=None, regressed=True, note="missing in current run")
        else:
            delta = float(cur) - float(base)
            rel = delta / abs(float(base)) if float(base) != 0 else None
            if kind == "max_increase":
                bad = delta > limit
            elif kind == "max_decrease":
                bad = -delta > limit
            elif kind == "max_increase_rel":
                bad = rel is not None and rel > limit
            else:  # max_decrease_rel
                bad = rel is not None and -rel > limit
            row.update(delta=delta, delta_rel=rel, regressed=bool(bad))
        rows.append(row)
    return rows


def regression_diff(current: Mapping[str, Any], baseline: Mapping[str, Any] | None, thresholds: Mapping[str, Any],
                    baseline_id: str | None = None) -> dict[str, Any]:
    """The ``regression_diff.json`` document for two ``metrics_summary`` documents (baseline may be ``None``).

    >>> regression_diff({"run_id": "b", "metrics": {}}, None, {"regression": {}})["regressions"]
    []
    """
    if baseline is None:
        return {"run_id": current.get("run_id"), "baseline": None, "rows": [], "regressions": [],
                "note": "no baseline report to compare with"}
    rows = compare_metrics(current.get("metrics", {}), baseline.get("metrics", {}), thresholds.get("regression", {}))
    return {"run_id": current.get("run_id"), "baseline": baseline_id or baseline.get("run_id"),
            "baseline_status": baseline.get("status"), "current_status": current.get("status"),
            "rows": rows, "regressions": [r for r in rows if r["regressed"]]}


def format_regressions(diff: Mapping[str, Any]) -> str:
    """Readable lines: which metric moved, by how much, against which limit.

    >>> print(format_regressions({"regressions": [{"metric": "lpips_mean", "baseline": 0.02, "current": 0.05,
    ...       "delta": 0.03, "rule": "max_increase", "limit": 0.01}]}))
    REGRESSION lpips_mean: 0.02 -> 0.05 (delta +0.03; max_increase 0.01)
    """
    lines = []
    for r in diff.get("regressions", []):
        if r.get("delta") is None:
            lines.append(f"REGRESSION {r['metric']}: {r['baseline']} -> missing ({r.get('note', '')})")
        else:
            rel = r.get("delta_rel")
            rel_s = f", {rel:+.1%}" if rel is not None and r["rule"].endswith("_rel") else ""
            lines.append(f"REGRESSION {r['metric']}: {r['baseline']:.4g} -> {r['current']:.4g} "
                         f"(delta {r['delta']:+.4g}{rel_s}; {r['rule']} {r['limit']:.4g})")
    return "\n".join(lines)


def list_reports(base: str | os.PathLike) -> list[Path]:
    """Report folders under ``base`` that hold a summary, oldest first (run ids sort by time).

    >>> list_reports("/nonexistent")
    []
    """
    base = Path(base)
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if p.is_dir() and (p / SUMMARY).is_file())


def read_summary(report_dir: str | os.PathLike) -> dict[str, Any]:
    """Parse ``<report_dir>/metrics_summary.json``."""
    path = Path(report_dir) / SUMMARY
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FragmentError(f"{path}: expected a metrics summary, found no file") from None
    except ValueError as exc:
        raise FragmentError(f"{path}: not valid JSON: {exc}") from exc


def resolve_report(spec: str, base: str | os.PathLike, *, before: Path | None = None) -> Path:
    """A report folder from ``spec``: a path, a run id under ``base``, ``latest`` (newest report older
    than ``before``, when given) or ``latest-valid`` (the same, skipping INVALID runs, which never become baselines).

    >>> resolve_report("latest", "/nonexistent")
    Traceback (most recent call last):
    ...
    prompt_fragments.errors.FragmentError: /nonexistent: expected a report folder for 'latest', found none
    """
    base = Path(base)
    if spec in ("latest", "latest-valid"):
        candidates = [p for p in list_reports(base) if before is None or (p.resolve() != before.resolve() and p.name < before.name)]
        if spec == "latest-valid":
            candidates = [p for p in candidates if read_summary(p).get("status") != "INVALID"]
        if not candidates:
            raise FragmentError(f"{base}: expected a report folder for {spec!r}, found none")
        return candidates[-1]
    for path in (Path(spec), base / spec):
        if (path / SUMMARY).is_file():
            return path
    raise FragmentError(f"report {spec!r}: expected a folder with {SUMMARY} (as a path or under {base}), found none")
