"""Tier 2: whole-step reuse (``step_reuse.skips = 0``) inside a real ComfyUI, on both test runtimes.

A fragment of the random-weight SD1.5 checkpoint (a quarter of its heads pruned
at random: what is checked is the mechanism, not image quality) gets a
whole-step schedule and is loaded with FragmentLoader, then sampled with the
KSampler node (euler and DPM++ 2M, 6 steps, cfg 7, one 64 px seed).  On a reuse step the
schedule's call wrapper (``nodes.schedule_patch``) must not call the UNet, and
must return what ComfyUI's ``apply_model`` would have returned had the UNet
given its output of the last computed step: ``calculate_denoised`` of that
output with this call's ``x`` and sigma.  The reference for that is the plain
fragment with a forward hook on the diffusion model that returns, on the
reuse steps, the output it recorded on the last computed step (so the UNet
output goes through ComfyUI's own ``apply_model`` arithmetic).

* the UNet runs exactly (steps - reuse steps) x (calls per step) times, with
  cond and uncond batched in one call and run apart (little free memory);
* the sample equals the hooked reference run's (float rounding only: the wrapper
  recovers the UNet output from ``apply_model``'s denoised result);
* below a CFG cut-off (cond rows only) a reuse step replays the cond rows of
  the last computed output, also of one computed on the whole batch;
* with no reuse step, or reuse turned off, or the schedule off, the sample is
  the plain fragment's bit for bit.
"""
from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from scheduled_env import plenty_of_free_memory

STEPS = 6
# Step 3 is computed between two reuses (the cache is refreshed), and 4, 5 replay the same output twice.
REUSE = (2, 4, 5)
SEED = 3


class UNetCalls:
    """Forward hooks on a UNet for one sampler run: its calls as (step, call of the step) and their timesteps.

    A lower timestep than the last call's is the next step; an equal one another call of the same step (cond and
    uncond run apart).  With ``replay``, on those steps the UNet's output is replaced by its output from the
    last step that was not replayed (the same call of that step), as the whole-step schedule should do; a call
    narrowed to its cond rows (CFG truncation) gets the cond rows of it.
    """

    def __init__(self, unet: torch.nn.Module, replay: tuple[int, ...] = ()) -> None:
        self.unet, self.replay = unet, set(replay)
        self.calls: list[tuple[int, int]] = []
        self.timesteps: list[float] = []  # one per step seen
        self.rows: list[int] = []  # each call's batch size
        self.replayed = 0
        self._saved: dict[int, tuple[torch.Tensor, list[int]]] = {}  # call -> (output, its cond_or_uncond chunks)
        self._handle: Any = None

    def __enter__(self) -> "UNetCalls":
        self._handle = self.unet.register_forward_hook(self._on_output, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()

    def _on_output(self, _module: torch.nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor | None:
        t = float((args[1] if len(args) > 1 else kwargs["timesteps"]).max())
        if not self.timesteps or t < self.timesteps[-1] - 1e-4:
            self.timesteps.append(t)
            step, call = len(self.timesteps) - 1, 0
        else:
            assert abs(t - self.timesteps[-1]) <= 1e-4, "a second sampler run inside one UNetCalls"
            step, call = self.calls[-1][0], self.calls[-1][1] + 1
        self.calls.append((step, call))
        self.rows.append(out.shape[0])
        if step in self.replay:
            self.replayed += 1
            saved, chunks = self._saved[call]
            if saved.shape[0] != out.shape[0]:  # the cond rows only, below the CFG cut-off
                size = saved.shape[0] // len(chunks)
                assert out.shape[0] == size, (saved.shape, out.shape, chunks)
                saved = saved[chunks.index(0) * size:(chunks.index(0) + 1) * size]
            return saved.clone()
        chunks = list(kwargs.get("transformer_options", {}).get("cond_or_uncond", []))
        self._saved[call] = (out.detach().clone(), chunks)
        return None


@dataclass
class WholeStepEnv:
    comfyui: Any
    pack: ModuleType
    base: Any
    positive: Any
    negative: Any
    latent: dict[str, torch.Tensor]
    frag: Any  # the plain fragment (no schedule)
    whole: Any  # the same fragment with a whole-step schedule: REUSE of STEPS steps, skips=0
    plain: torch.Tensor  # the plain fragment's sample, cond and uncond batched
    timesteps: list[float]  # the UNet's timestep on each step of that run

    def module(self, name: str) -> ModuleType:
        """A module of the pack as ComfyUI loaded it (its classes and caches, not this checkout's ``prompt_fragments``)."""
        return importlib.import_module(f"{self.pack.__name__}.{name}")

    def with_schedule(self, **schedule: Any) -> Any:
        state = self.module("fragment.schedule.state")
        return state.with_schedule(self.frag, state.Schedule(**schedule))

    def load(self, frag: Any, schedule: str = "as stored") -> tuple[Any, str]:
        handle = SimpleNamespace(fragment=frag, manifest_path=None)
        return self.pack.NODE_CLASS_MAPPINGS["FragmentLoader"]().apply(self.base, "(none)", "raise", fragment=handle,
                                                                       schedule=schedule)

    def sample(self, model: Any, sampler: str = "euler", negative: Any = None) -> torch.Tensor:
        """KSampler: STEPS steps of ``sampler``, cfg 7, on the one-seed 64 px latent."""
        (out,) = self.comfyui.nodes.KSampler().sample(model, SEED, STEPS, 7.0, sampler, "normal", self.positive,
                                                      self.negative if negative is None else negative, self.latent)
        return out["samples"]

    def state(self, model: Any) -> Any:
        found = self.module("nodes.schedule_patch").find_schedule_state(model)
        assert found is not None, "no schedule state on the loaded MODEL"
        return found

    @property
    def unet(self) -> torch.nn.Module:
        # Object patches replace the diffusion model's children, never the diffusion model itself.
        return self.base.model.diffusion_model


class _LowFreeMemory:
    """``comfy.samplers`` sees one byte free, so ComfyUI runs cond and uncond in separate UNet calls."""

    def __init__(self) -> None:
        import comfy.samplers

        self.samplers = comfy.samplers
        self.real = comfy.samplers.model_management

    def __enter__(self) -> "_LowFreeMemory":
        proxy = SimpleNamespace(**{k: getattr(self.real, k) for k in dir(self.real) if not k.startswith("__")})
        proxy.get_free_memory = lambda *args, **kwargs: 1  # noqa: ARG005
        self.samplers.model_management = proxy
        return self

    def __exit__(self, *exc: Any) -> None:
        self.samplers.model_management = self.real


def _memory(split: str) -> contextlib.AbstractContextManager:
    return _LowFreeMemory() if split == "cond and uncond apart" else contextlib.nullcontext()


@pytest.fixture(scope="module")
def env(comfyui, comfyui_pack, sd15_checkpoint) -> WholeStepEnv:
    """The base model, prompts, a random head-pruned fragment of it, its whole-step copy, and the plain sample."""
    nodes = comfyui.nodes
    module = lambda name: importlib.import_module(f"{comfyui_pack.__name__}.{name}")  # noqa: E731
    build, patching = module("fragment.build"), module("fragment.patching")
    heads, selection = module("fragment.surgery.heads"), module("fragment.surgery.selection")
    with torch.inference_mode():
        base, clip, _vae = nodes.CheckpointLoaderSimple().load_checkpoint(sd15_checkpoint)[:3]
        positive = nodes.CLIPTextEncode().encode(clip, "A dog on a jet ski")[0]
        negative = nodes.CLIPTextEncode().encode(clip, "blurry")[0]
        latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        unet = base.model.diffusion_model
        g = torch.Generator().manual_seed(0)
        scores = {p: torch.rand(n, generator=g) for p, n in sorted(build.keep_all_heads(unet).heads.items())}
        # The pack's own hash (cached per module): FragmentLoader finds the base already hashed.
        digest = patching.base_sha256(unet)
        base_block = build.describe_base(unet, "random-sd15", sha256=digest, hash_kind="state_dict_fp16")
        frag = build.build_fragment(unet, [heads.HeadLever(selection.select_heads(scores, ratio=0.25))],
                                    base=base_block, name="whole_step")
    partial = WholeStepEnv(comfyui=comfyui, pack=comfyui_pack, base=base, positive=positive, negative=negative,
                           latent=latent, frag=frag, whole=None, plain=torch.empty(0), timesteps=[])
    with torch.inference_mode(), plenty_of_free_memory():
        plain_model, status = partial.load(frag)
        assert "modules replaced" in status and "schedule" not in status, status
        with UNetCalls(partial.unet) as calls:
            plain = partial.sample(plain_model)
    assert len(calls.timesteps) == STEPS and len(calls.calls) == STEPS, calls.calls  # cond and uncond in one call
    # Stored with the run's timesteps, as the extractor stores a calibrated schedule.
    whole = partial.with_schedule(total_steps=STEPS, reuse_steps=REUSE, skips=0, step_timesteps=tuple(calls.timesteps))
    return WholeStepEnv(**{**partial.__dict__, "whole": whole, "plain": plain, "timesteps": calls.timesteps})


# Euler, the common case.  With an eps model, Euler keeps ``x - eps * sigma`` from one step to the next, so there
# replaying the UNet output and replaying the last denoised prediction itself give the same sample; DPM++ 2M's update
# does not keep it, so only there does the exactness check tell the two apart.
@pytest.mark.parametrize("sampler, split", [("euler", "batched"), ("dpmpp_2m", "batched"),
                                            ("dpmpp_2m", "cond and uncond apart")])
def test_a_reuse_step_skips_the_unet_and_replays_its_last_output_through_calculate_denoised(
        env: WholeStepEnv, sampler: str, split: str) -> None:
    with torch.inference_mode(), plenty_of_free_memory(), _memory(split):
        plain_model, _ = env.load(env.whole, schedule="off")  # the plain fragment's modules, no schedule
        with UNetCalls(env.unet) as plain_calls:
            plain = env.sample(plain_model, sampler)
        model, status = env.load(env.whole)
        state = env.state(model)
        state.history.clear()
        with UNetCalls(env.unet) as calls:
            out = env.sample(model, sampler)
        reused = state.reused_steps()
        with UNetCalls(env.unet) as again_calls:
            again = env.sample(model, sampler)  # a second run starts from a clean state (2024: no run wrapper resets it)
        with UNetCalls(env.unet, replay=REUSE) as reference_calls:
            reference = env.sample(plain_model, sampler)
    assert f"whole UNet calls reused on {len(REUSE)} of {STEPS} steps" in status, status
    per_step = len(plain_calls.calls) // STEPS
    assert len(plain_calls.calls) == STEPS * per_step and per_step == (1 if split == "batched" else 2), plain_calls.calls
    if sampler == "euler" and split == "batched":
        assert torch.equal(plain, env.plain)
    # 1. the UNet runs only on the computed steps, every call of them
    computed = [s for s in range(STEPS) if s not in REUSE]
    assert len(calls.calls) == (STEPS - len(REUSE)) * per_step, calls.calls
    assert calls.timesteps == [plain_calls.timesteps[s] for s in computed]
    assert len(again_calls.calls) == len(calls.calls)
    assert reused == list(REUSE)
    assert sorted({h["step"] for h in state.history}) == list(range(STEPS))
    assert torch.isfinite(out).all()
    assert torch.equal(out, again)
    # 2. exactness: what apply_model returns for the last computed step's UNet output, with this step's x and sigma
    assert reference_calls.replayed == len(REUSE) * per_step
    # Float rounding only (the wrapper recovers the UNet output from apply_model's denoised result): measured at
    # an eighth of this tolerance on both runtimes; replaying the denoised prediction instead misses it ~20-fold.
    assert_close(out, reference, rtol=2e-5, atol=2e-5)
    assert not torch.equal(out, plain)  # the reuse steps really replayed (a random UNet changes every step)
    assert (out - plain).abs().max() > 1e-3


def test_without_reuse_the_whole_step_schedule_is_the_plain_fragment_bit_for_bit(env: WholeStepEnv) -> None:
    state_module = env.module("fragment.schedule.state")
    with torch.inference_mode(), plenty_of_free_memory():
        # skips=0 with no reuse step: no schedule at all
        empty_model, empty_status = env.load(env.with_schedule(total_steps=STEPS, reuse_steps=(), skips=0))
        empty = env.sample(empty_model)
        # the whole-step wrapper installed, reuse turned off for the run (what BatchGenerator's schedule=off does)
        model, _ = env.load(env.whole)
        state = env.state(model)
        state.reuse_enabled = False
        state.history.clear()
        with UNetCalls(env.unet) as calls:
            disabled = env.sample(model)
        # FragmentLoader's schedule=off
        off_model, off_status = env.load(env.whole, schedule="off")
        off = env.sample(off_model)
    assert "schedule" not in empty_status and "schedule off" in off_status
    assert len(calls.calls) == STEPS and state.reused_steps() == []
    assert state.cached(state_module.WHOLE_STEP) is None  # nothing was stored: no step could replay it
    assert torch.equal(empty, env.plain)
    assert torch.equal(disabled, env.plain)
    assert torch.equal(off, env.plain)


def test_whole_step_reuse_under_cfg_truncation_replays_the_cond_rows(env: WholeStepEnv) -> None:
    """Below the CFG cut-off the call runs the cond rows only: a reuse step there replays those rows of the last
    computed step's output, also when that step ran the whole [cond, uncond] batch (step 4 after step 3 here)."""
    cutoff = (env.timesteps[3] + env.timesteps[4]) / 2
    truncated = env.with_schedule(cfg_cutoff=cutoff)
    both = env.with_schedule(total_steps=STEPS, reuse_steps=REUSE, skips=0, step_timesteps=tuple(env.timesteps),
                             cfg_cutoff=cutoff)
    # The random text encoder makes cond and uncond predictions alike (replaying the uncond rows passed unnoticed);
    # a far-off negative makes them differ, so a row mix-up fails the comparison (checked).
    negative = [[-20.0 * c, dict(extra)] for c, extra in env.positive]
    with torch.inference_mode(), plenty_of_free_memory():
        model, status = env.load(both)
        state = env.state(model)
        state.history.clear()
        with UNetCalls(env.unet) as calls:
            out = env.sample(model, "dpmpp_2m", negative)
        reused = state.reused_steps()
        reference_model, _ = env.load(truncated)
        with UNetCalls(env.unet, replay=REUSE) as reference_calls:
            reference = env.sample(reference_model, "dpmpp_2m", negative)
    assert "whole UNet calls reused" in status and "CFG truncated" in status, status
    assert reference_calls.rows == [2, 2, 2, 2, 1, 1], reference_calls.rows  # [cond, uncond], then cond alone
    assert calls.rows == [2, 2, 2] and reused == list(REUSE)
    assert [h["signature"][0] for h in state.history] == [2, 2, 2, 2, 1, 1]
    assert torch.isfinite(out).all()
    assert_close(out, reference, rtol=2e-5, atol=2e-5)
