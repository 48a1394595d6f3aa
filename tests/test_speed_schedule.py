"""Tier 1: a fragment's run-time schedule (per-bucket head sets, step reuse, CFG truncation) on real modules.

The reference architecture with seeded random weights: what is checked is
that a schedule runs exactly as stored, not what it does to quality (the bench
measures that on the trained model).
"""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

pytest.importorskip("diffusers")

from prompt_fragments.errors import FragmentError
from prompt_fragments.fragment.surgery.masking import mask_heads
from prompt_fragments.fragment.schedule.state import Schedule, ScheduleState, map_step
from prompt_fragments.fragment.schedule.apply import apply_schedule, fragment_schedule, with_schedule
from prompt_fragments.profiling.discovery import block_layout
from prompt_fragments.fragment.build import apply_fragment, build_fragment, describe_base
from prompt_fragments.fragment.format.store import load_fragment, save_fragment
from prompt_fragments.fragment.schedule.timestep_heads import is_bucket_masked, select_bucket_heads
from prompt_fragments.profiling.profiler import HeadProfiler
from prompt_fragments.profiling.step_change import StepChangeProbe, reuse_steps_for_budget, reuse_steps_for_count
from prompt_fragments.reference.model import build_reference, unet_input
from prompt_fragments.reference.sampling import sample
from prompt_fragments.fragment.surgery.heads import HeadLever

STEPS = 6
REUSE = (2, 4)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_reference()
    unet = model.unet.eval()
    ctx, unc = model.encode(["a red circle in the top left"]), model.encode([""])
    with torch.no_grad(), HeadProfiler(unet, buckets=2) as prof, StepChangeProbe(unet, shallow=1) as probe:
        for seed in range(2):
            prof.begin_sample(seed)
            sample(unet, ctx, unc, [seed], steps=STEPS)
    union, per_bucket = select_bucket_heads(prof.result(), [0.5, 0.25])
    plain = build_fragment(unet, [HeadLever(union)], base=describe_base(unet, "random-ref", sha256="ab12", hash_kind="none"), name="sched")
    schedule = Schedule(buckets=2, bucket_heads=per_bucket, total_steps=STEPS, reuse_steps=REUSE, shallow=1)
    return unet, ctx, unc, plain, with_schedule(plain, schedule), per_bucket, probe


def test_bucket_sets_lie_inside_the_pruned_union(setup) -> None:
    _, _, _, plain, _, per_bucket, _ = setup
    assert per_bucket[0] != per_bucket[1]  # the buckets really differ, so switching is tested
    for heads in per_bucket.values():
        for path, kept in heads.items():
            assert set(kept) <= set(plain.kept.get(path, kept))


def test_with_reuse_and_masks_off_the_output_is_the_plain_fragment(setup) -> None:
    unet, ctx, unc, plain, scheduled, _, _ = setup
    small, state = apply_schedule(unet, scheduled)
    state.reuse_enabled = state.heads_enabled = False
    images = sample(small, ctx, unc, [5, 6], steps=STEPS, state=state)
    expected = sample(apply_fragment(unet, plain), ctx, unc, [5, 6], steps=STEPS)
    assert (images == expected).all()
    assert state.reused_steps() == []


def test_skip_schedule_runs_exactly_as_stored_and_deterministically(setup) -> None:
    unet, ctx, unc, plain, scheduled, _, _ = setup
    small, state = apply_schedule(unet, scheduled)
    first = sample(small, ctx, unc, [5, 6], steps=STEPS, state=state)
    assert state.reused_steps() == list(REUSE)
    state.history.clear()
    again = sample(small, ctx, unc, [5, 6], steps=STEPS, state=state)
    assert (first == again).all() and state.reused_steps() == list(REUSE)
    state.reuse_enabled = False
    without = sample(small, ctx, unc, [5, 6], steps=STEPS, state=state)
    assert (first != without).any()  # reuse really changes the computation, so the equalities above mean something


def test_a_reuse_step_equals_replaying_the_deep_outputs_by_hand(setup) -> None:
    """Independent check: forward hooks on the plain fragment overwrite the deep blocks' outputs."""
    unet, ctx, _, plain, _, _, _ = setup
    schedule = Schedule(total_steps=2, reuse_steps=(1,), shallow=1)
    small, state = apply_schedule(unet, with_schedule(plain, schedule))
    reference = apply_fragment(unet, plain)
    deep = block_layout(reference).deep(1)
    x0, x1 = (unet_input(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(s))) for s in (1, 2))
    context = ctx.expand(2, -1, -1)
    captured: dict[str, object] = {}
    hooks = [reference.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: captured.__setitem__(p, o)) for p in deep]
    with torch.no_grad():
        state.begin_call(900.0, x0.shape)
        step0 = small(x0, 900, context).sample
        expected0 = reference(x0, 900, context).sample
        for h in hooks:
            h.remove()
        hooks = [reference.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: captured[p]) for p in deep]
        state.begin_call(700.0, x1.shape)
        step1 = small(x1, 700, context).sample
        expected1 = reference(x1, 700, context).sample
    for h in hooks:
        h.remove()
    assert state.replaying and state.reused_steps() == [1]
    assert_close(step0, expected0, rtol=0, atol=0)
    assert_close(step1, expected1, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("t, bucket", [(100.0, 0), (900.0, 1)])
def test_bucket_head_sets_switch_by_timestep_and_match_masking_the_full_model(setup, t: float, bucket: int) -> None:
    unet, ctx, _, _, scheduled, per_bucket, _ = setup
    small, state = apply_schedule(unet, with_schedule(scheduled, Schedule(buckets=2, bucket_heads=per_bucket)))
    x = unet_input(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)))
    with torch.no_grad():
        state.begin_call(t, x.shape)
        got = small(x, t, ctx.expand(2, -1, -1)).sample
        with mask_heads(unet, per_bucket[bucket]):
            expected = unet(x, t, ctx.expand(2, -1, -1)).sample
    assert state.bucket == bucket
    assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_cfg_truncation_below_every_step_is_the_conditional_prediction(setup) -> None:
    unet, ctx, unc, _, _, _, _ = setup
    truncated = sample(unet, ctx, unc, [1], steps=4, cfg_cutoff=1001.0)
    conditional = sample(unet, ctx, unc, [1], steps=4, guidance=1.0)
    assert (abs(truncated.astype(int) - conditional.astype(int)) <= 1).all()
    assert (truncated != sample(unet, ctx, unc, [1], steps=4)).any()


def test_schedule_is_saved_and_loaded_with_the_fragment(setup, tmp_path) -> None:
    unet, ctx, unc, _, scheduled, _, _ = setup
    loaded = load_fragment(save_fragment(scheduled, tmp_path))
    assert fragment_schedule(loaded) == fragment_schedule(scheduled)
    a, sa = apply_schedule(unet, loaded)
    b, sb = apply_schedule(unet, scheduled)
    assert (sample(a, ctx, unc, [9], steps=STEPS, state=sa) == sample(b, ctx, unc, [9], steps=STEPS, state=sb)).all()


def test_step_change_probe_and_reuse_budget(setup) -> None:
    probe = setup[-1]
    changes = probe.changes()
    assert len(changes) == STEPS and changes[0] is None and all(c > 0 for c in changes[1:])
    steps = reuse_steps_for_budget(changes, budget=float("inf"))
    assert steps == list(range(1, STEPS - 1))  # unlimited budget: everything but the first and last step
    one, budget = reuse_steps_for_count(changes, 1)
    assert len(one) == 1 and changes[one[0]] <= budget  # one step, and it fits the drift budget it was chosen by


def test_bad_schedules_are_refused_with_where_and_what(setup) -> None:
    _, _, _, plain, _, _, _ = setup
    with pytest.raises(FragmentError, match=r"step_reuse: reuse steps \[0\]|reuse_steps: expected an integer >= 1"):
        Schedule.from_manifest({"step_reuse": {"total_steps": 4, "reuse_steps": [0]}})
    with pytest.raises(FragmentError, match=r"must lie in 1\.\.3"):
        Schedule.from_manifest({"step_reuse": {"total_steps": 4, "reuse_steps": [4]}})
    with pytest.raises(FragmentError, match="cfg_cutoff.timestep: expected a number"):
        Schedule.from_manifest({"cfg_cutoff": {"timestep": "late"}})
    pruned_path, kept = next(iter(plain.kept.items()))
    removed = next(h for h in range(16) if h not in kept)
    with pytest.raises(FragmentError, match=f"{pruned_path}: schedule bucket 0 keeps heads"):
        with_schedule(plain, Schedule(buckets=1, bucket_heads={0: {pruned_path: [removed]}}))


def test_step_mapping_follows_the_noise_fraction() -> None:
    assert [map_step(s, 4, 8) for s in range(4)] == [0, 2, 5, 7]
    state = ScheduleState(reuse_steps=[2], total_steps=4)  # no timesteps stored: matched by step index
    state.expect_keys(["k"])
    state.run_total_steps = 8
    for t in (999, 875, 750, 625, 500, 375, 250, 125):
        state.begin_call(t, (1,))
        state.store("k", t)
    assert [h["step"] for h in state.history] == list(range(8))
    assert state.reused_steps() == [4, 5]  # round(s * 3 / 7) == 2


def test_a_late_start_reuses_at_the_calibrated_noise_levels() -> None:
    """A run that starts at mid noise (denoise < 1, start_at_step) is matched by timestep, not by step index."""
    state = ScheduleState(reuse_steps=[3, 4], total_steps=6, step_timesteps=(999, 832, 666, 499, 333, 166))
    state.expect_keys(["k"])
    for t in (520.0, 340.0, 170.0):
        state.begin_call(t, (1,))
        state.store("k", t)
    # 520 ~ step 3: a new run has nothing cached, so it computes; 340 ~ step 4 replays; 170 ~ step 5 computes
    assert [h["reused"] for h in state.history] == [False, True, False]
    assert state.cached("k") == 170.0


def _nearest(t: float, calibrated: list[float]) -> int:
    distances = [abs(c - t) for c in calibrated]
    return distances.index(min(distances))


def test_another_step_count_reuses_at_the_calibrated_noise_levels(setup) -> None:
    unet, ctx, unc, _, scheduled, _, probe = setup
    calibrated = probe.timesteps()
    assert len(calibrated) == STEPS and calibrated == sorted(calibrated, reverse=True)
    schedule = Schedule(total_steps=STEPS, reuse_steps=REUSE, shallow=1, step_timesteps=tuple(calibrated))
    small, state = apply_schedule(unet, with_schedule(scheduled, schedule))
    sample(small, ctx, unc, [5], steps=2 * STEPS, state=state)
    run_t = [h["t"] for h in state.history]
    expected = [i for i, t in enumerate(run_t) if i > 0 and _nearest(t, calibrated) in REUSE]
    assert len(run_t) == 2 * STEPS and expected and expected != list(REUSE)
    assert state.reused_steps() == expected


def test_cfg_truncation_keeps_the_reuse_cache_for_the_cond_rows(setup) -> None:
    unet, ctx, unc, _, scheduled, _, probe = setup
    calibrated = probe.timesteps()
    cutoff = (calibrated[REUSE[0] - 1] + calibrated[REUSE[0]]) / 2  # the switch falls right before the first reuse step
    schedule = Schedule(total_steps=STEPS, reuse_steps=REUSE, shallow=1, step_timesteps=tuple(calibrated), cfg_cutoff=cutoff)
    small, state = apply_schedule(unet, with_schedule(scheduled, schedule))
    images = sample(small, ctx, unc, [5, 6], steps=STEPS, state=state, cfg_cutoff=cutoff)
    batches = [h["signature"][0] for h in state.history]
    assert batches == [4 if t >= cutoff else 2 for t in calibrated]  # [uncond, cond] x 2 seeds, then cond alone
    assert state.reused_steps() == list(REUSE)  # the first reuse step replays the cached cond rows
    state.reuse_enabled = False
    assert (images != sample(small, ctx, unc, [5, 6], steps=STEPS, state=state, cfg_cutoff=cutoff)).any()


def test_step_change_probe_leaves_out_runs_with_other_timesteps(setup) -> None:
    unet, ctx, unc, _, _, _, _ = setup
    with torch.no_grad(), StepChangeProbe(unet, shallow=1) as alone:
        sample(unet, ctx, unc, [0], steps=STEPS)
    with torch.no_grad(), StepChangeProbe(unet, shallow=1) as mixed:
        sample(unet, ctx, unc, [0], steps=STEPS)
        sample(unet, ctx, unc, [0], steps=STEPS - 2)
    assert mixed.skipped_runs == 1 and mixed.runs == 2 and alone.skipped_runs == 0
    assert mixed.timesteps() == alone.timesteps()
    assert mixed.changes() == pytest.approx(alone.changes())


def test_bucket_masks_keep_the_weight_keys_of_the_plain_fragment(setup) -> None:
    """Weight patches (LoRA) find a bucket-masked projection under its usual key and act on it."""
    unet, _, _, plain, scheduled, per_bucket, _ = setup
    small, state = apply_schedule(unet, with_schedule(scheduled, Schedule(buckets=2, bucket_heads=per_bucket)))
    plain_model = apply_fragment(unet, plain)
    assert list(small.state_dict()) == list(plain_model.state_dict())
    masked = [n for n, m in small.named_modules() if is_bucket_masked(m)]
    assert masked and all(n.endswith("to_out.0") for n in masked)
    module = small.get_submodule(masked[0])
    assert torch.equal(module.weight, plain_model.get_submodule(masked[0]).weight)
