"""Issue #28 item 6: UsageVisualizer's heatmap says what it shows.

Tier 1 (no ComfyUI): ``profiling.heatmap.labelled_heatmap`` draws module
names beside the rows, head numbers over the columns, a colour legend, and a
red cross on each pruned head that a kept head of the same colour lacks, at a
size ComfyUI's preview shows without zooming.
"""
from __future__ import annotations

import torch

from prompt_fragments.profiling.heatmap import colormap, head_heatmap, labelled_heatmap, short_module_name

CELL = 22
PATHS = [f"diffusion_model.{block}.transformer_blocks.0.attn{a}"
         for block in ("input_blocks.1.1", "middle_block.1", "output_blocks.11.1") for a in (1, 2)]


def _scores() -> dict[str, torch.Tensor]:
    # equal scores in every module: every cell has the same colour, so a cell differs from another only by its cross
    return {p: torch.ones(8) for p in PATHS}


def _is_red(image: torch.Tensor) -> torch.Tensor:
    return (image[..., 0] > 0.8) & (image[..., 1] < 0.2) & (image[..., 2] < 0.2)


def _grid_origin(image: torch.Tensor) -> tuple[int, int]:
    """Top-left pixel of the cell grid: where the unlabelled grid's first cell row matches the figure."""
    grid = head_heatmap(_scores(), None, cell=CELL)[0]
    h, w = grid.shape[:2]
    probe = grid[1, :2 * CELL]  # one pixel row across two cells: borders and colours
    windows = image.unfold(1, probe.shape[0], 1)  # [H, W', 3, 2 * CELL]
    close = ((windows - probe.T).abs() <= 1 / 255).flatten(2).all(-1)
    for y, x in close.nonzero().tolist():
        y -= 1
        if y >= 0 and torch.allclose(image[y:y + h, x:x + w], grid, atol=1 / 255):
            return y, x
    raise AssertionError("the cell grid is not in the figure")


def test_the_figure_is_readable_size_and_has_labels_and_a_legend() -> None:
    image = labelled_heatmap(_scores(), cell=CELL)[0]
    height, width, _ = image.shape
    assert height >= len(PATHS) * CELL + 30 and width >= 8 * CELL + 250  # room for names, numbers, legend
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    y0, x0 = _grid_origin(image)
    light = image.min(dim=-1).values > 0.7  # text is light grey on the dark background
    # a module name left of every row, head numbers above the grid, and legend text right of it
    for row in range(len(PATHS)):
        assert light[y0 + row * CELL:y0 + (row + 1) * CELL, :x0].sum() > 20, f"row {row} has no label"
    assert light[:y0, x0:x0 + 8 * CELL].sum() > 40, "no head numbers over the columns"
    legend = image[y0:, x0 + 8 * CELL + 5:]
    assert light[y0:, x0 + 8 * CELL + 5:].sum() > 40, "no legend text"
    # the legend's ramp holds both ends of the colour map
    for end in (0.0, 1.0):
        colour = colormap(torch.tensor([end]))[0]
        assert ((legend - colour).abs().max(dim=-1).values < 2 / 255).sum() >= CELL, f"the legend lacks colour {end}"


def test_pruned_heads_carry_a_cross_kept_heads_do_not() -> None:
    kept = {p: [0, 1, 2, 3, 4, 5] for p in PATHS}  # heads 6 and 7 pruned in every module
    plain = labelled_heatmap(_scores(), cell=CELL)[0]
    marked = labelled_heatmap(_scores(), kept, cell=CELL)[0]
    y0, x0 = _grid_origin(plain)
    red = _is_red(marked)
    for row in range(len(PATHS)):
        y = y0 + row * CELL
        for head in range(8):
            cell_red = int(red[y:y + CELL, x0 + head * CELL:x0 + (head + 1) * CELL].sum())
            if head < 6:
                assert cell_red == 0, f"kept head {head} of row {row} is marked"
            else:
                assert cell_red > CELL, f"pruned head {head} of row {row} has no cross"
    # the legend explains the cross only when a fragment is shown
    assert int(_is_red(plain).sum()) == 0 and int(red[:, x0 + 8 * CELL + 5:].sum()) > CELL


def test_row_labels_drop_only_the_parts_every_path_shares() -> None:
    assert short_module_name("diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2") == "output_blocks.11.1.0.attn2"
    assert short_module_name("double_blocks.3.img_attn") == "double_blocks.3.img_attn"
