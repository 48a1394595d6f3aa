"""The one settings dataclass: how a fragment is cut, lever by lever.

One rule for "off": every lever is off at amount 0 (``amount`` for heads with the
``ratio`` strategy, ``ff_ratio``, ``low_bit_ratio``, ``precision_ratio``, ``step_reuse``; the K/V fold is
a switch, off at ``False``; ``low_rank`` is off when empty).  Format fields such
as ``precision``, ``low_bit_bits`` and ``low_bit_group`` name *how* a lever cuts, never *whether*.

The extractor node, the demo, the weight bench and the reference lever curves
all read this one dataclass (``extract.plan_levers`` turns it into levers).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from ..errors import FragmentError
from ..profiling.scoring import ScoreWeights

PRECISION_FORMATS = ("fp8", "int8")
LOW_BIT_BITS = (3, 4)  # fragment.surgery.low_bit.BITS and GROUPS (kept here: settings import no lever)
LOW_BIT_GROUPS = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class ExtractionSettings:
    """How to turn a profile into a fragment; every field is recorded in the manifest.

    >>> ExtractionSettings(amount=0.3, ff_ratio=0.3, precision_ratio=1.0).label
    'heads 30% + ff 30% + fp8 100%'
    >>> ExtractionSettings(amount=0.0).label
    'base'
    >>> ExtractionSettings(amount=0.0, low_bit_ratio=0.5, precision_ratio=1.0).label
    'int4 50% + fp8 100%'
    """

    strategy: str = "ratio"  # "ratio" (fraction of heads removed) or "percentile" (score cut-off)
    amount: float = 0.3
    scope: str = "global"
    min_keep: int = 1
    safety_margin_heads: int = 0
    keep_unstable_heads: bool = True
    max_rank_std: float = 0.25
    weights: ScoreWeights = field(default_factory=ScoreWeights)
    low_rank: Mapping[str, float] = field(default_factory=dict)  # layer path -> energy to keep
    kv_fold: bool = False  # fold attn2 K/V for the context given to extract_fragment
    kv_fold_keep_weights: bool = False  # keep to_k/to_v to recompute for other contexts (no bytes saved)
    ff_ratio: float = 0.0  # fraction of feed-forward hidden channels to remove (per block)
    precision: str = "fp8"  # the storage format when precision_ratio > 0: "fp8" or "int8"
    precision_ratio: float = 0.0  # share of retained Linear parameters stored in that precision
    low_bit_ratio: float = 0.0  # share of Linear and Conv2d parameters stored in low_bit_bits, group-wise
    low_bit_bits: int = 4  # 4 (int4) or 3 (int3)
    low_bit_group: int = 64  # input columns per fp16 scale and zero: 4.5 bits per weight at int4, group 64
    step_reuse: float = 0.0  # share of the profiled steps on which the deep blocks replay their last output
    reuse_skips: int | None = None  # replay below this many skip connections (None: the block depth, shallow=1)

    def __post_init__(self) -> None:
        checks = (
            ("strategy", self.strategy in ("ratio", "percentile"), "'ratio' or 'percentile'"),
            ("amount", _finite(self.amount) and 0.0 <= self.amount <= (100.0 if self.strategy == "percentile" else 1.0),
             "a fraction in [0, 1] (a percentile in [0, 100] with strategy 'percentile')"),
            ("ff_ratio", _finite(self.ff_ratio) and 0.0 <= self.ff_ratio < 1.0, "a fraction in [0, 1)"),
            ("precision", self.precision in PRECISION_FORMATS, "'fp8' or 'int8' (set precision_ratio=0 to turn it off)"),
            ("precision_ratio", _finite(self.precision_ratio) and 0.0 <= self.precision_ratio <= 1.0, "a fraction in [0, 1]"),
            ("low_bit_ratio", _finite(self.low_bit_ratio) and 0.0 <= self.low_bit_ratio <= 1.0, "a fraction in [0, 1]"),
            ("low_bit_bits", self.low_bit_bits in LOW_BIT_BITS and not isinstance(self.low_bit_bits, bool),
             "3 or 4 (set low_bit_ratio=0 to turn low-bit weights off)"),
            ("low_bit_group", self.low_bit_group in LOW_BIT_GROUPS and not isinstance(self.low_bit_group, bool),
             f"one of {', '.join(map(str, LOW_BIT_GROUPS))} input columns per scale"),
            ("step_reuse", _finite(self.step_reuse) and 0.0 <= self.step_reuse < 1.0, "a share of steps in [0, 1)"),
            ("reuse_skips", self.reuse_skips is None or (isinstance(self.reuse_skips, int)
                                                         and not isinstance(self.reuse_skips, bool) and self.reuse_skips >= 1),
             "None or an integer >= 1 (skip connections kept computed)"),
        )
        for name, ok, expected in checks:
            if not ok:
                raise FragmentError(f"extraction settings: {name}: expected {expected}, found {getattr(self, name)!r}")

    @property
    def heads_on(self) -> bool:
        return self.amount > 0

    @property
    def precision_on(self) -> bool:
        return self.precision_ratio > 0

    @property
    def low_bit_on(self) -> bool:
        return self.low_bit_ratio > 0

    @property
    def label(self) -> str:
        """A short name of the levers that are on, for tables and logs."""
        what = "heads" if self.strategy == "ratio" else "heads below percentile"
        amount = f"{self.amount:.0%}" if self.strategy == "ratio" else f"{self.amount:g}"
        parts = [f"{what} {amount}"] if self.heads_on else []
        parts += ["kv-fold"] if self.kv_fold else []
        parts += [f"ff {self.ff_ratio:.0%}"] if self.ff_ratio else []
        group = "" if self.low_bit_group == 64 else f"/g{self.low_bit_group}"
        parts += [f"int{self.low_bit_bits}{group} {self.low_bit_ratio:.0%}"] if self.low_bit_on else []
        parts += [f"{self.precision} {self.precision_ratio:.0%}"] if self.precision_on else []
        parts += [f"low-rank {len(self.low_rank)}"] if self.low_rank else []
        depth = f" below skip {self.reuse_skips}" if self.reuse_skips is not None else ""
        parts += [f"step reuse {self.step_reuse:.0%}{depth}"] if self.step_reuse else []
        return " + ".join(parts) or "base"

    def selection_kwargs(self) -> dict[str, Any]:
        """The head budget as ``select_heads`` takes it."""
        return {"ratio": self.amount} if self.strategy == "ratio" else {"percentile": self.amount}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "weights": self.weights.to_dict(), "low_rank": dict(self.low_rank)}


def lever_settings(heads: float = 0.0, kv_fold: bool = False, ff: float = 0.0, precision: str | None = None,
                   precision_ratio: float = 1.0, low_bit: float = 0.0, low_bit_bits: int = 4,
                   low_bit_group: int = 64) -> ExtractionSettings:
    """Settings with only the named levers on (heads default to off here), in the bench CLI's terms.

    ``precision=None`` leaves the weights unquantized; otherwise ``precision_ratio`` of them are stored in it.
    ``low_bit`` is the share of Linear and Conv2d parameters stored in ``low_bit_bits`` bits.

    >>> lever_settings(0.3, True, 0.3, "fp8").label
    'heads 30% + kv-fold + ff 30% + fp8 100%'
    >>> lever_settings(low_bit=1.0, low_bit_group=128).label
    'int4/g128 100%'
    """
    return ExtractionSettings(amount=heads, kv_fold=kv_fold, ff_ratio=ff, precision=precision or "fp8",
                              precision_ratio=precision_ratio if precision else 0.0, low_bit_ratio=low_bit,
                              low_bit_bits=low_bit_bits, low_bit_group=low_bit_group)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
