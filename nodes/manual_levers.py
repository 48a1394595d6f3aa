"""FragmentManualLevers: fixed lever amounts for FragmentExtractor when it does not calibrate.

With ``calibrate`` on (or auto with the prompts connected) the judge chooses the
amounts, so the extractor shows none of them; this node holds them for
``calibrate = off`` and outputs one ``FRAGMENT_LEVERS`` settings object
(``fragment.settings.ExtractionSettings``).  Its defaults are the extractor's old
widget defaults, so an extractor with nothing connected here builds what it built before.
"""
from __future__ import annotations

from typing import Any

from ..fragment.settings import ExtractionSettings
from .folders import CATEGORY, tip

LEVERS_TYPE = "FRAGMENT_LEVERS"


def manual_settings(strategy: str = "ratio", ratio: float = 0.3, percentile: float = 30.0, scope: str = "global",
                    min_keep: int = 1, safety_margin_heads: int = 0, keep_unstable_heads: bool = True,
                    ff_ratio: float = 0.0, precision: str = "none", precision_ratio: float = 1.0,
                    step_reuse: float = 0.0, low_bit_ratio: float = 0.0, low_bit_bits: str = "int4",
                    kv_fold: bool = False, kv_fold_keep_weights: bool = False) -> ExtractionSettings:
    """The extraction settings these amounts ask for (the node's "none" precision is the lever off).

    >>> manual_settings(ratio=0.4, ff_ratio=0.2).label
    'heads 40% + ff 20%'
    """
    amounts = {"heads": ratio if strategy == "ratio" else percentile, "kv_fold": kv_fold, "ff": ff_ratio,
               "precision": 0.0 if precision == "none" else precision_ratio, "step_reuse": step_reuse,
               "low_bit": low_bit_ratio}
    return ExtractionSettings(
        levers=amounts, strategy=strategy, scope=scope, min_keep=min_keep, safety_margin_heads=safety_margin_heads,
        keep_unstable_heads=keep_unstable_heads, kv_fold_keep_weights=kv_fold_keep_weights,
        precision_format="fp8" if precision == "none" else precision, low_bit_bits=3 if low_bit_bits == "int3" else 4,
    )


class FragmentManualLevers:
    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "strategy": (["ratio", "percentile"], tip("ratio: remove that fraction of heads; percentile: remove heads scoring below that percentile.")),
                "ratio": ("FLOAT", tip("Fraction of heads to remove (strategy=ratio).", default=0.3, min=0.0, max=0.95, step=0.05)),
                "percentile": ("FLOAT", tip("Score percentile below which heads go (strategy=percentile).", default=30.0, min=0.0, max=95.0, step=1.0)),
                "scope": (["global", "per_layer"], tip("global: one ranking across all modules; per_layer: the same share from each module.")),
                "ff_ratio": ("FLOAT", tip("Share of feed-forward hidden channels to remove, ranked by profiled activations.", default=0.0, min=0.0, max=0.9, step=0.05)),
                "precision": (["none", "fp8", "int8"], tip("Store the least important retained Linear weights in this precision.")),
                "precision_ratio": ("FLOAT", tip("Share of retained Linear parameters stored in that precision.", default=1.0, min=0.0, max=1.0, step=0.05)),
                "step_reuse": ("FLOAT", tip("Share of sampler steps on which the deep UNet blocks reuse their last output (0: off); the steps where the profile saw the deep features change least.", default=0.0, min=0.0, max=0.8, step=0.05)),
                "low_bit_ratio": ("FLOAT", tip("Share of Linear and Conv2d parameters stored as group-wise low-bit codes (4.5 bits per weight at int4), scaled per input channel from the profiled activations; the least sensitive layers first (0: off).", default=0.0, min=0.0, max=1.0, step=0.05)),
                "low_bit_bits": (["int4", "int3"], tip("The low-bit format: int4 or int3, asymmetric, 64 input channels per fp16 scale and zero.")),
            },
            "optional": {
                "min_keep": ("INT", tip("Heads every attention module keeps at least.", default=1, min=1, max=64)),
                "safety_margin_heads": ("INT", tip("Give back this many of the best-scored heads chosen for removal.", default=0, min=0, max=4096)),
                "keep_unstable_heads": ("BOOLEAN", tip("Never remove heads whose rank changes a lot between sampler runs.", default=True)),
                "kv_fold": ("BOOLEAN", tip("Compute cross-attention keys/values once for this prompt and drop to_k/to_v (the extractor needs positive and negative connected).", default=False)),
                "kv_fold_keep_weights": ("BOOLEAN", tip("Keep to_k/to_v so other prompts still work (saves no bytes).", default=False)),
            },
        }

    RETURN_TYPES = (LEVERS_TYPE,)
    RETURN_NAMES = ("levers",)
    FUNCTION = "levers"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Fixed lever amounts for FragmentExtractor's levers input, used when its calibrate is off "
                   "(with calibration the judge chooses the amounts).")

    def levers(self, **amounts: Any) -> tuple[ExtractionSettings]:
        return (manual_settings(**amounts),)
