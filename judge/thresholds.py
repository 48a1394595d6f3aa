"""Reading ``thresholds.yaml``: the quality gate's limits, the H1–H5 hypotheses' limits and the regression rules.

One reader for every user of the file (the demo, the benches, the nodes' judge,
the report and its regression gate); the shipped file's path is
``defaults.DEFAULT_THRESHOLDS``.  ``HYPOTHESES`` is the file's schema for the
``hypotheses`` block: which measured metric each limit bounds, and how
(``metrics.hypotheses`` judges them).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import FragmentError

HYPOTHESES = {
    "H1": [("pruned_head_pct", "pruned_head_pct_min", "min"), ("clip_drop_rel", "clip_drop_rel_max", "max"),
           ("lpips_mean", "lpips_max", "max"), ("adherence_delta", "adherence_delta_max", "max")],
    "H2": [("peak_memory_reduction", "peak_memory_reduction_min", "min"), ("lpips_mean", "lpips_max", "max"),
           ("ssim_mean", "ssim_min", "min")],
    "H3": [("reuse_pass_rate", "reuse_pass_rate_min", "min")],
    "H4": [("batch_speedup", "batch_speedup_min", "min"), ("batch_variants", "variants", "min")],
    "H5": [("break_even_variants", "break_even_max_variants", "max")],
}
LEGACY_LIMITS = {"vram_reduction_min": "peak_memory_reduction_min"}  # thresholds files written before the CPU figure


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FragmentError(f"{where}: expected a number, found {value!r}")
    return float(value)


def validate_thresholds(data: Any, source: str = "thresholds") -> dict[str, Any]:
    """Check a parsed thresholds document; return it with defaults filled in.

    >>> validate_thresholds({"hypotheses": {"H5": {"break_even_max_variants": "ten"}}}, "t.yaml")
    Traceback (most recent call last):
    ...
    prompt_fragments.errors.FragmentError: t.yaml: hypotheses.H5.break_even_max_variants: expected a number, found 'ten'
    >>> validate_thresholds({"quality_gate": {"lpips_max": 0.035, "lpips_p90_max": 0.01}}, "t.yaml")
    Traceback (most recent call last):
    ...
    prompt_fragments.errors.FragmentError: t.yaml: quality_gate.lpips_p90_max: expected a number >= lpips_max (0.035), found 0.01
    """
    if not isinstance(data, dict):
        raise FragmentError(f"{source}: expected a mapping at the top level, found {type(data).__name__}")
    out = {"warn_margin": _number(data.get("warn_margin", 0.1), f"{source}: warn_margin"),
           "hypotheses": {}, "regression": {}}
    hyps = data.get("hypotheses", {}) or {}
    if not isinstance(hyps, dict):
        raise FragmentError(f"{source}: hypotheses: expected a mapping, found {type(hyps).__name__}")
    for name, limits in hyps.items():
        if name not in HYPOTHESES:
            raise FragmentError(f"{source}: hypotheses: expected one of {sorted(HYPOTHESES)}, found {name!r}")
        if not isinstance(limits, dict):
            raise FragmentError(f"{source}: hypotheses.{name}: expected a mapping, found {type(limits).__name__}")
        out["hypotheses"][name] = {LEGACY_LIMITS.get(k, k): _number(v, f"{source}: hypotheses.{name}.{k}")
                                   for k, v in limits.items()}
    gate = data.get("quality_gate", {}) or {}
    if not isinstance(gate, dict):
        raise FragmentError(f"{source}: quality_gate: expected a mapping, found {type(gate).__name__}")
    out["quality_gate"] = {k: _number(v, f"{source}: quality_gate.{k}") for k, v in gate.items()}
    tail = out["quality_gate"].get("lpips_p90_max")
    # a 90th percentile is at least the typical image: a tail bound under the mean's bound would gate the mean twice
    if tail is not None and not tail >= out["quality_gate"].get("lpips_max", 0.0):
        raise FragmentError(f"{source}: quality_gate.lpips_p90_max: expected a number >= lpips_max "
                            f"({out['quality_gate'].get('lpips_max', 0.0)!r}), found {tail!r}")
    reg = data.get("regression", {}) or {}
    if not isinstance(reg, dict):
        raise FragmentError(f"{source}: regression: expected a mapping, found {type(reg).__name__}")
    allowed = {"max_increase", "max_decrease", "max_increase_rel", "max_decrease_rel"}
    for metric, rule in reg.items():
        if not isinstance(rule, dict) or len(rule) != 1 or next(iter(rule)) not in allowed:
            raise FragmentError(f"{source}: regression.{metric}: expected one of {sorted(allowed)} with a number, found {rule!r}")
        kind, limit = next(iter(rule.items()))
        out["regression"][metric] = {kind: _number(limit, f"{source}: regression.{metric}.{kind}")}
    return out


def load_thresholds(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a ``thresholds.yaml``.

    >>> load_thresholds("/nonexistent.yaml")
    Traceback (most recent call last):
    ...
    prompt_fragments.errors.FragmentError: /nonexistent.yaml: thresholds file not found
    """
    path = Path(path)
    if not path.is_file():
        raise FragmentError(f"{path}: thresholds file not found")
    try:
        import yaml
    except ImportError as exc:
        raise FragmentError("thresholds need pyyaml; run `pip install prompt-fragments[metrics]`") from exc
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise FragmentError(f"{path}: not valid YAML: {exc}") from exc
    return validate_thresholds(data, str(path))
