"""Measuring the reference model: the analyzer against ground truth, and prompt adherence of generated images.

The model card's numbers come from ``evaluate_model`` (``tools/evaluate_reference.py``),
and a test re-measures them from the committed weights.  The held-out
evaluation set is fixed: ``shapes.held_out_scenes(72, seed=0)`` (every scene
holds a (shape, colour, position) triple training never saw), each prompt a
grammar paraphrase drawn with ``random.Random(index)``, image i sampled with
seed i, 25 DDIM steps.  Guidance was chosen on a separate validation set
(``held_out_scenes(seed=1)``), never on the evaluation set.
"""
from __future__ import annotations

import logging
import random
from typing import Any, Sequence

import numpy as np
import torch.nn as nn

from .analyzer import ATTRIBUTES, analyze, exact, match
from .captions import caption, parse_caption
from .model import ReferenceModel
from .sampling import DEFAULT_GUIDANCE, DEFAULT_STEPS, generate
from .shapes import Scene, held_out_scenes, render, training_scenes

log = logging.getLogger(__name__)

EVAL_SCENES = 72


def truth(scene: Scene) -> list[dict[str, str]]:
    return [{"shape": o.shape, "colour": o.colour, "position": o.position} for o in scene.objects]


def tally(wanted: Sequence[Sequence[dict[str, Any]]], images: Sequence[np.ndarray]) -> dict[str, Any]:
    """Attribute accuracy over images: overall, per attribute, and the exact-image rate.

    >>> from .shapes import Scene, Shape
    >>> scene = Scene("black", (Shape("circle", "red", "center"),))
    >>> tally([truth(scene)], [render(scene)])["attribute_accuracy"]
    1.0
    """
    hits = {a: 0 for a in ATTRIBUTES}
    asked = {a: 0 for a in ATTRIBUTES}
    exact_count = 0
    per_image = []
    for want, image in zip(wanted, images):
        found = analyze(image)["objects"]
        per = match(want, found)
        for a, (h, k) in per.items():
            hits[a] += h
            asked[a] += k
        exact_count += exact(want, found)
        got, total = sum(h for h, _ in per.values()), sum(k for _, k in per.values())
        per_image.append(got / total if total else None)
    total_asked = sum(asked.values())
    return {
        "images": len(per_image),
        "attributes": total_asked,  # how many attributes were judged: the gate counts a drop in whole attributes
        "attribute_accuracy": sum(hits.values()) / total_asked if total_asked else None,
        "per_attribute": {a: (hits[a] / asked[a] if asked[a] else None) for a in ATTRIBUTES},
        "exact_rate": exact_count / len(per_image) if per_image else None,
        "per_image": per_image,
    }


def analyzer_accuracy(count: int = 500) -> dict[str, Any]:
    """The analyzer on the generator's own renders (held-out and training scenes): its error floor."""
    scenes = held_out_scenes(count // 2) + list(training_scenes(count - count // 2, seed=99))
    result = tally([truth(s) for s in scenes], [render(s) for s in scenes])
    result.pop("per_image")
    return result


def eval_prompts(scenes: Sequence[Scene]) -> list[str]:
    """The evaluation wording: a grammar paraphrase per scene, drawn with ``random.Random(index)``."""
    return [caption(scene, random.Random(i)) for i, scene in enumerate(scenes)]


def adherence_eval(model: ReferenceModel, scenes: Sequence[Scene] | None = None, *, unet: nn.Module | None = None,
                   steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE) -> dict[str, Any]:
    """Generate one image per scene (seed = index) and score it against the scene's ground truth.

    >>> # adherence_eval(load_reference())["attribute_accuracy"]  -> the model card's number
    """
    scenes = list(scenes if scenes is not None else held_out_scenes(EVAL_SCENES, seed=0))
    prompts = eval_prompts(scenes)
    images = generate(model, prompts, seeds=list(range(len(scenes))), unet=unet, steps=steps, guidance=guidance)
    result = tally([truth(s) for s in scenes], list(images))
    result.update(steps=steps, guidance=guidance)
    result["images_uint8"] = images
    return result


def adherence_scorer():
    """An ``AdherenceScorer`` for ``metrics.quality``: ``scorer(images, captions) -> [0..1 per image]``.

    Captions are parsed with the grammar (``parse_caption``); a caption that names
    no shape or colour scores ``nan`` (nothing to check).
    """
    from ..judge.image_similarity import as_batch

    def scorer(images: Any, captions: str | Sequence[str]) -> list[float]:
        batch = (as_batch(images).clamp(0, 1) * 255).round().byte().numpy()
        texts = [captions] * len(batch) if isinstance(captions, str) else list(captions)
        out = []
        for image, text in zip(batch, texts):
            wanted = parse_caption(text)["objects"]
            per = match(wanted, analyze(image)["objects"])
            total = sum(k for _, k in per.values())
            out.append(sum(h for h, _ in per.values()) / total if total else float("nan"))
        return out

    return scorer
