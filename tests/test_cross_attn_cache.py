"""Tier 1: the cross-attention cache (T-GATE's idea): the replay, the schedule record, the probe and the calibration.

The reference architecture with seeded random weights checks that a replay is
exactly an overwrite of each cross-attention output, and that with the cache
off a fragment is the plain one bit for bit; the trained reference model checks
that the probe measures real convergence.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

pytest.importorskip("diffusers")

from prompt_fragments.errors import FragmentError
from prompt_fragments.fragment.build import apply_fragment, build_fragment, describe_base
from prompt_fragments.fragment.calibration import (Budget, Candidate, Judgement, Predictors, calibrate,
                                                   profile_predictors, truncate)
from prompt_fragments.fragment.format.store import load_fragment, save_fragment
from prompt_fragments.fragment.levers import label
from prompt_fragments.fragment.schedule.apply import apply_schedule, fragment_schedule, with_schedule
from prompt_fragments.fragment.schedule.cross_attn import cross_attn_replacements, is_cross_attn_replay
from prompt_fragments.fragment.schedule.cross_attn_lever import (CROSS_ATTN_LIMIT, CrossAttnCacheLever,
                                                                 CrossAttnEvidence, predicted_gate)
from prompt_fragments.fragment.schedule.state import Schedule, ScheduleState
from prompt_fragments.fragment.surgery.tree import replace_modules
from prompt_fragments.judge.fragment_judge import branch_step
from prompt_fragments.profiling.cross_attn_change import CrossAttnChangeProbe, cross_attention_paths
from prompt_fragments.profiling.dataset import ProfileData
from prompt_fragments.profiling.evidence import ProfileEvidence
from prompt_fragments.reference.model import build_reference, unet_input
from prompt_fragments.reference.sampling import sample

STEPS = 6


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_reference()
    unet = model.unet.eval()
    ctx, unc = model.encode(["a red circle in the top left"]), model.encode([""])
    base = describe_base(unet, "random-ref", sha256="ab12", hash_kind="none")
    plain = build_fragment(unet, [], base=base, name="gate")
    return unet, ctx, unc, plain


def _call(model, x, t, ctx):
    return model(unet_input(x), t, ctx).sample


def _gated(unet):
    """``unet`` with every cross-attention replaying below t=500, its state, and the cross-attention paths."""
    state = ScheduleState()
    state.attn_gate = 500.0
    return state, replace_modules(unet, cross_attn_replacements(unet, {}, state)), cross_attention_paths(unet)


def test_a_replay_step_equals_overwriting_each_cross_attention_output_by_hand(setup) -> None:
    unet, ctx, unc, _ = setup
    state, gated, paths = _gated(unet)
    assert len(paths) == 7 and all(is_cross_attn_replay(gated.get_submodule(p)) for p in paths)
    assert list(gated.state_dict()) == list(unet.state_dict())  # same keys: a LoRA on attn2 still finds them
    both = torch.cat([unc, ctx])
    gen = torch.Generator().manual_seed(3)
    x0, x1 = torch.randn(2, 3, 32, 32, generator=gen), torch.randn(2, 3, 32, 32, generator=gen)
    captured: dict[str, torch.Tensor] = {}
    calls = {p: 0 for p in paths}
    hooks = [unet.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: captured.__setitem__(p, o.clone()))
             for p in paths]
    # to_q is shared by the base module and its replaying copy: it runs only when cross-attention is computed
    counters = [unet.get_submodule(p + ".to_q").register_forward_pre_hook(lambda m, i, p=p: calls.__setitem__(p, calls[p] + 1))
                for p in paths]
    with torch.no_grad():
        state.begin_call(900.0, (2, 3, 32, 32))
        got0 = _call(gated, x0, 900, both)
        expected0 = _call(unet, x0, 900, both)
        for h in hooks:
            h.remove()
        before = dict(calls)
        state.begin_call(400.0, (2, 3, 32, 32))
        got1 = _call(gated, x1, 400, both)
        assert before == {p: 2 for p in paths} and calls == before  # the replay step computed no cross-attention
        for h in counters:
            h.remove()
        overwrite = [unet.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: captured[p]) for p in paths]
        expected1 = _call(unet, x1, 400, both)
        for h in overwrite:
            h.remove()
        plain1 = _call(unet, x1, 400, both)
    assert_close(got0, expected0, rtol=0, atol=0)
    assert_close(got1, expected1, rtol=1e-6, atol=1e-6)
    assert (got1 - plain1).abs().max() > 1e-4  # the replay really differs from computing
    assert [h["attn_replayed"] for h in state.history] == [False, True]


def test_a_narrowed_call_replays_its_own_rows(setup) -> None:
    """CFG truncation drops the uncond rows: the cond rows' cached outputs replay, not the whole batch's."""
    unet, ctx, unc, _ = setup
    state, gated, paths = _gated(unet)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    captured: dict[str, torch.Tensor] = {}
    hooks = [gated.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: captured.__setitem__(p, o.clone()))
             for p in paths]  # on the replaying copies: what the gated model computed
    with torch.no_grad():
        state.begin_call(900.0, (4, 3, 32, 32))
        _call(gated, torch.cat([x, x]), 900, torch.cat([unc.expand(2, -1, -1), ctx.expand(2, -1, -1)]))
        for h in hooks:
            h.remove()
        state.begin_call(400.0, (2, 3, 32, 32), rows=slice(2, 4))
        got = _call(gated, x, 400, ctx.expand(2, -1, -1))
        overwrite = [unet.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: captured[p][2:]) for p in paths]
        expected = _call(unet, x, 400, ctx.expand(2, -1, -1))
        for h in overwrite:
            h.remove()
    assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_with_the_cache_off_the_output_is_the_plain_fragment_bit_for_bit(setup) -> None:
    unet, ctx, unc, plain = setup
    scheduled = with_schedule(plain, Schedule(cross_attn_cache=600.0))
    small, state = apply_schedule(unet, scheduled)
    cached = sample(small, ctx, unc, [5, 6], steps=STEPS, state=state)
    replayed = [h["t"] for h in state.history if h["attn_replayed"]]
    assert replayed and all(t < 600.0 for t in replayed)
    assert [h["t"] for h in state.history if not h["attn_replayed"]][-1] > 600.0
    state.attn_enabled = False
    state.history.clear()
    off = sample(small, ctx, unc, [5, 6], steps=STEPS, state=state)
    expected = sample(apply_fragment(unet, plain), ctx, unc, [5, 6], steps=STEPS)
    assert (off == expected).all() and not any(h["attn_replayed"] for h in state.history)
    assert (cached != expected).any()  # the cache really changes the images, so the equality above means something


def test_the_cache_wraps_a_folded_attention_as_the_fragment_built_it(setup) -> None:
    """A replaced cross-attention (the K/V fold's copy) is what the wrapper runs; replacements inside one fold in."""
    unet, _, _, _ = setup
    path = cross_attention_paths(unet)[0]
    state = ScheduleState()
    folded = torch.nn.Sequential(torch.nn.Linear(32, 32))
    out = cross_attn_replacements(unet, {path: folded}, state)
    assert is_cross_attn_replay(out[path]) and isinstance(out[path], torch.nn.Sequential)
    assert out[path][0] is folded[0] and not is_cross_attn_replay(folded)  # shares the copy's layers, changes it not
    inner = torch.nn.Linear(32, 32)
    out = cross_attn_replacements(unet, {path + ".to_q": inner}, state)
    assert path + ".to_q" not in out and out[path].to_q is inner
    assert unet.get_submodule(path).to_q is not inner  # the base model is left alone
    owner = path.rsplit(".", 1)[0]  # a replaced parent (the transformer block) gets the replaying module inside it
    block = torch.nn.Module()
    block.attn2 = unet.get_submodule(path)
    out = cross_attn_replacements(unet, {owner: block}, state)
    assert owner in out and path not in out and is_cross_attn_replay(out[owner].attn2)
    assert not is_cross_attn_replay(block.attn2)


def test_the_schedule_record_round_trips_and_hostile_values_are_refused(setup, tmp_path) -> None:
    unet, _, _, plain = setup
    schedule = Schedule(cfg_cutoff=700.0, cross_attn_cache=650.0)
    assert Schedule.from_manifest(schedule.to_manifest()) == schedule
    saved = load_fragment(save_fragment(with_schedule(plain, schedule), tmp_path / "gated"))
    assert fragment_schedule(saved).cross_attn_cache == 650.0
    for bad, found in (({"timestep": "600"}, "'600'"), ({"timestep": 1e9}, "1000000000.0"),
                       ({"timestep": float("nan")}, "nan"), ({"timestep": True}, "True"), ({}, None)):
        if found is None:
            assert Schedule.from_manifest({"cross_attn_cache": bad}).cross_attn_cache is None  # empty: off
            continue
        with pytest.raises(FragmentError, match=r"x\.cross_attn_cache\.timestep: expected a number in 0\.\.1000") as info:
            Schedule.from_manifest({"cross_attn_cache": bad}, "x")
        assert found in str(info.value)
    with pytest.raises(FragmentError, match=r"x\.cross_attn_cache: expected an object, found list"):
        Schedule.from_manifest({"cross_attn_cache": [600]}, "x")


def test_the_probe_measures_the_change_by_hand_and_the_trained_model_converges() -> None:
    """Each timestep's change is sqrt(sum ||o - o_prev||^2 / sum ||o_prev||^2) over the cross-attention modules;
    on the trained reference model it falls from the first steps and a gate is predicted inside the run."""
    from prompt_fragments.reference.model import load_reference

    model = load_reference()
    unet = model.unet
    context, uncond = model.encode(["a red circle in the top left"]), model.encode([""])
    paths = cross_attention_paths(unet)
    outputs: list[dict[str, torch.Tensor]] = []
    times: list[float] = []

    def on_call(_m, args, kwargs):
        times.append(float(args[1]))
        outputs.append({})

    hooks = [unet.register_forward_pre_hook(on_call, with_kwargs=True)]
    hooks += [unet.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: outputs[-1].__setitem__(p, o.clone()))
              for p in paths]
    with CrossAttnChangeProbe(unet) as probe:
        sample(unet, context, uncond, [0, 1], steps=10)
    for h in hooks:
        h.remove()
    changes = probe.changes()
    assert list(changes) == [round(t, 2) for t in times[1:]]
    by_hand = [math.sqrt(sum(float((b[p] - a[p]).square().sum()) for p in paths)
                         / sum(float(a[p].square().sum()) for p in paths)) for a, b in zip(outputs, outputs[1:])]
    assert_close(torch.tensor(list(changes.values())), torch.tensor(by_hand), rtol=1e-4, atol=0)
    assert changes[max(changes)] > CROSS_ATTN_LIMIT  # not converged on the first compared step
    gate = predicted_gate(changes)
    assert gate is not None and min(changes) < gate < max(changes)
    evidence = ProfileEvidence.from_probes(ProfileData({}, 4), [probe])
    assert evidence.cross_attn_changes == changes
    assert profile_predictors(evidence, unet, goal="speed").cross_attn_gate() == gate


def test_the_predicted_gate_moves_with_a_planted_change() -> None:
    early = {959.0: 0.5, 879.0: 0.05, 799.0: 0.04, 599.0: 0.03, 199.0: 0.03}
    late = {**early, 879.0: 0.3, 799.0: 0.2}
    assert predicted_gate(early) == 850.0 and predicted_gate(late) == 600.0
    assert predicted_gate(early, limit=0.035) == 600.0  # a stricter limit waits longer
    assert predicted_gate({959.0: 0.5, 199.0: 0.01}) is None  # fewer than two steps below: nothing to gain
    assert not Predictors({"cross_attn_cache": CrossAttnEvidence({959.0: 0.5, 199.0: 0.5})}).offers("cross_attn_cache")
    assert CrossAttnCacheLever.predictor(ProfileEvidence(ProfileData({}, 4)), None, None) is None


def test_the_cache_rides_on_each_cutoff_try_and_never_before_the_cutoff() -> None:
    assert truncate(Candidate(), 700.0, 850.0).amount("cross_attn_cache") == 700.0
    assert truncate(Candidate(), 500.0, 450.0).amount("cross_attn_cache") == 450.0
    assert label({"cfg_cutoff": 500.0, "cross_attn_cache": 450.0}) == "CFG off below t=500 + cross-attention cached below t=450"

    seen = []

    def judge(candidate: Candidate, seeds) -> Judgement:
        seen.append((candidate.amount("cfg_cutoff"), candidate.amount("cross_attn_cache")))
        return Judgement(candidate.amount("cfg_cutoff") <= 500.0)

    cal = calibrate([], judge, calibration_seeds=[0], holdout_seeds=[1], goal="speed", budget=Budget(images=16),
                    cfg_cutoffs=(700.0, 500.0), cross_attn_gate=600.0)
    assert seen == [(700.0, 600.0), (500.0, 500.0), (500.0, 500.0)]  # no judged try of its own
    assert cal.chosen.label == "CFG off below t=500 + cross-attention cached below t=500"
    in_batch = calibrate([Candidate({"step_reuse": 0.3}, level=0.1)], judge, calibration_seeds=[0], holdout_seeds=[1],
                         goal="speed", cfg_cutoffs=(700.0, 500.0), cross_attn_gate=600.0, confirm_in_batch=True)
    assert in_batch.chosen.amount("cross_attn_cache") == 500.0 and in_batch.tries == []


def test_a_judge_branches_one_step_before_the_first_cached_step() -> None:
    ts = [999.0, 799.0, 599.0, 399.0, 199.0]
    assert branch_step(Schedule(cross_attn_cache=500.0), ts, False) == 2
    assert branch_step(Schedule(cfg_cutoff=700.0, cross_attn_cache=500.0), ts, False) == 2
    assert branch_step(Schedule(cross_attn_cache=1000.0), ts, False) == 0
