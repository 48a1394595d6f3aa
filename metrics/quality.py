"""The quality block: full-model images against fragment images, plus prompt adherence.

Pluggable scorers, all plain callables:

- ``clip(images, captions) -> [similarity]`` (see ``clip_score.clip_scorer``);
- ``lpips(a, b) -> [distance]`` (see ``judge.image_similarity.lpips_scorer``);
- ``adherence(images, captions) -> [score in 0..1]``: how well each image
  follows its caption, judged by a reference model.  That analyzer is another
  issue; until it is plugged in, adherence is *missing*, and a missing metric
  makes the report INVALID rather than being replaced by a made-up number.

SSIM and pHash need no model and are always computed.
"""
from __future__ import annotations

import logging
import statistics
from typing import Any, Callable, Protocol, Sequence

from ..judge.gate import image_tails
from ..judge.image_similarity import as_batch, phash_distance, ssim
from ..judge.limits import Limit, failures

log = logging.getLogger(__name__)

PairScorer = Callable[[Any, Any], Sequence[float]]


class AdherenceScorer(Protocol):
    """Scores how well each image follows its caption: ``scorer(images, captions) -> [0..1 per image]``.

    Higher is better.  The reference-model analyzer will implement this; a
    test or a user may plug in any callable with this signature.
    """

    def __call__(self, images: Any, captions: str | Sequence[str]) -> Sequence[float]: ...


def _mean(values: Sequence[float] | None) -> float | None:
    return float(statistics.fmean(values)) if values else None


def quality_block(
    full_images: Any,
    fragment_images: Any,
    captions: str | Sequence[str],
    *,
    clip: Callable[[Any, Any], Sequence[float]] | None = None,
    lpips: PairScorer | None = None,
    adherence: AdherenceScorer | None = None,
    image_kind: str = "decoded images",
    ssim_limit: float | None = None,
) -> dict[str, Any]:
    """Compare paired full/fragment images; metrics without a scorer are listed in ``missing``.

    The per-image tails (``ssim_p10``, ``lpips_p90``, ``lpips_max``, and ``ssim_below_limit``: images under
    ``ssim_limit``) stand beside the means (``judge.gate.image_tails``).

    ``clip_drop_rel`` is the relative CLIP drop ``(full - fragment) / full``
    (H1's "≤2 % CLIP drop"); ``clip_delta`` the absolute difference.

    >>> import torch
    >>> img = torch.rand(2, 16, 16, 3)
    >>> q = quality_block(img, img, "a dog")
    >>> q["ssim_mean"], q["phash_distance_mean"], sorted(q["missing"])
    (1.0, 0.0, ['adherence', 'clip', 'lpips'])
    """
    full, frag = as_batch(full_images), as_batch(fragment_images)
    block: dict[str, Any] = {"images": int(full.shape[0]), "image_kind": image_kind, "missing": []}
    s = ssim(full, frag)
    block["ssim_mean"], block["ssim_min"] = _mean(s), min(s)
    p = phash_distance(full, frag)
    block["phash_distance_mean"], block["phash_distance_max"] = _mean(p), max(p)
    d = list(lpips(full, frag)) if lpips is not None else None
    if d is not None:
        block["lpips_mean"] = _mean(d)
    else:
        block["missing"].append("lpips")
    block.update({k: v for k, v in image_tails(s, d, ssim_limit).items() if v is not None})
    if clip is not None:
        cf, cg = list(clip(full, captions)), list(clip(frag, captions))
        block["clip_mean_full"], block["clip_mean_fragment"] = _mean(cf), _mean(cg)
        block["clip_delta"] = block["clip_mean_full"] - block["clip_mean_fragment"]
        denom = abs(block["clip_mean_full"])
        block["clip_drop_rel"] = block["clip_delta"] / denom if denom > 1e-12 else None
    else:
        block["missing"].append("clip")
    if adherence is not None:
        af, ag = list(adherence(full, captions)), list(adherence(frag, captions))
        block["adherence_full"], block["adherence_fragment"] = _mean(af), _mean(ag)
        block["adherence_delta"] = block["adherence_full"] - block["adherence_fragment"]
    else:
        block["missing"].append("adherence")
    if block["missing"]:
        log.info("quality block: missing %s", ", ".join(block["missing"]))
    return block


def passes_quality(block: dict[str, Any], *, clip_drop_rel_max: float = 0.02, lpips_max: float = 0.03,
                   ssim_min: float | None = None) -> tuple[bool, list[str]]:
    """Does a quality block meet the gate?  Returns ``(ok, reasons)``; a missing (or NaN) gated metric fails.

    >>> passes_quality({"clip_drop_rel": 0.01, "lpips_mean": 0.05})
    (False, ['lpips_mean 0.05 > 0.03'])
    >>> passes_quality({"clip_drop_rel": None, "lpips_mean": float("nan")})
    (False, ['clip_drop_rel missing', 'lpips_mean missing (found nan)'])
    """
    limits = [Limit("clip_drop_rel", clip_drop_rel_max, "max"), Limit("lpips_mean", lpips_max, "max")]
    if ssim_min is not None:
        limits.append(Limit("ssim_mean", ssim_min, "min"))
    reasons = failures(block, limits)
    return (not reasons, reasons)
