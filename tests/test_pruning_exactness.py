"""Physical pruning equals masking, on diffusers and on ComfyUI's real UNet, and never mutates the input."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

import comfyui_support as cs
from prompt_fragments.errors import ProfilingError, PruningError
from prompt_fragments.fragment.surgery.masking import mask_heads
from prompt_fragments.fragment.surgery.heads import prune_attention, prune_heads
from prompt_fragments.fragment.surgery.selection import select_heads
from prompt_fragments.profiling.discovery import find_attention, iter_attention


def _plan(model: nn.Module, ratio: float = 0.4, seed: int = 0) -> dict[str, list[int]]:
    """A random (seeded) plan that removes heads from every module: exactness must not depend on scores."""
    g = torch.Generator().manual_seed(seed)
    scores = {s.path: torch.rand(s.heads, generator=g) for s in find_attention(model)}
    return select_heads(scores, ratio=ratio, scope="per_layer").kept


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def _check_exact(unet: nn.Module, make_inputs) -> None:
    inputs = make_inputs(batch=2, seed=3)
    plan = _plan(unet)
    before = _snapshot(unet)
    modules_before = dict(unet.named_modules())
    with torch.no_grad():
        full = cs.unet_output(unet(**inputs))
        with mask_heads(unet, plan):
            masked = cs.unet_output(unet(**inputs))
        pruned_model = prune_heads(unet, plan)
        pruned = cs.unet_output(pruned_model(**inputs))
        full_again = cs.unet_output(unet(**inputs))

    assert _relative_error(masked, pruned) <= 1e-5
    assert _relative_error(full, masked) > 1e-3, "the plan must change the output, or the test proves nothing"
    # The input model is untouched: same modules, same tensors, same output.
    assert dict(unet.named_modules()).keys() == modules_before.keys()
    assert all(unet.get_submodule(p) is m for p, m in modules_before.items() if p)
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(full, full_again)
    # The pruned model really is smaller, with heads updated and layout consistent.
    for path, kept in plan.items():
        new, old = pruned_model.get_submodule(path), unet.get_submodule(path)
        assert new.heads == len(kept) and old.heads != new.heads
        assert new.to_q.out_features == new.heads * (old.to_q.out_features // old.heads)
        assert type(new.to_q) is type(old.to_q) and type(new.to_out[0]) is type(old.to_out[0])
        assert new.to_q.weight.dtype == old.to_q.weight.dtype and new.to_q.weight.device == old.to_q.weight.device
    n_full = sum(p.numel() for p in unet.parameters())
    n_pruned = sum(p.numel() for p in pruned_model.parameters())
    assert n_pruned < n_full


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_diffusers_physical_equals_masked(kind: str) -> None:
    unet, make_inputs = cs.make_small_diffusers_unet(kind)
    _check_exact(unet, make_inputs)
    pruned = prune_heads(unet, _plan(unet))
    attn = next(m for path, m in iter_attention(pruned) if m.heads < unet.get_submodule(path).heads)
    assert attn.inner_dim == attn.heads * (attn.to_q.out_features // attn.heads)  # diffusers bookkeeping follows


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_comfy_unet_physical_equals_masked(comfyui, kind: str) -> None:
    unet, make_inputs = cs.make_small_comfy_unet(kind)
    _check_exact(unet, make_inputs)


def test_comfy_ops_linear_class_and_half_precision_are_kept(comfyui) -> None:
    import comfy.ops
    from comfy.ldm.modules.attention import CrossAttention

    attn = CrossAttention(16, heads=4, dim_head=4, dtype=torch.float16, operations=comfy.ops.manual_cast)
    cs.fill_deterministic_(attn, 0)
    small = prune_attention(attn, [1, 3], "blk.attn1")
    assert type(small.to_k) is comfy.ops.manual_cast.Linear
    assert small.to_k.weight.dtype == torch.float16 and small.heads == 2 and small.dim_head == 4
    assert_close(small.to_k.weight, torch.cat([attn.to_k.weight[4:8], attn.to_k.weight[12:16]]), rtol=0, atol=0)
    w_out = attn.to_out[0].weight
    assert_close(small.to_out[0].weight, torch.cat([w_out[:, 4:8], w_out[:, 12:16]], dim=1), rtol=0, atol=0)
    assert small.to_out[0].bias is not None and torch.equal(small.to_out[0].bias, attn.to_out[0].bias)


def test_pruning_never_writes_into_base_tensors() -> None:
    unet, make_inputs = cs.make_small_diffusers_unet("sd15")
    # Every in-place write bumps a tensor's version counter, read-only mmap or not.
    versions = {n: p._version for n, p in unet.named_parameters()}
    pointers = {n: p.data_ptr() for n, p in unet.named_parameters()}
    pruned = prune_heads(unet, _plan(unet))
    with torch.no_grad():
        pruned(**make_inputs())
    assert {n: p._version for n, p in unet.named_parameters()} == versions
    assert {n: p.data_ptr() for n, p in unet.named_parameters()} == pointers


def test_bad_plans_name_the_module() -> None:
    unet, _ = cs.make_small_diffusers_unet("sd15")
    path = find_attention(unet)[0].path
    with pytest.raises(PruningError, match=rf"{path}: expected head indices in \[0, 3\], found \[4\]"):
        prune_heads(unet, {path: [0, 4]})
    with pytest.raises(PruningError, match=rf"{path}: duplicate head indices \[2\]"):
        prune_heads(unet, {path: [2, 2]})
    with pytest.raises(PruningError, match="no.such: module not found"):
        prune_heads(unet, {"no.such": [0]})


def test_stale_heads_are_caught(comfyui) -> None:
    from comfy.ldm.modules.attention import CrossAttention

    attn = cs.fill_deterministic_(CrossAttention(16, heads=4, dim_head=4), 0)
    broken = prune_attention(attn, [0, 1], "blk.attn1")
    broken.heads = 4  # what forgetting to update heads after slicing looks like: 8 channels still divide by 4
    with pytest.raises(ProfilingError, match=r"blk.attn1: expected to_q.out_features == heads \* dim_head == 4 \* 4, found 8"):
        prune_attention(broken, [0], "blk.attn1")
