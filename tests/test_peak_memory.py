"""Peak live tensor bytes (metrics.tensor_memory): exact on known-by-construction cases, fake == real, H2's source."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from prompt_fragments.cli import main
from prompt_fragments.judge.thresholds import validate_thresholds
from prompt_fragments.metrics.hypotheses import evaluate_hypotheses, missing_metrics, run_status
from prompt_fragments.metrics.memory import peak_memory, peak_memory_metrics
from prompt_fragments.metrics.report import build_summary
from prompt_fragments.metrics.tensor_memory import fake_module_peak, measure_peak_tensor_bytes, storage_bytes

F32 = 4


def test_a_chain_of_known_allocations_peaks_where_counted_by_hand() -> None:
    def chain():
        a = torch.empty(1000)            # 4000 B
        b = torch.ones(500)              # 2000 B: 6000 live
        v = a.view(10, 100)              # a view: shares a's storage, +0
        v.add_(1)                        # in place, +0
        c = a * 2                        # 4000 B: 10000 live, the peak
        del a, v                         # a's storage dies only now (the view held it): 6000 live
        d = torch.zeros(250)             # 1000 B: 7000 live, below the peak because a gave its bytes back first
        return c, d, b

    out, peak = measure_peak_tensor_bytes(chain)
    assert (peak.resident_bytes, peak.peak_activation_bytes, peak.end_bytes, peak.allocations) == (0, 10000, 7000, 4)
    assert peak.peak_op == "aten.mul.Tensor" and peak.peak_tensor_bytes == 10000
    del out


@pytest.mark.parametrize("inplace, peak", [(False, 2 * 8 * 128 * F32), (True, (8 * 128 + 8 * 32) * F32)])
def test_a_module_peak_counts_weights_once_and_frees_intermediates(inplace: bool, peak: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(inplace=inplace), nn.Linear(128, 32))
    x = torch.randn(8, 64)
    weights = (64 * 128 + 128 + 128 * 32 + 32) * F32
    with torch.no_grad():
        # relu: its output and the first Linear's are live together (8 x 128 twice); in place, the first Linear's
        # output is written over and the second Linear's (8 x 32) is the only new tensor while it is alive
        y, measured = measure_peak_tensor_bytes(lambda: model(x), resident=[model, x, model])  # declared twice: once
    assert measured.resident_bytes == weights + x.numel() * F32 == storage_bytes([model, x])
    assert measured.peak_activation_bytes == peak and measured.end_bytes == y.numel() * F32


def test_tensors_the_call_only_reads_count_as_resident_and_a_resize_is_followed() -> None:
    table = torch.ones(100)  # not declared: live before the call, read by it

    def call():
        out = torch.empty(0)
        torch.mul(table, 2, out=out)  # out= resizes the empty tensor to 400 B in place
        return out

    out, peak = measure_peak_tensor_bytes(call)
    assert peak.resident_bytes == 400 and peak.peak_activation_bytes == 400 and peak.end_bytes == 400
    del out


def test_peak_memory_gives_a_step_and_a_batch_and_no_vram_on_cpu() -> None:
    lin = nn.Linear(16, 16, bias=False)

    def sampler():  # two steps; the second step's input is the first's output, freed after the step
        x = torch.zeros(4, 16)
        for _ in range(2):
            x = lin(x)
        return x

    with torch.no_grad():
        m = peak_memory(sampler, [lin], device="cpu", step_module=lin)
    # batch: x and lin(x) live together, 2 x 256 B; a step: the same window, and two calls seen
    assert m["peak_tensor_bytes_activations"] == 512 and m["step"]["peak_tensor_bytes_activations"] == 512
    assert m["step"]["calls"] == 2 and m["peak_vram_bytes"] is None and m["step"]["peak_vram_bytes"] is None
    flat = peak_memory_metrics({"full": {"batch": m, "step": m["step"]}, "fragment": {"batch": m, "step": m["step"]}})
    assert flat["peak_tensor_reduction"] == 0.0 and flat["vram_reduction"] is None


def _reference_unet():
    from prompt_fragments.reference.model import load_reference

    return load_reference().unet


def test_the_fake_tensor_peak_equals_the_real_run_on_the_reference_model() -> None:
    pytest.importorskip("diffusers")
    from prompt_fragments.bench.memory import random_scores
    from prompt_fragments.fragment.build import apply_fragment, build_fragment, describe_base
    from prompt_fragments.fragment.extract import plan_levers
    from prompt_fragments.fragment.settings import lever_settings
    from prompt_fragments.fragment.surgery.kv_fold import FoldedProjection
    from prompt_fragments.profiling.evidence import ProfileEvidence

    unet = _reference_unet()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, unet.config.in_channels, 16, 16, generator=g)
    rows = torch.randn(2, 32, unet.config.cross_attention_dim, generator=g)
    context = rows.repeat_interleave(2, 0)
    t = torch.tensor(500.0)
    heads, ff = random_scores(unet)
    evidence = ProfileEvidence.from_scores(heads, ff_scores=ff, kv_context=rows)
    levers = plan_levers(evidence, lever_settings(0.3, True, 0.3), model=unet)
    small = apply_fragment(unet, build_fragment(unet, levers, base=describe_base(unet, "ref", sha256="x", hash_kind="none"),
                                                name="t"))
    next(m for m in small.modules() if isinstance(m, FoldedProjection)).contexts.match(context)  # warm the fold's match
    for model, keep in ((unet, ()), (small, ("encoder_hidden_states",))):
        with torch.no_grad():
            out, real = measure_peak_tensor_bytes(lambda: model(x, t, encoder_hidden_states=context),
                                                  resident=[model, x, t, context])
        fake = fake_module_peak(model, (x, t), {"encoder_hidden_states": context}, keep_real=keep)
        assert fake.device == "cpu (fake tensors)" and real.device == "cpu"
        assert (fake.resident_bytes, fake.peak_activation_bytes, fake.allocations, fake.end_bytes) == \
            (real.resident_bytes, real.peak_activation_bytes, real.allocations, real.end_bytes)
        assert fake.attention_ops == real.attention_ops and fake.peak_activation_bytes > 0
        del out
    assert fake.peak_tensor_bytes < fake_module_peak(unet, (x, t), {"encoder_hidden_states": context}).peak_tensor_bytes


H2 = validate_thresholds({"hypotheses": {"H2": {"peak_memory_reduction_min": 0.25, "lpips_max": 0.035, "ssim_min": 0.9}}})
QUALITY = {"lpips_mean": 0.01, "ssim_mean": 0.95}


def test_h2_is_judged_on_cuda_when_measured_else_on_peak_tensor_bytes_and_says_which() -> None:
    cuda = evaluate_hypotheses({**QUALITY, "vram_reduction": 0.10, "peak_tensor_reduction": 0.40}, H2)["H2"]
    assert cuda["memory_source"] == "vram_reduction" and cuda["peak_memory_reduction"] == 0.10 and cuda["status"] == "FAIL"
    cpu = evaluate_hypotheses({**QUALITY, "vram_reduction": None, "peak_tensor_reduction": 0.30}, H2)
    assert cpu["H2"]["memory_source"] == "peak_tensor_reduction" and cpu["H2"]["status"] == "PASS"
    assert run_status(cpu) == "PASS"
    summary = build_summary("r", {**QUALITY, "peak_tensor_reduction": 0.30}, H2)
    assert summary["verified"] is True and summary["h2_memory"]["source"] == "peak_tensor_reduction"
    assert "H2 judged on peak_tensor_bytes (CPU, live tensors incl. activations), not VRAM." in summary["notes"]
    assert "judged on peak VRAM" in build_summary("r", {**QUALITY, "vram_reduction": 0.3}, H2)["h2_memory"]["judged_on"]


@pytest.mark.parametrize("value", [None, float("nan")])
def test_a_run_with_neither_memory_figure_is_missing_and_invalid(value) -> None:
    h = evaluate_hypotheses({**QUALITY, "vram_reduction": value, "peak_tensor_reduction": value}, H2)
    assert h["H2"]["status"] == "MISSING" and h["H2"]["memory_source"] is None and run_status(h) == "INVALID"
    assert missing_metrics(h) == ["H2.peak_memory_reduction"]
    summary = build_summary("r", {**QUALITY}, H2)
    assert summary["status"] == "INVALID" and any("neither peak VRAM (CUDA) nor peak_tensor_bytes" in n for n in summary["notes"])


def test_older_thresholds_files_name_the_same_limit_vram_reduction_min() -> None:
    legacy = validate_thresholds({"hypotheses": {"H2": {"vram_reduction_min": 0.25}}})
    assert legacy["hypotheses"]["H2"] == {"peak_memory_reduction_min": 0.25}


def test_bench_memory_cli_prints_full_and_fragment_on_fake_tensors(capsys) -> None:
    pytest.importorskip("diffusers")
    assert main(["bench", "memory", "--arch", "tiny", "--size", "128", "--batch", "2", "--sweep", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["config"]: r for r in report["rows"]}
    assert list(rows) == ["full model", "heads 30%", "kv-fold", "ff 30%", "heads 30% + kv-fold + ff 30%"]
    full, frag = rows["full model"], rows["heads 30% + kv-fold + ff 30%"]
    assert report["cfg_batch"] == 4 and full["device"] == "cpu (fake tensors)"
    assert frag["weights_bytes"] < full["weights_bytes"] and frag["peak_tensor_bytes"] < full["peak_tensor_bytes"]
    assert frag["peak_tensor_bytes_activations"] <= full["peak_tensor_bytes_activations"]
    assert all(r["peak_tensor_bytes"] == r["peak_tensor_bytes_resident"] + r["peak_tensor_bytes_activations"] for r in rows.values())
    assert main(["bench", "memory", "--arch", "tiny", "--size", "128", "--batch", "1"]) == 0
    assert "not VRAM" in capsys.readouterr().out
