"""Precision tiers: fp8 / int8 Linears dequantize correctly, survive ComfyUI's cast path, and round-trip (issue #7)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import comfyui_support as cs
from prompt_fragments.errors import PruningError
from prompt_fragments.fragment.surgery.precision import (
    QuantizedLinearMixin, dequantize, quantize_weight, quantized_linear, select_precision_layers,
)
from prompt_fragments.fragment.surgery.selection import select_heads
from prompt_fragments.fragment.build import apply_fragment, build_fragment, describe_base
from prompt_fragments.fragment.format.store import load_fragment, save_fragment
from prompt_fragments.profiling.discovery import find_attention
from prompt_fragments.fragment.surgery.precision import PrecisionLever
from prompt_fragments.fragment.surgery.heads import HeadLever


@pytest.mark.parametrize(("fmt", "tolerance"), [("fp8", 0.04), ("int8", 0.01)])
def test_quantized_linear_is_close_and_dequantizes_to_input_dtype(fmt: str, tolerance: float) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    q, scale = quantize_weight(lin.weight, fmt)
    ql = quantized_linear(lin, q, scale)
    x = torch.randn(5, 64)
    with torch.no_grad():
        ref, out = lin(x), ql(x)
        half = ql(x.to(torch.float16))
    assert isinstance(ql, nn.Linear) and ql.weight.dtype == q.dtype and ql.weight_scale.shape == (32, 1)
    assert float((ref - out).norm() / ref.norm()) < tolerance
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), out, rtol=2e-2, atol=2e-2)
    assert lin.weight.dtype == torch.float32  # the original is untouched
    assert "weight_scale" in ql.state_dict()


def test_per_tensor_scale_and_bad_shapes() -> None:
    w = torch.tensor([[1.0, -2.0], [4.0, 0.5]])
    q, s = quantize_weight(w, "int8", "per_tensor")
    assert s.shape == (1, 1)
    torch.testing.assert_close(dequantize(q, s, torch.float32), w, rtol=0, atol=4.0 / 127)
    with pytest.raises(PruningError, match="expected quantized weight"):
        quantized_linear(nn.Linear(2, 2), torch.zeros(3, 2, dtype=torch.int8), s)


def test_selection_quantizes_least_sensitive_layers_up_to_the_ratio() -> None:
    exact = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        exact.weight.copy_(torch.eye(4))  # int8 represents it exactly
    noisy = nn.Linear(4, 4, bias=False)
    chosen = select_precision_layers({"exact": exact, "noisy": noisy}, fmt="int8", ratio=0.5)
    assert chosen == ["exact"]


def test_comfy_manual_cast_path_dequantizes(comfyui) -> None:
    import comfy.ops

    lin = comfy.ops.manual_cast.Linear(16, 8, dtype=torch.float16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(8, 16) * 0.1)  # our own new layer
        lin.bias.copy_(torch.randn(8) * 0.1)
    q, s = quantize_weight(lin.weight, "fp8")
    ql = quantized_linear(lin, q, s)
    assert isinstance(ql, comfy.ops.manual_cast.Linear) and isinstance(ql, QuantizedLinearMixin)
    x = torch.randn(3, 16)
    expected = torch.nn.functional.linear(x, dequantize(q, s, torch.float32), lin.bias.float())
    torch.testing.assert_close(ql(x), expected)  # manual_cast sets comfy_cast_weights: our override must run
    assert ql.comfy_cast_weights


def test_fragment_with_precision_round_trips(tmp_path) -> None:
    unet, make_inputs = cs.make_small_diffusers_unet("sd15")
    inputs = make_inputs(batch=2, seed=3)
    selection = select_heads({s.path: torch.ones(s.heads) for s in find_attention(unet)}, ratio=0.0)
    fragment = build_fragment(unet, [HeadLever(selection), PrecisionLever("int8", ratio=0.5)], base=describe_base(unet, "toy"), name="q")
    block = fragment.manifest["compression"]["precision"]
    assert block["applied"] and 0 < block["params_quantized"] <= 0.5 * block["params_linear"]
    loaded = load_fragment(save_fragment(fragment, tmp_path))
    small = apply_fragment(unet, loaded)
    layers = list(block["layers"])
    assert all(small.get_submodule(p).weight.dtype == torch.int8 for p in layers)
    assert all(unet.get_submodule(p).weight.dtype == torch.float32 for p in layers)
    with torch.no_grad():
        full, out = cs.unet_output(unet(**inputs)), cs.unet_output(small(**inputs))
    assert 0 < float((full - out).norm() / full.norm()) < 0.05
