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
import torch
import torch.nn as nn

from ..fragment.ff_pruning import select_ff_channels
from ..fragment.selection import Selection, select_heads
from ..fragment.store import apply_fragment, build_fragment
from ..metrics.memory import resident_weight_mb
from .measure import adherence, compare

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeverPoint:
    """One configuration: which levers, at what ratios (``None`` = off)."""

    lever: str
    heads: float = 0.0
    ff: float | None = None
    kv_fold: bool = False
    precision: str | None = None
    precision_ratio: float = 1.0

    @property
    def x(self) -> float:
        """The curve's x: the lever's own ratio (1.0 for the all-or-nothing K/V fold)."""
        if self.lever == "heads":
            return self.heads
        if self.lever == "ff":
            return self.ff or 0.0
        if self.lever in ("fp8", "int8"):
            return self.precision_ratio
        return 1.0


def default_points(ratios: Sequence[float] = (0.1, 0.3, 0.5)) -> list[LeverPoint]:
    """Heads and FF channels over ``ratios``; fp8 and int8 over twice those shares of the retained Linear
    parameters (capped at all of them); the K/V fold; and the two combinations issue #7 sets byte goals for.

    >>> [p.lever for p in default_points((0.3,))]
    ['heads', 'ff', 'fp8', 'int8', 'kv_fold', 'heads+kv+ff', 'heads+kv+ff+fp8']
    """
    points = [LeverPoint("heads", heads=r) for r in ratios]
    points += [LeverPoint("ff", ff=r) for r in ratios]
    points += [LeverPoint("fp8", precision="fp8", precision_ratio=min(1.0, 2 * r)) for r in ratios]
    points += [LeverPoint("int8", precision="int8", precision_ratio=min(1.0, 2 * r)) for r in ratios]
    points.append(LeverPoint("kv_fold", kv_fold=True))
    points.append(LeverPoint("heads+kv+ff", heads=0.3, ff=0.3, kv_fold=True))
    points.append(LeverPoint("heads+kv+ff+fp8", heads=0.3, ff=0.3, kv_fold=True, precision="fp8", precision_ratio=1.0))
    return points


def lever_curves(
    unet: nn.Module,
    *,
    base: Mapping[str, Any],
    head_scores: Mapping[str, torch.Tensor],
    protected: Any,
    ff_scores: Mapping[str, torch.Tensor],
    kv_context: torch.Tensor,
    seeds: Sequence[int],
    sampler: Callable[[nn.Module, Sequence[int]], np.ndarray],
    prompt: str,
    full_images: np.ndarray,
    lpips: Callable | None,
    points: Sequence[LeverPoint] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """``{lever: [{x, bytes_saved, adherence_delta, ssim_mean, lpips_mean, ...}, ...]}`` for every point.

    ``kv_context`` is the ``[rows, tokens, dim]`` context the sampler feeds (uncond
    and cond rows); ``full_images`` are the full model's images for ``seeds``.
    """
    base_adh = adherence(full_images, prompt)
    full_mb = resident_weight_mb(unet)
    out: dict[str, list[dict[str, Any]]] = {}
    for point in points or default_points():
        heads: Selection = select_heads(head_scores, ratio=point.heads, protected=protected)
        fragment = build_fragment(
            unet, heads, base=base, name=f"curve-{point.lever}",
            kv_context=kv_context if point.kv_fold else None,
            ff_selection=select_ff_channels(ff_scores, ratio=point.ff) if point.ff else None,
            precision=point.precision, precision_ratio=point.precision_ratio,
        )
        small = apply_fragment(unet, fragment, base_sha256=base["sha256"])
        record = {
            "x": point.x, "heads": point.heads, "ff": point.ff, "kv_fold": point.kv_fold,
            "precision": point.precision, "precision_ratio": point.precision_ratio if point.precision else None,
            "bytes_saved": 1.0 - resident_weight_mb(small) / full_mb,
            **compare(full_images, sampler(small, seeds), prompt, lpips, base_adh),
        }
        out.setdefault(point.lever, []).append(record)
        log.info("lever %s: %s", point.lever, record)
    return out
