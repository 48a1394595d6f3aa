"""Tier 2: a fragment's schedule inside a real ComfyUI: ComfyUI's UNet layout, the nodes, and stock patches on top."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.testing import assert_close

from prompt_fragments.fragment.surgery.tree import replace_modules
from prompt_fragments.fragment.schedule.state import Schedule, ScheduleState, nearest_step
from prompt_fragments.fragment.schedule.apply import fragment_schedule, with_schedule
from prompt_fragments.profiling.discovery import block_layout
from prompt_fragments.fragment.schedule.step_reuse import reuse_replacements
from prompt_fragments.fragment.format.store import load_fragment

from scheduled_env import STEPS, ScheduledEnv, build_scheduled_env


def test_comfy_layout_reuse_step_equals_replaying_by_hand(comfyui) -> None:
    """ComfyUI iterates a block's layers itself; the replay must still equal overwriting the block's output."""
    import comfyui_support as cs

    unet, make_inputs = cs.make_small_comfy_unet("sd15")
    state = ScheduleState(reuse_steps=[1], total_steps=2)
    scheduled = replace_modules(unet, reuse_replacements(unet, 1, state))
    deep = block_layout(unet).deep(1)
    first, second = make_inputs(seed=1), make_inputs(seed=2)
    captured: dict[str, torch.Tensor] = {}
    last = {p: unet.get_submodule(p)[-1] for p in deep}  # a block's output is its last layer's output
    hooks = [m.register_forward_hook(lambda m, i, o, p=p: captured.__setitem__(p, o)) for p, m in last.items()]
    with torch.no_grad():
        state.begin_call(900.0, first["x"].shape)
        got0 = scheduled(**{**first, "timesteps": torch.full((2,), 900.0)})
        expected0 = unet(**{**first, "timesteps": torch.full((2,), 900.0)})
        for h in hooks:
            h.remove()
        hooks = [m.register_forward_hook(lambda m, i, o, p=p: captured[p]) for p, m in last.items()]
        state.begin_call(700.0, second["x"].shape)
        got1 = scheduled(**{**second, "timesteps": torch.full((2,), 700.0)})
        expected1 = unet(**{**second, "timesteps": torch.full((2,), 700.0)})
    for h in hooks:
        h.remove()
    assert state.reused_steps() == [1]
    assert_close(got0, expected0, rtol=0, atol=0)
    assert_close(got1, expected1, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        plain = unet(**{**second, "timesteps": torch.full((2,), 700.0)})
    assert (got1 - plain).abs().max() > 1e-4  # replaying really differs from computing


def test_comfy_layout_cross_attention_replay_equals_overwriting_by_hand(comfyui) -> None:
    """ComfyUI's CrossAttention takes ``(x, context=..., value=..., transformer_options=...)``; below the gate the
    wrapper must still equal overwriting each attn2 output with the last computed one, and compute none."""
    import comfyui_support as cs
    from prompt_fragments.fragment.schedule.cross_attn import cross_attn_replacements
    from prompt_fragments.profiling.cross_attn_change import cross_attention_paths

    unet, make_inputs = cs.make_small_comfy_unet("sd15")
    state = ScheduleState()
    state.attn_gate = 500.0
    gated = replace_modules(unet, cross_attn_replacements(unet, {}, state))
    paths = cross_attention_paths(unet)
    assert paths and all(p.endswith("attn2") for p in paths)
    first, second = make_inputs(seed=1), make_inputs(seed=2)
    second["context"] = first["context"]  # one prompt: the context does not change between steps
    captured: dict[str, torch.Tensor] = {}
    calls = {p: 0 for p in paths}
    hooks = [gated.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: captured.__setitem__(p, o.clone()))
             for p in paths]  # on the replaying copies: what the gated model computed
    # to_q is shared by the base module and its replaying copy: it runs only when cross-attention is computed
    counters = [unet.get_submodule(p + ".to_q").register_forward_pre_hook(lambda m, i, p=p: calls.__setitem__(p, calls[p] + 1))
                for p in paths]
    with torch.no_grad():
        state.begin_call(900.0, tuple(first["x"].shape))
        got0 = gated(**{**first, "timesteps": torch.full((2,), 900.0)})
        for h in hooks:
            h.remove()
        state.begin_call(400.0, tuple(second["x"].shape))
        got1 = gated(**{**second, "timesteps": torch.full((2,), 400.0)})
        assert calls == {p: 1 for p in paths}  # the replay call computed no cross-attention
        for h in counters:
            h.remove()
        expected0 = unet(**{**first, "timesteps": torch.full((2,), 900.0)})
        overwrite = [unet.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: captured[p]) for p in paths]
        expected1 = unet(**{**second, "timesteps": torch.full((2,), 400.0)})
        for h in overwrite:
            h.remove()
        plain = unet(**{**second, "timesteps": torch.full((2,), 400.0)})
    assert_close(got0, expected0, rtol=0, atol=0)
    assert_close(got1, expected1, rtol=1e-6, atol=1e-6)
    assert (got1 - plain).abs().max() > 1e-4
    # the profiling session, which installs its hooks around each call, measures the change the gate is predicted from
    from prompt_fragments.profiling.session import ProfileSession

    session = ProfileSession(unet, buckets=2)
    with torch.no_grad():
        for t in (900.0, 700.0, 500.0):
            session.call(lambda: unet(**{**first, "timesteps": torch.full((2,), t)}), sigma=t / 100)
    changes = session.evidence().cross_attn_changes
    assert list(changes) == [700.0, 500.0] and all(c > 0 for c in changes.values())


def test_comfy_units_are_its_blocks_and_the_probe_times_every_depth(comfyui) -> None:
    """ComfyUI's blocks are the skip units: a depth in skips replays the same blocks as the block depth, and the
    probe's hooks on each block's layers (ComfyUI calls the layers, not the block) see every unit of a call."""
    import comfyui_support as cs
    from prompt_fragments.profiling.step_change import StepChangeProbe

    unet, make_inputs = cs.make_small_comfy_unet("sd15")
    layout = block_layout(unet)
    assert layout.max_skips == len(layout.down) - 1
    for k in range(1, layout.max_skips + 1):
        assert layout.replay_paths(k) == layout.deep(k)
        assert layout.skips_for_shallow(k) == k
    probe = StepChangeProbe(unet, skips=(1, 2))
    with probe, torch.no_grad():
        for t in (900.0, 700.0, 500.0):
            unet(**{**make_inputs(seed=1), "timesteps": torch.full((2,), t)})
    depths = probe.depths()
    assert all(0.0 < depths[k].cost < 1.0 for k in (1, 2))  # every unit of a timed call was seen (else None)
    assert depths[1].changes[0] is None and all(c > 0 for c in depths[1].changes[1:])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in unet.modules())


@pytest.fixture(scope="module")
def scheduled(comfyui, comfyui_pack, sd15_checkpoint) -> ScheduledEnv:
    """One profiled 4-step run, a fragment with a step-reuse schedule, and a copy with per-bucket heads and CFG truncation."""
    return build_scheduled_env(comfyui, comfyui_pack, sd15_checkpoint)


def _load(env: ScheduledEnv, frag, schedule="as stored"):
    return env.load(frag, schedule)


def _batch(env: ScheduledEnv, model, schedule="as stored", seed=5, count=2):
    return env.batch(model, schedule, seed, count)


def test_extractor_stores_a_reuse_schedule_from_the_profiled_step_changes(scheduled) -> None:
    schedule = fragment_schedule(load_fragment(scheduled.path))
    assert schedule.total_steps == STEPS and schedule.reuse_steps and 0 not in schedule.reuse_steps
    changes = schedule.calibration["change_per_step"]
    assert len(changes) == STEPS and changes[0] is None and all(c > 0 for c in changes[1:])


def test_loaded_schedule_runs_exactly_as_stored_and_off_is_the_plain_fragment(scheduled) -> None:
    with torch.inference_mode():
        model, status = _load(scheduled, scheduled.frag)
        state = _state(scheduled, model)
        first = _batch(scheduled, model)
        reused = sorted(set(state.reused_steps()))
        second = _batch(scheduled, model)
        off = _batch(scheduled, model, schedule="off")
        plain_model, plain_status = _load(scheduled, scheduled.frag, schedule="off")
        plain = _batch(scheduled, plain_model)
    assert "deep blocks reused on" in status and "schedule off" in plain_status
    assert reused == list(fragment_schedule(scheduled.frag).reuse_steps)
    assert torch.equal(first, second)  # deterministic for given seeds
    assert torch.equal(off, plain)  # reuse disabled: identical to the plain fragment
    assert not torch.equal(first, plain)


def _state(env: ScheduledEnv, model):
    return env.state(model)


def test_bucket_heads_and_cfg_truncation_switch_inside_the_sampler(scheduled) -> None:
    with torch.inference_mode():
        model, status = _load(scheduled, scheduled.full)
        state = _state(scheduled, model)
        out = _batch(scheduled, model)
        heads_only = _batch(scheduled, model, schedule="heads only")
        off = _batch(scheduled, model, schedule="off")
    assert "2 per-noise-level head sets" in status and "CFG truncated below t=400" in status
    assert {h["bucket"] for h in state.history} == {0, 1}
    assert torch.isfinite(out).all() and not torch.equal(heads_only, off) and not torch.equal(out, heads_only)


def test_a_cross_attention_cache_below_the_cutoff_runs_as_stored_in_the_nodes(scheduled) -> None:
    """FragmentLoader installs the cache on ComfyUI's attn2 modules (object patches) and BatchGenerator drives
    it: calls below t=400 replay, none above; "heads only" turns it off with the CFG cut-off, "off" is the plain
    fragment, and a LoRA-style patch on an attn2 weight still lands (the replaying copy keeps its keys)."""
    gated = with_schedule(scheduled.frag, dataclasses.replace(fragment_schedule(scheduled.frag), cfg_cutoff=400.0,
                                                              cross_attn_cache=400.0))
    truncated = with_schedule(scheduled.frag, dataclasses.replace(fragment_schedule(scheduled.frag), cfg_cutoff=400.0))
    with torch.inference_mode():
        model, status = _load(scheduled, gated)
        state = _state(scheduled, model)
        out = _batch(scheduled, model)
        history = list(state.history)
        state.history.clear()
        heads_only = _batch(scheduled, model, schedule="heads only")
        assert not any(h["attn_replayed"] for h in state.history)
        truncated_model, _ = _load(scheduled, truncated)
        without = _batch(scheduled, truncated_model)
        off = _batch(scheduled, model, schedule="off")
        plain = _batch(scheduled, _load(scheduled, scheduled.frag, schedule="off")[0])
        pruned = set(scheduled.frag.manifest["pruning"]["modules"])
        whole = [k for k in model.object_patches if k.endswith("attn2") and k.split(".", 1)[1] not in pruned]
        assert whole, f"every attn2 is in the pruning record: {sorted(pruned)}"  # a LoRA may patch only a whole one
        key = whole[0] + ".to_q.weight"
        weight = model.model.get_submodule(key[: -len(".weight")]).weight
        lora_base = scheduled.base.clone()
        assert lora_base.add_patches({key: (torch.full_like(weight, 0.05),)}, 1.0) == [key]
        with_lora = _batch(scheduled, scheduled.load(gated, base=lora_base)[0])
    assert "cross-attention cached below t=400" in status
    assert torch.equal(off, plain) and not torch.equal(with_lora, out)
    replayed = {h["t"] for h in history if h["attn_replayed"]}
    assert replayed and max(replayed) < 400.0 and any(h["t"] >= 400.0 and not h["attn_replayed"] for h in history)
    assert torch.isfinite(out).all() and not torch.equal(out, without) and not torch.equal(out, heads_only)


@pytest.mark.parametrize("stack", ["FreeU", "TomePatchModel", "FreeU+TomePatchModel"])
def test_stock_patches_stack_on_a_scheduled_fragment(scheduled, stack: str) -> None:
    """FreeU (output-block patch) and ToMe (attn1 patch) on top: the schedule still runs as stored, and off stays exact."""
    import comfyui_support as cs

    def patch(model):
        for name in stack.split("+"):
            inputs = dict(b1=1.1, b2=1.2, s1=0.9, s2=0.2) if name == "FreeU" else dict(ratio=0.3)
            model = cs.call_node(scheduled.comfyui, name, model=model, **inputs)[0]
        return model

    with torch.inference_mode():
        model, _ = _load(scheduled, scheduled.frag)
        patched = patch(model)
        state = _state(scheduled, patched)
        state.history.clear()
        out = _batch(scheduled, patched)
        reused = sorted(set(state.reused_steps()))
        off = _batch(scheduled, patched, schedule="off")
        plain = _batch(scheduled, patch(_load(scheduled, scheduled.frag, schedule="off")[0]))
        unpatched = _batch(scheduled, model)
    assert torch.isfinite(out).all()
    assert reused == list(fragment_schedule(scheduled.frag).reuse_steps)
    assert torch.equal(off, plain)
    assert not torch.equal(out, unpatched)  # the stock patch really acts on the fragment model


def test_cfg_truncation_alone_runs_only_the_cond_rows_below_the_cutoff(scheduled) -> None:
    cfg_only = with_schedule(scheduled.frag, Schedule(cfg_cutoff=400.0))
    with torch.inference_mode():
        model, status = _load(scheduled, cfg_only)
        state = _state(scheduled, model)
        out = _batch(scheduled, model)
        calls = [(h["t"], h["signature"][0]) for h in state.history]
        full_cfg = _batch(scheduled, model, schedule="heads only")  # CFG truncation off for this batch
    assert "CFG truncated below t=400" in status
    assert any(t < 400 for t, _ in calls) and any(t >= 400 for t, _ in calls)
    assert all(rows == (2 if t < 400 else 4) for t, rows in calls), calls  # 2 seeds: [cond, uncond] x 2, then cond alone
    assert torch.isfinite(out).all() and not torch.equal(out, full_cfg)


def test_a_weight_patch_on_a_bucket_masked_projection_is_applied(scheduled) -> None:
    """A LoRA-style patch on a projection the fragment keeps whole but masks per bucket: the key must still exist."""
    with torch.inference_mode():
        model, _ = _load(scheduled, scheduled.full)
        masked = [k for k, m in model.object_patches.items()
                  if k.endswith(".to_out.0") and type(m).__name__.startswith("BucketMasked")]
        assert masked, "the schedule should mask some projection the fragment did not prune"
        key = masked[0] + ".weight"
        weight = model.model.get_submodule(key[: -len(".weight")]).weight
        lora_base = scheduled.base.clone()
        assert lora_base.add_patches({key: (torch.full_like(weight, 0.05),)}, 1.0) == [key]
        with_lora, _ = scheduled.load(scheduled.full, base=lora_base)
        out = _batch(scheduled, with_lora)
        without = _batch(scheduled, model)
    assert not torch.equal(out, without)  # ComfyUI found the key and patched it (a renamed key is dropped silently)


def test_a_schedule_is_refused_where_it_cannot_follow_the_steps(scheduled) -> None:
    """Non-discrete sampling (EDM) would misread every timestep; a replaced wrapper would leave the schedule undriven.

    Only a 2024 ComfyUI has that second hole: there the schedule lives in the single ``model_function_wrapper``
    slot.  On 0.3.x it is a keyed APPLY_MODEL wrapper, which a foreign ``model_function_wrapper`` cannot displace,
    so there the schedule must still run as stored under one.
    """
    with torch.inference_mode():
        edm = scheduled.nodes.NODE_CLASS_MAPPINGS["ModelSamplingContinuousEDM"]().patch(scheduled.base, "eps", 120.0, 0.002)[0]
        with pytest.raises(Exception, match="discrete training timesteps.*ModelSamplingAdvanced.*schedule=off"):
            scheduled.load(scheduled.full, base=edm)
        plain_edm = _batch(scheduled, scheduled.load(scheduled.full, "off", base=edm)[0])
        model, _ = _load(scheduled, scheduled.frag)
        foreign = model.clone()
        foreign_calls = []

        def foreign_wrapper(apply_model, args):
            foreign_calls.append(float(args["timestep"].max()))
            return apply_model(args["input"], args["timestep"], **args["c"])

        foreign.set_model_unet_function_wrapper(foreign_wrapper)
        if hasattr(foreign, "add_wrapper_with_key"):
            state = _state(scheduled, foreign)
            state.history.clear()
            out = _batch(scheduled, foreign)
            assert torch.isfinite(out).all() and foreign_calls
            assert sorted(set(state.reused_steps())) == list(fragment_schedule(scheduled.frag).reuse_steps)
        else:
            with pytest.raises(Exception, match="model_function_wrapper was replaced by another node after FragmentLoader"):
                _batch(scheduled, foreign)
    assert torch.isfinite(plain_edm).all()


# Issue #27 item 5: the samplers users pick (one model evaluation per step, deterministic, ancestral and SDE), and two
# that evaluate the model twice per step.  The fragment was calibrated on euler / normal; a run of another sampler
# maps each call to the calibrated step of the nearest timestep (the schedule is stored in timesteps).
ONE_EVALUATION = [("euler", "normal"), ("euler_ancestral", "normal"), ("dpmpp_2m", "karras"),
                  ("dpmpp_2m_sde", "karras"), ("uni_pc", "normal"), ("ddim", "ddim_uniform")]
TWO_EVALUATIONS = [("heun", "normal"), ("dpmpp_sde", "karras")]


@pytest.mark.parametrize("sampler_name,scheduler", ONE_EVALUATION + TWO_EVALUATIONS)
def test_each_sampler_runs_the_schedule_on_the_calls_it_plans(scheduled, sampler_name: str, scheduler: str) -> None:
    plan = fragment_schedule(scheduled.frag)
    assert plan.step_timesteps, "the extractor stores the calibrated steps' timesteps: calls are mapped by them"
    with torch.inference_mode():
        model, _ = _load(scheduled, scheduled.frag)
        state = _state(scheduled, model)
        state.history.clear()
        run = lambda schedule: scheduled.batch(model, schedule, 5, 1, sampler_name=sampler_name,  # noqa: E731
                                               scheduler=scheduler)
        scheduled_out = run("as stored")
        calls = list(state.history)
        off = run("off")
    assert torch.isfinite(scheduled_out).all() and calls
    planned = [nearest_step(c["t"], plan.step_timesteps) in plan.reuse_steps for c in calls]
    # never a call the plan does not name; and the plan takes effect in this sampler's run
    assert all(p for p, c in zip(planned, calls) if c["reused"]), calls
    assert any(c["reused"] for c in calls), f"{sampler_name}: no call was reused: {calls}"
    assert not torch.equal(scheduled_out, off)
    if (sampler_name, scheduler) in ONE_EVALUATION:
        # one call per step (cond and uncond in one batch): every planned call after the first step replays
        assert [c["reused"] for c in calls] == [p and c["step"] > 0 for p, c in zip(planned, calls)], calls
