"""A profiled SD1.5 fragment with a run-time schedule inside a real ComfyUI, shared by the tier-2 schedule tests.

``build_scheduled_env`` profiles one 4-step run of a random-weight SD1.5
checkpoint through the pack's nodes, extracts a fragment with a step-reuse
schedule (``frag``) and stores a copy with per-bucket heads and CFG truncation
(``full``).  The returned ``ScheduledEnv`` loads fragments onto the base model
and runs batches the way the nodes would.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from prompt_fragments.fragment.schedule.state import Schedule, ScheduleState
from prompt_fragments.fragment.schedule.apply import fragment_schedule, with_schedule
from prompt_fragments.fragment.format.manifest import Fragment
from prompt_fragments.fragment.format.store import load_fragment, save_fragment
from prompt_fragments.fragment.schedule.timestep_heads import select_bucket_heads

STEPS = 4
PLENTY = 64 * 2**30  # bytes of "free memory" the tests report, so sub-batch sizes never follow the machine's load


@contextlib.contextmanager
def plenty_of_free_memory() -> Iterator[None]:
    """ComfyUI reports PLENTY free bytes: BatchGenerator plans the sub-batches it is asked for, and the sampler
    runs cond and uncond in one call, whatever else runs on this machine (batch sizes change float rounding)."""
    import comfy.model_management as mm

    real = mm.get_free_memory
    mm.get_free_memory = lambda dev=None, torch_free_too=False: (PLENTY, PLENTY) if torch_free_too else PLENTY
    try:
        yield
    finally:
        mm.get_free_memory = real


@dataclass
class ScheduledEnv:
    comfyui: Any
    nodes: Any
    mapping: dict[str, type]
    base: Any
    positive: Any
    negative: Any
    latent: dict[str, torch.Tensor]
    frag: Fragment
    path: Path
    full: Fragment

    def load(self, frag: Fragment, schedule: str = "as stored", base: Any = None) -> tuple[Any, str]:
        """FragmentLoader on ``base`` (default: the plain base model) with ``frag`` connected directly."""
        handle = SimpleNamespace(fragment=frag, manifest_path=None)
        return self.mapping["FragmentLoader"]().apply(self.base if base is None else base, "(none)", "raise",
                                                      fragment=handle, schedule=schedule)

    def batch(self, model: Any, schedule: str = "as stored", seed: int = 5, count: int = 2, batch_size: int | None = None,
              positive: Any = None, negative: Any = None, latent: dict[str, torch.Tensor] | None = None,
              sampler_name: str = "euler", scheduler: str = "normal") -> torch.Tensor:
        """BatchGenerator: ``count`` seeds from ``seed`` in sub-batches of ``batch_size`` (default: all at once),
        STEPS steps of ``sampler_name`` (euler, normal unless given), cfg 7, on the 64 px latent unless given.
        The running audit is off: these batches check the schedule, and an audited row is the full model's."""
        with plenty_of_free_memory():
            (out,) = self.mapping["BatchGenerator"]().generate(
                model, self.positive if positive is None else positive, self.negative if negative is None else negative,
                self.latent if latent is None else latent, seed, count, batch_size or count, STEPS, 7.0, sampler_name,
                scheduler, 1.0, schedule=schedule, audit_every=0)
        return out["samples"]

    def state(self, model: Any) -> ScheduleState:
        """The loaded MODEL's ScheduleState, found as BatchGenerator finds it (the pack runs under another module name)."""
        found = sys.modules[self.mapping["BatchGenerator"].__module__].find_schedule_state(model)
        assert found is not None, "no schedule state on the loaded MODEL"
        return found


def build_scheduled_env(comfyui: Any, comfyui_pack: Any, ckpt_name: str) -> ScheduledEnv:
    """Profile, extract with ``step_reuse=0.5``, and add a copy with 2 per-bucket head sets and CFG truncation below t=400."""
    nodes, mapping = comfyui.nodes, comfyui_pack.NODE_CLASS_MAPPINGS
    with torch.inference_mode():
        model, clip, _vae, profile = mapping["ProfilerModelLoader"]().load(ckpt_name, 2, 32, "accumulate")
        positive = nodes.CLIPTextEncode().encode(clip, "A dog on a jet ski")[0]
        negative = nodes.CLIPTextEncode().encode(clip, "blurry")[0]
        latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        sampled = nodes.KSampler().sample(model, 1, STEPS, 7.0, "euler", "normal", positive, negative, latent)[0]
        (levers,) = mapping["FragmentManualLevers"]().levers(ratio=0.2, step_reuse=0.5)
        handle, _status, _latents = mapping["FragmentExtractor"]().extract(
            profile, sampled, "speed_test", overwrite=True, levers=levers)["result"]
        base = nodes.CheckpointLoaderSimple().load_checkpoint(ckpt_name)[0]
    frag = handle.fragment
    union, per_bucket = select_bucket_heads(profile.session.result(), [0.4, 0.2])
    allowed = {p: frag.kept.get(p, list(range(n))) for p, n in union.heads.items()}  # what the fragment kept
    buckets = {b: {p: [h for h in hs if h in allowed[p]] or allowed[p][:1] for p, hs in plan.items()}
               for b, plan in per_bucket.items()}
    full = with_schedule(frag, Schedule(buckets=2, bucket_heads=buckets, total_steps=STEPS,
                                        reuse_steps=fragment_schedule(frag).reuse_steps, shallow=1, cfg_cutoff=400.0))
    full_path = save_fragment(full, handle.manifest_path.parent / "speed_full", overwrite=True)
    return ScheduledEnv(comfyui=comfyui, nodes=nodes, mapping=mapping, base=base, positive=positive, negative=negative,
                        latent=latent, frag=frag, path=handle.manifest_path, full=load_fragment(full_path))
