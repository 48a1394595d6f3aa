"""UsageVisualizer: the head-importance heatmap as an IMAGE, for people who would rather look than read."""
from __future__ import annotations

from ..profiling.heatmap import labelled_heatmap
from ..profiling.scoring import score_heads
from .folders import CATEGORY, FragmentHandle, ProfileHandle, tip


class UsageVisualizer:
    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {"profile": ("FRAGMENT_PROFILE", tip("From ProfilerModelLoader, after a sampler ran."))},
            "optional": {
                "fragment": ("FRAGMENT", tip("Mark this fragment's pruned heads with a red cross.")),
                "trigger": ("LATENT", tip("Connect the profiled sampler's LATENT so the heatmap is drawn after sampling.")),
            },
        }

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "draw"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Rows are attention modules (named on the left), columns heads (numbered on top); "
                   "the legend maps colour to importance within the module; red cross = pruned.")

    def draw(self, profile: ProfileHandle, fragment: FragmentHandle | None = None, trigger: object = None) -> tuple:
        kept = fragment.fragment.kept if fragment is not None else None
        return (labelled_heatmap(score_heads(profile.session.result()), kept),)
