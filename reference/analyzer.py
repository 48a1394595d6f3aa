"""Reading a generated 32x32 image back into attributes, and scoring a prompt's adherence.

Deterministic and model-free (scikit-image only):

1. background: the median colour of the 2-pixel frame, named by the nearest
   background colour in CIELAB;
2. objects: pixels more than ``FOREGROUND_DELTA_E`` from that median colour,
   cleaned by a 3x3 majority filter, split into 8-connected components; those
   under ``MIN_AREA`` pixels are noise;
3. per object: colour = nearest palette colour to the median Lab of its
   pixels; shape = the circle, square or triangle template (rendered with the
   generator's own geometry, sized to the object's soft area, placed at its
   centroid) nearest in L1 to the object's soft coverage map; position = the
   grid cell of that template's centre (a triangle's centroid sits a third of
   its half-height low, its centre does not).

Adherence of one image = prompted attributes found / prompted attributes, with
the prompt's objects matched to the detected ones by the assignment that
finds the most attributes.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .shapes import BACKGROUNDS, COLOURS, position_of

FOREGROUND_DELTA_E = 22.0
MIN_AREA = 8
ATTRIBUTES = ("shape", "colour", "position")


def _lab(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2lab

    return rgb2lab(np.asarray(rgb, dtype=np.float64).reshape(-1, 1, 3) / 255.0).reshape(-1, 3)


_PALETTE_LAB = {name: _lab(np.array([rgb]))[0] for name, rgb in COLOURS.items()}
_BACKGROUND_LAB = {name: _lab(np.array([rgb]))[0] for name, rgb in BACKGROUNDS.items()}


def _nearest(lab: np.ndarray, table: Mapping[str, np.ndarray]) -> str:
    return min(table, key=lambda name: float(np.linalg.norm(lab - table[name])))


@dataclass(frozen=True)
class Detection:
    shape: str
    colour: str
    position: str
    area: int
    fit: float  # L1 template error per covered pixel: small for clean shapes, large for blobs

    def as_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "colour": self.colour, "position": self.position, "area": self.area,
                "fit": round(self.fit, 3)}


# Area of each shape as a multiple of half-extent squared (the generator's geometry, ``shapes.shape_mask``).
_AREA_PER_HALF2 = {"circle": np.pi, "square": 1.8**2, "triangle": 2.2}
# Where the centroid sits below the shape's centre, per half-extent (a triangle's is a third lower).
_CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 3.0}


def _template(shape: str, cx: float, cy: float, half: float, h: int, w: int) -> np.ndarray:
    from .shapes import SUPERSAMPLE, shape_mask

    n = SUPERSAMPLE
    ys, xs = np.meshgrid((np.arange(h * n) + 0.5) / n, (np.arange(w * n) + 0.5) / n, indexing="ij")
    mask = shape_mask(shape, cx, cy, half, np.stack([ys, xs])).astype(np.float64)
    return mask.reshape(h, n, w, n).mean(axis=(1, 3))


def _classify_shape(alpha: np.ndarray) -> tuple[str, float, tuple[float, float]]:
    """Best-fitting shape for a soft coverage map (0..1), by L1 distance to a rendered template.

    Each candidate is sized to the measured area and centred from the centroid, so
    only the outline decides; returns (shape, fit error per covered pixel, centre).
    """
    area = float(alpha.sum())
    h, w = alpha.shape
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    cy, cx = float((alpha * ys).sum() / area), float((alpha * xs).sum() / area)
    best = ("circle", float("inf"), (cx, cy))
    for shape, k in _AREA_PER_HALF2.items():
        half = float(np.sqrt(area / k))
        centre_y = cy - _CENTROID_DROP[shape] * half
        error = float(np.abs(alpha - _template(shape, cx, centre_y, half, h, w)).sum()) / area
        if error < best[1]:
            best = (shape, error, (cx, centre_y))
    return best


def analyze(image: np.ndarray) -> dict[str, Any]:
    """Attributes of a uint8 ``[32, 32, 3]`` image: ``{"background": name, "objects": [Detection, ...]}``.

    >>> from .shapes import Scene, Shape, render
    >>> found = analyze(render(Scene("white", (Shape("triangle", "blue", "bottom right"),))))
    >>> found["background"], [(d.shape, d.colour, d.position) for d in found["objects"]]
    ('white', [('triangle', 'blue', 'bottom right')])
    """
    from scipy.ndimage import median_filter
    from skimage.measure import label, regionprops

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"reference.analyzer.analyze: expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    h, w, _ = image.shape
    lab = _lab(image.reshape(-1, 3)).reshape(h, w, 3)
    frame = np.concatenate([lab[:2].reshape(-1, 3), lab[-2:].reshape(-1, 3), lab[:, :2].reshape(-1, 3),
                            lab[:, -2:].reshape(-1, 3)])
    bg_lab = np.median(frame, axis=0)
    foreground = np.linalg.norm(lab - bg_lab, axis=2) > FOREGROUND_DELTA_E
    foreground = median_filter(foreground.astype(np.uint8), size=3, mode="constant").astype(bool)
    objects = []
    labels = label(foreground, connectivity=2)
    for region in regionprops(labels):
        if region.area < MIN_AREA:
            continue
        pixels = lab[region.coords[:, 0], region.coords[:, 1]]
        obj_lab = np.median(pixels, axis=0)
        colour = _nearest(obj_lab, _PALETTE_LAB)
        # soft coverage: how far each pixel has moved from the background toward the object's colour,
        # so anti-aliased edges count fractionally; other objects' pixels are cut out
        axis = obj_lab - bg_lab
        alpha = np.clip(((lab - bg_lab) @ axis) / float(axis @ axis), 0.0, 1.0)
        alpha[(labels != region.label) & (labels > 0)] = 0.0
        near = np.zeros_like(foreground)
        r0, c0, r1, c1 = region.bbox
        near[max(0, r0 - 2):r1 + 2, max(0, c0 - 2):c1 + 2] = True
        alpha[~near] = 0.0
        shape, fit, (cx, cy) = _classify_shape(alpha)
        objects.append(Detection(shape, colour, position_of(cx, cy), int(region.area), fit))
    objects.sort(key=lambda d: -d.area)
    return {"background": _nearest(bg_lab, _BACKGROUND_LAB), "objects": objects}


def match(wanted: Sequence[Mapping[str, str | None]], found: Sequence[Detection]) -> dict[str, tuple[int, int]]:
    """Per attribute, (found, asked) under the assignment of prompted to detected objects that finds the most.

    >>> match([{"shape": "circle", "colour": "red", "position": None}], [Detection("circle", "blue", "top", 40, 0.1)])
    {'shape': (1, 1), 'colour': (0, 1), 'position': (0, 0)}
    """
    asked = {a: sum(1 for obj in wanted if obj.get(a) is not None) for a in ATTRIBUTES}
    best = {a: 0 for a in ATTRIBUTES}
    slots = list(found) + [None] * len(wanted)  # a prompted object may match nothing
    for chosen in itertools.permutations(slots, len(wanted)):
        hits = {a: sum(1 for obj, det in zip(wanted, chosen)
                       if det is not None and obj.get(a) is not None and obj[a] == getattr(det, a)) for a in ATTRIBUTES}
        if sum(hits.values()) > sum(best.values()):
            best = hits
    return {a: (best[a], asked[a]) for a in ATTRIBUTES}


def score(wanted: Sequence[Mapping[str, str | None]], found: Sequence[Detection]) -> tuple[int, int]:
    """(attributes found, attributes asked) for one image; unnamed (None) attributes are not asked.

    >>> score([{"shape": "circle", "colour": "red", "position": "top"}], [Detection("square", "red", "top", 40, 0.1)])
    (2, 3)
    """
    per = match(wanted, found)
    return sum(h for h, _ in per.values()), sum(a for _, a in per.values())


def exact(wanted: Sequence[Mapping[str, str | None]], found: Sequence[Detection]) -> bool:
    """Every asked attribute found and no extra objects: the strict per-image criterion."""
    hits, asked = score(wanted, found)
    return hits == asked and len(found) == len(wanted)
