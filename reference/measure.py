"""Measurements the demo makes on the reference model: adherence, fidelity, the H1 curve, H3 reuse, the grid.

All images here are uint8 ``[N, 32, 32, 3]`` arrays from ``reference.sampling``.
Fidelity compares a fragment's image with the full model's image for the same
seed (SSIM always; LPIPS when its weights are available offline).  Adherence
compares each image with what the prompt asks, through the analyzer.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..fragment.schedule.state import ScheduleState
from ..fragment.surgery.masking import mask_heads
from ..fragment.surgery.selection import select_heads
from ..judge.gate import TAIL_KEYS, image_tails
from ..judge.image_similarity import ssim
from ..metrics.reuse import ReuseReport, measure_reuse
from .captions import caption, parse_caption
from .evaluation import tally
from .model import ReferenceModel
from .sampling import sample
from .shapes import Scene, Shape

log = logging.getLogger(__name__)

Sampler = Callable[[nn.Module, Sequence[int]], np.ndarray]


def as_float(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> float ``[N, H, W, 3]`` in 0..1 (the metrics' IMAGE layout)."""
    return torch.from_numpy(np.asarray(images)).float().div(255.0)


def adherence(images: np.ndarray, prompt: str) -> dict[str, Any] | None:
    """Attribute accuracy of images against what ``prompt`` asks; ``None`` if it names no shape or colour.

    >>> from .shapes import render
    >>> img = render(Scene("white", (Shape("circle", "red", "top left"),)))
    >>> adherence(img[None], "a crimson disc in the upper left")["attribute_accuracy"]
    1.0
    """
    wanted = parse_caption(prompt)["objects"]
    if not wanted:
        return None
    result = tally([wanted] * len(images), list(images))
    result.pop("per_image")
    return result


def fidelity(full: np.ndarray, fragment: np.ndarray, lpips: Callable[[Any, Any], Sequence[float]] | None,
             ssim_limit: float | None = None) -> dict[str, Any]:
    """Same-seed fidelity of fragment images to full-model images: SSIM (and LPIPS when given), means and
    per-image tails (``judge.gate.image_tails``; ``ssim_below_limit`` counts images under ``ssim_limit``).

    >>> img = np.zeros((2, 32, 32, 3), np.uint8)
    >>> fidelity(img, img, None, 0.9)
    {'ssim_mean': 1.0, 'ssim_min': 1.0, 'lpips_mean': None, 'ssim_p10': 1.0, 'lpips_p90': None, 'lpips_max': None, 'ssim_below_limit': 0}
    """
    a, b = as_float(full), as_float(fragment)
    s = ssim(a, b)
    d = list(lpips(a, b)) if lpips is not None else None
    return {"ssim_mean": float(np.mean(s)), "ssim_min": float(np.min(s)), "lpips_mean": float(np.mean(d)) if d else None,
            **image_tails(s, d, ssim_limit)}


def compare(full_images: np.ndarray, images: np.ndarray, prompt: str, lpips: Callable | None,
            base: Mapping[str, Any] | None, ssim_limit: float | None = None) -> dict[str, Any]:
    """Images of a changed model against the full model's (same seeds): adherence, its drop, SSIM, LPIPS, and
    the per-image tails beside the means (``fidelity``); ``ssim_limit`` is the gate's ``ssim_min``.

    ``base`` is ``adherence(full_images, prompt)``, passed in so a sweep computes it once.
    ``adherence_attributes`` is how many attributes the drop was judged on: the gate counts it in whole
    attributes (``judge.gate.adherence_allowance``).

    >>> img = np.zeros((1, 32, 32, 3), np.uint8)
    >>> compare(img, img, "a dog", None, None)
    {'adherence': None, 'adherence_delta': None, 'adherence_attributes': None, 'ssim_mean': 1.0, 'lpips_mean': None, 'ssim_p10': 1.0, 'lpips_p90': None, 'lpips_max': None, 'ssim_below_limit': None}
    """
    adh = adherence(images, prompt)
    fid = fidelity(full_images, images, lpips, ssim_limit)
    judged = base and adh
    return {"adherence": adh and adh["attribute_accuracy"],
            "adherence_delta": (base["attribute_accuracy"] - adh["attribute_accuracy"]) if judged else None,
            "adherence_attributes": adh["attributes"] if judged else None,
            "ssim_mean": fid["ssim_mean"], "lpips_mean": fid["lpips_mean"],
            **{k: fid[k] for k in TAIL_KEYS}}


def masked_point(
    unet: nn.Module, scores: Mapping[str, torch.Tensor], protected: Any, ratio: float, seeds: Sequence[int],
    sampler: Sampler, prompt: str, full_images: np.ndarray, lpips: Callable | None, base: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """``compare`` for the model with the heads ``select_heads(ratio)`` would remove masked out."""
    plan = select_heads(scores, ratio=ratio, protected=protected)
    with mask_heads(unet, plan.kept):
        images = sampler(unet, seeds)
    return {"ratio": ratio, "heads_removed": plan.removed_heads, **compare(full_images, images, prompt, lpips, base)}


def ratio_curve(
    unet: nn.Module, scores: Mapping[str, torch.Tensor], protected: Any, ratios: Sequence[float], seeds: Sequence[int],
    sampler: Sampler, prompt: str, full_images: np.ndarray, lpips: Callable | None,
) -> list[dict[str, Any]]:
    """Adherence and fidelity at each pruning ratio, heads masked (equal to pruned in float32, cheaper to build).

    ``full_images`` are the full model's images for ``seeds``; the same selection
    code as the fragment picks the heads at every ratio.
    """
    base = adherence(full_images, prompt)
    curve = [{"ratio": 0.0, "heads_removed": 0, "adherence": base and base["attribute_accuracy"],
              "adherence_delta": 0.0 if base else None, "ssim_mean": 1.0, "lpips_mean": 0.0 if lpips else None}]
    for ratio in ratios:
        curve.append(masked_point(unet, scores, protected, ratio, seeds, sampler, prompt, full_images, lpips, base))
        log.info("H1 curve: ratio %.2f -> %s", ratio, curve[-1])
    return curve


def scene_from_prompt(prompt: str) -> Scene | None:
    """The scene a prompt describes, when it names every attribute (else ``None``: no paraphrases can be made)."""
    parsed = parse_caption(prompt)
    objects = parsed["objects"]
    if not objects or any(v is None for obj in objects for v in obj.values()):
        return None
    shapes = tuple(Shape(o["shape"], o["colour"], o["position"]) for o in objects)
    return Scene(parsed["background"] or "black", shapes)


def paraphrases(prompt: str, count: int = 8, seed: int = 0) -> list[str]:
    """Up to ``count`` distinct grammar rewordings of ``prompt`` (never the prompt itself).

    >>> len(paraphrases("a red circle in the top left on a white background", 4))
    4
    """
    scene = scene_from_prompt(prompt)
    if scene is None:
        return []
    background_named = parse_caption(prompt)["background"] is not None
    rng, out = random.Random(seed), []
    for _ in range(count * 50):
        text = caption(scene, rng)
        if background_named and parse_caption(text)["background"] is None:
            continue  # keep what the prompt asked for: a paraphrase must not drop the background
        if text != prompt and text not in out:
            out.append(text)
        if len(out) == count:
            break
    return out


def paraphrase_reuse(
    model: ReferenceModel, small: nn.Module, prompt: str, seeds: Sequence[int], bounds: Mapping[str, tuple[str, float]],
    lpips: Callable | None, *, steps: int, guidance: float, count: int = 8, texts: Sequence[str] | None = None,
    state: ScheduleState | None = None, cfg_cutoff: float | None = None,
) -> ReuseReport | None:
    """H3 on the real model: each paraphrase through the full model and the fragment, fidelity within ``bounds``.

    ``texts`` are the paraphrases to try (default: ``count`` grammar rewordings of
    ``prompt``); LPIPS bounds are dropped when no LPIPS model is given.
    Returns ``None`` when there is nothing to try.  ``state`` and ``cfg_cutoff`` are the
    fragment's schedule (``apply_schedule``), used for the fragment's images only.
    """
    texts = list(texts) if texts is not None else paraphrases(prompt, count)
    if not texts:
        return None
    uncond = model.encode([""])

    def generate(unet: nn.Module, text: str, seed: int) -> np.ndarray:
        scheduled = unet is small
        return sample(unet, model.encode([text]), uncond, [seed], steps=steps, guidance=guidance,
                      state=state if scheduled else None, cfg_cutoff=cfg_cutoff if scheduled else None)

    def quality(full: np.ndarray, frag: np.ndarray) -> dict[str, float]:
        fid = fidelity(full, frag, lpips)
        return {k: fid[k] for k in ("ssim_mean", "lpips_mean") if fid[k] is not None}

    usable = {k: v for k, v in bounds.items() if k != "lpips_mean" or lpips is not None}
    return measure_reuse(model.unet, small, texts, seeds=seeds, generate=generate, quality=quality, bounds=usable,
                         embed=lambda text: model.encode([text])[0], fragment_prompt=prompt)


def grid_png(full: np.ndarray, fragment: np.ndarray, path: str | Path, *, columns: int = 8, scale: int = 4) -> Path:
    """Side-by-side PNG: the full model's images on the left, the fragment's (same seeds) on the right."""
    from PIL import Image

    def panel(images: np.ndarray) -> np.ndarray:
        n, h, w, _ = images.shape
        rows = -(-n // columns)
        canvas = np.full((rows * (h + 2), columns * (w + 2), 3), 96, np.uint8)  # dark gutters: white backgrounds stay apart
        for i, img in enumerate(images):
            r, c = divmod(i, columns)
            canvas[r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = img
        return canvas

    left, right = panel(full), panel(fragment)
    gap = np.full((left.shape[0], 8, 3), 255, np.uint8)  # the white band between the two panels
    grid = np.concatenate([left, gap, right], axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)
    return path
