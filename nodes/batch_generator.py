"""BatchGenerator: many seeds of one prompt in memory-aware sub-batches, with per-step progress and cancel.

With a MODEL from FragmentLoader that carries a schedule, the batch runs it
(or part of it, or none) and tells it the real step count.

Each variant gets the noise ``comfy.sample.prepare_noise`` makes for its own
seed with batch size 1, so variant ``i`` matches a plain KSampler run with
seed ``seeds[i]``, whatever the sub-batch it lands in.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Iterator

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import torch

from ..fragment.batching import chunk, plan_sub_batches, variant_seeds
from ..fragment.schedule.state import ScheduleState
from .folders import CATEGORY, tip
from .node_text import with_text
from .schedule_patch import find_schedule_state

log = logging.getLogger(__name__)


@contextlib.contextmanager
def schedule_settings(state: ScheduleState | None, steps: int, mode: str) -> Iterator[None]:
    """For one batch: tell a fragment's schedule the step count, and turn parts off as ``mode`` asks."""
    if state is None:
        yield
        return
    saved = (state.run_total_steps, state.reuse_enabled, state.heads_enabled, state.cfg_enabled)
    state.run_total_steps = steps  # the sampler's real step count: a schedule made for other steps is mapped onto it
    state.reuse_enabled = state.cfg_enabled = mode == "as stored"
    state.heads_enabled = mode != "off"
    try:
        yield
    finally:
        state.run_total_steps, state.reuse_enabled, state.heads_enabled, state.cfg_enabled = saved


class StepProgress:
    """Progress in image-steps (``count x steps``), updated by the sampler's per-step callback.

    The callback also checks for Cancel after every step, so an interrupt stops
    a sub-batch within one step, as it stops KSampler, not only between
    sub-batches.
    """

    def __init__(self, images: int, steps: int) -> None:
        self.steps = max(1, steps)
        self.bar = comfy.utils.ProgressBar(images * self.steps)
        self.done_images = 0

    def callback(self, group_size: int) -> Any:
        def on_step(step: int, x0: Any, x: Any, total_steps: int) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            self.bar.update_absolute(self.done_images * self.steps + min(step + 1, self.steps) * group_size)

        return on_step

    def finished(self, group_size: int) -> None:
        self.done_images += group_size
        self.bar.update_absolute(self.done_images * self.steps)


def _per_image_bytes(model: Any, latent: torch.Tensor) -> float:
    shape = (1,) + tuple(latent.shape[1:])
    # Cond and uncond run together, hence twice the sampler's single-image estimate.
    return 2.0 * float(model.memory_required(shape))


class BatchGenerator:
    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", tip("Usually the MODEL from FragmentLoader.")),
                "positive": ("CONDITIONING", tip("Positive prompt conditioning.")),
                "negative": ("CONDITIONING", tip("Negative prompt conditioning.")),
                "latent_image": ("LATENT", tip("Starting latent; its first image is used for every variant.")),
                "seed": ("INT", tip("First seed; variants use seed, seed+1, ...", default=0, min=0, max=0xFFFFFFFFFFFFFFFF)),
                "count": ("INT", tip("Number of variants (ignored when seed_list is set).", default=32, min=1, max=4096)),
                "batch_size": ("INT", tip("Most images per sampler pass; lowered automatically to fit free memory.", default=4, min=1, max=64)),
                "steps": ("INT", tip("Sampler steps.", default=20, min=1, max=10000)),
                "cfg": ("FLOAT", tip("Classifier-free guidance scale.", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01)),
                "sampler_name": (comfy.samplers.KSampler.SAMPLERS, tip("Sampler, as in KSampler.")),
                "scheduler": (comfy.samplers.KSampler.SCHEDULERS, tip("Scheduler, as in KSampler.")),
                "denoise": ("FLOAT", tip("Denoise strength, as in KSampler.", default=1.0, min=0.0, max=1.0, step=0.01)),
            },
            "optional": {
                "seed_list": ("STRING", tip("Explicit seeds, e.g. '1, 5, 10-13'; overrides seed and count.", default="", multiline=False)),
                "schedule": (["as stored", "off", "heads only"], tip("A fragment's run-time schedule for this batch: as stored (step reuse, head sets, CFG truncation), off (the plain fragment), or heads only (no step reuse or CFG truncation).")),
            },
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "run"
    CATEGORY = CATEGORY
    DESCRIPTION = "Generates many seeds of one prompt in sub-batches that fit in memory, with progress and cancel."

    def run(self, **inputs: Any) -> dict[str, Any]:
        """The node's entry point: ``generate``'s LATENT, with the report (images, seconds, images/s) on the node."""
        result, report = self.generate_and_report(**inputs)
        return with_text(result, report)

    def generate(self, *args: Any, **kwargs: Any) -> tuple:
        """``(LATENT,)`` of ``generate_and_report`` (same arguments), without the report."""
        return self.generate_and_report(*args, **kwargs)[0]

    def generate_and_report(self, model: Any, positive: Any, negative: Any, latent_image: dict, seed: int, count: int,
                            batch_size: int, steps: int, cfg: float, sampler_name: str, scheduler: str, denoise: float,
                            seed_list: str = "", schedule: str = "as stored") -> tuple[tuple, str]:
        seeds = variant_seeds(seed, count, seed_list)
        state = find_schedule_state(model)
        with schedule_settings(state, steps, schedule):
            result, report = self._generate(model, positive, negative, latent_image, seeds, batch_size, steps, cfg,
                                            sampler_name, scheduler, denoise, state)
        if state is not None:
            report += f"; fragment schedule {schedule}"
        return result, report

    def _generate(self, model: Any, positive: Any, negative: Any, latent_image: dict, seeds: list[int], batch_size: int,
                  steps: int, cfg: float, sampler_name: str, scheduler: str, denoise: float,
                  state: ScheduleState | None = None) -> tuple[tuple, str]:
        base = latent_image["samples"][:1]
        free = comfy.model_management.get_free_memory(model.load_device)
        sizes = plan_sub_batches(len(seeds), batch_size, _per_image_bytes(model, base), free)
        progress = StepProgress(len(seeds), steps)
        outputs = []
        started = time.perf_counter()
        for group in chunk(seeds, sizes):
            comfy.model_management.throw_exception_if_processing_interrupted()
            noise = torch.cat([comfy.sample.prepare_noise(base, s) for s in group])
            latent = base.repeat(len(group), 1, 1, 1)
            if state is not None:  # each sub-batch is its own run: never replay another run's features
                state.reset()
            samples = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                          denoise=denoise, disable_pbar=True, seed=group[0],
                                          callback=progress.callback(len(group)))
            if state is not None:  # and the cached deep features are freed once the run is done
                state.reset()
            outputs.append(samples.cpu())
            progress.finished(len(group))
        elapsed = time.perf_counter() - started
        report = (f"{len(seeds)} images in {elapsed:.1f} s ({len(seeds) / elapsed if elapsed > 0 else float('inf'):.2f} "
                  f"images/s), sub-batches {sizes}")
        log.info("BatchGenerator: %s", report)
        out = {k: v for k, v in latent_image.items() if k not in ("samples", "batch_index", "noise_mask")}
        out["samples"] = torch.cat(outputs)
        return (out,), report
