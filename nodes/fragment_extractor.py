"""FragmentExtractor: turn a profile into a fragment file in the fragments folder, judged where it runs.

Two modes (``calibrate``):

* calibration (``auto`` when the profiled prompts are connected, or ``on``):
  ``fragment.extract.calibrated_fragment`` picks the strongest lever combination
  for ``goal`` that passes the quality gate of thresholds.yaml, judged by
  ``judge.comfy.ComfyJudge`` on the profiled seed (its reference is the
  ``trigger`` LATENT) and confirmed on held-out seeds (``seed+1``...).  The
  sampler settings are the profiled run's, as ProfilerModelLoader recorded them
  (``ProfileHandle.runs``); seed, steps, cfg, sampler_name and scheduler inputs
  are optional overrides, refused when they disagree with the recorded run.
  The budget follows the batch the user plans (``batch_images``): the judged
  images that batch can repay at an assumed raw speed-up
  (:func:`judged_image_budget`); a batch too small to confirm anything is refused
  before anything renders.  Every full-model render (the profiled seed and the
  held-out seeds) comes out as ``full_model_latents``, one row per seed, for the
  batch to keep.  When nothing passes, the stored fragment is the full model (no
  levers) marked ``fallback_full_model``, and the status says why.  The search
  starts warm from the prior of the model configuration (base hash, sampler,
  scheduler, steps, size, cfg; ``models/fragments/.library/priors``) when earlier
  prompts left one, else cold, and records its tries into it; an unreadable prior
  is left in place and the run is cold, with a warning in the status.  The status
  says cold or warm and what the calibration spent in u (one stock image, timed
  by the reference check) and from which image the planned batch pays it back.
  With ``confirm`` "in batch" (the default) no candidate is rendered at all: the rung
  the profile predicts (warm: the prior's) is picked, the manifest says so
  (``quality.refinement.status`` "in_batch"), and BatchGenerator's running audit
  confirms it on the batch's first images; only the reference check renders, and
  its image of the profiled seed is delivered.  "judge" is the search above.
* fixed settings (``off``, or ``auto`` with the prompts missing): the amounts of
  the optional ``levers`` input (FragmentManualLevers; its defaults when not
  connected), unjudged.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import comfy.samplers
import torch

from ..defaults import optional_lpips
from ..errors import FragmentError
from ..fragment.audit import AuditRule, planned_audits
from ..fragment.build import describe_base
from ..fragment.calibration import GOALS, Budget
from ..fragment.compat import same_setting
from ..fragment.library.fingerprint import conditioning_identity, pool_conditioning
from ..fragment.library.prior import PriorKey, PriorPlace
from ..fragment.patching import base_sha256
from ..fragment.pipeline import Judging, make_fragment
from ..fragment.settings import ExtractionSettings
from ..judge.comfy import LATENT_JUDGE, ComfyJudge, SamplerSettings, check_steps
from ..metrics.costs import calibration_costs
from .comfy_versions import unload_clones
from .folders import CATEGORY, FragmentHandle, ProfileHandle, fragments_dir, tip, unpatched_originals
from .fragment_loader import JUDGE_MODELS
from .manual_levers import LEVERS_TYPE, manual_settings
from .node_text import with_text

log = logging.getLogger(__name__)
CALIBRATE = ["auto", "on", "off"]
#: Where a calibrated pick is confirmed: in the user's batch (BatchGenerator's running audit), or judged here first.
CONFIRM = ["in batch", "judge"]
SEED_SPACE = 2**64  # KSampler's seed range: held-out seeds wrap around it
#: The fragment's raw speed-up the budget assumes before anything is measured (about what the levers reach).
ASSUMED_RAW_RATIO = 2.0
SAMPLER_FIELDS = ("seed", "steps", "cfg", "sampler_name", "scheduler")


def least_judged_images(holdout: int, per_seed: int = 1) -> int:
    """The fewest images a calibration can confirm a choice with: one try on the profiled seed, the
    held-out references, and the same candidate on the held-out seeds.

    >>> least_judged_images(holdout=1)
    3
    """
    return (1 + 2 * holdout) * per_seed


def judged_image_budget(batch_images: int, holdout: int, per_seed: int = 1,
                        raw_ratio: float = ASSUMED_RAW_RATIO) -> int:
    """The images the calibration may render for a planned batch of ``batch_images``.

    It is the overhead the batch can repay at ``raw_ratio`` (a fragment image costs ``1 / raw_ratio`` of a
    full-model one): ``(n - delivered) * (1 - 1 / raw_ratio)`` full-model images, where the profiled and
    held-out seeds' full-model images are delivered to the batch, not overhead.  The reference check (one
    full-model render of the profiled seed) comes out of it; the held-out references are delivered, so they
    are added on top.

    >>> judged_image_budget(32, holdout=1)
    15
    >>> judged_image_budget(4, holdout=1)
    1
    """
    delivered = 1 + holdout
    repayable = max(0, batch_images - delivered) * max(0.0, 1.0 - 1.0 / raw_ratio) if raw_ratio > 1 else 0.0
    judged = max(0, math.floor(repayable + 1e-9) - per_seed)
    return judged + holdout * per_seed


def least_batch_images(holdout: int, per_seed: int = 1, raw_ratio: float = ASSUMED_RAW_RATIO) -> int:
    """The smallest planned batch whose budget can confirm a choice.

    >>> least_batch_images(holdout=1)
    8
    """
    n = 1
    while judged_image_budget(n, holdout, per_seed, raw_ratio) < least_judged_images(holdout, per_seed):
        n += 1
    return n


class FragmentExtractor:
    @classmethod
    def INPUT_TYPES(cls) -> dict:
        override = "Optional override (leave unconnected: the profiled run's recorded value is used); refused when it disagrees with the recorded run."
        return {
            "required": {
                "profile": ("FRAGMENT_PROFILE", tip("From ProfilerModelLoader, after a sampler ran its MODEL: it carries the run's recorded sampler settings.")),
                "trigger": ("LATENT", tip("Connect the profiled sampler's LATENT so extraction runs after sampling (it is the full model's image of the profiled seed).")),
                "name": ("STRING", tip("File name of the fragment (letters, digits, . _ -).", default="dog_on_jet_ski")),
                "calibrate": (CALIBRATE, tip("auto: judge candidates against the full model when the prompts are connected (the sampler settings come from the profile); on: require that; off: the levers input's fixed amounts, unjudged.")),
                "goal": (list(GOALS), tip("What calibration maximises: memory (resident bytes: heads, FF, low-bit, precision), speed (time: heads, FF, step reuse, CFG cut-off) or both.", default="both")),
                "batch_images": ("INT", tip("Images you plan to render with the fragment: the calibration spends only what that batch can repay (at an assumed 2x raw speed-up); too few to confirm anything is refused before rendering.", default=32, min=1, max=100000)),
                "overwrite": ("BOOLEAN", tip("Replace an existing fragment of the same name.", default=False)),
            },
            "optional": {
                "positive": ("CONDITIONING", tip("The profiled prompt: indexes the fragment for (auto) reuse, the judge renders with it, and K/V folding folds it.")),
                "negative": ("CONDITIONING", tip("The profiled negative prompt.")),
                "vae": ("VAE", tip("The checkpoint's VAE: the judge decodes and measures SSIM (+ LPIPS when its weights are installed). Without it the judge compares latents and says so.")),
                "levers": (LEVERS_TYPE, tip("FragmentManualLevers: the fixed lever amounts used when calibrate is off (ignored when calibrating; its defaults when not connected).")),
                "holdout_seeds": ("INT", tip("Held-out seeds (seed+1, seed+2, ...) a choice must also pass when confirm is judge; rendered with the full model, delivered as full_model_latents.", default=1, min=1, max=16)),
                "confirm": (CONFIRM, tip("in batch: no candidate is rendered here; the rung the profile (and the prior of earlier prompts) predicts is picked, and BatchGenerator's running audit confirms it on the batch's first images, switching to the full model if it fails. judge: candidates are judged against the full model here, on the profiled and held-out seeds, before the batch (costs judged renders the batch must repay).")),
                "seed": ("INT", tip(override, default=0, min=0, max=0xFFFFFFFFFFFFFFFF, forceInput=True)),
                "steps": ("INT", tip(override, default=20, min=1, max=10000, forceInput=True)),
                "cfg": ("FLOAT", tip(override, default=8.0, min=0.0, max=100.0, step=0.1, round=0.01, forceInput=True)),
                "sampler_name": (comfy.samplers.KSampler.SAMPLERS, tip(override, forceInput=True)),
                "scheduler": (comfy.samplers.KSampler.SCHEDULERS, tip(override, forceInput=True)),
            },
        }

    RETURN_TYPES = ("FRAGMENT", "STRING", "LATENT")
    RETURN_NAMES = ("fragment", "status", "full_model_latents")
    FUNCTION = "extract"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = ("Scores the profiled heads and channels, picks the levers the profile predicts (confirm in batch: "
                   "BatchGenerator's running audit confirms them) or the strongest that pass the quality gate against the "
                   "full model on the profiled and held-out seeds (confirm judge), and writes manifest + safetensors to "
                   "models/fragments.")

    def extract(self, profile: ProfileHandle, trigger: Any, name: str, calibrate: str = "auto", goal: str = "both",
                batch_images: int = 32, overwrite: bool = False, positive: Any = None, negative: Any = None,
                vae: Any = None, levers: ExtractionSettings | None = None, holdout_seeds: int = 1,
                seed: int | None = None, steps: int | None = None, cfg: float | None = None,
                sampler_name: str | None = None, scheduler: str | None = None, confirm: str = CONFIRM[0],
                budget_images: int | None = None) -> dict[str, Any]:
        """``budget_images`` (Python callers and benches only, no widget) replaces the budget ``batch_images`` implies."""
        calibrating = wants_calibration(calibrate, positive, negative)
        if confirm not in CONFIRM:
            raise FragmentError(f"FragmentExtractor: confirm: expected one of {', '.join(CONFIRM)}, found {confirm!r}; "
                                "choose one of them")
        in_batch = calibrating and confirm == "in batch"
        settings = ExtractionSettings() if calibrating else (levers if levers is not None else manual_settings())
        kv_fold = bool(settings.amount("kv_fold")) if not calibrating else False
        if kv_fold and (positive is None or negative is None):
            raise FragmentError("FragmentExtractor: kv_fold (FragmentManualLevers) needs both the positive and negative "
                                "CONDITIONING inputs connected; connect the profiled KSampler's positive and negative, "
                                "or turn kv_fold off")
        sampler = None
        if calibrating:
            sampler = profiled_settings(profile.runs[-1] if profile.runs else None,
                                        dict(seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler))
            budget = budget_images if budget_images is not None else judged_image_budget(batch_images, holdout_seeds,
                                                                                        batch_of(trigger))
            if not in_batch:  # an in-batch pick renders no candidate: there is nothing to budget
                check_budget(budget, batch_images, holdout_seeds, batch_of(trigger), explicit=budget_images is not None)
            check_steps(sampler, len(profile.session.step_timesteps() or []))
        model = profile.diffusion_model
        # A clone kept loaded after an earlier queue (a fragment's MODEL) has its object patches on the shared modules:
        # put them back before reading the base, calibrating or not (else a pruned module is read as the base).
        unload_clones(profile.patcher)
        originals = unpatched_originals(profile.patcher)
        digest = base_sha256(model, originals)
        base = describe_base(model, profile.checkpoint, sha256=digest, hash_kind="state_dict_fp16")
        kv_context = fold_context(positive, negative, context_dtype(profile.patcher)) if kv_fold else None
        judging = None
        if sampler is not None:
            judging = comfy_judging(profile, sampler, positive, negative, trigger, vae, digest, originals,
                                    goal=goal, holdout=holdout_seeds, budget_images=budget, batch_images=batch_images,
                                    prior=prior_place(digest, sampler, trigger, positive), in_batch=in_batch)
        why = "calibrate off" if calibrate == "off" else "calibrate auto: the positive and negative prompts are not connected"
        made = make_fragment(profile.session.evidence(kv_context), model, base=base, name=name, directory=fragments_dir(),
                             settings=settings, judging=judging, overwrite=overwrite, unjudged_reason=why,
                             embedding=pool_conditioning(positive) if positive is not None else None)
        latents = full_model_latents(judging.judge if judging is not None else None, trigger)
        log.info("FragmentExtractor: %s", made.status)
        return with_text((FragmentHandle(fragment=made.fragment, manifest_path=made.path), made.status, latents), made.status)


def wants_calibration(calibrate: str, positive: Any, negative: Any) -> bool:
    """Whether the extractor judges: ``on`` always (naming what is missing), ``auto`` when the prompts are connected.

    >>> wants_calibration("auto", None, None), wants_calibration("auto", [], []), wants_calibration("off", [], [])
    (False, True, False)
    """
    if calibrate not in CALIBRATE:
        raise FragmentError(f"FragmentExtractor: calibrate: expected one of {', '.join(CALIBRATE)}, found {calibrate!r}; "
                            "choose one of them")
    missing = [k for k, v in (("positive", positive), ("negative", negative)) if v is None]
    if calibrate == "on" and missing:
        raise FragmentError(f"FragmentExtractor: calibrate is on, but {' and '.join(missing)} "
                            f"{'is' if len(missing) == 1 else 'are'} not connected; connect the profiled KSampler's "
                            "prompts, or set calibrate to off")
    return calibrate == "on" or (calibrate == "auto" and not missing)


def batch_of(trigger: Any) -> int:
    """Images one seed renders: the profiled sampler's latent batch."""
    try:
        return int(trigger["samples"].shape[0])
    except (TypeError, KeyError, AttributeError, IndexError):
        return 1


def check_budget(budget: int, batch_images: int, holdout: int, per_seed: int, *, explicit: bool = False) -> None:
    """Refuse, before anything renders, a budget too small to confirm any choice, with the least that could.

    >>> check_budget(15, 32, holdout=1, per_seed=1)
    >>> try:
    ...     check_budget(1, 4, holdout=1, per_seed=1)
    ... except FragmentError as exc:
    ...     print(exc)
    FragmentExtractor: batch_images 4 lets the calibration render 1 image, but confirming any choice takes 3 (one try on the profiled seed, 1 held-out reference and the same try on it); set batch_images to 8 or more, or set calibrate to off
    """
    need = least_judged_images(holdout, per_seed)
    if budget >= need:
        return
    plural = "s" if holdout != 1 else ""
    what = (f"one try on the profiled seed, {holdout} held-out reference{plural} and the same try on "
            f"{'it' if holdout == 1 else 'them'}")
    if explicit:
        raise FragmentError(f"FragmentExtractor: budget_images {budget} is too small to confirm any choice: it takes "
                            f"{need} ({what}); give budget_images {need} or more, or set calibrate to off")
    raise FragmentError(f"FragmentExtractor: batch_images {batch_images} lets the calibration render {budget} "
                        f"image{'s' if budget != 1 else ''}, but confirming any choice takes {need} ({what}); set "
                        f"batch_images to {least_batch_images(holdout, per_seed)} or more, or set calibrate to off")


def profiled_settings(run: Any, overrides: dict[str, Any]) -> SamplerSettings:
    """The sampler settings to judge with: the recorded run's, each override checked against it.

    ``run`` is the profiled run ProfilerModelLoader recorded (``RecordedRun``; ``None`` when no run was
    recorded); an override fills what the run could not show and must otherwise agree with it.

    >>> from types import SimpleNamespace as run
    >>> rec = run(seed=3, steps=4, cfg=7.0, sampler_name="euler", scheduler="normal", noise_from_seed=True,
    ...           empty_latent=True, denoise=1.0, describe=lambda: "seed 3, 4 steps, cfg 7, euler/normal")
    >>> profiled_settings(rec, {"seed": None, "steps": 4}).seed
    3
    >>> try:
    ...     profiled_settings(rec, {"seed": 5})
    ... except FragmentError as exc:
    ...     print(exc)
    FragmentExtractor: the seed input is 5, but the profiled run was recorded with seed 3 (seed 3, 4 steps, cfg 7, euler/normal); use the recorded run (disconnect the seed input), or run the profiling sampler again with seed 5
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    if run is None:
        missing = [k for k in SAMPLER_FIELDS if k not in given]
        if missing:
            raise FragmentError("FragmentExtractor: the profile has no recorded sampler run (its MODEL has not been "
                                "sampled since it loaded); connect the profiled sampler's LATENT to trigger so it runs "
                                f"first, or connect {', '.join(missing)}, or set calibrate to off")
        return SamplerSettings(**{k: kind(given[k]) for k, kind in zip(SAMPLER_FIELDS, (int, int, float, str, str))})
    values: dict[str, Any] = {}
    for key, kind in zip(SAMPLER_FIELDS, (int, int, float, str, str)):
        recorded = getattr(run, key)
        if key in given and recorded is not None and not agrees(recorded, given[key]):
            raise FragmentError(
                f"FragmentExtractor: the {key} input is {given[key]!r}, but the profiled run was recorded with {key} "
                f"{recorded!r} ({run.describe()}); use the recorded run (disconnect the {key} input), or run the "
                f"profiling sampler again with {key} {given[key]!r}")
        value = recorded if recorded is not None else given.get(key)
        if value is None:
            raise FragmentError(f"FragmentExtractor: the profiled run did not show its {key} (a custom sampler node); "
                                f"connect the {key} it used to the extractor's {key} input, or set calibrate to off")
        values[key] = kind(value)
    if not run.noise_from_seed:
        raise FragmentError(f"FragmentExtractor: the profiled run ({run.describe()}) did not start from KSampler's noise "
                            "for its seed (add_noise off, another noise node, or another sampler node), so no seed "
                            "reproduces it; profile with a KSampler (add noise on), or set calibrate to off")
    if not run.empty_latent or (run.denoise is not None and run.denoise < 1.0):
        raise FragmentError(f"FragmentExtractor: the profiled run ({run.describe()}) started from a non-empty latent or "
                            f"denoise {run.denoise if run.denoise is not None else 1:g}; profile with an Empty Latent Image "
                            "and denoise 1 (calibration re-renders text-to-image runs only), or set calibrate to off")
    return SamplerSettings(**values)


def agrees(recorded: Any, given: Any) -> bool:
    """Whether an override says the same as the recorded value (cfg to a float's rounding)."""
    return same_setting(recorded, given, numeric=isinstance(recorded, float) or isinstance(given, float))


def full_model_latents(judge: ComfyJudge | None, trigger: Any) -> dict[str, Any]:
    """Every full-model latent the calibration has, one row per seed (the profiled seed first), as
    BatchGenerator renders that seed: row 0 of each seed's render (its noise is ``prepare_noise(base[:1], seed)``'s).

    Without a judge (fixed settings) nothing was rendered: zero rows.
    """
    if judge is None:
        samples = trigger["samples"] if isinstance(trigger, dict) and "samples" in trigger else torch.zeros(1, 4, 8, 8)
        return {"samples": torch.zeros((0, *samples.shape[1:]), dtype=torch.float32), "fragment_seeds": []}
    seeds = list(judge.references)  # insertion order: the profiled seed, then each held-out seed as rendered
    rows = [judge.references[s][:1] for s in seeds]
    return {"samples": torch.cat(rows), "fragment_seeds": seeds}


def prior_place(digest: str, sampler: SamplerSettings, trigger: Any, positive: Any) -> PriorPlace | None:
    """Where this run's model configuration keeps its prior: ``<fragments folder>/.library/priors``, keyed by the
    base's sha256, the recorded sampler, scheduler, steps and cfg, and the latent's size in pixels (x 8).

    ComfyUI gives the extractor the prompt only as CONDITIONING, so the prompt's identity in the prior is a digest
    of the positive conditioning's bytes (``conditioning_identity``).  A run the key cannot describe (more steps
    than a prior keeps, say) calibrates without a prior, and the log says so.
    """
    place = run_prior(digest, sampler.sampler_name, sampler.scheduler, sampler.steps, sampler.cfg, trigger["samples"],
                      positive)
    if isinstance(place, str):
        log.warning("FragmentExtractor: no prior for this run (%s); the calibration starts cold", place)
        return None
    return place


def run_prior(digest: str, sampler_name: str, scheduler: str, steps: int, cfg: float, samples: torch.Tensor,
              positive: Any) -> PriorPlace | str:
    """The prior of a sampler run's model configuration (the extractor's profiled run, a BatchGenerator batch): the
    base's sha256, sampler, scheduler, steps, cfg and the latent's size in pixels (x 8), in the fragments folder;
    or why the key cannot describe the run (a string)."""
    try:
        key = PriorKey(digest, sampler_name, scheduler, steps, (int(samples.shape[-1]) * 8, int(samples.shape[-2]) * 8),
                       cfg)
    except FragmentError as exc:
        return str(exc)
    return PriorPlace(fragments_dir(), key, conditioning_identity(positive))


def comfy_judging(profile: ProfileHandle, sampler: SamplerSettings, positive: Any, negative: Any, trigger: Any,
                  vae: Any, digest: str, originals: Any, *, goal: str, holdout: int, budget_images: int,
                  batch_images: int = 32, prior: PriorPlace | None = None, in_batch: bool = False) -> Judging:
    """The calibration's judging in ComfyUI: the profiled seed, then ``holdout`` seeds after it, rendered on clones
    of the profiled model and compared with its output (the ``trigger`` LATENT).

    The reference check's full-model render times one stock image (``u``); the status's cost line counts the
    calibration in it against the planned batch of ``batch_images`` at the assumed raw speed-up (the full model
    kept: 1x, never pays back).  ``prior`` (``prior_place``) starts the search warm and records its tries.
    ``in_batch``: no candidate is judged (``Judging.confirm_in_batch``); only the reference check renders, and its
    image of the profiled seed is delivered.

    >>> judging = comfy_judging(profile, sampler, pos, neg, latent, None, digest, originals,  # doctest: +SKIP
    ...                         goal="both", holdout=1, budget_images=16)
    """
    lpips, lpips_note = optional_lpips() if vae is not None else (None, "")
    judge = ComfyJudge(profile.patcher, sampler, positive, negative, trigger, models=JUDGE_MODELS, vae=vae,
                       digest=digest, originals=originals, lpips=lpips)
    space = "judged in latent space (no VAE connected)" if vae is None else "judged on decoded images"
    if vae is not None and "not measured" in lpips_note:
        space += "; LPIPS not measured (no weights installed), its limit dropped"
    seed = sampler.seed

    def costs(cal: Any) -> tuple[str | None, dict[str, Any]]:
        checked = judge.reference_seconds is not None
        # the batch's running audit (BatchGenerator, audit_every auto) is part of what the pick costs the user
        rest = max(batch_images - len(judge.references), 0)
        audits = planned_audits(ASSUMED_RAW_RATIO, rest, lead=AuditRule().min_audits if cal.untried else 0)
        return calibration_costs(cal, unit_s=judge.unit_s, n=batch_images, raw_ratio=ASSUMED_RAW_RATIO,
                                 reference_s=judge.reference_seconds or 0.0, reference_images=judge.batch if checked else 0,
                                 profiled_images=judge.batch, planned_audits=audits,
                                 ratio_note="assumed (the extractor's budget assumption)")

    # an untried pick's only judge is the batch's running audit, a latent one: its prior is read under that name
    return Judging(judge, LATENT_JUDGE if in_batch else judge.name, [seed],
                   [(seed + i) % SEED_SPACE for i in range(1, holdout + 1)], goal=goal,
                   budget=Budget(images=budget_images), images_per_seed=judge.batch, space=space,
                   reference_images=judge.batch, prepare=judge.check_reference, prior=prior,
                   unit_s=lambda: judge.unit_s, costs=costs, confirm_in_batch=in_batch,
                   # the judge renders at full denoise from the profiled run's empty latent
                   sampler={"sampler_name": sampler.sampler_name, "scheduler": sampler.scheduler,
                            "steps": sampler.steps, "cfg": sampler.cfg, "denoise": 1.0})


def context_dtype(patcher: Any) -> torch.dtype:
    """The dtype ComfyUI casts the text context to before the UNet (``BaseModel.apply_model``)."""
    model = patcher.model
    return getattr(model, "manual_cast_dtype", None) or model.get_dtype()


def fold_context(positive: Any, negative: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The cond and uncond rows a sampler passes to the UNet, as ComfyUI batches them.

    Different token counts (long prompts) are repeated up to their least common
    multiple, which is what ComfyUI does before it concatenates conds.  The rows
    are cast to the UNet's context dtype, because folded K/V are matched by
    value against what ``to_k`` really receives (fp16 on most GPUs).
    """
    cond, uncond = positive[0][0], negative[0][0]
    if cond.shape[1] != uncond.shape[1]:
        tokens = math.lcm(cond.shape[1], uncond.shape[1])
        cond = cond.repeat(1, tokens // cond.shape[1], 1)
        uncond = uncond.repeat(1, tokens // uncond.shape[1], 1)
    rows = torch.cat([cond, uncond])
    return rows if dtype is None else rows.to(dtype)
