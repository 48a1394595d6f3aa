"""Hypothesis H3 harness: how many paraphrases can reuse a fragment with quality inside the H2 bounds.

The harness is written against callables; ``reference.reuse.reference_reuse`` binds them to
the project's trained reference model (its text encoder, sampler and the
H2 fidelity metrics), and tests bind them to small stand-ins:

* ``embed(prompt) -> tensor``: the prompt embedding (pooled as in
  ``fragment.library.fingerprint.pool_conditioning``), used to report how close each
  paraphrase is to the fragment's own prompt and whether the library's
  lookup would pick the fragment for it;
* ``generate(model, prompt, seed) -> image tensor``;
* ``quality(full_image, fragment_image) -> {metric: value}``;
* ``bounds``: ``{metric: ("max" | "min", limit)}``, by default H2's
  ``lpips_mean <= 0.035`` and ``ssim_mean >= 0.90`` (thresholds.yaml).

A paraphrase passes when every bounded metric, averaged over the seeds,
stays within its bound.  ``reuse_pass_rate`` = passed / paraphrases.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import FragmentError
from ..fragment.library.fingerprint import cosine, normalise, pool_conditioning
from ..judge.limits import KINDS, Limit, check_limits

log = logging.getLogger(__name__)

Bounds = Mapping[str, tuple[str, float]]
H2_BOUNDS: dict[str, tuple[str, float]] = {"lpips_mean": ("max", 0.035), "ssim_mean": ("min", 0.90)}


@dataclass
class ParaphraseResult:
    """One paraphrase: mean metrics over seeds, similarity to the fragment's prompt, pass or fail and why."""

    prompt: str
    metrics: dict[str, float]
    similarity: float | None
    passed: bool
    failures: list[str] = field(default_factory=list)


@dataclass
class ReuseReport:
    """The H3 measurement: pass rate over paraphrases, and every paraphrase's result."""

    pass_rate: float
    passed: int
    paraphrases: int
    seeds: list[int]
    bounds: dict[str, tuple[str, float]]
    results: list[ParaphraseResult]


def h2_bounds(thresholds: Mapping[str, Any] | None = None) -> dict[str, tuple[str, float]]:
    """H2's quality bounds from a parsed thresholds.yaml (``hypotheses.H2``), or the defaults.

    >>> h2_bounds({"hypotheses": {"H2": {"lpips_max": 0.05, "ssim_min": 0.8}}})
    {'lpips_mean': ('max', 0.05), 'ssim_mean': ('min', 0.8)}
    """
    h2 = ((thresholds or {}).get("hypotheses") or {}).get("H2") or {}
    return {
        "lpips_mean": ("max", float(h2.get("lpips_max", H2_BOUNDS["lpips_mean"][1]))),
        "ssim_mean": ("min", float(h2.get("ssim_min", H2_BOUNDS["ssim_mean"][1]))),
    }


def bounds_limits(bounds: Bounds) -> list[Limit]:
    """``{metric: (kind, limit)}`` bounds as ``Limit`` objects for ``limits.check_limits``.

    >>> bounds_limits({"ssim_mean": ("min", 0.9)})
    [Limit(metric='ssim_mean', bound=0.9, kind='min', margin=0.0)]
    >>> bounds_limits({"ssim_mean": ("above", 0.9)})
    Traceback (most recent call last):
    ...
    prompt_fragments.errors.FragmentError: bounds['ssim_mean']: expected 'max' or 'min', found 'above'
    """
    for name, (kind, _) in bounds.items():
        if kind not in KINDS:  # say "bounds", the caller's word, rather than Limit's own message
            raise FragmentError(f"bounds[{name!r}]: expected 'max' or 'min', found {kind!r}")
    return [Limit(name, limit, kind) for name, (kind, limit) in bounds.items()]


def within_bounds(metrics: Mapping[str, float], bounds: Bounds) -> list[str]:
    """The bounds ``metrics`` breaks, as readable strings (empty: within bounds; a missing or NaN metric fails).

    >>> within_bounds({"lpips_mean": 0.02, "ssim_mean": 0.85}, H2_BOUNDS)
    ['ssim_mean: expected >= 0.9, found 0.85']
    >>> within_bounds({"ssim_mean": float("nan")}, H2_BOUNDS)
    ['lpips_mean: expected a measured value, found None', 'ssim_mean: expected a measured value, found nan']
    """
    out = []
    for verdict in check_limits(metrics, bounds_limits(bounds)):
        name, limit = verdict.limit.metric, bounds[verdict.limit.metric][1]
        if verdict.status == "MISSING":
            out.append(f"{name}: expected a measured value, found {verdict.found!r}")
        elif not verdict.passed:
            op = "<=" if verdict.limit.kind == "max" else ">="
            out.append(f"{name}: expected {op} {limit}, found {verdict.value:.4g}")
    return out


def measure_reuse(
    full_model: Any,
    fragment_model: Any,
    paraphrases: Sequence[str],
    *,
    seeds: Sequence[int],
    generate: Callable[[Any, str, int], torch.Tensor],
    quality: Callable[[torch.Tensor, torch.Tensor], Mapping[str, float]],
    bounds: Bounds = H2_BOUNDS,
    embed: Callable[[str], torch.Tensor] | None = None,
    fragment_prompt: str | None = None,
) -> ReuseReport:
    """Generate every paraphrase x seed with both models, score the pairs, and count paraphrases within bounds.

    >>> gen = lambda model, prompt, seed: torch.full((1, 2, 2), float(model) + seed)
    >>> drift = lambda a, b: {"drift": float((a - b).abs().max())}
    >>> r = measure_reuse(0.0, 0.1, ["a dog", "a puppy"], seeds=[1, 2], generate=gen, quality=drift,
    ...                   bounds={"drift": ("max", 0.2)})
    >>> r.pass_rate, r.passed, r.paraphrases
    (1.0, 2, 2)
    """
    if not paraphrases or not seeds:
        raise FragmentError(f"reuse: expected at least one paraphrase and one seed, found {len(paraphrases)} and {len(seeds)}")
    anchor = _embedding(embed(fragment_prompt)) if embed is not None and fragment_prompt else None
    results: list[ParaphraseResult] = []
    for prompt in paraphrases:
        per_seed: dict[str, list[float]] = {}
        for seed in seeds:
            full = generate(full_model, prompt, seed)
            frag = generate(fragment_model, prompt, seed)
            for name, value in quality(full, frag).items():
                per_seed.setdefault(name, []).append(float(value))
        metrics = {name: sum(v) / len(v) for name, v in per_seed.items()}
        similarity = cosine(anchor, _embedding(embed(prompt))) if anchor is not None and embed is not None else None
        failures = within_bounds(metrics, bounds)
        results.append(ParaphraseResult(prompt, metrics, similarity, not failures, failures))
        log.info("reuse: %r %s %s", prompt, "PASS" if not failures else "FAIL", "; ".join(failures))
    passed = sum(r.passed for r in results)
    return ReuseReport(passed / len(results), passed, len(results), [int(s) for s in seeds],
                       {k: (str(v[0]), float(v[1])) for k, v in bounds.items()}, results)


def _embedding(value: torch.Tensor) -> torch.Tensor:
    """An ``embed`` result: already pooled (1-D) or token states to pool like the library does."""
    return normalise(value) if value.ndim == 1 else pool_conditioning(value)


def reuse_block(report: ReuseReport, *, stand_in: bool, note: str = "") -> dict[str, Any]:
    """The manifest ``reuse`` block for a report (``record_measurements(reuse=...)`` merges it).

    >>> rep = ReuseReport(0.5, 1, 2, [1], {"drift": ("max", 0.2)}, [])
    >>> b = reuse_block(rep, stand_in=True); b["h3"]["pass_rate"], b["reuse_pass_rate"], b["h3"]["stand_in"]
    (0.5, 0.5, True)
    """
    return {
        "reuse_pass_rate": report.pass_rate,
        "h3": {
            "pass_rate": report.pass_rate,
            "passed": report.passed,
            "paraphrases": report.paraphrases,
            "seeds": report.seeds,
            "bounds": {k: [v[0], v[1]] for k, v in report.bounds.items()},
            "stand_in": stand_in,
            "note": note,
            "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "results": [
                {"prompt": r.prompt, "passed": r.passed, "metrics": r.metrics, "similarity": r.similarity}
                for r in report.results
            ],
        },
    }


def relative_drift(full: torch.Tensor, fragment: torch.Tensor) -> dict[str, float]:
    """Stand-in quality for random-weight models: relative L2 distance of the fragment's output to the full one's.

    >>> relative_drift(torch.ones(4), torch.ones(4))
    {'relative_drift': 0.0}
    """
    denom = float(full.float().norm()) or 1e-12
    return {"relative_drift": float((full.float() - fragment.float()).norm()) / denom}
