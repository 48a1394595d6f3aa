"""ProfilerModelLoader: a checkpoint loader whose MODEL records head statistics while any sampler runs it.

Queue semantics (ComfyUI caches node outputs between queues):

* ``accumulate`` (default): the profile lives as long as this node's output
  is cached.  Queue again with a new seed and the sampler runs again on the
  same MODEL, adding one more run (sample) to the same profile; queue with
  nothing changed and nothing runs, so nothing is counted twice.
* ``reset``: the node runs on every queue, so each queue starts a new,
  empty profile (and reloads the checkpoint).

Each sampler run is one sample of the profile (ComfyUI does not tell a model
its seed, so runs are labelled ``run-1``, ``run-2``...); every model call is
one profiled step, bucketed by timestep.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import comfy.sd
import folder_paths

from ..profiling.profiler import DEFAULT_ENTROPY_TOKENS
from ..profiling.session import ProfileSession
from .comfy_versions import add_call_wrapper, call_next, call_wrappers, remove_call_wrappers
from .folders import CATEGORY, ProfileHandle, tip

log = logging.getLogger(__name__)


PROFILE_KEY = "prompt_fragments.profile"
PROFILING_MARK = "prompt_fragments_profiling"


def profiling_wrapper(session: ProfileSession) -> Callable:
    """A call wrapper (``model_function_wrapper`` signature) that runs each UNet call inside the session's hooks."""

    def wrapper(apply_model: Callable, args: dict[str, Any]) -> Any:
        sigma = args["timestep"]
        return session.call(lambda: call_next(wrapper, apply_model, args), sigma=float(sigma.max()) if hasattr(sigma, "max") else float(sigma))

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
        add_call_wrapper(profiled, PROFILE_KEY, profiling_wrapper(session))
        log.info("profiling %s: %d attention modules", ckpt_name, len(session.result().modules))
        return (profiled, clip, vae, ProfileHandle(session=session, checkpoint=ckpt_name, patcher=profiled))
