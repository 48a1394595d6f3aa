"""Tier 1: whole-step reuse (``skips=0``), the deepest step-reuse rung, on the reference architecture.

On a calibrated reuse step the whole UNet call is skipped and its output from
the last computed step returned, under the same ScheduleState rules (slots per
call, signatures, narrowed rows) as the deep-block depths.  Seeded random
weights: what is checked is the mechanism (what runs, what is returned, what
the manifest and the calibration ladder hold), not image quality.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

pytest.importorskip("diffusers")

from prompt_fragments.errors import FragmentError
from prompt_fragments.fragment.build import apply_fragment, build_fragment, check_loadable, describe_base
from prompt_fragments.fragment.calibration import Candidate, Predictors, candidate_ladder
from prompt_fragments.fragment.format.store import load_fragment, save_fragment
from prompt_fragments.fragment.format.untrusted import check_schema
from prompt_fragments.fragment.schedule.apply import apply_schedule, fragment_schedule, with_schedule
from prompt_fragments.fragment.schedule.reuse_lever import ReuseEvidence, StepReuseLever
from prompt_fragments.fragment.schedule.state import WHOLE_STEP, Schedule, ScheduleState
from prompt_fragments.fragment.schedule.step_reuse import WholeStepReplay, reuse_replacements
from prompt_fragments.fragment.settings import ExtractionSettings
from prompt_fragments.fragment.schedule.step_reuse import model_output_of_denoised as model_output
from prompt_fragments.profiling.step_change import DEFAULT_SKIPS, WHOLE_STEP_SKIPS, ReuseDepth, StepChangeProbe
from prompt_fragments.reference.model import build_reference, unet_input
from prompt_fragments.reference.sampling import sample

STEPS = 6


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_reference()
    unet = model.unet.eval()
    ctx, unc = model.encode(["a red circle in the top left"]), model.encode([""])
    with torch.no_grad(), StepChangeProbe(unet, shallow=1, skips=WHOLE_STEP_SKIPS) as probe:
        for seed in range(2):
            sample(unet, ctx, unc, [seed], steps=STEPS)
    plain = build_fragment(unet, [], base=describe_base(unet, "random-ref", sha256="ab12", hash_kind="none"), name="whole")
    return unet, ctx, unc, plain, probe


def _inputs(seed: int, batch: int = 2) -> torch.Tensor:
    return unet_input(torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed)))


def _whole(plain, reuse: tuple[int, ...] = (1,), total: int = 2):
    return with_schedule(plain, Schedule(total_steps=total, reuse_steps=reuse, skips=0))


def _count_calls(module: nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls: list[int] = []
    return calls, module.register_forward_hook(lambda *_: calls.append(1))


def test_a_whole_step_reuse_step_returns_the_stored_output_and_runs_no_unet(setup) -> None:
    unet, ctx, _, plain, _ = setup
    small, state = apply_schedule(unet, _whole(plain))
    assert isinstance(small, WholeStepReplay)
    calls, handle = _count_calls(small.inner)
    conv_calls, conv_handle = _count_calls(small.inner.conv_in)  # a leaf too: nothing inside the UNet runs either
    context = ctx.expand(2, -1, -1)
    try:
        with torch.no_grad():
            state.begin_call(900.0, _inputs(1).shape)
            first = small(_inputs(1), 900, context).sample
            stored = state.cached(WHOLE_STEP).clone()
            state.begin_call(700.0, _inputs(2).shape)
            second = small(_inputs(2), 700, context)
    finally:
        handle.remove()
        conv_handle.remove()
    assert len(calls) == 1 and len(conv_calls) == 1  # the reuse step did not call the UNet
    assert type(second).__name__ == "UNet2DConditionOutput"  # the call's own form, so samplers read .sample
    assert_close(second.sample, stored, rtol=0, atol=0)
    assert_close(second.sample, first, rtol=0, atol=0)
    assert second.sample is not first  # replayed as a copy: a sampler's in-place update cannot reach the cache
    assert state.reused_steps() == [1]
    with torch.no_grad():  # the computed step is the plain fragment's call
        expected = apply_fragment(unet, plain)(_inputs(1), 900, context).sample
    assert torch.equal(first, expected)


def test_the_return_dict_false_form_is_kept_on_a_reuse_step(setup) -> None:
    unet, ctx, _, plain, _ = setup
    small, state = apply_schedule(unet, _whole(plain))
    context = ctx.expand(2, -1, -1)
    with torch.no_grad():
        state.begin_call(900.0, _inputs(1).shape)
        first = small(_inputs(1), 900, context, return_dict=False)
        state.begin_call(700.0, _inputs(2).shape)
        second = small(_inputs(2), 700, context, return_dict=False)
    assert isinstance(second, tuple) and len(second) == 1
    assert_close(second[0], first[0], rtol=0, atol=0)


def test_sub_batch_rows_and_signatures_follow_the_schedule_state_rules(setup) -> None:
    """A narrowed call (CFG truncation: the cond rows only) replays those rows; another shape computes."""
    unet, ctx, _, plain, _ = setup
    small, state = apply_schedule(unet, _whole(plain, reuse=(1, 2), total=3))
    calls, handle = _count_calls(small.inner)
    try:
        with torch.no_grad():
            state.begin_call(900.0, _inputs(1).shape)
            first = small(_inputs(1), 900, ctx.expand(2, -1, -1)).sample
            state.begin_call(700.0, tuple(_inputs(2, batch=1).shape), rows=slice(1, 2))
            narrowed = small(_inputs(2, batch=1), 700, ctx).sample
            state.begin_call(500.0, tuple(_inputs(3, batch=3).shape))  # another shape: the cache cannot serve it
            other = small(_inputs(3, batch=3), 500, ctx.expand(3, -1, -1)).sample
    finally:
        handle.remove()
    assert len(calls) == 2 and other.shape[0] == 3
    assert_close(narrowed, first[1:2], rtol=0, atol=0)
    assert [e["reused"] for e in state.history] == [False, True, False]


def test_a_sampler_run_reuses_exactly_the_scheduled_steps(setup) -> None:
    unet, ctx, unc, plain, _ = setup
    small, state = apply_schedule(unet, _whole(plain, reuse=(2, 4), total=STEPS))
    calls, handle = _count_calls(small.inner)
    try:
        with torch.no_grad():
            images = sample(small, ctx, unc, [3], steps=STEPS, state=state)
    finally:
        handle.remove()
    assert images.shape == (1, 32, 32, 3)
    assert state.reused_steps() == [2, 4] and len(calls) == STEPS - 2


def test_with_the_schedule_off_the_output_is_the_plain_fragment_bit_for_bit(setup) -> None:
    unet, ctx, unc, plain, _ = setup
    with torch.no_grad():
        expected = sample(apply_fragment(unet, plain), ctx, unc, [4], steps=STEPS, raw=True)
        small, state = apply_schedule(unet, _whole(plain, reuse=(2, 4), total=STEPS))
        state.reuse_enabled = False
        off = sample(small, ctx, unc, [4], steps=STEPS, state=state, raw=True)
        none, none_state = apply_schedule(unet, with_schedule(plain, Schedule(skips=0)))  # no reuse steps at all
        empty = sample(none, ctx, unc, [4], steps=STEPS, state=none_state, raw=True)
    assert state.reused_steps() == [] and state.cached(WHOLE_STEP) is None
    assert not isinstance(none, WholeStepReplay)
    assert torch.equal(off, expected) and torch.equal(empty, expected)


def test_the_manifest_round_trips_whole_step_reuse(setup, tmp_path) -> None:
    unet, _, _, plain, _ = setup
    schedule = Schedule(total_steps=STEPS, reuse_steps=(2, 4), skips=0, step_timesteps=(999.0, 800.0, 600.0, 400.0, 200.0, 0.0))
    block = schedule.to_manifest()
    assert block["step_reuse"]["skips"] == 0
    assert Schedule.from_manifest(block) == schedule and schedule.whole_step
    loaded = load_fragment(save_fragment(with_schedule(plain, schedule), tmp_path))
    assert fragment_schedule(loaded) == schedule
    # the whole call fits any model: the base check asks for no block layout at depth 0
    assert check_loadable(loaded.manifest, loaded.tensors, "whole.json", base=unet) == schedule
    # a manifest asking for a negative depth is refused by the file schema and by the loadability check, both
    # naming the field (a sealed file cannot be edited on disk, so the parsed manifest is changed here)
    bad = {**loaded.manifest, "schedule": {"step_reuse": {**block["step_reuse"], "skips": -1}}}
    with pytest.raises(FragmentError, match=r"^w\.json: schema: at schedule/step_reuse/skips: -1 is less than the minimum of 0"):
        check_schema(bad, "w.json")
    with pytest.raises(FragmentError, match=r"^w\.json: schedule\.step_reuse\.skips: expected an integer >= 0, found -1$"):
        check_loadable(bad, loaded.tensors, "w.json", base=unet)


@pytest.mark.parametrize("bad, found", [(-1, "-1"), ("0", "'0'"), (0.0, "0.0"), (False, "False"), (65, "65")])
def test_an_invalid_depth_is_refused_naming_the_field(bad, found: str) -> None:
    block = {"step_reuse": {"total_steps": 4, "reuse_steps": [1], "skips": bad}}
    with pytest.raises(FragmentError, match=rf"^frag: schedule\.step_reuse\.skips: expected an integer [<>]= \d+, "
                                            rf"found {found}$"):
        Schedule.from_manifest(block, "frag: schedule")
    with pytest.raises(FragmentError, match="reuse_skips: expected None or an integer >= 0"):
        ExtractionSettings(levers={"step_reuse": 0.3}, reuse_skips=-1)


def test_the_probe_measures_the_whole_output_as_depth_zero(setup) -> None:
    unet, _, _, _, probe = setup
    assert 0 in WHOLE_STEP_SKIPS and 0 not in DEFAULT_SKIPS  # opt-in: see profiling/step_change.py
    depth = probe.depths()[0]
    assert depth.cache_point == "" and depth.cost == 0.0 and depth.saving(0.5) == 0.5
    assert len(depth.changes) == STEPS and depth.changes[0] is None and all(c > 0 for c in depth.changes[1:])
    # its own curve: the whole output's change, not a deep block's
    assert depth.changes != probe.depths()[1].changes
    assert probe.record()["depths"]["0"]["cache_point"] == ""


def test_the_calibration_ladder_has_the_whole_step_rung_below_skips_one(setup) -> None:
    """Fails if depth 0 is dropped from the profiled depths, the predictors or the ladder's choice of depth."""
    unet, _, _, _, probe = setup
    predictors = Predictors({StepReuseLever.name: ReuseEvidence(probe.changes(), probe.depths())})
    assert 0 in predictors.depths and min(predictors.depths) == 0
    ladder = candidate_ladder(predictors, "speed")
    assert any(c.reuse_skips == 0 for c in ladder), [(c.label, c.reuse_skips) for c in ladder]
    # with the same change curve as skips=1, the whole step saves more of each reused step: it is the one chosen
    changes = (None, 0.3, 0.1, 0.1, 0.1, 0.2)
    depths = {0: ReuseDepth(0, "", changes, 0.0), 1: ReuseDepth(1, "up_blocks.2.attentions.0", changes, 0.3)}
    same = candidate_ladder(Predictors({StepReuseLever.name: ReuseEvidence(list(changes), depths)}), "speed")
    assert same and all(c.reuse_skips == 0 for c in same)
    assert same[0].label.endswith("of whole steps")


def test_the_lever_plans_a_whole_step_schedule_from_the_whole_output_changes(setup) -> None:
    unet, _, _, _, probe = setup
    evidence = SimpleNamespace(step_changes=probe.changes(), step_timesteps=probe.timesteps(), reuse_depths=probe.depths())
    planned = StepReuseLever.plan(evidence, ExtractionSettings(levers={"step_reuse": 0.4}, reuse_skips=0), unet, "w")
    assert planned.schedule.skips == 0 and planned.schedule.whole_step
    assert planned.schedule.calibration["change_per_step"][1:] == [round(c, 5) for c in probe.depths()[0].changes[1:]]
    candidate = Candidate({"step_reuse": 0.4}, reuse_skips=0)
    assert candidate.settings().reuse_skips == 0 and candidate.label == "step reuse 40% of whole steps"


def test_reuse_replacements_at_depth_zero_wrap_no_block() -> None:
    state = ScheduleState(reuse_steps=[1], total_steps=2)
    assert reuse_replacements(nn.Linear(1, 1), 1, state, skips=0) == {}  # no block layout needed either
    state.begin_call(999.0, (1,))
    state.store(WHOLE_STEP, torch.ones(1))
    state.begin_call(500.0, (1,))
    assert state.replaying


@pytest.mark.parametrize("kind", ["eps", "v"])
def test_comfyui_replay_recovers_the_unet_output_behind_the_denoised_prediction(kind: str) -> None:
    """ComfyUI's call wrapper caches the UNet output behind ``apply_model``'s denoised result (its formulas)."""
    sd = 1.0

    def calculate_denoised(sigma: torch.Tensor, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        s = sigma.view(sigma.shape[:1] + (1,) * (out.ndim - 1))
        if kind == "eps":
            return x - out * s
        return x * sd ** 2 / (s ** 2 + sd ** 2) - out * s * sd / (s ** 2 + sd ** 2) ** 0.5

    sampling = SimpleNamespace(calculate_denoised=calculate_denoised)
    raw = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([3.0, 3.0])
    recovered = model_output(sampling, sigma, calculate_denoised(sigma, raw, x), x)
    assert_close(recovered, raw, rtol=1e-5, atol=1e-5)
    assert model_output(sampling, torch.tensor([0.0, 3.0]), x, x) is None  # sigma 0: the output is not recoverable
