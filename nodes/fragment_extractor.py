"""FragmentExtractor: turn a profile into a fragment file in the fragments folder, judged where it runs.

Two modes (``calibrate``):

* calibration (``auto`` when the profiled KSampler's settings and prompts are
  connected, or ``on``): ``fragment.extract.calibrated_fragment`` picks the
  strongest lever combination for ``goal`` that passes the quality gate of
  thresholds.yaml, judged by ``judge.comfy.ComfyJudge`` on the profiled seed
  (its reference is the ``trigger`` LATENT) and confirmed on held-out seeds
  (``seed+1``...), within ``budget_images`` rendered images.  The user's lever
  amounts (ratio, ff_ratio, precision_ratio, low_bit_ratio, step_reuse) are then not used:
  the judge chooses them.  When nothing passes, the stored fragment is the full
  model (no levers) marked ``fallback_full_model``, and the status says why.
* fixed settings (``off``, or ``auto`` with the sampler settings missing): the
  user's amounts, unjudged, as before calibration existed.
"""
from __future__ import annotations

import logging
import math
from types import SimpleNamespace  # noqa: F401 - the docstring examples build judges from it
from typing import Any

import comfy.samplers
import torch

from ..defaults import optional_lpips
from ..errors import FragmentError
from ..fragment.build import describe_base
from ..fragment.calibration import GOALS, Budget, Calibration, Candidate
from ..fragment.extract import calibrated_fragment, candidate_fragment, extract_fragment, record_calibration
from ..fragment.format.manifest import Fragment
from ..fragment.format.measurements import record_measurements
from ..fragment.format.store import save_fragment
from ..fragment.library.fingerprint import pool_conditioning
from ..fragment.library.index import register
from ..fragment.patching import base_sha256
from ..fragment.settings import ExtractionSettings
from ..judge.comfy import ComfyJudge, SamplerSettings, check_steps
from ..profiling.evidence import ProfileEvidence
from .comfy_versions import unload_clones
from .folders import CATEGORY, FragmentHandle, ProfileHandle, fragments_dir, tip, unpatched_originals
from .fragment_loader import JUDGE_MODELS

log = logging.getLogger(__name__)
CALIBRATE = ["auto", "on", "off"]
SEED_SPACE = 2**64  # KSampler's seed range: held-out seeds wrap around it


class FragmentExtractor:
    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "profile": ("FRAGMENT_PROFILE", tip("From ProfilerModelLoader, after a sampler ran its MODEL.")),
                "trigger": ("LATENT", tip("Connect the profiled sampler's LATENT so extraction runs after sampling.")),
                "name": ("STRING", tip("File name of the fragment (letters, digits, . _ -).", default="dog_on_jet_ski")),
                "strategy": (["ratio", "percentile"], tip("ratio: remove that fraction of heads; percentile: remove heads scoring below that percentile.")),
                "ratio": ("FLOAT", tip("Fraction of heads to remove (strategy=ratio).", default=0.3, min=0.0, max=0.95, step=0.05)),
                "percentile": ("FLOAT", tip("Score percentile below which heads go (strategy=percentile).", default=30.0, min=0.0, max=95.0, step=1.0)),
                "scope": (["global", "per_layer"], tip("global: one ranking across all modules; per_layer: the same share from each module.")),
                "min_keep": ("INT", tip("Heads every attention module keeps at least.", default=1, min=1, max=64)),
                "safety_margin_heads": ("INT", tip("Give back this many of the best-scored heads chosen for removal.", default=0, min=0, max=4096)),
                "keep_unstable_heads": ("BOOLEAN", tip("Never remove heads whose rank changes a lot between sampler runs.", default=True)),
                "overwrite": ("BOOLEAN", tip("Replace an existing fragment of the same name.", default=False)),
            },
            "optional": {
                "positive": ("CONDITIONING", tip("The profiled prompt: indexes the fragment for (auto) reuse, and is what K/V folding folds.")),
                "negative": ("CONDITIONING", tip("The profiled negative prompt (needed for K/V folding).")),
                "kv_fold": ("BOOLEAN", tip("Compute cross-attention keys/values once for this prompt and drop to_k/to_v.", default=False)),
                "kv_fold_keep_weights": ("BOOLEAN", tip("Keep to_k/to_v so other prompts still work (saves no bytes).", default=False)),
                "ff_ratio": ("FLOAT", tip("Share of feed-forward hidden channels to remove, ranked by profiled activations.", default=0.0, min=0.0, max=0.9, step=0.05)),
                "precision": (["none", "fp8", "int8"], tip("Store the least important retained Linear weights in this precision.")),
                "precision_ratio": ("FLOAT", tip("Share of retained Linear parameters stored in that precision.", default=1.0, min=0.0, max=1.0, step=0.05)),
                "step_reuse": ("FLOAT", tip("Share of sampler steps on which the deep UNet blocks reuse their last output (0: off); the steps where the profile saw the deep features change least.", default=0.0, min=0.0, max=0.8, step=0.05)),
                "calibrate": (CALIBRATE, tip("auto: judge candidates against the full model when seed, steps, cfg, sampler_name, scheduler and the prompts are connected (the lever amounts above are then chosen by the judge, not used); on: require them; off: the fixed settings above, unjudged.")),
                "vae": ("VAE", tip("The checkpoint's VAE: the judge decodes and measures SSIM (+ LPIPS when its weights are installed). Without it the judge compares latents and says so.")),
                "seed": ("INT", tip("The profiled KSampler's seed (set the same value, or convert both widgets to inputs and share one primitive): the trigger LATENT is the full model's output for it; checked before calibrating.", default=0, min=0, max=0xFFFFFFFFFFFFFFFF)),
                "steps": ("INT", tip("The profiled KSampler's steps (must match the profiled run; checked).", default=20, min=1, max=10000)),
                "cfg": ("FLOAT", tip("The profiled KSampler's cfg.", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01)),
                "sampler_name": (comfy.samplers.KSampler.SAMPLERS, tip("The profiled KSampler's sampler.")),
                "scheduler": (comfy.samplers.KSampler.SCHEDULERS, tip("The profiled KSampler's scheduler.")),
                "goal": (list(GOALS), tip("What calibration maximises: memory (resident bytes: heads, FF, low-bit, precision), speed (time: heads, FF, step reuse, CFG cut-off) or both.", default="both")),
                "budget_images": ("INT", tip("Most images the calibration renders: every try's seeds times the latent batch, plus the held-out references.", default=16, min=2, max=1024)),
                "holdout_seeds": ("INT", tip("Held-out seeds (seed+1, seed+2, ...) a choice must also pass; rendered with the full model for reference.", default=1, min=1, max=16)),
                "low_bit_ratio": ("FLOAT", tip("Share of Linear and Conv2d parameters stored as group-wise low-bit codes (4.5 bits per weight at int4), scaled per input channel from the profiled activations; the least sensitive layers first (0: off).", default=0.0, min=0.0, max=1.0, step=0.05)),
                "low_bit_bits": (["int4", "int3"], tip("The low-bit format: int4 or int3, asymmetric, 64 input channels per fp16 scale and zero.")),
            },
        }

    RETURN_TYPES = ("FRAGMENT", "STRING")
    RETURN_NAMES = ("fragment", "status")
    FUNCTION = "extract"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = ("Scores the profiled heads and channels, chooses the strongest levers that pass the quality gate against the "
                   "full model on the profiled and held-out seeds, and writes manifest + safetensors to models/fragments.")

    def extract(self, profile: ProfileHandle, trigger: Any, name: str, strategy: str, ratio: float, percentile: float,
                scope: str, min_keep: int, safety_margin_heads: int, keep_unstable_heads: bool, overwrite: bool,
                positive: Any = None, negative: Any = None, kv_fold: bool = False, kv_fold_keep_weights: bool = False,
                ff_ratio: float = 0.0, precision: str = "none", precision_ratio: float = 1.0, step_reuse: float = 0.0,
                calibrate: str = "auto", vae: Any = None, seed: int | None = None, steps: int | None = None,
                cfg: float | None = None, sampler_name: str | None = None, scheduler: str | None = None,
                goal: str = "both", budget_images: int = 16, holdout_seeds: int = 1, low_bit_ratio: float = 0.0,
                low_bit_bits: str = "int4") -> dict[str, Any]:
        amounts = {"heads": ratio if strategy == "ratio" else percentile, "kv_fold": kv_fold, "ff": ff_ratio,
                   # The node's "none" is the precision lever off: one spelling of off in the core.
                   "precision": 0.0 if precision == "none" else precision_ratio, "step_reuse": step_reuse,
                   "low_bit": low_bit_ratio}
        settings = ExtractionSettings(
            levers=amounts, strategy=strategy, scope=scope, min_keep=min_keep, safety_margin_heads=safety_margin_heads,
            keep_unstable_heads=keep_unstable_heads, kv_fold_keep_weights=kv_fold_keep_weights,
            precision_format="fp8" if precision == "none" else precision, low_bit_bits=3 if low_bit_bits == "int3" else 4,
        )
        if kv_fold and (positive is None or negative is None):
            raise FragmentError("FragmentExtractor: kv_fold needs both the positive and negative CONDITIONING inputs "
                                "connected; connect the profiled KSampler's positive and negative, or turn kv_fold off")
        sampler = sampler_settings(calibrate, seed, steps, cfg, sampler_name, scheduler, positive, negative)
        model = profile.diffusion_model
        if sampler is not None:
            # A clone kept loaded after an earlier queue has its object patches on the shared modules: read the base as it is.
            unload_clones(profile.patcher)
        originals = unpatched_originals(profile.patcher)
        digest = base_sha256(model, originals)
        base = describe_base(model, profile.checkpoint, sha256=digest, hash_kind="state_dict_fp16")
        kv_context = fold_context(positive, negative, context_dtype(profile.patcher)) if kv_fold else None
        params = {"strategy": strategy, "ratio": settings.amount("heads"), "scope": scope}
        evidence = profile.session.evidence(kv_context)
        if sampler is None:
            fragment, path = extract_fragment(evidence, model, base=base, name=name, settings=settings,
                                              directory=fragments_dir(), overwrite=overwrite)
            why = "calibrate off" if calibrate == "off" else "calibrate auto: the sampler settings or prompts are not connected"
            status = f"fixed settings, not judged ({why}): {settings.label}"
        else:
            check_steps(sampler, len(profile.session.step_timesteps() or []))
            existing = fragments_dir() / f"{name}.json"
            if not overwrite and existing.exists():  # before minutes of judging, not after
                raise FragmentError(f"FragmentExtractor: {existing}: a fragment named {name!r} already exists; "
                                    "choose another name, or set overwrite to true")
            lpips, lpips_note = optional_lpips() if vae is not None else (None, "")
            judge = ComfyJudge(profile.patcher, sampler, positive, negative, trigger, models=JUDGE_MODELS, vae=vae,
                               digest=digest, originals=originals, lpips=lpips)
            judge.check_reference()
            fragment, cal = calibrated_judged_fragment(
                evidence, model, judge, base=base, name=name, settings=settings, goal=goal,
                holdout=holdout_seeds, budget_images=budget_images)
            path = save_fragment(fragment, fragments_dir(), overwrite=overwrite)
            status = calibration_status(cal, judge, lpips_note)
            params = {"strategy": "ratio", "ratio": cal.chosen.amount("heads") if cal.chosen else 0.0, "scope": scope,
                      "calibration": cal.status, "levers": cal.chosen.label if cal.chosen else "full model"}
        # Indexed for FragmentLoader's (auto) mode, unless it is the no-lever fallback: auto would pick the full model.
        if positive is not None and params.get("levers") != "full model":
            register(fragments_dir(), path, embedding=pool_conditioning(positive), prompt=name, params=params)
        log.info("FragmentExtractor: %s", status)
        return {"ui": {"text": [status]}, "result": (FragmentHandle(fragment=fragment, manifest_path=path), status)}


def sampler_settings(calibrate: str, seed: int | None, steps: int | None, cfg: float | None, sampler_name: str | None,
                     scheduler: str | None, positive: Any, negative: Any) -> SamplerSettings | None:
    """The profiled sampler's settings when calibration runs (``None``: the fixed-settings path).

    ``auto`` calibrates when everything the judge needs is connected; ``on`` names what is missing.

    >>> sampler_settings("auto", 1, 4, 7.0, "euler", "normal", None, None) is None
    True
    >>> sampler_settings("auto", 1, 4, 7.0, "euler", "normal", [], []).steps
    4
    """
    if calibrate not in CALIBRATE:
        raise FragmentError(f"FragmentExtractor: calibrate: expected one of {', '.join(CALIBRATE)}, found {calibrate!r}; "
                            "choose one of them")
    given = {"seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler_name, "scheduler": scheduler,
             "positive": positive, "negative": negative}
    missing = [k for k, v in given.items() if v is None]
    if calibrate == "off" or (calibrate == "auto" and missing):
        return None
    if missing:
        raise FragmentError(f"FragmentExtractor: calibrate is on, but {', '.join(missing)} "
                            f"{'is' if len(missing) == 1 else 'are'} not connected; connect the profiled KSampler's "
                            "settings and prompts, or set calibrate to off")
    return SamplerSettings(seed=int(seed), steps=int(steps), cfg=float(cfg), sampler_name=str(sampler_name),
                           scheduler=str(scheduler))


def calibrated_judged_fragment(evidence: ProfileEvidence, model: torch.nn.Module, judge: ComfyJudge, *,
                               base: dict[str, Any], name: str, settings: ExtractionSettings, goal: str, holdout: int,
                               budget_images: int) -> tuple[Fragment, Calibration]:
    """The calibrated fragment, or the full model (no levers) marked ``fallback_full_model``; its cost in ``performance``.

    >>> frag, cal = calibrated_judged_fragment(session.evidence(), unet, judge, base=base, name="dog",  # doctest: +SKIP
    ...                                        settings=ExtractionSettings(), goal="both", holdout=1, budget_images=16)
    """
    seed = judge.settings.seed
    data = dict(base=base, name=name, settings=settings)
    fragment, cal = calibrated_fragment(
        evidence, model, judge, calibration_seeds=[seed],
        holdout_seeds=[(seed + i) % SEED_SPACE for i in range(1, holdout + 1)], goal=goal,
        budget=Budget(images=budget_images), judge_name=judge.name, images_per_seed=judge.batch, **data)
    if fragment is None:
        # Nothing passed: the stored fragment is the full model, so it claims no quality it lacks.
        fragment = record_calibration(candidate_fragment(evidence, model, Candidate(), **data), cal)
    # The reference check (one full-model render of the profiled seed, before calibrating) is counted apart:
    # it is not a judged try, but it is what the user paid.
    cost = {"images": cal.images, "seconds": round(cal.seconds, 3), "tries": len(cal.tries), "budget_images": budget_images,
            "reference_check_images": judge.batch}
    return Fragment(manifest=record_measurements(fragment.manifest, performance={"calibration": cost}),
                    tensors=fragment.tensors), cal


def calibration_status(cal: Calibration, judge: Any, lpips_note: str = "") -> str:
    """The line the user reads: the chosen levers, the held-out figures, the cost and the judge (on a fallback: why).

    >>> cal = Calibration("both", None, "fallback_full_model", [1], [2], Budget(4), "toy", reason="nothing passed")
    >>> calibration_status(cal, SimpleNamespace(vae=None, name="toy"))  # doctest: +ELLIPSIS
    'FULL MODEL used: no lever combination passed the quality gate (nothing passed); ...; judged in latent space (no VAE connected); judge: toy'
    """
    cost = f"{len(cal.tries)} tries, {cal.images} images, {cal.seconds:.1f} s"
    space = "judged in latent space (no VAE connected)" if judge.vae is None else "judged on decoded images"
    if judge.vae is not None and "not measured" in lpips_note:
        space += "; LPIPS not measured (no weights installed), its limit dropped"
    if cal.chosen is None:
        last = next((t for t in reversed(cal.tries) if t["reasons"]), None)
        why = f"; last failures ({last['candidate']['label']}): {'; '.join(last['reasons'])}" if last else ""
        return (f"FULL MODEL used: no lever combination passed the quality gate ({cal.reason}){why}; the stored "
                f"fragment has no levers (quality_gate fallback_full_model); {cost}; {space}; judge: {judge.name}")
    metrics = (cal.confirmed or {}).get("metrics", {})
    figures = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("ssim_mean", "lpips_mean", "latent_rel_error")
                        if isinstance(metrics.get(k), (int, float)))
    return (f"calibrated ({cal.goal}): {cal.chosen.label}; held-out seeds {cal.holdout_seeds}: {figures}; {cost}; "
            f"{space}; judge: {judge.name}")


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
