"""FragmentLoader: put a fragment onto a MODEL as object patches on a clone.

The shared model is never changed: the pruned modules are installed with
``clone().add_object_patch`` and ComfyUI puts the originals back when it
unpatches.  The clone's size is corrected to the bytes really resident, so
ComfyUI's memory planner sees the smaller model.

LoRA patches on weights the fragment prunes are refused with a clear error
(merge the LoRA into the checkpoint before profiling instead); attn2
replacement patches (IPAdapter, InstantID, PuLID) are refused when the
fragment prunes cross-attention.
"""
from __future__ import annotations

import logging
from typing import Any

from ..fragment.errors import BaseModelMismatchError, FragmentError
from ..fragment.patching import plan_patches
from ..fragment.store import load_fragment
from .profiler_loader import without_profiling
from .folders import CATEGORY, NONE, FragmentHandle, fragment_choices, fragment_path, tip, unpatched_originals

log = logging.getLogger(__name__)
PREFIX = "diffusion_model."


class FragmentLoader:
    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", tip("The base model the fragment was extracted from.")),
                "fragment_name": (fragment_choices(), tip("A fragment manifest from models/fragments, or (none) to use the fragment input.")),
                "on_mismatch": (["fallback", "raise"], tip("Wrong base model: fallback returns the full model with a warning; raise stops the queue.")),
            },
            "optional": {
                "fragment": ("FRAGMENT", tip("A fragment straight from FragmentExtractor (takes precedence over fragment_name).")),
            },
        }

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("MODEL", "status")
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = "Applies a fragment to a model: pruned attention heads, verified against the base model."

    def apply(self, model: Any, fragment_name: str, on_mismatch: str, fragment: FragmentHandle | None = None) -> tuple:
        if fragment is not None:
            frag = fragment.fragment
        elif fragment_name and fragment_name != NONE:
            frag = load_fragment(fragment_path(fragment_name))
        else:
            raise FragmentError("FragmentLoader: expected a fragment_name or a connected fragment input, found neither")
        try:
            plan = plan_patches(
                model.model.diffusion_model,
                frag,
                originals=unpatched_originals(model),
                weight_patch_keys=model.patches.keys(),
                transformer_options=model.model_options.get("transformer_options", {}),
                key_prefix=PREFIX,
            )
        except BaseModelMismatchError as exc:
            if on_mismatch == "raise":
                raise
            status = f"FALLBACK to the full model: {exc}"
            log.warning("FragmentLoader: %s", status)
            return (without_profiling(model.clone()), status)
        # A fragment model is never profiled: statistics must describe the full model only.
        patched = without_profiling(model.clone())
        for path, module in plan.replacements.items():
            patched.add_object_patch(PREFIX + path, module)
        patched.size = max(1, model.model_size() - plan.bytes_saved)
        status = (f"applied fragment {frag.name!r}: {len(plan.replacements)} modules replaced, "
                  f"{plan.bytes_saved / 2**20:.1f} MiB fewer weights")
        log.info("FragmentLoader: %s", status)
        return (patched, status)
