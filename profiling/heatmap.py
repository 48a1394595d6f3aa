"""A head-importance heatmap as an image tensor: one row per attention module, one column per head.

Cells are coloured by the head's score relative to the highest score in its
module (dark = unimportant, bright yellow = most important); pruned heads
get a red cross.  Modules with fewer heads than the widest leave their extra
cells grey.  The result is a float tensor ``[1, H, W, 3]`` in 0..1, which is
ComfyUI's IMAGE layout, built with torch alone.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

# Five anchor colours of a perceptually ordered dark-to-bright ramp (viridis-like).
_RAMP = torch.tensor(
    [[0.267, 0.005, 0.329], [0.230, 0.322, 0.546], [0.128, 0.567, 0.551], [0.370, 0.789, 0.383], [0.993, 0.906, 0.144]]
)
_EMPTY = torch.tensor([0.35, 0.35, 0.35])
_CROSS = torch.tensor([0.9, 0.1, 0.1])


def colormap(values: torch.Tensor) -> torch.Tensor:
    """Map values in [0, 1] to RGB by linear interpolation along the ramp: ``[..., 3]``.

    >>> [round(c, 3) for c in colormap(torch.tensor([0.0, 1.0]))[1].tolist()]
    [0.993, 0.906, 0.144]
    """
    v = values.clamp(0, 1) * (len(_RAMP) - 1)
    lo = v.floor().long().clamp(max=len(_RAMP) - 2)
    frac = (v - lo.to(v.dtype)).unsqueeze(-1)
    return _RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac


def head_heatmap(
    scores: Mapping[str, torch.Tensor], kept: Mapping[str, Sequence[int]] | None = None, cell: int = 12
) -> torch.Tensor:
    """Render per-module head scores (and optionally which heads a plan keeps) as an IMAGE tensor.

    >>> img = head_heatmap({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}, kept={"a": [1]}, cell=4)
    >>> tuple(img.shape), float(img.min()) >= 0.0, float(img.max()) <= 1.0
    ((1, 8, 8, 3), True, True)
    """
    paths = list(scores)
    if not paths:
        return torch.zeros(1, cell, cell, 3)
    width = max(int(scores[p].numel()) for p in paths)
    grid = _EMPTY.expand(len(paths), width, 3).clone()
    pruned = torch.zeros(len(paths), width, dtype=torch.bool)
    for row, path in enumerate(paths):
        s = scores[path].detach().to(torch.float32).flatten()
        top = float(s.max()) if s.numel() else 0.0
        grid[row, : s.numel()] = colormap(s / top if top > 0 else torch.zeros_like(s))
        if kept is not None and path in kept:
            keep = set(int(i) for i in kept[path])
            for h in range(s.numel()):
                pruned[row, h] = h not in keep
    image = grid.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    # A one-pixel dark border around each cell keeps neighbouring heads apart.
    image[::cell, :, :] = 0.1
    image[:, ::cell, :] = 0.1
    diag = torch.arange(1, cell - 1)
    for row, col in pruned.nonzero().tolist():
        y, x = row * cell, col * cell
        image[y + diag, x + diag] = _CROSS
        image[y + diag, x + cell - 1 - diag] = _CROSS
    return image.unsqueeze(0).contiguous()
