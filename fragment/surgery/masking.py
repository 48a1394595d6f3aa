"""Logical head masking: simulate pruning with hooks, weights untouched.

A forward pre-hook on ``to_out[0]`` multiplies its input (the concatenated
head outputs) by a 0/1 channel mask, so a removed head contributes nothing
while every weight stays where it is.  This is the reference that physical
pruning must match exactly, and the cheap way to try a ratio before
building anything.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from ...profiling.discovery import describe, iter_attention, out_linear
from .selection import validate_plan


def head_mask(heads: int, dim_head: int, kept: Sequence[int]) -> torch.Tensor:
    """A ``[heads * dim_head]`` float mask with ones on the channels of kept heads.

    >>> head_mask(3, 2, [1]).tolist()
    [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    """
    mask = torch.zeros(heads, dim_head)
    mask[list(kept)] = 1.0
    return mask.flatten()


def input_mask_hook(mask: torch.Tensor) -> Callable:
    """A forward pre-hook multiplying a Linear's input by a 0/1 channel mask (a new tensor, never in place).

    Used for heads (input of ``to_out[0]``) and feed-forward channels (input of the output Linear).

    >>> hook = input_mask_hook(torch.tensor([1.0, 0.0]))
    >>> hook(None, (torch.ones(1, 2),))[0].tolist()
    [[1.0, 0.0]]
    """
    cache: dict[tuple, torch.Tensor] = {}

    def hook(_m: nn.Module | None, args: tuple) -> tuple:
        x = args[0]
        key = (x.device, x.dtype)
        m = cache.get(key)
        if m is None:
            m = cache[key] = mask.to(device=x.device, dtype=x.dtype)
        return (x * m,) + tuple(args[1:])

    return hook


@contextmanager
def mask_heads(model: nn.Module, plan: Mapping[str, Sequence[int]]) -> Iterator[nn.Module]:
    """Within the block, heads not in ``plan[path]`` output zero; hooks are removed on exit.

    >>> with mask_heads(unet, {"mid_block.attentions.0.transformer_blocks.0.attn1": [0, 2]}):  # doctest: +SKIP
    ...     masked_out = unet(**inputs).sample
    """
    modules = dict(iter_attention(model))
    heads = {p: int(m.heads) for p, m in modules.items()}
    clean = validate_plan(plan, heads, source=f"{type(model).__name__} mask plan")
    handles = []
    try:
        for path, kept in clean.items():
            if len(kept) == heads[path]:
                continue
            module = modules[path]
            site = describe(path, module)
            mask = head_mask(site.heads, site.dim_head, kept)
            handles.append(out_linear(module, path).register_forward_pre_hook(input_mask_hook(mask)))
        yield model
    finally:
        for handle in handles:
            handle.remove()
