"""Tier 1: the equal-bytes bench's GGUF layers against gguf's own code, the bench itself, and low-bit bytes in `bench weights`."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

gguf_quants = pytest.importorskip("gguf.quants")
from gguf.constants import GGMLQuantizationType  # noqa: E402

from prompt_fragments.bench.gguf_weights import GGUFLayer, dequantize_rows, padded_length, quantize_rows  # noqa: E402
from prompt_fragments.bench.quant import bench_reference_quant  # noqa: E402
from prompt_fragments.bench.weights import WeightsConfig, build_random_unet, measure  # noqa: E402
from prompt_fragments.fragment.settings import lever_settings  # noqa: E402

FORMATS = ("Q8_0", "Q4_0")


def random_weight(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w.view(shape[0], -1)[0] = 0.0  # an all-zero row: scale 0, the formats' divide-by-zero branch
    w.view(shape[0], -1)[-1, 0] = 3.0  # an outlier: a block dominated by one value
    return w


def gguf_reference(w: torch.Tensor, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """gguf's own quantize and dequantize of ``w`` zero-padded to whole blocks: (packed, weights [out, cols])."""
    rows = w.reshape(w.shape[0], -1).numpy().astype(np.float32)
    cols = rows.shape[1]
    rows = np.pad(rows, ((0, 0), (0, padded_length(cols) - cols)))
    qtype = getattr(GGMLQuantizationType, fmt)
    packed = gguf_quants.quantize(rows, qtype)
    return packed, gguf_quants.dequantize(packed, qtype)[:, :cols]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(6, 64), (5, 27), (4, 100), (3, 2, 3, 3), (8, 8, 1, 1)])
def test_torch_dequantizer_is_bit_exact_with_gguf(fmt: str, shape: tuple[int, ...]) -> None:
    w = random_weight(shape, seed=sum(shape))
    packed = quantize_rows(w, fmt)
    ref_packed, ref = gguf_reference(w, fmt)
    assert np.array_equal(packed.numpy(), ref_packed)  # the bytes are gguf's own
    cols = int(np.prod(shape[1:]))
    mine = dequantize_rows(packed, fmt, cols)
    assert mine.dtype == torch.float32 and mine.shape == (shape[0], cols)
    assert torch.equal(mine, torch.from_numpy(np.ascontiguousarray(ref)))  # bit-exact, not close


@pytest.mark.parametrize("fmt", FORMATS)
def test_gguf_layer_forward_is_the_layer_with_the_dequantized_weight(fmt: str) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(40, 6)  # 40 columns: one padded block
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    x_lin, x_conv = torch.randn(4, 40), torch.randn(2, 3, 9, 9)
    for module, x in ((lin, x_lin), (conv, x_conv)):
        layer = GGUFLayer.from_module(module, fmt)
        w = torch.from_numpy(np.ascontiguousarray(gguf_reference(module.weight.detach(), fmt)[1])).reshape(module.weight.shape)
        expected = F.linear(x, w, module.bias) if isinstance(module, nn.Linear) else \
            F.conv2d(x, w, module.bias, stride=module.stride, padding=module.padding)
        torch.testing.assert_close(layer(x), expected)
        assert layer.packed.dtype == torch.uint8


FIELDS = ("format", "scope", "group", "layers", "params_quantized", "bits_per_weight", "bytes", "bytes_saved", "saved_pct",
          "ssim_mean", "lpips_mean", "adherence", "adherence_delta", "seconds_per_image", "build_seconds", "passed",
          "gate_failures")


def mean_abs_difference(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """A cheap stand-in for LPIPS: the judge only needs a per-image distance."""
    return (a - b).abs().flatten(1).mean(1).tolist()


def test_quant_bench_runs_and_every_row_has_every_field() -> None:
    report = bench_reference_quant(seeds=2, profile_seeds=1, steps=1, groups=[64], lpips_scorer=mean_abs_difference, grid=2)
    rows = report["results"]
    labels = {(r["format"], r["scope"]) for r in rows}
    for fmt in ("fp8", "int8", "Q8_0", "Q4_0", "int4 g64", "int4-aw g64"):
        assert {(fmt, "all"), (fmt, "linear")} <= labels
    full = next(r for r in rows if r["scope"] == "-")
    for r in rows:
        assert set(FIELDS) <= set(r), r["format"]
        assert all(r[k] is not None for k in FIELDS if k not in ("group", "adherence", "adherence_delta")), r
        if r is not full:
            assert 0 < r["bytes"] < full["bytes"] and r["bytes_saved"] == full["bytes"] - r["bytes"]
            assert r["bits_per_weight"] < 32
    by = {(r["format"], r["scope"]): r for r in rows}
    # all layers hold more weights than the Linears alone, so storing them saves more
    assert by[("Q4_0", "all")]["bytes"] < by[("Q4_0", "linear")]["bytes"]
    assert by[("Q4_0", "all")]["params_quantized"] > by[("Q4_0", "linear")]["params_quantized"]
    assert report["comparisons"] and {c["scope"] for c in report["comparisons"]} == {"all", "linear"}


def test_bench_weights_low_bit_lever_stores_fewer_bytes() -> None:
    model = build_random_unet("tiny")
    plain = measure(model, lever_settings(heads=0.3, ff=0.3), arch="tiny")
    low = measure(model, WeightsConfig(lever_settings(heads=0.3, ff=0.3), low_bit_ratio=1.0), arch="tiny")
    assert plain["low_bit_params"] == 0 and low["low_bit_params"] > 0 and low["low_bit_layers"] > 0
    assert low["bytes_before"] == plain["bytes_before"]
    saved = plain["bytes_after"] - low["bytes_after"]
    # fp16 weights (2 bytes) became int4 codes with fp16 scale and zero per 64 columns (<= 0.5625 bytes,
    # more where a short row is padded to a whole group): at least a quarter of their bytes go, never more than all
    assert 0.25 * 2 * low["low_bit_params"] < saved < 2 * low["low_bit_params"]
    assert low["config"].endswith("int4 100%")  # the one label of the low-bit lever (group 64 is the default)
