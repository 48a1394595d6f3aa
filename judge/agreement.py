"""How well the latent-space judge agrees with the decoded gate (issue #26: judge without a VAE decode).

The cheap judge is ``latent_rel_error`` (``judge.latent_distance``) on the
sampler's raw float output, before it is rounded to an image: no SSIM, no
LPIPS, no analyzer.  :func:`latent_agreement` measures, over candidates and
seeds, the rank correlation (Spearman) of that error with ``1 - SSIM`` and
with LPIPS per image, and the pass/fail agreement of a latent limit (the
fixed one of ``thresholds.yaml`` and the one fitted here) with the full gate.
``format_agreement`` is the line a bench prints.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .image_similarity import ssim
from .latent_distance import latent_rel_error

Gate = Callable[[Any, Any], "tuple[bool, dict[str, Any]]"]  # gate(full_images, images) -> (passed, metrics)


def ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks from 1, ties sharing their mean rank.

    >>> ranks([0.3, 0.1, 0.3]).tolist()
    [2.5, 1.0, 2.5]
    """
    v = np.asarray(values, dtype=float)
    order = np.argsort(v, kind="mergesort")
    out = np.empty(len(v))
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
            j += 1
        out[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation; ``None`` with fewer than 3 pairs or a constant side (no ranking to compare).

    >>> spearman([1, 2, 3, 4], [10, 20, 30, 25])
    0.8
    """
    if len(a) != len(b) or len(a) < 3:
        return None
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return round(float(np.corrcoef(ra, rb)[0, 1]), 6)


def fitted_limit(errors: Sequence[float], passed: Sequence[bool]) -> tuple[float | None, float | None]:
    """The latent limit (pass: error <= limit) that agrees best with the gate's verdicts, and that agreement.

    Ties go to the largest such limit (it fails the fewest candidates without the full judge).

    >>> fitted_limit([0.01, 0.02, 0.2, 0.3], [True, True, False, False])
    (0.02, 1.0)
    """
    if not errors:
        return None, None
    best: tuple[float, float] | None = None
    for limit in sorted(set(float(e) for e in errors)) + [min(errors) - 1.0]:
        score = float(np.mean([(e <= limit) == p for e, p in zip(errors, passed)]))
        if best is None or score > best[1] or (score == best[1] and limit > best[0]):
            best = (limit, score)
    assert best is not None
    return round(best[0], 6), round(best[1], 6)


def latent_agreement(full: torch.Tensor, candidates: Mapping[str, torch.Tensor], *, gate: Gate,
                     to_images: Callable[[torch.Tensor], Any], lpips: Callable[[Any, Any], Sequence[float]] | None = None,
                     latent_limit: float | None = 0.1) -> dict[str, Any]:
    """The latent judge against the decoded gate, on the full model's raw outputs ``full`` ``[N, ...]`` and each
    candidate's (label -> ``[N, ...]``, the same seeds); ``to_images`` makes the gate's images (uint8 ``[N, H, W, 3]``).

    Returns per-image Spearman correlations (latent error vs ``1 - SSIM`` and vs LPIPS), the same over candidate
    means, the pass/fail agreement of ``latent_limit`` and of the fitted limit with the gate, and per candidate
    its mean latent error and gate verdict.  ``screen_limit`` is the largest mean latent error of a candidate the
    gate passed (a screening rule fails candidates far above it without the decoded metrics).

    >>> full = torch.zeros(3, 3, 4, 4) + 0.5
    >>> cands = {f"c{k}": full + 0.05 * k * torch.arange(3.0).view(3, 1, 1, 1) for k in range(1, 4)}
    >>> gate = lambda a, b: (bool(np.abs(a.astype(int) - b.astype(int)).mean() < 4), {})
    >>> img = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    >>> d = latent_agreement(full, cands, gate=gate, to_images=img)
    >>> d["candidates"], d["images"], d["spearman_latent_vs_1_minus_ssim"] is not None
    (3, 9, True)
    """
    full_images = to_images(full)
    errors: list[float] = []
    dissimilarity: list[float] = []
    distances: list[float] = []
    rows = []
    for label, raw in candidates.items():
        images = to_images(raw)
        per_image = [latent_rel_error(full[i:i + 1], raw[i:i + 1]) for i in range(len(full))]
        ref = torch.from_numpy(np.asarray(full_images)).float().div(255.0)
        out = torch.from_numpy(np.asarray(images)).float().div(255.0)
        errors += per_image
        dissimilarity += [1.0 - s for s in ssim(ref, out)]
        if lpips is not None:
            distances += [float(d) for d in lpips(ref, out)]
        passed, metrics = gate(full_images, images)
        rows.append({"label": label, "latent_rel_error": round(float(np.mean(per_image)), 6), "gate_passed": bool(passed),
                     "ssim_mean": metrics.get("ssim_mean"), "lpips_mean": metrics.get("lpips_mean")})
    means = [r["latent_rel_error"] for r in rows]
    verdicts = [r["gate_passed"] for r in rows]
    limit, agreement = fitted_limit(means, verdicts)
    fixed = (float(np.mean([(e <= latent_limit) == p for e, p in zip(means, verdicts)]))
             if latent_limit is not None and rows else None)
    return {
        "candidates": len(rows), "images": len(errors),
        "spearman_latent_vs_1_minus_ssim": spearman(errors, dissimilarity),
        "spearman_latent_vs_lpips": spearman(errors, distances) if distances else None,
        "spearman_candidates_vs_ssim_mean": spearman(means, [-(r["ssim_mean"] or 0.0) for r in rows])
        if all(r["ssim_mean"] is not None for r in rows) else None,
        "gate_passes": int(sum(verdicts)),
        "latent_limit": latent_limit, "agreement_at_latent_limit": None if fixed is None else round(fixed, 6),
        "fitted_latent_limit": limit, "agreement_at_fitted_limit": agreement,
        "screen_limit": max((e for e, p in zip(means, verdicts) if p), default=None),
        "per_candidate": rows,
    }


def format_agreement(d: Mapping[str, Any]) -> str:
    """The bench's line for :func:`latent_agreement`'s result.

    >>> format_agreement({"candidates": 2, "images": 8, "spearman_latent_vs_1_minus_ssim": 0.91,
    ...     "spearman_latent_vs_lpips": None, "gate_passes": 1, "latent_limit": 0.1, "agreement_at_latent_limit": 0.5,
    ...     "fitted_latent_limit": 0.04, "agreement_at_fitted_limit": 1.0})
    'latent judge vs decoded gate (2 candidates, 8 images): Spearman vs 1-SSIM 0.910, vs LPIPS n/a; gate passed 1/2; pass/fail agreement 50% at latent limit 0.1, 100% at fitted 0.04'
    """
    def num(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    def pct(v: Any) -> str:
        return "n/a" if v is None else f"{100 * v:.0f}%"

    return (f"latent judge vs decoded gate ({d['candidates']} candidates, {d['images']} images): "
            f"Spearman vs 1-SSIM {num(d['spearman_latent_vs_1_minus_ssim'])}, vs LPIPS {num(d['spearman_latent_vs_lpips'])}; "
            f"gate passed {d['gate_passes']}/{d['candidates']}; pass/fail agreement {pct(d['agreement_at_latent_limit'])} "
            f"at latent limit {d['latent_limit']}, {pct(d['agreement_at_fitted_limit'])} at fitted {d['fitted_latent_limit']}")
