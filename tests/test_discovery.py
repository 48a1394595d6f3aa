"""Attention discovery on both module families, by structure."""
from __future__ import annotations

import pytest
import torch.nn as nn
from diffusers.models.attention_processor import Attention

import comfyui_support as cs
from prompt_fragments.errors import ProfilingError
from prompt_fragments.profiling.discovery import CROSS, SELF, describe, find_attention, is_attention


def test_diffusers_sd15_sites_are_found_with_layout() -> None:
    unet, _ = cs.make_small_diffusers_unet("sd15")
    sites = find_attention(unet)
    # 2 down + 3 up (2 levels x ...) blocks each with one transformer: attn1 and attn2 alternate.
    assert len(sites) == len([n for n, m in unet.named_modules() if isinstance(m, Attention)])
    assert {s.kind for s in sites} == {SELF, CROSS}
    first = sites[0]
    assert first.path == "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    assert (first.kind, first.heads, first.dim_head, first.query_dim) == (SELF, 4, 8, 32)
    cross = next(s for s in sites if s.kind == CROSS)
    assert cross.context_dim == 40 and cross.query_dim == 32
    assert unet.get_submodule(cross.path).to_k.in_features == 40


def test_comfy_unet_sites(comfyui) -> None:
    unet, _ = cs.make_small_comfy_unet("sdxl")
    sites = find_attention(unet)
    assert sites, "ComfyUI CrossAttention modules must be found by structure"
    assert all(s.path.endswith(("attn1", "attn2")) for s in sites)
    assert all(s.kind == (CROSS if s.path.endswith("attn2") else SELF) for s in sites)
    assert all(s.heads == 8 and s.dim_head == 8 for s in sites)


def test_lookalikes_without_heads_are_ignored() -> None:
    m = nn.Module()
    m.to_q, m.to_k, m.to_v = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(4, 8)
    m.to_out = nn.Sequential(nn.Linear(8, 4))
    assert not is_attention(m)  # no heads attribute
    m.heads = True  # a bool is not a head count
    assert not is_attention(m)
    m.heads = 2
    assert is_attention(m)
    assert find_attention(nn.Sequential(m))[0].path == "0"


def test_inconsistent_layout_names_the_module() -> None:
    m = Attention(12, heads=4, dim_head=3)
    m.heads = 5  # 12 channels cannot hold 5 heads
    with pytest.raises(ProfilingError, match=r"^blk\.attn: expected to_q.out_features divisible by heads=5, found 12"):
        describe("blk.attn", m)
