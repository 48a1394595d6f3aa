"""Quality of each lever on the reference model (issue #7): heads, FF channels, K/V folding, precision, combined.

Every point is a real fragment, built by ``build_fragment`` with that lever
alone (or the combination), applied with ``apply_fragment``, and sampled on
the same seeds as the full model; it records the resident weight bytes saved
and the same quality numbers as the demo (adherence drop, SSIM, LPIPS).
Heads are selected from the head profile, FF channels from the FF profile,
precision layers by quantization error, as the extractor does.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch.nn as nn

from ..fragment.build import apply_fragment, build_fragment
from ..fragment.extract import plan_levers
from ..fragment.settings import ExtractionSettings, lever_settings
from ..profiling.evidence import ProfileEvidence
from ..metrics.memory import resident_weight_mb
from .measure import adherence, compare

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeverPoint:
    """One configuration: the curve it belongs to (``lever``) and the settings that turn its levers on."""

    lever: str
    settings: ExtractionSettings

    @property
    def x(self) -> float:
        """The curve's x: the lever's own ratio (1.0 for the all-or-nothing K/V fold).

        >>> LeverPoint("ff", lever_settings(ff=0.3)).x
        0.3
        """
        if self.lever in ("heads", "ff"):
            return self.settings.amount(self.lever)
        if self.lever in ("fp8", "int8"):
            return self.settings.amount("precision")
        return 1.0


def default_points(ratios: Sequence[float] = (0.1, 0.3, 0.5)) -> list[LeverPoint]:
    """Heads and FF channels over ``ratios``; fp8 and int8 over twice those shares of the retained Linear
    parameters (capped at all of them); the K/V fold; and the two combinations issue #7 sets byte goals for.

    >>> [p.lever for p in default_points((0.3,))]
    ['heads', 'ff', 'fp8', 'int8', 'kv_fold', 'heads+kv+ff', 'heads+kv+ff+fp8']
    """
    points = [LeverPoint("heads", lever_settings(heads=r)) for r in ratios]
    points += [LeverPoint("ff", lever_settings(ff=r)) for r in ratios]
    points += [LeverPoint(fmt, lever_settings(precision=fmt, precision_ratio=min(1.0, 2 * r))) for fmt in ("fp8", "int8") for r in ratios]
    points.append(LeverPoint("kv_fold", lever_settings(kv_fold=True)))
    points.append(LeverPoint("heads+kv+ff", lever_settings(heads=0.3, kv_fold=True, ff=0.3)))
    points.append(LeverPoint("heads+kv+ff+fp8", lever_settings(heads=0.3, kv_fold=True, ff=0.3, precision="fp8")))
    return points


def lever_curves(
    unet: nn.Module,
    evidence: ProfileEvidence,
    *,
    base: Mapping[str, Any],
    seeds: Sequence[int],
    sampler: Callable[[nn.Module, Sequence[int]], np.ndarray],
    prompt: str,
    full_images: np.ndarray,
    lpips: Callable | None,
    points: Sequence[LeverPoint] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """``{lever: [{x, bytes_saved, adherence_delta, ssim_mean, lpips_mean, ...}, ...]}`` for every point.

    ``evidence.kv_context`` is the ``[rows, tokens, dim]`` context the sampler feeds (uncond
    and cond rows); ``full_images`` are the full model's images for ``seeds``.
    """
    base_adh = adherence(full_images, prompt)
    full_mb = resident_weight_mb(unet)
    out: dict[str, list[dict[str, Any]]] = {}
    for point in points or default_points():
        settings = point.settings
        levers = plan_levers(evidence, settings, model=unet, name=f"curve-{point.lever}")
        fragment = build_fragment(unet, levers, base=base, name=f"curve-{point.lever}")
        small = apply_fragment(unet, fragment, base_sha256=base["sha256"])
        record = {
            "x": point.x, "heads": settings.amount("heads"), "ff": settings.amount("ff") or None,
            "kv_fold": settings.amount("kv_fold"),
            "precision": settings.precision_format if settings.on("precision") else None,
            "precision_ratio": settings.amount("precision") if settings.on("precision") else None,
            "bytes_saved": 1.0 - resident_weight_mb(small) / full_mb,
            **compare(full_images, sampler(small, seeds), prompt, lpips, base_adh),
        }
        out.setdefault(point.lever, []).append(record)
        log.info("lever %s: %s", point.lever, record)
    return out
