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
from typing import Any

import comfy.samplers
import torch

from ..defaults import optional_lpips
from ..errors import FragmentError
from ..fragment.build import describe_base
from ..fragment.calibration import GOALS, Budget
from ..fragment.library.fingerprint import pool_conditioning
from ..fragment.patching import base_sha256
from ..fragment.pipeline import Judging, make_fragment
from ..fragment.settings import ExtractionSettings
from ..judge.comfy import ComfyJudge, SamplerSettings, check_steps
from .comfy_versions import unload_clones
from .folders import CATEGORY, FragmentHandle, ProfileHandle, fragments_dir, tip, unpatched_originals
from .fragment_loader import JUDGE_MODELS
from .node_text import with_text

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
        judging = None
        if sampler is not None:
            check_steps(sampler, len(profile.session.step_timesteps() or []))
            judging = comfy_judging(profile, sampler, positive, negative, trigger, vae, digest, originals,
                                    goal=goal, holdout=holdout_seeds, budget_images=budget_images)
        why = "calibrate off" if calibrate == "off" else "calibrate auto: the sampler settings or prompts are not connected"
        made = make_fragment(profile.session.evidence(kv_context), model, base=base, name=name, directory=fragments_dir(),
                             settings=settings, judging=judging, overwrite=overwrite, unjudged_reason=why,
                             embedding=pool_conditioning(positive) if positive is not None else None)
        log.info("FragmentExtractor: %s", made.status)
        return with_text((FragmentHandle(fragment=made.fragment, manifest_path=made.path), made.status), made.status)


def comfy_judging(profile: ProfileHandle, sampler: SamplerSettings, positive: Any, negative: Any, trigger: Any,
                  vae: Any, digest: str, originals: Any, *, goal: str, holdout: int, budget_images: int) -> Judging:
    """The calibration's judging in ComfyUI: the profiled seed, then ``holdout`` seeds after it, rendered on clones
    of the profiled model and compared with its output (the ``trigger`` LATENT).

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
    return Judging(judge, judge.name, [seed], [(seed + i) % SEED_SPACE for i in range(1, holdout + 1)], goal=goal,
                   budget=Budget(images=budget_images), images_per_seed=judge.batch, space=space,
                   reference_images=judge.batch, prepare=judge.check_reference)


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
