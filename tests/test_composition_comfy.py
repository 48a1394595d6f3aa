"""Tier 2: a fragment composed with what users stack on it in ComfyUI, on both test runtimes.

Each composition either works, with an output the test checks, or is refused
with an error that says what to do:

* LoRA through ``LoraLoaderModelOnly``: on a projection the fragment keeps it
  applies; on one it prunes FragmentLoader refuses it (ComfyUI would drop it
  silently);
* ControlNet (a random-weight SD1.5 ControlNet built from ComfyUI's classes):
  works with and without a schedule; CFG truncation leaves ControlNet calls
  whole;
* FreeU_V2, TomePatchModel and, on ComfyUI 0.3.x, EasyCache and LazyCache
  stacked on a fragment with and without a schedule: they act, and the
  schedule turned off is the plain fragment bit for bit;
* an attn2 replacement patch (IPAdapter style) on a fragment that prunes
  cross-attention: refused (``test_nodes.py``);
* ComfyUI running cond and uncond in separate calls (little free memory), or
  an area cond as a smaller call of its own: a batch of 4 gives the images of
  4 single runs, as it does with cond and uncond batched.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch.testing import assert_close

import comfyui_support as cs
from prompt_fragments.fragment.schedule.apply import fragment_schedule
from scheduled_env import ScheduledEnv, build_scheduled_env

#: Stock patch nodes stacked on a fragment, with inputs a user would try; EasyCache/LazyCache exist from 0.3.4x on.
STACKS = {
    "FreeU_V2": dict(b1=1.3, b2=1.4, s1=0.9, s2=0.2),
    "TomePatchModel": dict(ratio=0.3),
    # The highest threshold, so the random-weight model's changes never stop a skip: the cache must really act.
    "EasyCache": dict(reuse_threshold=3.0, start_percent=0.0, end_percent=1.0, verbose=False),
    "LazyCache": dict(reuse_threshold=3.0, start_percent=0.0, end_percent=1.0, verbose=False),
}


@pytest.fixture(scope="module")
def env(comfyui, comfyui_pack, sd15_checkpoint) -> ScheduledEnv:
    return build_scheduled_env(comfyui, comfyui_pack, sd15_checkpoint)


def _random_lora(folder: Path, name: str, module_path: str, weight: torch.Tensor) -> str:
    """A rank-2 LoRA file in ComfyUI's ``lora_unet_`` naming for ``module_path``'s weight."""
    stem = "lora_unet_" + module_path.replace(".", "_")
    g = torch.Generator().manual_seed(7)
    save_file({
        f"{stem}.lora_up.weight": torch.randn(weight.shape[0], 2, generator=g) * 0.5,
        f"{stem}.lora_down.weight": torch.randn(2, weight.shape[1], generator=g) * 0.5,
        f"{stem}.alpha": torch.tensor(2.0),
    }, str(folder / name))
    return name


def test_lora_applies_on_a_kept_projection_and_is_refused_on_a_pruned_one(env: ScheduledEnv) -> None:
    comfyui = env.comfyui
    kept_path = next(iter(env.frag.kept))  # an attention module the fragment pruned
    diffusion_model = env.base.model.diffusion_model
    ff_out = f"{kept_path.rsplit('.', 1)[0]}.ff.net.2"  # the same block's feed-forward output: never pruned here
    folder = comfyui.model_dir("loras")
    kept_lora = _random_lora(folder, "compose_kept.safetensors", ff_out, diffusion_model.get_submodule(ff_out).weight)
    pruned_lora = _random_lora(folder, "compose_pruned.safetensors", f"{kept_path}.to_k",
                               diffusion_model.get_submodule(f"{kept_path}.to_k").weight)
    comfyui.folder_paths.filename_list_cache.clear()
    with torch.inference_mode():
        with_kept = cs.call_node(comfyui, "LoraLoaderModelOnly", model=env.base, lora_name=kept_lora, strength_model=1.0)[0]
        with_pruned = cs.call_node(comfyui, "LoraLoaderModelOnly", model=env.base, lora_name=pruned_lora, strength_model=1.0)[0]
        assert f"diffusion_model.{ff_out}.weight" in with_kept.patches
        for frag in (env.frag, env.full):
            fragment, _ = env.load(frag)
            lora_fragment, status = env.load(frag, base=with_kept)
            assert status.startswith("applied fragment")
            out, plain = env.batch(lora_fragment), env.batch(fragment)
            assert torch.isfinite(out).all() and not torch.equal(out, plain)  # the LoRA reached the fragment model
            with pytest.raises(Exception, match=r"LoRA/weight patches target weights the fragment prunes .*Merge the LoRA"):
                env.load(frag, base=with_pruned)


def test_controlnet_works_on_a_fragment_with_and_without_a_schedule(env: ScheduledEnv, sd15_controlnet: str) -> None:
    comfyui = env.comfyui
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        (control_net,) = cs.call_node(comfyui, "ControlNetLoader", control_net_name=sd15_controlnet)
        positive, negative = cs.call_node(comfyui, "ControlNetApplyAdvanced", positive=env.positive, negative=env.negative,
                                          control_net=control_net, image=hint, strength=1.0, start_percent=0.0,
                                          end_percent=1.0)[:2]
        for frag in (env.frag, env.full):
            model, _ = env.load(frag)
            state = env.state(model)
            state.history.clear()
            controlled = env.batch(model, positive=positive, negative=negative)
            rows_per_step: dict[int, int] = {}
            for h in state.history:
                rows_per_step[h["step"]] = rows_per_step.get(h["step"], 0) + h["signature"][0]
            uncontrolled = env.batch(model)
            off = env.batch(model, "off", positive=positive, negative=negative)
            plain = env.batch(env.load(frag, "off")[0], positive=positive, negative=negative)
            assert torch.isfinite(controlled).all() and not torch.equal(controlled, uncontrolled)
            assert torch.equal(off, plain)
            # 2 seeds x (cond, uncond) on every step, in one call or two: truncation never drops a ControlNet call's rows.
            assert set(rows_per_step.values()) == {4} and len(rows_per_step) == 4, rows_per_step
        full_model = env.batch(env.base, positive=positive, negative=negative)
        assert not torch.equal(full_model, env.batch(env.base))  # the random ControlNet really acts on the base too


def _available_stacks(env: ScheduledEnv) -> list[str]:
    names = [n for n in STACKS if n in env.nodes.NODE_CLASS_MAPPINGS]
    if (Path(env.comfyui.root) / "comfy_api").is_dir():  # 0.3.x ships every one of them: none may be missing there
        assert names == list(STACKS), f"ComfyUI at {env.comfyui.root} lacks {set(STACKS) - set(names)}"
    return names


def test_stock_patches_stack_on_a_fragment_with_and_without_a_schedule(env: ScheduledEnv) -> None:
    # FreeU_V2 at 96 px: at 64 px SD1.5's deepest level is 1x1, where its min-max normalisation divides 0 by 0
    # (the full model gives NaN there too); at 96 px that level is 2x2.
    latents = {"FreeU_V2": env.nodes.EmptyLatentImage().generate(96, 96, 1)[0]}

    def run(model, name, stacked=True, schedule="as stored"):
        if stacked:
            model = cs.call_node(env.comfyui, name, model=model, **STACKS[name])[0]
        return env.batch(model, schedule, count=1, latent=latents.get(name))

    checked = []
    with torch.inference_mode():
        for name in _available_stacks(env):
            for frag in (env.frag, env.full):
                model, _ = env.load(frag)
                out, off, unstacked = run(model, name), run(model, name, schedule="off"), run(model, name, stacked=False)
                plain = run(env.load(frag, "off")[0], name)
                assert torch.isfinite(out).all(), name
                assert torch.equal(off, plain), f"{name}: schedule off is not the plain fragment"
                if name == "EasyCache" and fragment_schedule(frag).cfg_cutoff is not None:
                    # Known limit (README): below the cut-off the call narrows to the cond rows, EasyCache sees a new
                    # input shape and starts over, so with 2 of 4 steps above the cut it never skips a step.
                    assert torch.equal(out, unstacked), "EasyCache now skips under CFG truncation: update the README"
                else:
                    assert not torch.equal(out, unstacked), f"{name} did not change the fragment's output"
                checked.append((name, frag.name))
    assert len(checked) == 2 * len(_available_stacks(env))


class _LowFreeMemory:
    """``comfy.samplers`` sees almost no free memory, so ComfyUI runs cond and uncond in separate UNet calls.

    Only the sampler's view is changed: BatchGenerator still plans one sub-batch of 4.
    """

    def __init__(self, samplers_module) -> None:
        self.samplers = samplers_module
        self.real = samplers_module.model_management

    def __enter__(self) -> "_LowFreeMemory":
        proxy = SimpleNamespace(**{k: getattr(self.real, k) for k in dir(self.real) if not k.startswith("__")})
        proxy.get_free_memory = lambda *args, **kwargs: 1  # noqa: ARG005 - one byte: nothing batches with anything
        self.samplers.model_management = proxy
        return self

    def __exit__(self, *exc) -> None:
        self.samplers.model_management = self.real


@pytest.mark.parametrize("split", ["batched", "low memory", "area conds"])
def test_a_batch_of_4_equals_4_single_runs(env: ScheduledEnv, split: str) -> None:
    """Cache packs break on batches over 1 and on split conds; a schedule's cache slots must not.

    ``low memory``: the sampler sees almost no free memory and runs cond and uncond in separate calls.
    ``area conds``: a second positive cond on a 32 px corner runs as its own, smaller UNet call.
    """
    import comfy.samplers

    positive = env.positive
    if split == "area conds":
        (corner,) = cs.call_node(env.comfyui, "ConditioningSetArea", conditioning=env.positive, width=32, height=32,
                                 x=0, y=0, strength=1.0)
        (positive,) = cs.call_node(env.comfyui, "ConditioningCombine", conditioning_1=env.positive, conditioning_2=corner)
    low_memory = _LowFreeMemory(comfy.samplers) if split == "low memory" else contextlib.nullcontext()
    with torch.inference_mode(), low_memory:
        model, _ = env.load(env.full)
        state = env.state(model)
        state.history.clear()
        batch = env.batch(model, seed=20, count=4, positive=positive)
        signatures = {h["signature"] for h in state.history}
        reused = sorted(set(state.reused_steps()))
        singles = torch.cat([env.batch(model, seed=20 + i, count=1, positive=positive) for i in range(4)])
    rows = {s[0] for s in signatures}
    if split == "low memory":  # every call holds one chunk of 4 rows
        assert rows == {4}, signatures
    elif split == "batched":  # [cond, uncond] x 4, then cond alone below the cut-off
        assert rows == {8, 4}, signatures
    else:  # the corner cond runs at a quarter of the latent, beside the full-size calls
        assert {s[2:] for s in signatures} == {(8, 8), (4, 4)}, signatures
    assert reused, "the schedule reused no step in the batch"
    assert_close(batch, singles, rtol=1e-4, atol=1e-4)
