"""Procedural 32x32 scenes for the reference model: 1-2 flat shapes on a flat background.

A scene is plain data (``Scene``); ``render`` turns it into an image and the
caption grammar (``reference.captions``) into text.  Everything is a pure
function of a seed, so the training set, the held-out set and the analyzer's
ground truth are reproduced bit for bit on any machine.

Objects sit in the cells of a 3x3 grid.  Two objects are never in touching
cells (Chebyshev distance >= 2), so they never overlap and a colour-based
segmentation can tell them apart; that keeps the analyzer's own error small,
which is what lets adherence measure the model rather than the analyzer.
"""
from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

SIZE = 32
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges, still exact colours inside

# Saturated, well-separated hues: the analyzer classifies pixels by the nearest of these.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 170, 60),
    "blue": (45, 80, 225),
    "yellow": (235, 210, 40),
    "purple": (145, 55, 190),
    "orange": (245, 135, 25),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "white": (240, 240, 240),
    "gray": (120, 120, 120),
}
SHAPES = ("circle", "square", "triangle")
# Half-extent in pixels: as large as the 3x3 grid allows (an edge cell's centre is 5.33 px from the border).
SIZES: dict[str, float] = {"small": 3.8, "large": 4.8}
# Row-major 3x3 grid; the names are the canonical ones the analyzer reports.
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
JITTER = 0.5  # pixels a centre may move inside its cell


@dataclass(frozen=True)
class Shape:
    """One object: what it is, where it is (a grid cell name) and its exact centre."""

    shape: str
    colour: str
    position: str
    size: str = "large"
    center: tuple[float, float] = (0.0, 0.0)  # (x, y) in pixels; (0, 0) means the cell centre

    def attributes(self) -> tuple[str, str, str]:
        return (self.shape, self.colour, self.position)


@dataclass(frozen=True)
class Scene:
    """A background colour name and one or two ``Shape``s."""

    background: str
    objects: tuple[Shape, ...] = field(default_factory=tuple)


def cell_center(position: str) -> tuple[float, float]:
    """The pixel centre of a grid cell.

    >>> cell_center("top left"), cell_center("center")
    ((5.333333333333333, 5.333333333333333), (16.0, 16.0))
    """
    index = POSITIONS.index(position)
    row, col = divmod(index, 3)
    step = SIZE / 3
    return (step * (col + 0.5), step * (row + 0.5))


def position_of(x: float, y: float) -> str:
    """The grid cell name that contains pixel coordinates ``(x, y)``.

    >>> position_of(30.0, 2.0)
    'top right'
    """
    step = SIZE / 3
    col = min(2, max(0, int(x // step)))
    row = min(2, max(0, int(y // step)))
    return POSITIONS[row * 3 + col]


def cells_apart(a: str, b: str) -> bool:
    """True when two cells do not touch (Chebyshev distance >= 2)."""
    ra, ca = divmod(POSITIONS.index(a), 3)
    rb, cb = divmod(POSITIONS.index(b), 3)
    return max(abs(ra - rb), abs(ca - cb)) >= 2


def shape_mask(shape: str, cx: float, cy: float, half: float, grid: np.ndarray) -> np.ndarray:
    ys, xs = grid
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= half**2
    if shape == "square":
        return (np.abs(xs - cx) <= half * 0.9) & (np.abs(ys - cy) <= half * 0.9)
    if shape == "triangle":  # apex up, base down: inside when below both slanted edges and above the base
        top, bottom = cy - half, cy + half
        t = (ys - top) / (2 * half)  # 0 at the apex, 1 at the base
        return (ys >= top) & (ys <= bottom) & (np.abs(xs - cx) <= t * half * 1.1)
    raise ValueError(f"reference.shapes: unknown shape {shape!r}; expected one of {SHAPES}")


_GRID_CACHE: dict[int, np.ndarray] = {}


def _grid() -> np.ndarray:
    if SUPERSAMPLE not in _GRID_CACHE:
        n = SIZE * SUPERSAMPLE
        coords = (np.arange(n, dtype=np.float32) + 0.5) / SUPERSAMPLE
        _GRID_CACHE[SUPERSAMPLE] = np.stack(np.meshgrid(coords, coords, indexing="ij"))
    return _GRID_CACHE[SUPERSAMPLE]


def render(scene: Scene) -> np.ndarray:
    """The scene as a ``[32, 32, 3]`` uint8 RGB image (see ``render_with_coverage``).

    >>> img = render(Scene("black", (Shape("square", "red", "center", "large", (16.0, 16.0)),)))
    >>> img.shape, img[16, 16].tolist(), img[0, 0].tolist()
    ((32, 32, 3), [215, 35, 35], [15, 15, 15])
    """
    return render_with_coverage(scene)[0]


def render_with_coverage(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """The image and a ``[32, 32]`` float32 map of how much of each pixel the objects cover (0..1).

    >>> img, cover = render_with_coverage(Scene("white", (Shape("circle", "red", "center"),)))
    >>> float(cover[16, 16]), float(cover[0, 0])
    (1.0, 0.0)
    """
    grid = _grid()
    n = SIZE * SUPERSAMPLE
    canvas = np.empty((n, n, 3), dtype=np.float32)
    canvas[:] = BACKGROUNDS[scene.background]
    covered = np.zeros((n, n), dtype=np.float32)
    for obj in scene.objects:
        cx, cy = obj.center if obj.center != (0.0, 0.0) else cell_center(obj.position)
        mask = shape_mask(obj.shape, cx, cy, SIZES[obj.size], grid)
        canvas[mask] = COLOURS[obj.colour]
        covered[mask] = 1.0
    small = canvas.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    coverage = covered.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean(axis=(1, 3))
    return np.clip(np.rint(small), 0, 255).astype(np.uint8), coverage


def shape_detail(scene: Scene) -> np.ndarray:
    """A ``[32, 32]`` float32 map (0..1) of the pixels that tell the objects' shapes apart.

    For each object: where a circle, a square and a triangle of the same size
    and centre disagree (covered by some, not all).  Shape lives in these few
    edge and corner pixels; training weights them up, since a blob of the right
    colour in the right cell already gets most of a per-pixel loss right.

    >>> detail = shape_detail(Scene("white", (Shape("circle", "red", "center"),)))
    >>> float(detail[16, 16]), float(detail[0, 0]), bool(detail.max() > 0.9)
    (0.0, 0.0, True)
    """
    grid = _grid()
    n = SIZE * SUPERSAMPLE
    detail = np.zeros((n, n), dtype=bool)
    for obj in scene.objects:
        cx, cy = obj.center if obj.center != (0.0, 0.0) else cell_center(obj.position)
        masks = [shape_mask(shape, cx, cy, SIZES[obj.size], grid) for shape in SHAPES]
        detail |= np.logical_or.reduce(masks) & ~np.logical_and.reduce(masks)
    return detail.astype(np.float32).reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean(axis=(1, 3))


def all_triples() -> list[tuple[str, str, str]]:
    return list(itertools.product(SHAPES, COLOURS, POSITIONS))


def held_out_triples() -> frozenset[tuple[str, str, str]]:
    """(shape, colour, position) combinations never shown in training: 18 of 162.

    Chosen by a fixed hash so that every shape, colour and position occurs in
    the held-out set and each held-out triple's parts are all seen in training.

    >>> len(held_out_triples()), ("circle", "red", "top left") in held_out_triples()
    (18, False)
    """
    chosen = []
    for index, colour in enumerate(COLOURS):
        for k, shape in enumerate(SHAPES):
            # a Latin-square-like walk over positions: each (colour, shape) gets one held-out cell
            position = POSITIONS[(index * 4 + k * 3 + 1) % len(POSITIONS)]
            chosen.append((shape, colour, position))
    return frozenset(chosen)


def _random_object(rng: random.Random, position: str, colour: str | None = None) -> Shape:
    cx, cy = cell_center(position)
    return Shape(
        shape=rng.choice(SHAPES),
        colour=colour or rng.choice(list(COLOURS)),
        position=position,
        size=rng.choice(list(SIZES)),
        center=(cx + rng.uniform(-JITTER, JITTER), cy + rng.uniform(-JITTER, JITTER)),
    )


def random_scene(rng: random.Random) -> Scene:
    """One scene: 1 object, or (60 % of the time, unless it is central) 2 in non-touching cells with different colours."""
    background = rng.choice(list(BACKGROUNDS))
    first = rng.choice(POSITIONS)
    objects = [_random_object(rng, first)]
    apart = [p for p in POSITIONS if cells_apart(first, p)]  # none for the centre: it touches every cell
    if apart and rng.random() < 0.6:
        second = rng.choice(apart)
        colour = rng.choice([c for c in COLOURS if c != objects[0].colour])
        objects.append(_random_object(rng, second, colour))
    return Scene(background, tuple(objects))


def scene_is_held_out(scene: Scene) -> bool:
    held = held_out_triples()
    return any(obj.attributes() in held for obj in scene.objects)


def training_scenes(count: int, seed: int = 0) -> Iterator[Scene]:
    """``count`` training scenes, none containing a held-out triple, reproducible from ``seed``.

    >>> [len(s.objects) for s in training_scenes(3, seed=1)]
    [2, 1, 2]
    """
    rng = random.Random(seed)
    made = 0
    while made < count:
        scene = random_scene(rng)
        if not scene_is_held_out(scene):
            made += 1
            yield scene


def held_out_scenes(count: int, seed: int = 0) -> list[Scene]:
    """Evaluation scenes: each contains at least one held-out triple (about half have two objects).

    >>> all(scene_is_held_out(s) for s in held_out_scenes(20))
    True
    """
    rng = random.Random(1_000_003 + seed)
    held = sorted(held_out_triples())
    scenes = []
    for i in range(count):
        shape, colour, position = held[i % len(held)]
        cx, cy = cell_center(position)
        obj = Shape(shape, colour, position, rng.choice(list(SIZES)),
                    (cx + rng.uniform(-JITTER, JITTER), cy + rng.uniform(-JITTER, JITTER)))
        objects = [obj]
        apart = [p for p in POSITIONS if cells_apart(position, p)]
        if apart and i % 2 == 1:
            second = rng.choice(apart)
            objects.append(_random_object(rng, second, rng.choice([c for c in COLOURS if c != colour])))
        scenes.append(Scene(rng.choice(list(BACKGROUNDS)), tuple(objects)))
    return scenes


def scene_digest(scenes: list[Scene]) -> str:
    """A short fingerprint of a scene list, recorded in the model card to pin the data."""
    return hashlib.sha256(repr(scenes).encode()).hexdigest()[:16]
