"""Hypotheses H1–H5 judged against ``thresholds.yaml``: PASS, WARN, FAIL or MISSING.

The measured values are one flat dict (the ``metrics`` block of
``metrics_summary.json``), e.g. ``{"pruned_head_pct": 0.31, "lpips_mean": 0.02, ...}``.
Each hypothesis is a list of checks on those keys (seed 002 "Success Metrics"):

- H1 head pruning: ``pruned_head_pct`` ≥ 0.30, ``clip_drop_rel`` ≤ 0.02,
  ``lpips_mean`` ≤ 0.03, ``adherence_delta`` ≤ 0.02
- H2 memory vs quality: ``peak_memory_reduction`` ≥ 0.25, ``lpips_mean`` ≤ 0.035, ``ssim_mean`` ≥ 0.90,
  where the memory figure is ``vram_reduction`` (peak VRAM on CUDA) when the run measured it, else
  ``peak_tensor_reduction`` (peak live tensor bytes incl. activations, any device: ``metrics.tensor_memory``);
  the H2 record names which one in ``memory_source`` and ``memory_judged_on``
- H3 reuse: ``reuse_pass_rate`` ≥ 0.80
- H4 throughput: ``batch_speedup`` ≥ 1.7 measured over ``batch_variants`` ≥ 32 images
- H5 amortisation: ``break_even_variants`` ≤ 10 (``break_even_never`` = the fragment is not faster: FAIL)

A check meeting its target is PASS; missing it by at most ``warn_margin``
(relative to the target) is WARN; worse is FAIL.  A value that was not
measured (absent, ``None``, NaN or ±inf) is MISSING, never guessed, and makes
the run INVALID.  Every check here, and the quality gate, is ``judge.limits.judge``:
the one rule for missing values lives there.  The limits come from
``judge.thresholds.load_thresholds``; the quality gate itself is ``judge.gate``.
"""
from __future__ import annotations

from typing import Any, Mapping

from ..judge.limits import Limit, judge
from ..judge.thresholds import HYPOTHESES

ORDER = {"PASS": 0, "WARN": 1, "FAIL": 2, "MISSING": 3}
# H2's memory figure, best first: the CUDA allocator's peak when there is one, else the CPU-measurable peak
# of live tensor bytes.  Never the other way round, and never silently: the summary says which was used.
H2_MEMORY_SOURCES: tuple[tuple[str, str], ...] = (
    ("vram_reduction", "peak VRAM (CUDA, torch.cuda.max_memory_allocated)"),
    ("peak_tensor_reduction", "peak_tensor_bytes (CPU, live tensors incl. activations), not VRAM"),
)


def measured(value: Any) -> bool:
    """A finite number (not None, NaN, ±inf or a bool): what counts as measured.

    >>> measured(0.3), measured(None), measured(float("nan"))
    (True, False, False)
    """
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) != float("inf")


def memory_figure(metrics: Mapping[str, Any]) -> tuple[str | None, float | None]:
    """H2's memory reduction and the metric it came from: ``vram_reduction`` when measured, else ``peak_tensor_reduction``.

    >>> memory_figure({"vram_reduction": 0.3, "peak_tensor_reduction": 0.4})
    ('vram_reduction', 0.3)
    >>> memory_figure({"vram_reduction": None, "peak_tensor_reduction": 0.4})
    ('peak_tensor_reduction', 0.4)
    >>> memory_figure({})
    (None, None)
    """
    for key, _ in H2_MEMORY_SOURCES:
        if measured(metrics.get(key)):
            return key, float(metrics[key])
    return None, None


def memory_judged_on(source: str | None) -> str:
    """The sentence a summary prints about H2's memory figure.

    >>> memory_judged_on("peak_tensor_reduction")
    'H2 judged on peak_tensor_bytes (CPU, live tensors incl. activations), not VRAM'
    >>> memory_judged_on(None)
    'H2 memory not measured: neither peak VRAM (CUDA) nor peak_tensor_bytes (CPU) was measured'
    """
    if source is None:
        return "H2 memory not measured: neither peak VRAM (CUDA) nor peak_tensor_bytes (CPU) was measured"
    return f"H2 judged on {dict(H2_MEMORY_SOURCES)[source]}"


def check(value: float | None, limit: float, kind: str, margin: float) -> str:
    """One check's status; ``kind`` is ``"min"`` (value must reach limit) or ``"max"``; unmeasured is MISSING.

    >>> check(0.28, 0.30, "min", 0.1), check(0.31, 0.30, "min", 0.1), check(0.2, 0.30, "min", 0.1), check(None, 1, "max", 0.1)
    ('WARN', 'PASS', 'FAIL', 'MISSING')
    >>> check(float("nan"), 1, "max", 0.1)
    'MISSING'
    """
    return judge(value, Limit("value", limit, kind, margin)).status


def evaluate_hypotheses(metrics: Mapping[str, Any], thresholds: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """H1–H5 records: each measured value, its limit, per-check status and the hypothesis status (worst check).

    >>> t = {"hypotheses": {"H5": {"break_even_max_variants": 10}}}  # as judge.thresholds.validate_thresholds returns it
    >>> evaluate_hypotheses({"break_even_variants": 9.2}, t)["H5"]["status"]
    'PASS'
    >>> evaluate_hypotheses({"break_even_variants": None, "break_even_never": True}, t)["H5"]["status"]
    'FAIL'
    >>> h2 = {"hypotheses": {"H2": {"peak_memory_reduction_min": 0.25}}}
    >>> r = evaluate_hypotheses({"peak_tensor_reduction": 0.3}, h2)["H2"]
    >>> r["status"], r["memory_source"]
    ('PASS', 'peak_tensor_reduction')
    """
    margin = float(thresholds.get("warn_margin", 0.1))
    out: dict[str, dict[str, Any]] = {}
    for name, limits in thresholds.get("hypotheses", {}).items():
        record: dict[str, Any] = {"checks": {}}
        for key, limit_key, kind in HYPOTHESES[name]:
            if limit_key not in limits:
                continue
            value = metrics.get(key)
            if key == "peak_memory_reduction":  # derived: the best memory figure the run measured
                source, value = memory_figure(metrics)
                record["memory_source"], record["memory_judged_on"] = source, memory_judged_on(source)
            status = check(value, limits[limit_key], kind, margin)
            if key == "break_even_variants" and value is None and metrics.get("break_even_never"):
                status = "FAIL"  # measured: the fragment is not faster, so it never pays back
            record[key] = value
            record["checks"][key] = {"limit": limits[limit_key], "kind": kind, "status": status}
        statuses = [c["status"] for c in record["checks"].values()]
        record["status"] = max(statuses, key=ORDER.__getitem__) if statuses else "MISSING"
        out[name] = record
    return out


def run_status(hypotheses: Mapping[str, Mapping[str, Any]]) -> str:
    """INVALID if anything is MISSING, else the worst of PASS/WARN/FAIL.

    >>> run_status({"H1": {"status": "PASS"}, "H2": {"status": "WARN"}}), run_status({"H3": {"status": "MISSING"}})
    ('WARN', 'INVALID')
    """
    statuses = [h["status"] for h in hypotheses.values()]
    if not statuses or "MISSING" in statuses:
        return "INVALID"
    return max(statuses, key=ORDER.__getitem__)


def missing_metrics(hypotheses: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Every metric a hypothesis needed but the run did not measure, as ``"H2.peak_memory_reduction"``.

    >>> missing_metrics({"H2": {"checks": {"peak_memory_reduction": {"status": "MISSING"}}}})
    ['H2.peak_memory_reduction']
    """
    return [f"{h}.{k}" for h, rec in hypotheses.items() for k, c in rec.get("checks", {}).items() if c["status"] == "MISSING"]
