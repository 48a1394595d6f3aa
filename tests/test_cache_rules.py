"""Tier 1: EasyCache's and LazyCache's skip rule as the peer bench re-implements it (issue #27, item 4): its decisions
on a toy trajectory against hand-computed ones, each wrapper's skipped step against the reuse done by hand, and, on
the reference model, threshold 0 giving the stock images bit for bit while a loose threshold skips."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

from prompt_fragments.bench.cache_rules import (EasyCacheUNet, LazyCacheUNet, ReuseRule, percent_timestep)
from prompt_fragments.errors import FragmentError


def test_decisions_on_a_toy_trajectory_match_the_hand_computed_ones() -> None:
    rule = ReuseRule(threshold=0.3, start_t=900.0, end_t=100.0, subsample=1)
    planted = {950: 10.0, 850: 12.0, 600: 20.0, 100: 30.0, 50: 31.0}  # what a computed step returns
    called: list[int] = []

    def compute(t: int) -> torch.Tensor:
        called.append(t)
        return torch.tensor([planted[t]], dtype=torch.float64)

    run = [(950, 0.0), (850, 1.0), (800, 1.5), (700, 2.0), (600, 2.5), (500, 2.6), (100, 3.0), (50, 3.1)]
    outs = [rule.step(t, torch.tensor([x], dtype=torch.float64), lambda t=t: compute(t)).item() for t, x in run]
    # 950: before the window, computed. 850: first in the window, no rate yet: computed, rate |12-10|/|1-0| = 2.
    # 800: 2 * 0.5 / 12 = 0.083 < 0.3: skipped, 1.5 + (12 - 1). 700: + 2 * |2 - 1| / 12 -> 0.25: skipped, 2 + 11.
    # 600: + 2 * 1.5 / 12 -> 0.5 >= 0.3: computed (20), sum back to 0, rate |20-12| / 1.5 = 5.33.
    # 500: 5.33 * 0.1 / 20 = 0.027: skipped, 2.6 + 17.5.  100 and 50: the end of the window, always computed.
    assert_close(outs, [10.0, 12.0, 12.5, 13.0, 20.0, 20.1, 30.0, 31.0])
    assert called == [950, 850, 600, 100, 50]
    assert [skip for _, skip in rule.decisions] == [False, False, True, True, False, True, False, False]
    assert rule.skipped == 3 and rule.runs == 1
    # a timestep not below the last starts a new run: no rate carried over, so its first window step computes
    rule.step(950, torch.tensor([0.0], dtype=torch.float64), lambda: compute(950))
    rule.step(850, torch.tensor([0.01], dtype=torch.float64), lambda: compute(850))
    assert called[-2:] == [950, 850] and rule.runs == 2 and rule.skipped == 3


def test_the_end_of_the_window_computes_and_leaves_the_state_untouched() -> None:
    a = ReuseRule(threshold=1.0, start_t=900.0, end_t=100.0, subsample=1)
    b = ReuseRule(threshold=1.0, start_t=900.0, end_t=100.0, subsample=1)
    for rule in (a, b):
        for t, x in [(850, 0.0), (800, 1.0)]:
            rule.step(t, torch.tensor([x]), lambda x=x: torch.tensor([2 * x + 1]))
    # a threshold of 1 would skip this step; at t <= end_t it is computed and nothing it saw is kept
    assert b.step(90, torch.tensor([1.01]), lambda: torch.tensor([-7.0])).item() == -7.0
    assert b.decisions[-1] == (90, False) and b.skipped == 0
    assert {k: v for k, v in a._state.items() if k != "last_t"}.keys() == {k for k in b._state if k != "last_t"}
    for key in ("rate", "out_norm"):
        assert a._state[key] == b._state[key]
    for key in ("residual", "x_prev", "out_prev"):
        assert_close(a._state[key], b._state[key])


def test_easycache_keeps_no_state_before_the_window_so_it_skips_one_step_later() -> None:
    # ComfyUI's EasyCache picks the condition it watches at the window's first step; LazyCache measures from the start
    decisions = {}
    for track in (True, False):
        rule = ReuseRule(threshold=1e9, start_t=900.0, end_t=0.0, subsample=1, track_before_start=track)
        for t, x in [(950, 0.0), (850, 1.0), (800, 2.0), (750, 3.0)]:
            rule.step(t, torch.tensor([x]), lambda x=x: torch.tensor([2 * x + 1]))
        decisions[track] = [skip for _, skip in rule.decisions]
    assert decisions[True] == [False, False, True, True]
    assert decisions[False] == [False, False, False, True]


def test_percent_timestep_and_bad_settings() -> None:
    assert percent_timestep(0.0) == 999.0 and percent_timestep(1.0) == 0.0
    with pytest.raises(FragmentError, match="reuse threshold: expected a finite number >= 0, found -1"):
        ReuseRule(threshold=-1)
    with pytest.raises(FragmentError, match="subsample: expected an integer >= 1, found 0"):
        ReuseRule(threshold=0.1, subsample=0)


class ToyUNet(nn.Module):
    """A diffusers-shaped UNet: ``(sample, t, context) -> .sample`` with two coordinate channels on the input."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(out_channels=2)
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.calls = 0

    def forward(self, sample: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> SimpleNamespace:
        self.calls += 1
        # each row's output depends on its input, the timestep and its context row (cond differs from uncond)
        out = self.scale * sample[:, :2] * (1 + float(t) / 1000) + context[:, :1, :1, None]
        return SimpleNamespace(sample=out)


def toy_inputs(n: int, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(int(t))
    x = torch.randn(n, 2, 4, 4, generator=g, dtype=torch.float64)
    coords = torch.zeros(2 * n, 2, 4, 4, dtype=torch.float64)
    sample = torch.cat([torch.cat([x, x]), coords], dim=1)  # [uncond; cond] rows, coordinates last
    context = torch.cat([torch.zeros(n, 1, 1), torch.ones(n, 1, 1)]).double()
    return sample, context


def test_easycache_skip_reuses_each_rows_residual_without_calling_the_unet() -> None:
    unet = ToyUNet().double()
    cached = EasyCacheUNet(unet, threshold=1e9, start_percent=0.0, end_percent=1.0, subsample=1)
    s1, ctx = toy_inputs(2, 900)
    cached(s1, torch.tensor(900), ctx)
    s2, _ = toy_inputs(2, 800)
    out2 = cached(s2, torch.tensor(800), ctx).sample  # first with a rate: computed
    assert unet.calls == 2
    assert_close(cached.rule._state["x_prev"], s2[:2, :2])  # it watches the first condition ComfyUI batches: uncond
    s3, _ = toy_inputs(2, 700)
    out3 = cached(s3, torch.tensor(700), ctx).sample
    assert unet.calls == 2 and cached.rule.skipped == 1
    assert_close(out3, s3[:, :2] + (out2 - s2[:, :2]))  # per row, the cond rows' own residual included


def test_lazycache_skip_returns_the_pair_whose_cfg_gives_the_reused_denoised_image() -> None:
    unet = ToyUNet().double()
    alphas = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    guidance = 3.0
    cached = LazyCacheUNet(unet, 1e9, alphas, guidance, start_percent=0.0, end_percent=1.0, subsample=1)
    ctx = None
    seen = []
    for t in (900, 800):
        sample, ctx = toy_inputs(2, t)
        out = cached(sample, torch.tensor(t), ctx).sample
        uncond, cond = out.chunk(2)
        seen.append((t, sample[2:, :2], uncond + guidance * (cond - uncond)))
    assert unet.calls == 2
    (t2, x2, v2) = seen[-1]
    a2 = float(alphas[t2])
    residual = (math.sqrt(a2) * x2 - math.sqrt(1 - a2) * v2) - x2 / math.sqrt(a2)  # x0 - x / sqrt(alpha_bar)
    sample3, _ = toy_inputs(2, 700)
    out3 = cached(sample3, torch.tensor(700), ctx).sample
    assert unet.calls == 2 and cached.rule.skipped == 1
    uncond, cond = out3.chunk(2)
    v3 = uncond + guidance * (cond - uncond)
    a3, x3 = float(alphas[700]), sample3[2:, :2]
    assert_close(math.sqrt(a3) * x3 - math.sqrt(1 - a3) * v3, x3 / math.sqrt(a3) + residual)
    with pytest.raises(FragmentError, match="expected a CFG pair of rows"):
        cached(sample3[:3], torch.tensor(600), ctx[:3])
    with pytest.raises(FragmentError, match="prediction: expected one of"):
        LazyCacheUNet(unet, 0.1, alphas, guidance, prediction="sample")


@pytest.fixture(scope="module")
def reference():
    pytest.importorskip("diffusers")
    from prompt_fragments.defaults import DEFAULT_PROMPT
    from prompt_fragments.judge.reference_target import ReferenceTarget

    return ReferenceTarget(DEFAULT_PROMPT, limits={}, steps=6)


def test_on_the_reference_model_threshold_zero_is_stock_and_a_loose_one_is_not(reference) -> None:
    from prompt_fragments.reference.model import SCHEDULER_CONFIG, build_scheduler, pack_pixels, unet_output

    seeds = [3, 4, 5]
    stock = reference.run(reference.unet, seeds, raw=True)
    space = (unet_output, pack_pixels)

    def lazy(threshold: float) -> LazyCacheUNet:
        return LazyCacheUNet(reference.unet, threshold, build_scheduler("ddim").alphas_cumprod, reference.guidance,
                             prediction=SCHEDULER_CONFIG["prediction_type"], space=space)

    for cached in (EasyCacheUNet(reference.unet, 0.0, space=space), lazy(0.0)):
        # the wrappers' layout changes and slicing leave every computed step as the UNet made it
        assert torch.equal(reference.run(cached, seeds, raw=True), stock)
        assert cached.rule.runs == 1
    for cached in (EasyCacheUNet(reference.unet, 3.0, space=space), lazy(3.0)):
        images = reference.run(cached, seeds, raw=True)
        assert cached.rule.skipped > 0 and not torch.equal(images, stock)
        assert torch.isfinite(images).all()
