"""FragmentExtractor: turn a profile into a fragment file in the fragments folder."""
from __future__ import annotations

from typing import Any

from ..fragment.extract import ExtractionSettings, extract_fragment
from ..fragment.patching import base_sha256
from ..fragment.store import describe_base
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
            }
        }

    RETURN_TYPES = ("FRAGMENT",)
    RETURN_NAMES = ("fragment",)
    FUNCTION = "extract"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = "Scores the profiled heads, removes the least important, and writes manifest + safetensors to models/fragments."

    def extract(self, profile: ProfileHandle, trigger: Any, name: str, strategy: str, ratio: float, percentile: float,
                scope: str, min_keep: int, safety_margin_heads: int, keep_unstable_heads: bool, overwrite: bool) -> tuple:
        settings = ExtractionSettings(
            strategy=strategy, amount=ratio if strategy == "ratio" else percentile, scope=scope, min_keep=min_keep,
            safety_margin_heads=safety_margin_heads, keep_unstable_heads=keep_unstable_heads,
        )
        model = profile.diffusion_model
        digest = base_sha256(model, unpatched_originals(profile.patcher))
        base = describe_base(model, profile.checkpoint, sha256=digest, hash_kind="state_dict_fp16")
        fragment, path = extract_fragment(profile.session.result(), model, base=base, name=name, settings=settings,
                                          directory=fragments_dir(), overwrite=overwrite)
        return (FragmentHandle(fragment=fragment, manifest_path=path),)
