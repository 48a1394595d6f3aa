"""Tier 1: step reuse cut at a depth counted in skip connections (DeepCache's cached branch), on real modules.

The reference architecture with seeded random weights: what is checked is that
a reuse step at every depth replays exactly the units it says and computes the
rest, that fewer skips run fewer layers, and that the calibration's ladder picks
a depth by what a reuse step still costs.  What a depth does to quality is
measured by ``prompt-fragments bench batch`` / ``bench peers`` on the trained model.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

pytest.importorskip("diffusers")

from prompt_fragments.errors import FragmentError
from prompt_fragments.fragment.build import apply_fragment, build_fragment, describe_base
from prompt_fragments.fragment.calibration import (MIN_REUSE_SAVING, Candidate, Predictors, candidate_ladder,
                                                   lever_ladder)
from prompt_fragments.fragment.format.store import load_fragment, save_fragment
from prompt_fragments.fragment.schedule.apply import apply_schedule, fragment_schedule, with_schedule
from prompt_fragments.fragment.schedule.reuse_lever import ReuseEvidence
from prompt_fragments.fragment.schedule.state import Schedule, ScheduleState
from prompt_fragments.fragment.schedule.step_reuse import reuse_replacements
from prompt_fragments.fragment.settings import ExtractionSettings
from prompt_fragments.fragment.surgery.heads import HeadLever
from prompt_fragments.fragment.surgery.selection import Selection
from prompt_fragments.fragment.surgery.tree import replace_modules
from prompt_fragments.profiling.discovery import block_layout
from prompt_fragments.profiling import step_change
from prompt_fragments.profiling.step_change import ReuseDepth, StepChangeProbe
from prompt_fragments.reference.model import build_reference, unet_input
from prompt_fragments.reference.sampling import sample

STEPS = 6


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_reference()
    unet = model.unet.eval()
    ctx, unc = model.encode(["a red circle in the top left"]), model.encode([""])
    with torch.no_grad(), StepChangeProbe(unet, shallow=1) as probe:
        for seed in range(2):
            sample(unet, ctx, unc, [seed], steps=STEPS)
    return unet, ctx, unc, probe


def _inputs(seed: int) -> torch.Tensor:
    return unet_input(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)))


def _two_steps(model: nn.Module, state: ScheduleState, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    context = ctx.expand(2, -1, -1)
    with torch.no_grad():
        state.begin_call(900.0, _inputs(1).shape)
        first = model(_inputs(1), 900, context).sample
        state.begin_call(700.0, _inputs(2).shape)
        second = model(_inputs(2), 700, context).sample
    return first, second


def test_reference_units_pair_every_skip_producer_with_its_consumer(setup) -> None:
    layout = block_layout(setup[0])
    assert len(layout.down_units) == len(layout.up_units) == 6 and layout.max_skips == 5
    assert layout.down_units[0] == ("conv_in",)
    assert layout.up_units[-1] == ("up_blocks.2.resnets.1", "up_blocks.2.attentions.1")
    # the block depth is a special case: shallow=1 replays what skips=2 replays, less the first downsampler
    assert layout.replay_paths(2) == ["down_blocks.0.downsamplers.0", *layout.deep(1)]


@pytest.mark.parametrize("skips", [1, 2, 3, 4, 5])
def test_a_reuse_step_at_each_depth_equals_replaying_its_units_by_hand(setup, skips: int) -> None:
    """Independent check: forward hooks on the unwrapped UNet overwrite the replayed modules' outputs."""
    unet, ctx, _, _ = setup
    paths = block_layout(unet).replay_paths(skips)
    state = ScheduleState(reuse_steps=[1], total_steps=2)
    scheduled = replace_modules(unet, reuse_replacements(unet, 1, state, skips=skips))
    got0, got1 = _two_steps(scheduled, state, ctx)
    captured: dict[str, object] = {}
    hooks = [unet.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: captured.__setitem__(p, o)) for p in paths]
    with torch.no_grad():
        expected0 = unet(_inputs(1), 900, ctx.expand(2, -1, -1)).sample
        for h in hooks:
            h.remove()
        hooks = [unet.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: captured[p]) for p in paths]
        expected1 = unet(_inputs(2), 700, ctx.expand(2, -1, -1)).sample
        for h in hooks:
            h.remove()
        plain1 = unet(_inputs(2), 700, ctx.expand(2, -1, -1)).sample
    assert state.reused_steps() == [1]
    assert_close(got0, expected0, rtol=0, atol=0)
    assert_close(got1, expected1, rtol=1e-6, atol=1e-6)
    assert (got1 - plain1).abs().max() > 1e-4  # replaying really differs from computing


def test_skips_two_is_the_block_depth_output_for_output(setup) -> None:
    unet, ctx, _, _ = setup
    runs = []
    for skips in (None, 2):
        state = ScheduleState(reuse_steps=[1], total_steps=2)
        runs.append(_two_steps(replace_modules(unet, reuse_replacements(unet, 1, state, skips=skips)), state, ctx))
    assert_close(runs[0][1], runs[1][1], rtol=0, atol=0)


def test_fewer_skips_run_fewer_layers_on_a_reuse_step(setup) -> None:
    unet, ctx, _, _ = setup
    counts = {}
    for skips in (1, 2, 3, 5, None):
        state = ScheduleState(reuse_steps=[1], total_steps=2)
        scheduled = replace_modules(unet, reuse_replacements(unet, 1, state, skips=skips))
        calls = []
        leaves = [m for m in unet.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in leaves]
        context = ctx.expand(2, -1, -1)
        with torch.no_grad():
            state.begin_call(900.0, _inputs(1).shape)
            scheduled(_inputs(1), 900, context)
            full = len(calls)
            state.begin_call(700.0, _inputs(2).shape)
            scheduled(_inputs(2), 700, context)
        for h in hooks:
            h.remove()
        counts[skips] = len(calls) - full
    assert counts[1] < counts[2] < counts[3] < counts[5] < full
    assert counts[2] < counts[None]  # the block depth also runs a downsampler whose output only replayed blocks read


def test_probe_measures_changes_and_costs_at_every_depth(setup) -> None:
    probe = setup[-1]
    depths = probe.depths()
    assert sorted(depths) == [1, 2, 3]  # 0 (the whole call) only when asked: tests/test_whole_step_reuse.py
    for k, depth in depths.items():
        assert depth.cache_point == block_layout(setup[0]).skips_cache_point(k)
        assert len(depth.changes) == STEPS and depth.changes[0] is None and all(c > 0 for c in depth.changes[1:])
        assert 0.0 < depth.cost < 1.0
    # skips=2 watches the tensor the block depth watches (the last replayed up block's output)
    assert_close(torch.tensor(depths[2].changes[1:]), torch.tensor(probe.changes()[1:]), rtol=1e-6, atol=0)
    record = probe.record()["depths"]
    assert set(record) == {"1", "2", "3"} and record["1"]["cache_point"] == depths[1].cache_point
    with pytest.raises(FragmentError, match=r"no changes at skips=4; profiled depths: \[1, 2, 3\]"):
        probe.changes(4)


def test_probe_cost_is_the_timed_share_of_the_units_a_reuse_step_runs(setup, monkeypatch) -> None:
    """A clock that only moves inside the units, by a known amount per unit: the costs are exact."""
    unet, ctx, _, _ = setup
    layout = block_layout(unet)
    units = [*layout.down_units, (layout.mid,), *layout.up_units]
    weight = {unit: float(i + 1) for i, unit in enumerate(units)}
    clock = [0.0]
    monkeypatch.setattr(step_change, "_clock", lambda: clock[0])
    probe = StepChangeProbe(unet, skips=(1, 3))
    with probe:  # registered before the probe's per-call timing hooks, so each move lands inside its unit
        hooks = [unet.get_submodule(u[-1]).register_forward_hook(
            lambda *a, w=weight[u]: clock.__setitem__(0, clock[0] + w)) for u in units]
        try:
            for t in (900.0, 800.0, 700.0):
                with torch.no_grad():
                    unet(_inputs(1), t, ctx.expand(2, -1, -1))
        finally:
            for h in hooks:
                h.remove()
    total = sum(weight.values())
    for k in (1, 3):
        replayed = sum(weight[u] for u in layout.replay_units(k))
        assert probe.depths()[k].cost == pytest.approx(1.0 - replayed / total, abs=1e-12)


def test_a_call_that_raises_leaves_no_hooks_and_no_stale_timing(setup) -> None:
    unet, ctx, _, _ = setup
    probe = StepChangeProbe(unet, skips=(1,))

    def boom(*_):
        raise RuntimeError("boom")

    with probe, torch.no_grad():
        unet(_inputs(1), 900.0, ctx.expand(2, -1, -1))  # call 1: not timed (warm-up)
        handle = unet.mid_block.register_forward_pre_hook(boom)
        with pytest.raises(RuntimeError, match="boom"):
            unet(_inputs(1), 800.0, ctx.expand(2, -1, -1))  # call 2: timed, fails half-way
        handle.remove()
        assert probe.depths()[1].cost is None  # the failed call's partial times are not a cost
        unet(_inputs(1), 700.0, ctx.expand(2, -1, -1))  # call 3: timed from its own start
    assert 0.0 < probe.depths()[1].cost < 1.0
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in unet.modules())


def test_probe_leaves_no_hooks_and_ignores_depths_the_unet_lacks(setup) -> None:
    unet = setup[0]
    probe = StepChangeProbe(unet, skips=(1, 9, True))
    assert probe.skips == (1,)
    with probe:
        pass
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in unet.modules())
    assert probe.depths()[1].cost is None  # no call was timed


def test_units_pair_each_skip_with_its_consumer_on_an_sdxl_like_unet() -> None:
    """Channels prove the pairing: up unit i's resnet takes the running features plus down unit N-1-i's output."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(16, 24, 40), norm_num_groups=8, cross_attention_dim=12,
                                attention_head_dim=2,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")).eval()
    layout = block_layout(unet)
    assert len(layout.down_units) == len(layout.up_units) == 9  # SDXL's own count: no attention at level 0
    outs: dict[tuple[str, ...], int] = {}
    ins: dict[tuple[str, ...], int] = {}
    hooks = []
    for unit in (*layout.down_units, (layout.mid,), *layout.up_units):
        hooks.append(unet.get_submodule(unit[-1]).register_forward_hook(
            lambda m, i, o, u=unit: outs.__setitem__(u, (o[0] if isinstance(o, tuple) else o).shape[1])))
    for unit in layout.up_units:
        hooks.append(unet.get_submodule(unit[0]).register_forward_pre_hook(
            lambda m, a, u=unit: ins.__setitem__(u, a[0].shape[1])))
    with torch.no_grad():
        unet(torch.randn(1, 4, 8, 8), 500, torch.randn(1, 3, 12))
    for h in hooks:
        h.remove()
    running = outs[(layout.mid,)]
    n = len(layout.up_units)
    for i, unit in enumerate(layout.up_units):
        assert ins[unit] == running + outs[layout.down_units[n - 1 - i]], unit
        running = outs[unit]
    assert layout.skips_for_shallow(1) == 3  # two resnets at level 0: stem + 2 kept, the downsampler left out
    assert layout.replay_paths(3) == ["down_blocks.0.downsamplers.0", *layout.deep(1)]


def test_an_in_place_change_after_the_cut_does_not_reach_the_cache(setup) -> None:
    """FreeU scales the first computed block's input in place; the cached feature must stay as computed."""
    unet, ctx, _, _ = setup
    state = ScheduleState(reuse_steps=[1, 2], total_steps=3)
    scheduled = replace_modules(unet, reuse_replacements(unet, 1, state, skips=2))
    cut = block_layout(unet).replay_paths(2)[-1]  # up_blocks.1: its output enters up_blocks.2
    seen = []
    # both modules are the base UNet's own (shared, not copied): the hooks must come off again
    hooks = [scheduled.get_submodule(cut).inner.register_forward_hook(lambda m, i, o: seen.append(o.clone()))]

    def freeu_like(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).mul_(2.0)

    hooks.append(scheduled.up_blocks[2].register_forward_pre_hook(freeu_like, with_kwargs=True))
    context = ctx.expand(2, -1, -1)
    try:
        with torch.no_grad():
            for t in (900.0, 800.0, 700.0):
                state.begin_call(t, _inputs(1).shape)
                scheduled(_inputs(1), t, context)
                assert_close(state.cached(cut), seen[0], rtol=0, atol=0)
    finally:
        for h in hooks:
            h.remove()
    assert state.reused_steps() == [1, 2]


def test_ladder_picks_the_depth_that_saves_the_most_time() -> None:
    changes = (None, *[0.1] * 9)
    cheap = ReuseDepth(1, "a", changes, cost=0.2)
    dear = ReuseDepth(3, "b", changes, cost=0.4)
    ladder = candidate_ladder(Predictors({"step_reuse": ReuseEvidence(reuse_depths={1: cheap, 3: dear})}), "speed", levels=(0.35,))
    # the same drift at both cuts: the same steps fit, and the cut that still computes less wins
    assert [(c.amount("step_reuse"), c.reuse_skips) for c in ladder] == [(0.6, 1)]
    # the shallow cut drifts twice as fast: every other step fits (4 of 10), against 6 at the deeper cut
    drifty = ReuseDepth(1, "a", (None, *[0.2] * 9), cost=0.2)
    ladder = candidate_ladder(Predictors({"step_reuse": ReuseEvidence(reuse_depths={1: drifty, 3: dear})}), "speed", levels=(0.35,))
    assert [(c.amount("step_reuse"), c.reuse_skips) for c in ladder] == [(0.6, 3)]
    assert drifty.saving(0.4) < dear.saving(0.6)
    # a reuse that saves under MIN_REUSE_SAVING of the run is not offered: its cache costs memory for little time
    costly = ReuseDepth(3, "b", changes, cost=0.85)
    assert costly.saving(0.6) < MIN_REUSE_SAVING
    assert candidate_ladder(Predictors({"step_reuse": ReuseEvidence(reuse_depths={3: costly})}), "speed", levels=(0.35,)) == []
    # a depth without a timed cost is not offered; the block depth's changes are then the lever
    untimed = ReuseDepth(1, "a", changes, cost=None)
    ladder = candidate_ladder(Predictors({"step_reuse": ReuseEvidence(list(changes), {1: untimed})}), "speed", levels=(0.35,))
    assert [(c.amount("step_reuse"), c.reuse_skips) for c in ladder] == [(0.6, None)]


def test_candidate_carries_its_depth_into_settings_rows_and_label() -> None:
    chosen = Candidate({"heads": 0.1, "step_reuse": 0.4}, reuse_skips=1)
    assert chosen.settings().reuse_skips == 1 and "below skip 1" in chosen.label
    assert Candidate({"heads": 0.1}, reuse_skips=1).settings().reuse_skips is None  # no reuse: no depth
    rows = lever_ladder(chosen)
    assert rows[-1][1] == chosen and rows[0][1].reuse_skips is None
    # 0 is whole-step reuse (the deepest rung); below it nothing is a depth
    with pytest.raises(FragmentError, match=r"extraction settings: reuse_skips: expected None or an integer >= 0 .*, found -1"):
        ExtractionSettings(reuse_skips=-1)


def test_a_skips_schedule_is_saved_loaded_and_run_as_stored(setup, tmp_path) -> None:
    unet, ctx, unc, _ = setup
    plain = build_fragment(unet, [HeadLever(Selection(kept={}, heads={}))], base=describe_base(unet, "random-ref", sha256="ab12", hash_kind="none"),
                           name="skips")
    frag = with_schedule(plain, Schedule(total_steps=STEPS, reuse_steps=(2, 3, 4), skips=1))
    loaded = load_fragment(save_fragment(frag, tmp_path))
    assert fragment_schedule(loaded).skips == 1
    assert loaded.manifest["schedule"]["step_reuse"]["skips"] == 1
    small, state = apply_schedule(unet, loaded)
    images = sample(small, ctx, unc, [3], steps=STEPS, state=state)
    assert state.reused_steps() == [2, 3, 4]
    block, block_state = apply_schedule(unet, with_schedule(plain, Schedule(total_steps=STEPS, reuse_steps=(2, 3, 4))))
    assert (images != sample(block, ctx, unc, [3], steps=STEPS, state=block_state)).any()  # another cut, another image
    state.reuse_enabled = False
    assert (sample(small, ctx, unc, [3], steps=STEPS, state=state) == sample(apply_fragment(unet, plain), ctx, unc, [3],
                                                                                 steps=STEPS)).all()


def test_bad_depths_are_refused_with_where_and_what(setup) -> None:
    unet = setup[0]
    with pytest.raises(FragmentError, match=r"step_reuse\.skips: expected an integer >= 0, found -1"):
        Schedule.from_manifest({"step_reuse": {"total_steps": 4, "reuse_steps": [1], "skips": -1}})
    with pytest.raises(FragmentError, match=r"step_reuse\.skips: expected an integer >= 0, found 'x'"):
        Schedule.from_manifest({"step_reuse": {"total_steps": 4, "reuse_steps": [1], "skips": "x"}})
    with pytest.raises(FragmentError, match=r"step_reuse\.skips: expected an integer >= 0, found True"):
        Schedule.from_manifest({"step_reuse": {"total_steps": 4, "reuse_steps": [1], "skips": True}})
    with pytest.raises(FragmentError, match=r"expected 1 <= skips <= 5 for this diffusers UNet .* found 6"):
        reuse_replacements(unet, 1, ScheduleState(reuse_steps=[1], total_steps=2), skips=6)
    plain = build_fragment(unet, [HeadLever(Selection(kept={}, heads={}))],
                           base=describe_base(unet, "random-ref", sha256="ab12", hash_kind="none"), name="deep")
    hostile = with_schedule(plain, Schedule(total_steps=4, reuse_steps=(1,), skips=10**30))
    with pytest.raises(FragmentError, match=r"fragment 'deep': schedule\.step_reuse\.skips: .* found 10000"):
        apply_schedule(unet, hostile)
