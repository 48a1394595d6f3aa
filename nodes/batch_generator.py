"""BatchGenerator: many seeds of one prompt in memory-aware sub-batches, with per-step progress and cancel.

With a MODEL from FragmentLoader that carries a schedule, the batch runs it
(or part of it, or none) and tells it the real step count.

Each variant gets the noise ``comfy.sample.prepare_noise`` makes for its own
seed with batch size 1, so variant ``i`` matches a plain KSampler run with
seed ``seeds[i]``, whatever the sub-batch it lands in.

The running audit (issue #26, ``audit_every``): the 1st and every k-th
variant are also rendered with the full model (the fragment's MODEL with the
fragment's object patches and schedule taken off a clone); the batch holds
the full model's image for those seeds, and the fragment's is judged against
it in latent space (``latent_rel_error`` against the gate's latent limit).
When the audit's sequential rule (``fragment.audit.AuditRule``) fires, the
rest of the batch runs on the full model and the report is a WARNING.  By
default (-1, auto) k follows the cost model (``audit_interval_for``), and a
fragment extracted with confirm "in batch" (picked, no judged try) has its
first 3 images audited.  The verdict is kept in the fragment's manifest
(``quality.audits``) and in the prior of the batch's model configuration
(``fragment.library.audit_outcome``), so the next prompt starts from it.

``rendered`` (FragmentExtractor's ``full_model_latents``) holds full-model
renders the calibration already made: those seeds are not rendered again,
their rows take their places in the batch.

A fragment whose manifest records the sampler settings its calibration
judged with (``quality.sampler``) and a batch run with other ones (sampler,
scheduler, steps, cfg or denoise): the batch runs, and the report is a WARNING that
says what differs, since the fragment's quality on this run was not measured.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Iterator, Sequence

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import torch

from ..errors import FragmentError
from ..fragment.audit import (
    FULL, AuditedBatch, AuditRule, audit_positions, lead_pays, planned_audit_every, run_audited
)
from ..fragment.batching import chunk, plan_sub_batches, variant_seeds
from ..fragment.compat import sampler_mismatch
from ..fragment.library.audit_outcome import keep_audit_outcome
from ..fragment.schedule.state import ScheduleState
from ..judge.comfy import LATENT_JUDGE, judge_limits
from ..judge.latent_distance import latent_rel_error
from ..metrics.costs import BatchTimes, batch_costs
from .comfy_versions import has_keyed_wrappers, remove_call_wrappers, unload_clones
from .folders import CATEGORY, tip
from .fragment_extractor import ASSUMED_RAW_RATIO, run_prior
from .fragment_loader import FRAGMENT_PATCHES
from .node_text import WARNING, with_text
from .schedule_patch import SCHEDULE_KEY, SCHEDULE_MARK, find_schedule_state

log = logging.getLogger(__name__)


@contextlib.contextmanager
def schedule_settings(state: ScheduleState | None, steps: int, mode: str) -> Iterator[None]:
    """For one batch: tell a fragment's schedule the step count, and turn parts off as ``mode`` asks."""
    if state is None:
        yield
        return
    saved = (state.run_total_steps, state.reuse_enabled, state.heads_enabled, state.cfg_enabled, state.attn_enabled)
    state.run_total_steps = steps  # the sampler's real step count: a schedule made for other steps is mapped onto it
    state.reuse_enabled = state.cfg_enabled = state.attn_enabled = mode == "as stored"
    state.heads_enabled = mode != "off"
    try:
        yield
    finally:
        (state.run_total_steps, state.reuse_enabled, state.heads_enabled, state.cfg_enabled,
         state.attn_enabled) = saved


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
                "schedule": (["as stored", "off", "heads only"], tip("A fragment's run-time schedule for this batch: as stored (step reuse, head sets, CFG truncation, cross-attention cache), off (the plain fragment), or heads only (no step reuse, CFG truncation or cross-attention cache).")),
                "audit_every": ("INT", tip("Running audit of a fragment MODEL: the 1st and every k-th variant are also rendered with the full model; you get the full model's image for those seeds, and the fragment's is judged against it (latent error vs thresholds.yaml's limit). If the audit fails (failures outnumber passes by 3), the rest of the batch runs on the full model and the report warns. Each audit costs one fragment render. -1 = auto: k from the cost model (the audits a tenth of what the batch saves pays for, none under 6 images), and a fragment extracted with confirm 'in batch' has its first 3 images audited when the batch saves more than they cost (6 images or more); 0 = off. The verdict is kept in the fragment's manifest and, for a batch of the fragment as stored, in the model configuration's prior.", default=-1, min=-1, max=4096)),
                "rendered": ("LATENT", tip("Full-model renders made already (FragmentExtractor's full_model_latents): the seeds it names are not rendered again, and its rows take their places in the batch.")),
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
                            seed_list: str = "", schedule: str = "as stored", audit_every: int = -1,
                            rendered: dict | None = None) -> tuple[tuple, str]:
        seeds = variant_seeds(seed, count, seed_list)
        state = find_schedule_state(model)
        with schedule_settings(state, steps, schedule):
            result, report = self._generate(model, positive, negative, latent_image, seeds, batch_size, steps, cfg,
                                            sampler_name, scheduler, denoise, state, audit_every, rendered, schedule)
        if state is not None:
            report += f"; fragment schedule {schedule}"
        return result, report

    def _generate(self, model: Any, positive: Any, negative: Any, latent_image: dict, seeds: list[int], batch_size: int,
                  steps: int, cfg: float, sampler_name: str, scheduler: str, denoise: float,
                  state: ScheduleState | None = None, audit_every: int = -1,
                  rendered: dict | None = None, schedule: str = "as stored") -> tuple[tuple, str]:
        base = latent_image["samples"][:1]
        given = given_rows(rendered, seeds, tuple(base.shape[1:]))
        marker = model.model_options.get(FRAGMENT_PATCHES) or {}
        todo = sum(1 for s in seeds if s not in given)
        # a pick no judged try confirmed (confirm: in batch) meets its confirmation on the batch's first images
        untried = bool(marker.get("levers")) and marker.get("confirmation") == "in_batch"
        least = AuditRule().min_audits
        audited = audit_interval_for(audit_every, marker, todo, least if untried else 0)
        full = full_model_of(model) if audited else None
        lead = least if untried and audited else 0
        progress = StepProgress(todo + len(audit_positions(todo, audited, lead)), steps)
        sizes: list[int] = []
        spent = {"fragment": [0.0, 0], "full": [0.0, 0]}  # seconds and images each model rendered: the cost line's

        def render(patcher: Any, group_seeds: Sequence[int], fragment_state: ScheduleState | None) -> torch.Tensor:
            began = time.perf_counter()
            free = comfy.model_management.get_free_memory(patcher.load_device)
            plan = plan_sub_batches(len(group_seeds), batch_size, _per_image_bytes(patcher, base), free)
            sizes.extend(plan)
            outputs = []
            for group in chunk(list(group_seeds), plan):
                comfy.model_management.throw_exception_if_processing_interrupted()
                noise = torch.cat([comfy.sample.prepare_noise(base, s) for s in group])
                latent = base.repeat(len(group), 1, 1, 1)
                if fragment_state is not None:  # each sub-batch is its own run: never replay another run's features
                    fragment_state.reset()
                samples = comfy.sample.sample(patcher, noise, steps, cfg, sampler_name, scheduler, positive, negative,
                                              latent, denoise=denoise, disable_pbar=True, seed=group[0],
                                              callback=progress.callback(len(group)))
                if fragment_state is not None:  # and the cached deep features are freed once the run is done
                    fragment_state.reset()
                outputs.append(samples.cpu())
                progress.finished(len(group))
            if audited:
                # The other model may be loaded with its object patches on the shared modules: put them back.
                unload_clones(model)
            tally = spent["full" if patcher is full else "fragment"]
            tally[0] += time.perf_counter() - began
            tally[1] += len(group_seeds)
            return torch.cat(outputs)

        limit = judge_limits(vae=False, lpips=False)["latent_rel_error_max"] if audited else 0.0

        def compare(reference: torch.Tensor, sample: torch.Tensor) -> tuple[bool, dict[str, Any]]:
            error = latent_rel_error(reference[None], sample[None])
            return error <= limit, {"latent_rel_error": error, "limit": limit}

        started = time.perf_counter()
        batch = run_audited(seeds, lambda _setting, group: render(model, group, state),
                            lambda group: render(full, group, None), compare, AuditRule(), [], setting="fragment",
                            every=audited, given=given, block=max(batch_size, 1), lead=lead)  # stretches fill a sub-batch
        elapsed = time.perf_counter() - started
        report = (f"{len(seeds)} images in {elapsed:.1f} s ({len(seeds) / elapsed if elapsed > 0 else float('inf'):.2f} "
                  f"images/s), sub-batches {sizes}")
        report += audit_clause(batch, audit_every, bool(marker.get("levers", bool(marker))))
        unjudged = sampler_mismatch(marker.get("judged_sampler"),
                                    {"sampler_name": sampler_name, "scheduler": scheduler, "steps": steps, "cfg": cfg,
                                     "denoise": denoise})
        measured = None
        if marker.get("levers"):
            try:  # the images stand whatever a stored ledger claims: a cost that cannot be computed is said, not raised
                line, costs = batch_costs(
                    BatchTimes(images=len(seeds), wall_s=elapsed, fragment_s=spent["fragment"][0],
                               fragment_images=spent["fragment"][1], kept=sum(1 for s in batch.setting if s != FULL),
                               full_s=spent["full"][0], full_images=spent["full"][1], given=batch.given),
                    marker.get("extraction"), extraction_unit=not unjudged)
            except (FragmentError, ArithmeticError, ValueError) as exc:
                line, costs = None, {"note": f"the cost could not be computed: {exc}"}
            report += f"; cost: {line}" if line else f"; cost in u not measured ({costs['note']})"
            if line:
                measured = {"raw_ratio": costs["raw_ratio"], "unit_s": costs["unit_s"]}
        if batch.records:
            place = run_prior(marker.get("base_sha256") or "", sampler_name, scheduler, steps, cfg, base, positive)
            notes = keep_audit_outcome(
                batch, judge=LATENT_JUDGE, chosen=marker.get("chosen"), manifest_path=marker.get("manifest"),
                manifest_id=marker.get("identity"), prior=place if not isinstance(place, str) and denoise >= 1.0 else None,
                measured=measured,
                settings={"sampler_name": sampler_name, "scheduler": scheduler, "steps": steps, "cfg": cfg,
                          "denoise": float(denoise), "images": len(seeds),
                          "schedule": "off (FragmentLoader)" if marker.get("schedule_off") else schedule})
            report += "".join(f"; {note}" for note in notes)
        elif untried and audit_every == 0 and todo:
            report += ("; the fragment was picked untried (extracted with confirm: in batch) and the "
                       "audit is off, so its quality on this batch was not measured: set audit_every to -1 (auto)")
        elif untried and audit_every < 0 and todo:
            report += (f"; the fragment was picked untried (extracted with confirm: in batch), and "
                       f"auditing its first {least} images would cost more than a batch of {todo} saves, "
                       f"so its quality on this batch was not measured: render {least_led_batch()} or more images, or "
                       "extract with confirm judge")
        if unjudged:
            check = ("the running audit checks it" if audited else
                     "set audit_every to check it in the batch")
            report += (f"; the fragment's quality was not measured on this sampler ({unjudged}): extract it again with "
                       f"these settings, or {check}")
        if batch.switches or unjudged or (untried and todo and not batch.records):
            # the user asked for the fragment and got the full model, or one whose quality here nothing measured
            report = WARNING + report
        log.info("BatchGenerator: %s", report)
        out = {k: v for k, v in latent_image.items() if k not in ("samples", "batch_index", "noise_mask")}
        out["samples"] = torch.stack([image.to(base.dtype) for image in batch.images])
        return (out,), report


def audit_interval_for(audit_every: int, marker: dict, images: int, lead: int) -> int:
    """The audit interval a batch of ``images`` fragment images runs: ``audit_every`` as given (0: off), or for -1
    (auto) the cost model's (``fragment.audit.planned_audit_every`` at the extractor's assumed raw speed-up, after a
    ``lead``); 0 for a MODEL that carries no fragment levers (``marker``: FragmentLoader's ``FRAGMENT_PATCHES``).

    >>> audit_interval_for(-1, {"levers": True}, 32, 0), audit_interval_for(-1, {"levers": True}, 32, 3)
    (15, 32)
    >>> audit_interval_for(-1, {"levers": True}, 5, 3), audit_interval_for(-1, {"levers": True}, 6, 3)
    (0, 6)
    >>> audit_interval_for(4, {"levers": True}, 32, 0), audit_interval_for(-1, {}, 32, 0), audit_interval_for(0, {"levers": True}, 32, 3)
    (4, 0, 0)
    """
    if audit_every < -1:
        raise FragmentError(f"BatchGenerator audit_every: expected -1 (auto), 0 (off) or an interval >= 1, found "
                            f"{audit_every}; set it to -1 for the cost model's interval")
    if not marker or not marker.get("levers", True) or audit_every == 0:
        return 0
    if audit_every > 0:
        return audit_every
    if lead and not lead_pays(ASSUMED_RAW_RATIO, images, lead):
        return 0  # the lead would cost more than the batch saves: the report warns instead
    return planned_audit_every(ASSUMED_RAW_RATIO, images, lead=lead)


def least_led_batch() -> int:
    """The fewest images to render whose saving pays for an untried pick's lead of audits (``lead_pays``)."""
    n = 1
    while not lead_pays(ASSUMED_RAW_RATIO, n, AuditRule().min_audits):
        n += 1
    return n


def audit_clause(batch: AuditedBatch, audit_every: int, has_fragment: bool) -> str:
    """What the report adds for the audit and the delivered rows; a switch makes the whole report a WARNING.

    >>> audit_clause(AuditedBatch([1, 2], [0, 0], [FULL, "fragment"], every=2), 2, True)
    '; full-model images delivered: 1; no audit of 2 images'
    """
    clause = ""
    if batch.given:
        clause += f"; {batch.given} rows from rendered (not rendered again)"
    if batch.delivered:
        clause += f"; full-model images delivered: {batch.delivered}"
    if audit_every > 0 and not has_fragment:
        return clause + "; audit off: the MODEL carries no fragment (it is the full model)"
    if audit_every > 0 or batch.records:
        clause += f"; {batch.summary()}"
    elif audit_every < 0 and has_fragment:
        clause += "; no audit (auto: too few images to audit)"
    return clause


def given_rows(rendered: dict | None, seeds: Sequence[int], shape: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """The rows of ``rendered`` (``{"samples", "fragment_seeds"}``) for seeds of this batch, keyed by seed.

    >>> rows = given_rows({"samples": torch.zeros(2, 4, 8, 8), "fragment_seeds": [7, 9]}, [5, 7], (4, 8, 8))
    >>> sorted(rows)
    [7]
    """
    if rendered is None:
        return {}
    samples, named = rendered.get("samples"), rendered.get("fragment_seeds")
    if not isinstance(samples, torch.Tensor) or not isinstance(named, (list, tuple)) or len(named) != samples.shape[0]:
        raise FragmentError(
            "BatchGenerator rendered: expected FragmentExtractor's full_model_latents (a LATENT with one "
            f"'fragment_seeds' entry per row), found {len(named) if isinstance(named, (list, tuple)) else 'no'} seeds for "
            f"{samples.shape[0] if isinstance(samples, torch.Tensor) else 'no'} rows; connect the extractor's "
            "full_model_latents output, or leave rendered unconnected")
    if tuple(samples.shape[1:]) != shape:
        raise FragmentError(f"BatchGenerator rendered: rows of shape {tuple(samples.shape[1:])} for a batch of latent "
                            f"shape {shape}; render the batch at the extractor's size, or leave rendered unconnected")
    wanted = set(seeds)
    return {int(s): samples[i].cpu() for i, s in enumerate(named) if int(s) in wanted}


def full_model_of(model: Any) -> Any | None:
    """A clone of a fragment MODEL with the fragment taken off (its object patches, schedule wrappers); None for a MODEL
    FragmentLoader did not patch.  The shared model and ``model`` are left as they are."""
    marker = model.model_options.get(FRAGMENT_PATCHES)
    if not marker:
        return None
    full = model.clone()
    for key in marker["keys"]:
        full.object_patches.pop(key, None)
    del full.model_options[FRAGMENT_PATCHES]
    remove_call_wrappers(full, SCHEDULE_KEY, SCHEDULE_MARK)
    if has_keyed_wrappers(full):
        from comfy.patcher_extension import WrappersMP

        full.remove_wrappers_with_key(WrappersMP.OUTER_SAMPLE, SCHEDULE_KEY)
    full.size = marker["size"]
    return full
