"""ProfilerModelLoader: a checkpoint loader whose MODEL records head statistics while any sampler runs it.

Queue semantics (ComfyUI caches node outputs between queues):

* ``accumulate`` (default): the profile lives as long as this node's output
  is cached.  Queue again with a new seed and the sampler runs again on the
  same MODEL, adding one more run (sample) to the same profile; queue with
  nothing changed and nothing runs, so nothing is counted twice.
* ``reset``: the node runs on every queue, so each queue starts a new,
  empty profile (and reloads the checkpoint).

Each sampler run is one sample of the profile (runs are labelled ``run-1``,
``run-2``...); every model call is one profiled step, bucketed by timestep.

Each run's sampler settings are recorded too (``ProfileHandle.runs``), so the
extractor re-renders the profiled run without the user copying them.  A model
call wrapper sees only the call (input, sigma), on both runtimes, so at a run's
first call the wrapper reads the arguments of the ``comfy.sample.sample`` (or
``sample_custom``) call it runs inside: seed, steps, cfg, sampler, scheduler,
sigmas, denoise, the initial noise and the input latent.  The noise is checked
against ``comfy.sample.prepare_noise`` for that seed (what KSampler does), so a
run with other noise is recorded as such, not mistaken for its seed.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable

import comfy.sample
import comfy.sd
import folder_paths
import torch

from ..profiling.profiler import DEFAULT_ENTROPY_TOKENS
from ..profiling.session import ProfileSession
from .comfy_versions import add_call_wrapper, call_next, call_wrappers, remove_call_wrappers
from .folders import CATEGORY, ProfileHandle, tip

log = logging.getLogger(__name__)


PROFILE_KEY = "prompt_fragments.profile"
PROFILING_MARK = "prompt_fragments_profiling"


@dataclass(frozen=True)
class RecordedRun:
    """One profiled sampler run's settings, as the wrapper found them (``None``: not visible for this run).

    ``noise_from_seed``: the initial noise is ``prepare_noise(latent, seed)`` (KSampler's), so rendering
    ``seed`` again reproduces the run; ``empty_latent``: it started from zeros (txt2img).

    >>> RecordedRun(seed=1, steps=4, cfg=7.0, sampler_name="euler", scheduler="normal").describe()
    'seed 1, 4 steps, cfg 7, euler/normal'
    """

    seed: int | None = None
    steps: int | None = None
    cfg: float | None = None
    sampler_name: str | None = None
    scheduler: str | None = None
    sigmas: tuple[float, ...] = ()
    denoise: float | None = 1.0
    noise_from_seed: bool = True
    empty_latent: bool = True
    source: str = "comfy.sample.sample"

    def describe(self) -> str:
        def shown(value: Any) -> str:
            return "?" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
        return (f"seed {shown(self.seed)}, {shown(self.steps)} steps, cfg {shown(self.cfg)}, "
                f"{shown(self.sampler_name)}/{shown(self.scheduler)}")


def sampler_frame_run() -> RecordedRun | None:
    """The settings of the ``comfy.sample.sample`` / ``sample_custom`` call this code runs inside (None: neither)."""
    codes = {comfy.sample.sample.__code__: "comfy.sample.sample", comfy.sample.sample_custom.__code__: "comfy.sample.sample_custom"}
    frame = inspect.currentframe()
    try:
        while frame is not None and frame.f_code not in codes:
            frame = frame.f_back
        if frame is None:
            return None
        return run_from_arguments(codes[frame.f_code], frame.f_locals)
    finally:
        del frame  # a frame reference would keep every local of the sampler alive


def run_from_arguments(source: str, args: dict[str, Any]) -> RecordedRun:
    """A :class:`RecordedRun` from the arguments of ``comfy.sample.sample`` (or ``sample_custom``)."""
    seed, noise, latent = args.get("seed"), args.get("noise"), args.get("latent_image")
    noise_from_seed = False
    if seed is not None and isinstance(noise, torch.Tensor) and isinstance(latent, torch.Tensor):
        expected = comfy.sample.prepare_noise(latent, int(seed))
        noise_from_seed = expected.shape == noise.shape and torch.equal(expected, noise.to(expected.dtype).cpu())
    empty = isinstance(latent, torch.Tensor) and not bool(latent.any())
    if source == "comfy.sample.sample":
        ksampler = args.get("sampler")  # the comfy.samplers.KSampler built inside sample(): its sigmas
        sigmas = getattr(ksampler, "sigmas", None) if args.get("sigmas") is None else args.get("sigmas")
        return RecordedRun(seed=None if seed is None else int(seed), steps=int(args["steps"]), cfg=float(args["cfg"]),
                           sampler_name=str(args["sampler_name"]), scheduler=str(args["scheduler"]),
                           sigmas=tuple(float(v) for v in sigmas) if sigmas is not None else (),
                           denoise=float(args.get("denoise", 1.0)), noise_from_seed=noise_from_seed,
                           empty_latent=empty, source=source)
    sigmas = args.get("sigmas")
    return RecordedRun(seed=None if seed is None else int(seed), steps=max(1, len(sigmas) - 1) if sigmas is not None else None,
                       cfg=float(args["cfg"]), sigmas=tuple(float(v) for v in sigmas) if sigmas is not None else (),
                       denoise=None, noise_from_seed=noise_from_seed, empty_latent=empty, source=source)


def profiling_wrapper(session: ProfileSession, runs: list[RecordedRun] | None = None) -> Callable:
    """A call wrapper (``model_function_wrapper`` signature) that runs each UNet call inside the session's hooks.

    When a call starts a new run, that run's sampler settings are appended to ``runs``.
    """

    def wrapper(apply_model: Callable, args: dict[str, Any]) -> Any:
        sigma = args["timestep"]
        before = session.runs
        out = session.call(lambda: call_next(wrapper, apply_model, args), sigma=float(sigma.max()) if hasattr(sigma, "max") else float(sigma))
        if runs is not None and session.runs != before:
            found = sampler_frame_run()
            # Another way in (a pack calling the model itself): the run is counted, its settings unknown.
            runs.append(found if found is not None else RecordedRun(noise_from_seed=False, denoise=None, source="unknown"))
        return out

    # The mark lets FragmentLoader take profiling off a fragment model it builds from this MODEL.
    setattr(wrapper, PROFILING_MARK, True)
    return wrapper


def without_profiling(patcher: Any) -> Any:
    """Remove this pack's profiling wrapper from a (cloned) ModelPatcher, keeping every other wrapper."""
    remove_call_wrappers(patcher, PROFILE_KEY, PROFILING_MARK)
    return patcher


def is_profiling(patcher: Any) -> bool:
    """True when ``patcher`` records statistics into a profile while it samples."""
    return any(getattr(w, PROFILING_MARK, False) for w in call_wrappers(patcher, PROFILE_KEY))


class ProfilerModelLoader:
    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "ckpt_name": (folder_paths.get_filename_list("checkpoints"), tip("Checkpoint to load and profile.")),
                "timestep_buckets": ("INT", tip("Statistics are kept separately for this many noise-level ranges.", default=4, min=1, max=16)),
                "entropy_tokens": ("INT", tip("Query tokens sampled per call for attention entropy (0 turns entropy off).", default=DEFAULT_ENTROPY_TOKENS, min=0, max=4096)),
                "on_requeue": (["accumulate", "reset"], tip("accumulate: sampler runs on later queues add to this profile; reset: every queue starts a new profile.")),
            }
        }

    RETURN_TYPES = ("MODEL", "CLIP", "VAE", "FRAGMENT_PROFILE")
    RETURN_NAMES = ("MODEL", "CLIP", "VAE", "profile")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a checkpoint; its MODEL records which attention heads carry the output while any sampler runs it."

    @classmethod
    def IS_CHANGED(cls, on_requeue: str = "accumulate", **_: Any) -> Any:
        # NaN never equals itself, so ComfyUI re-runs the node (and a fresh profile) on every queue.
        return float("nan") if on_requeue == "reset" else ""

    def load(self, ckpt_name: str, timestep_buckets: int, entropy_tokens: int, on_requeue: str) -> tuple:
        path = folder_paths.get_full_path("checkpoints", ckpt_name)
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(
            path, output_vae=True, output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings")
        )[:3]
        diffusion_model = model.model.diffusion_model
        session = ProfileSession(diffusion_model, buckets=timestep_buckets, entropy_tokens=entropy_tokens,
                                 info={"checkpoint": ckpt_name, "on_requeue": on_requeue})
        profiled = model.clone()
        handle = ProfileHandle(session=session, checkpoint=ckpt_name, patcher=profiled)
        add_call_wrapper(profiled, PROFILE_KEY, profiling_wrapper(session, handle.runs))
        log.info("profiling %s: %d attention modules", ckpt_name, len(session.result().modules))
        return (profiled, clip, vae, handle)
