"""FragmentExtractor: turn a profile into a fragment file in the fragments folder."""
from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import FragmentError
from ..fragment.build import describe_base
from ..fragment.extract import extract_fragment
from ..fragment.library.fingerprint import pool_conditioning
from ..fragment.library.index import register
from ..fragment.patching import base_sha256
from ..fragment.settings import ExtractionSettings
from .folders import CATEGORY, FragmentHandle, ProfileHandle, fragments_dir, tip, unpatched_originals


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
            },
        }

    RETURN_TYPES = ("FRAGMENT",)
    RETURN_NAMES = ("fragment",)
    FUNCTION = "extract"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = "Scores the profiled heads, removes the least important, and writes manifest + safetensors to models/fragments."

    def extract(self, profile: ProfileHandle, trigger: Any, name: str, strategy: str, ratio: float, percentile: float,
                scope: str, min_keep: int, safety_margin_heads: int, keep_unstable_heads: bool, overwrite: bool,
                positive: Any = None, negative: Any = None, kv_fold: bool = False, kv_fold_keep_weights: bool = False,
                ff_ratio: float = 0.0, precision: str = "none", precision_ratio: float = 1.0, step_reuse: float = 0.0) -> tuple:
        settings = ExtractionSettings(
            strategy=strategy, amount=ratio if strategy == "ratio" else percentile, scope=scope, min_keep=min_keep,
            safety_margin_heads=safety_margin_heads, keep_unstable_heads=keep_unstable_heads, kv_fold=kv_fold,
            kv_fold_keep_weights=kv_fold_keep_weights, ff_ratio=ff_ratio,
            # The node's "none" is the settings' precision_ratio 0: one spelling of off in the core.
            precision="fp8" if precision == "none" else precision, precision_ratio=0.0 if precision == "none" else precision_ratio,
            step_reuse=step_reuse,
        )
        if kv_fold and (positive is None or negative is None):
            raise FragmentError("FragmentExtractor: kv_fold needs both the positive and negative CONDITIONING inputs connected")
        model = profile.diffusion_model
        digest = base_sha256(model, unpatched_originals(profile.patcher))
        base = describe_base(model, profile.checkpoint, sha256=digest, hash_kind="state_dict_fp16")
        fragment, path = extract_fragment(
            profile.session.result(), model, base=base, name=name, settings=settings, directory=fragments_dir(),
            overwrite=overwrite, kv_context=fold_context(positive, negative, context_dtype(profile.patcher)) if kv_fold else None,
            ff_scores=profile.session.ff_scores() if ff_ratio > 0 else None,
            step_changes=profile.session.step_changes() if step_reuse > 0 else None,
            step_timesteps=profile.session.step_timesteps() if step_reuse > 0 else None,
        )
        if positive is not None:  # indexed for FragmentLoader's (auto) mode
            register(fragments_dir(), path, embedding=pool_conditioning(positive), prompt=name,
                     params={"strategy": strategy, "ratio": settings.amount, "scope": scope})
        return (FragmentHandle(fragment=fragment, manifest_path=path),)


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
