"""Low-bit weights (issue #18 item 2): exact packing, a reference dequantizer, AWQ scaling, modules, fragments."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

from prompt_fragments.errors import IntegrityError, ManifestError
from prompt_fragments.fragment.build import apply_fragment, build_fragment, check_lever_tensors, describe_base
from prompt_fragments.fragment.calibration import Predictors, candidate_ladder, goal_levers
from prompt_fragments.fragment.format.manifest import seal, validate_manifest
from prompt_fragments.fragment.format.store import load_fragment, save_fragment
from prompt_fragments.fragment.settings import ExtractionSettings
from prompt_fragments.fragment.surgery.low_bit import (
    LowBitLever, LowBitMixin, awq_channel_scale, dequantize_groups, low_bit_errors, low_bit_keys, low_bit_module, pack_int3, pack_int4,
    quantization_error, quantize_groups, unpack_int3, unpack_int4,
)
from prompt_fragments.fragment.surgery.precision import PrecisionLever
from prompt_fragments.profiling.activation_stats import ActivationStats


# ---- packing ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 7, 16, 33, 64])
def test_int4_pack_round_trip_is_bit_exact_for_every_code_and_odd_lengths(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    q = torch.randint(0, 16, (3, n), generator=g, dtype=torch.uint8)
    q[0, : min(n, 16)] = torch.arange(16, dtype=torch.uint8)[: min(n, 16)]  # every code appears
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (3, (n + 1) // 2)
    assert torch.equal(unpack_int4(packed, n), q)
    # low nibble first, written out by hand
    assert pack_int4(torch.tensor([3, 12], dtype=torch.uint8)).item() == 3 + 12 * 16


@pytest.mark.parametrize("n", [1, 8, 13, 64])
def test_int3_pack_round_trip_is_bit_exact(n: int) -> None:
    q = torch.randint(0, 8, (2, n), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
    q[0, : min(n, 8)] = torch.arange(8, dtype=torch.uint8)[: min(n, 8)]
    packed = pack_int3(q)
    assert packed.shape == (2, 3 * math.ceil(n / 8))
    assert torch.equal(unpack_int3(packed, n), q)


def test_out_of_range_codes_are_refused() -> None:
    from prompt_fragments.errors import PruningError

    with pytest.raises(PruningError, match="0..15"):
        pack_int4(torch.tensor([16]))
    with pytest.raises(PruningError, match="0..7"):
        pack_int3(torch.tensor([8]))


# ---- group quantization against a straightforward reference ----------------------------------------------------

def reference_dequantized(weight: torch.Tensor, bits: int, group: int, s: torch.Tensor | None = None) -> torch.Tensor:
    """Loop-by-group asymmetric RTN with fp16 scale and zero, written independently of the package."""
    out_ch = weight.shape[0]
    w = weight.reshape(out_ch, -1).double()
    per = w.shape[1] // (s.numel() if s is not None else w.shape[1]) if s is not None else 1
    col = s.double().repeat_interleave(per) if s is not None else torch.ones(w.shape[1], dtype=torch.float64)
    w = w * col
    result = torch.empty_like(w)
    levels = 2 ** bits - 1
    for start in range(0, w.shape[1], group):
        block = w[:, start : start + group]
        lo = block.min(1, keepdim=True).values
        hi = block.max(1, keepdim=True).values
        scale = ((hi - lo) / levels).float().half().double()
        zero = lo.float().half().double()
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.where(scale > 0, ((block - zero) / safe).round().clamp(0, levels), torch.zeros_like(block))
        result[:, start : start + group] = codes * scale + zero
    return (result / col).reshape(weight.shape).float()


@pytest.mark.parametrize(("shape", "bits", "group"), [((12, 100), 4, 64), ((8, 3, 3, 3), 4, 16), ((5, 64), 3, 32),
                                                      ((6, 10, 1, 1), 4, 128)])
def test_dequantized_weights_equal_the_reference(shape: tuple[int, ...], bits: int, group: int) -> None:
    torch.manual_seed(1)
    w = torch.randn(shape)
    q = quantize_groups(w, bits=bits, group=group)
    cols = math.prod(shape[1:])
    assert q.codes.dtype == torch.uint8 and q.scale.dtype == torch.float16 and q.scale.shape == (shape[0], -(-cols // group))
    assert_close(dequantize_groups(q, torch.float32), reference_dequantized(w, bits, group), rtol=1e-5, atol=1e-5)


def test_channel_scale_is_folded_and_divided_back() -> None:
    torch.manual_seed(2)
    w = torch.randn(8, 4, 3, 3)
    s = torch.rand(4) + 0.5
    q = quantize_groups(w, group=16, channel_scale=s)
    assert_close(dequantize_groups(q), reference_dequantized(w, 4, 16, s), rtol=1e-5, atol=1e-5)
    assert_close(dequantize_groups(q), w, rtol=0, atol=0.5)  # close to the weight itself, not to W * s


def test_awq_alpha_zero_is_rtn_and_the_search_never_loses_on_its_sample() -> None:
    torch.manual_seed(3)
    w = torch.randn(32, 128)
    a = torch.rand(128) * 0.2 + 0.05
    a[:8] = 5.0  # a few channels the prompt drives hard
    x = torch.randn(64, 128) * a
    rtn = quantization_error(w, inputs=x)
    s = awq_channel_scale(w, a, x, grid=1)  # grid 1: alpha in {0, 1}
    ones = awq_channel_scale(w, torch.ones(128), x)  # a flat activation profile: every alpha gives s = 1
    assert_close(dequantize_groups(quantize_groups(w, channel_scale=ones)), dequantize_groups(quantize_groups(w)))
    aware = quantization_error(w, channel_scale=s, inputs=x)
    assert aware <= rtn
    assert quantization_error(w, channel_scale=awq_channel_scale(w, a, x), inputs=x) <= aware + 1e-9  # finer grid


# ---- modules ---------------------------------------------------------------------------------------------------

def test_low_bit_linear_and_conv_run_the_dequantized_weight_in_the_input_dtype() -> None:
    torch.manual_seed(4)
    lin, conv = nn.Linear(70, 9), nn.Conv2d(6, 5, 3, padding=1, stride=2)
    for module, x, op in ((lin, torch.randn(3, 70), lambda x, w, b: F.linear(x, w, b)),
                          (conv, torch.randn(2, 6, 9, 9), lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1))):
        q = quantize_groups(module.weight, group=32, channel_scale=torch.rand(module.weight.shape[1]) + 0.5)
        lb = low_bit_module(module, q)
        assert isinstance(lb, type(module)) and isinstance(lb, LowBitMixin) and lb.weight.dtype == torch.uint8
        assert module.weight.dtype == torch.float32 and "weight_scale" in lb.state_dict()
        with torch.no_grad():
            assert_close(lb(x), op(x, dequantize_groups(q), module.bias))
            half = lb(x.half())
        assert half.dtype == torch.float16
        assert_close(half.float(), op(x, dequantize_groups(q), module.bias), rtol=2e-2, atol=2e-2)


# ---- activation statistics -------------------------------------------------------------------------------------

def test_activation_stats_measure_mean_abs_per_channel_and_sample_inputs() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 4), nn.Conv2d(3, 2, 3))
    x_lin, x_conv = torch.randn(2, 10, 6), torch.randn(2, 3, 8, 8)
    with ActivationStats(model, token_sample=None, rows_per_call=4, sample_rows=8, call_stride=1) as acts:
        for _ in range(3):
            model[0](x_lin)
            model[1](x_conv)
    stats = acts.stats()
    assert_close(stats["0"]["abs_mean"], x_lin.abs().mean((0, 1)))
    assert_close(stats["1"]["abs_mean"], x_conv.abs().mean((0, 2, 3)))
    rows = stats["1"]["inputs"]
    assert rows.shape == (8, 27)
    patches = F.unfold(x_conv, 3).transpose(1, 2).reshape(-1, 27).half().float()
    # every sampled row is one real im2col patch of the input (stored in float16)
    assert all(bool((patches - r).abs().amax(1).min() == 0) for r in rows)
    assert sum(len(h) for h in (model[0]._forward_pre_hooks, model[1]._forward_pre_hooks)) == 0


def test_activation_stats_measure_every_call_stride_th_call_from_the_first() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    with ActivationStats(model, token_sample=None, call_stride=3) as acts:
        for i in range(1, 6):
            model(torch.full((1, 3), float(i)))
    # calls 1 and 4 of 5: mean |x| of 1 and 4
    assert_close(acts.stats()["0"]["abs_mean"], torch.full((3,), 2.5))
    assert acts.info()["calls"] == 2 and acts.info()["call_stride"] == 3


# ---- the lever in a fragment -------------------------------------------------------------------------------------

def _tiny_model() -> nn.Module:
    """3x3 and 1x1 convolutions and Linears, the layer kinds of the reference UNet, at toy size."""
    torch.manual_seed(8)
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 8, 1), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 32))


def test_fragment_with_low_bit_round_trips_and_precision_skips_its_layers(tmp_path) -> None:
    model = _tiny_model()
    x = torch.randn(6, 8, 4, 4) * (torch.rand(1, 8, 1, 1) * 3)
    with ActivationStats(model) as acts, torch.no_grad():
        model(x)
    fragment = build_fragment(model, [LowBitLever(ratio=0.6, stats=acts.stats()), PrecisionLever("int8", ratio=1.0)],
                              base=describe_base(model, "toy"), name="lb")
    block = fragment.manifest["compression"]["low_bit"]
    assert block["applied"] and block["method"] == "activation_aware" and block["bits_per_weight"] == 4.5
    assert 0 < block["params_quantized"] <= 0.6 * block["params_quantizable"]
    assert {e["kind"] for e in block["layers"].values()} == {"conv2d", "linear"}
    precision = fragment.manifest["compression"]["precision"]["layers"]
    assert precision and not set(block["layers"]) & set(precision)
    live = apply_fragment(model, fragment)
    loaded = load_fragment(save_fragment(fragment, tmp_path))
    small = apply_fragment(model, loaded)
    for path in block["layers"]:
        assert small.get_submodule(path).weight.dtype == torch.uint8
        assert model.get_submodule(path).weight.dtype == torch.float32
    assert next(small.parameters()).dtype == torch.float32  # the codes are buffers: a model's dtype stays readable
    with torch.no_grad():
        full, out, out_live = model(x), small(x), live(x)
    assert_close(out, out_live)
    assert 0 < float((full - out).norm() / full.norm()) < 0.3


def test_without_stats_the_lever_is_plain_rtn_and_says_so() -> None:
    model = _tiny_model()
    block = build_fragment(model, [LowBitLever(ratio=0.5)], base=describe_base(model, "toy"), name="rtn").manifest["compression"]["low_bit"]
    assert block["applied"] and block["method"] == "round_to_nearest" and "no activation statistics" in block["score"]
    assert all(e["method"] == "rtn_no_stats" and not e["channel_scale"] for e in block["layers"].values())


def _small_fragment():
    torch.manual_seed(7)
    lin = nn.Sequential(nn.Linear(64, 8), nn.Conv2d(4, 4, 3))
    a = torch.full((64,), 0.05)
    a[:4] = 10.0  # four channels the prompt drives hard: their scale wins over plain RTN
    stats = {"0": {"abs_mean": a, "inputs": torch.randn(32, 64) * a}}
    return build_fragment(lin, [LowBitLever(ratio=1.0, stats=stats)], base=describe_base(lin, "toy"), name="h")


@pytest.mark.parametrize(("key_part", "tamper", "message"), [
    ("codes", lambda t: t.to(torch.int8), "expected uint8"),
    ("codes", lambda t: t[:, :-1], "expected uint8"),
    ("scale", lambda t: t.float(), "expected float16"),
    ("zero", lambda t: torch.full_like(t, float("nan")), "finite"),
    ("channel_scale", lambda t: -t, "positive"),
    ("channel_scale", None, "missing tensor"),
])
def test_hostile_low_bit_tensors_are_integrity_errors_naming_file_and_key(key_part, tamper, message) -> None:
    fragment = _small_fragment()
    assert fragment.manifest["compression"]["low_bit"]["layers"]["0"]["channel_scale"]
    tensors = dict(fragment.tensors)
    key = dict(zip(("codes", "scale", "zero", "channel_scale"), low_bit_keys("0")))[key_part]
    if tamper is None:
        del tensors[key]
    else:
        tensors[key] = tamper(tensors[key])
    with pytest.raises(IntegrityError, match=message) as err:
        check_lever_tensors(fragment.manifest, tensors, "evil.safetensors")
    assert "evil.safetensors" in str(err.value) and key in str(err.value)


def test_hostile_low_bit_record_is_refused_by_schema_and_check() -> None:
    fragment = _small_fragment()
    check_lever_tensors(fragment.manifest, fragment.tensors, "ok.safetensors")
    manifest = {k: v for k, v in fragment.manifest.items() if k != "integrity"}
    manifest["compression"] = {**manifest["compression"], "low_bit": {**manifest["compression"]["low_bit"], "bits": 5}}
    with pytest.raises(ManifestError):
        validate_manifest(seal(manifest))
    with pytest.raises(IntegrityError, match="bits"):
        check_lever_tensors(manifest, fragment.tensors, "evil.safetensors")
    layers = {"0": {**fragment.manifest["compression"]["low_bit"]["layers"]["0"], "shape": [8, -64]}}
    manifest["compression"]["low_bit"] = {**fragment.manifest["compression"]["low_bit"], "layers": layers}
    with pytest.raises(IntegrityError, match="shape"):
        check_lever_tensors(manifest, fragment.tensors, "evil.safetensors")


# ---- settings and calibration ------------------------------------------------------------------------------------

def test_settings_and_calibration_offer_the_lever() -> None:
    from prompt_fragments.errors import FragmentError

    assert ExtractionSettings(levers={"heads": 0.0, "low_bit": 0.5}, low_bit_bits=3).label == "int3 50%"
    with pytest.raises(FragmentError, match="low_bit_bits"):
        ExtractionSettings(low_bit_bits=2)
    with pytest.raises(FragmentError, match="low_bit_group"):
        ExtractionSettings(low_bit_group=100)
    assert "low_bit" in goal_levers("memory") and "low_bit" in goal_levers("both")
    assert "low_bit" not in goal_levers("speed")
    rows = low_bit_errors(nn.Sequential(nn.Linear(64, 8), nn.Conv2d(4, 4, 3)))
    assert [n for n, _ in rows] == [512, 144] and all(e > 0 for _, e in rows)
    p = Predictors({"low_bit": [(100, 0.01), (100, 0.2)]})
    # errors of the quantized layers add in energy: sqrt(0.01^2) and sqrt(0.01^2 + 0.2^2)
    assert p.damage("low_bit", 0.5) == pytest.approx(0.01) and p.damage("low_bit", 1.0) == pytest.approx(math.hypot(0.01, 0.2))
    ladder = candidate_ladder(p, "memory", levels=(0.25, 0.05))
    assert [c.amount("low_bit") for c in ladder] == [1.0, 0.5] and ladder[0].label == "int4 100%"
    assert ladder[1].settings().amount("low_bit") == 0.5


# ---- ComfyUI's manual-cast path (tier 2) -------------------------------------------------------------------------

def test_comfy_manual_cast_path_gives_the_core_output(comfyui) -> None:
    import comfy.ops

    torch.manual_seed(6)
    lin = comfy.ops.manual_cast.Linear(70, 8, dtype=torch.float16)
    conv = comfy.ops.manual_cast.Conv2d(4, 6, 3, padding=1, dtype=torch.float16)
    for module in (lin, conv):
        with torch.no_grad():  # our own new layers
            module.weight.copy_(torch.randn_like(module.weight, dtype=torch.float32) * 0.1)
            module.bias.copy_(torch.randn_like(module.bias, dtype=torch.float32) * 0.1)
    for module, x in ((lin, torch.randn(3, 70)), (conv, torch.randn(2, 4, 6, 6))):
        q = quantize_groups(module.weight, group=32, channel_scale=torch.rand(module.weight.shape[1]) + 0.5)
        lb = low_bit_module(module, q)
        assert isinstance(lb, type(module)) and lb.comfy_cast_weights  # manual_cast: ComfyUI takes its cast path
        core = low_bit_module(nn.Linear(70, 8) if module is lin else nn.Conv2d(4, 6, 3, padding=1), q)
        core._parameters["bias"] = nn.Parameter(module.bias.detach().float())
        with torch.no_grad():
            assert_close(lb(x), core(x))
            assert_close(lb.forward_comfy_cast_weights(x), core(x))
