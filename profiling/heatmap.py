"""A head-importance heatmap as an image tensor: one row per attention module, one column per head.

Cells are coloured by the head's score relative to the highest score in its
module (dark = unimportant, bright yellow = most important); pruned heads
get a red cross.  Modules with fewer heads than the widest leave their extra
cells grey.  The result is a float tensor ``[1, H, W, 3]`` in 0..1, which is
ComfyUI's IMAGE layout, built with torch alone.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

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


# --------------------------------------------------------------------------- the labelled figure (UsageVisualizer)

#: Text and frame colours of the labelled figure, on ComfyUI's dark preview background.
_BACKGROUND, _TEXT, _MUTED = (32, 32, 32), (230, 230, 230), (150, 150, 150)
_PRUNED_RGB = tuple(int(255 * c) for c in _CROSS.tolist())
_FONT_PX = 14
_MARGIN = 10
#: Path parts that say nothing a reader needs on a row label (every SD1.5/SDXL attention path has them).
_DROP_PARTS = ("diffusion_model", "transformer_blocks", "transformer")


def short_module_name(path: str) -> str:
    """A row label for an attention module path: the parts that tell modules apart.

    >>> short_module_name("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1")
    'input_blocks.1.1.0.attn1'
    """
    return ".".join(part for part in path.split(".") if part not in _DROP_PARTS) or path


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:  # Pillow >= 10.1 scales its bundled font; older ones have only a small bitmap font
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _cross(draw: Any, x: int, y: int, cell: int) -> None:
    """A pruned head's mark: a red cross over the cell, thick enough to see on the darkest colour."""
    inset, last = 3, cell - 4
    draw.line((x + inset, y + inset, x + last, y + last), fill=_PRUNED_RGB, width=3)
    draw.line((x + inset, y + last, x + last, y + inset), fill=_PRUNED_RGB, width=3)


def labelled_heatmap(
    scores: Mapping[str, torch.Tensor], kept: Mapping[str, Sequence[int]] | None = None, cell: int = 22
) -> torch.Tensor:
    """``head_heatmap`` with what a reader needs: module names on rows, head index on columns, a colour legend,
    and (when ``kept`` is given) a key for the pruned heads' cross.  An IMAGE tensor ``[1, H, W, 3]``.

    Drawn with Pillow, which ComfyUI itself depends on (imported here only, so the rest of the core needs none).

    >>> img = labelled_heatmap({"m.attn1": torch.tensor([1.0, 2.0]), "m.attn2": torch.tensor([3.0, 1.0])}, {"m.attn1": [1]})
    >>> img.shape[0], img.shape[-1], img.shape[1] > 2 * 22, img.shape[2] > 2 * 22
    (1, 3, True, True)
    """
    from PIL import Image, ImageDraw

    font = _font(_FONT_PX)
    grid = head_heatmap(scores, None, cell=cell)[0]  # crosses drawn below, thicker than the raw grid's
    grid_img = Image.fromarray((grid.clamp(0, 1) * 255).round().to(torch.uint8).numpy(), "RGB")
    labels = [short_module_name(p) for p in scores] or ["(no attention modules profiled)"]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_w(text: str) -> int:
        left, _, right, _ = probe.textbbox((0, 0), text, font=font)
        return int(right - left)

    label_w = max(text_w(t) for t in labels) + _MARGIN
    header_h = _FONT_PX + 2 * _MARGIN + _FONT_PX  # "head" caption over the column numbers
    legend_lines = ["importance in its module:", "low", "high"]
    if kept is not None:
        legend_lines.append("pruned head")
    legend_w = max(text_w(t) for t in legend_lines) + 2 * _MARGIN + cell
    width = _MARGIN + label_w + grid_img.width + 2 * _MARGIN + legend_w
    height = max(header_h + grid_img.height, header_h + 6 * cell) + _MARGIN
    image = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    gx, gy = _MARGIN + label_w, header_h
    image.paste(grid_img, (gx, gy))
    for row, path in enumerate(scores):
        if kept is None or path not in kept:
            continue
        keep = {int(i) for i in kept[path]}
        for col in (h for h in range(int(scores[path].numel())) if h not in keep):
            _cross(draw, gx + col * cell, gy + row * cell, cell)
    draw.text((gx, _MARGIN // 2), "head", fill=_MUTED, font=font)
    n_cols = grid_img.width // cell
    step = 1 if cell >= 3 * _FONT_PX // 2 or n_cols <= 10 else 2  # keep two-digit numbers from touching
    for col in range(0, n_cols, step):
        number = str(col)
        draw.text((gx + col * cell + (cell - text_w(number)) // 2, _MARGIN // 2 + _FONT_PX + 4), number, fill=_TEXT, font=font)
    for row, label in enumerate(labels):
        draw.text((gx - _MARGIN // 2 - text_w(label), gy + row * cell + (cell - _FONT_PX) // 2), label, fill=_TEXT, font=font)
    # Legend: the ramp, bright (high) at the top, with its two ends named; then the cross.
    lx, ly = gx + grid_img.width + 2 * _MARGIN, header_h
    draw.text((lx, ly - _FONT_PX - 4), legend_lines[0], fill=_MUTED, font=font)
    ramp_h = 4 * cell
    ramp = colormap(torch.linspace(1, 0, ramp_h)).unsqueeze(1).expand(ramp_h, cell, 3)
    image.paste(Image.fromarray((ramp * 255).round().to(torch.uint8).numpy(), "RGB"), (lx, ly))
    draw.text((lx + cell + 6, ly), legend_lines[2], fill=_TEXT, font=font)
    draw.text((lx + cell + 6, ly + ramp_h - _FONT_PX - 2), legend_lines[1], fill=_TEXT, font=font)
    if kept is not None:
        cy = ly + ramp_h + cell // 2
        draw.rectangle((lx, cy, lx + cell - 1, cy + cell - 1), fill=_BACKGROUND, outline=_MUTED)
        _cross(draw, lx, cy, cell)
        draw.text((lx + cell + 6, cy + (cell - _FONT_PX) // 2), "pruned head", fill=_TEXT, font=font)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return (pixels.to(torch.float32) / 255).unsqueeze(0).contiguous()
