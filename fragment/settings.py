"""The one settings dataclass: how a fragment is cut, lever by lever.

``levers`` holds the amounts, keyed by lever name (``fragment.levers``:
``heads``, ``kv_fold``, ``ff``, ``low_rank``, ``low_bit``, ``precision``,
``step_reuse``, ``cfg_cutoff``, ``cross_attn_cache``); each lever checks its own amount, and one that
is absent is off (amount 0; the K/V fold a switch, off at ``False``; ``low_rank``
off when empty; the CFG cut-off and the cross-attention cache off at ``None``).  The other fields name *how*
a lever cuts, never *whether*: the head strategy and scope, the precision
format, the low-bit bits and group, the reuse depth.

The extractor node, the demo, the weight bench and the reference lever curves
all read this one dataclass (``extract.plan_levers`` turns it into levers).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from ..errors import FragmentError
from ..profiling.scoring import ScoreWeights
from .levers import LeverAmounts, label

PRECISION_FORMATS = ("fp8", "int8")
LOW_BIT_BITS = (3, 4)  # fragment.surgery.low_bit.BITS and GROUPS
LOW_BIT_GROUPS = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class ExtractionSettings:
    """How to turn a profile into a fragment; every field is recorded in the manifest.

    >>> ExtractionSettings(levers={"heads": 0.3, "ff": 0.3, "precision": 1.0}).label
    'heads 30% + ff 30% + fp8 100%'
    >>> ExtractionSettings(levers={}).label
    'base'
    >>> ExtractionSettings(levers={"low_bit": 0.5, "precision": 1.0}).label
    'int4 50% + fp8 100%'
    """

    levers: Mapping[str, Any] = field(default_factory=lambda: {"heads": 0.3})  # lever name -> amount
    strategy: str = "ratio"  # heads: "ratio" (fraction of heads removed) or "percentile" (score cut-off)
    scope: str = "global"
    min_keep: int = 1
    safety_margin_heads: int = 0
    keep_unstable_heads: bool = True
    max_rank_std: float = 0.25
    weights: ScoreWeights = field(default_factory=ScoreWeights)
    kv_fold_keep_weights: bool = False  # keep to_k/to_v to recompute for other contexts (no bytes saved)
    precision_format: str = "fp8"  # the storage format of the precision lever: "fp8" or "int8"
    low_bit_bits: int = 4  # 4 (int4) or 3 (int3)
    low_bit_group: int = 64  # input columns per fp16 scale and zero: 4.5 bits per weight at int4, group 64
    # replay below this many skip connections (None: the block depth, shallow=1; 0: the whole UNet call)
    reuse_skips: int | None = None

    def __post_init__(self) -> None:
        checks = (
            ("strategy", self.strategy in ("ratio", "percentile"), "'ratio' or 'percentile'"),
            ("precision_format", self.precision_format in PRECISION_FORMATS,
             "'fp8' or 'int8' (leave the precision lever off to keep the weights)"),
            ("low_bit_bits", self.low_bit_bits in LOW_BIT_BITS and not isinstance(self.low_bit_bits, bool),
             "3 or 4 (leave the low_bit lever off to keep the weights)"),
            ("low_bit_group", self.low_bit_group in LOW_BIT_GROUPS and not isinstance(self.low_bit_group, bool),
             f"one of {', '.join(map(str, LOW_BIT_GROUPS))} input columns per scale"),
            ("reuse_skips", self.reuse_skips is None or (isinstance(self.reuse_skips, int)
                                                         and not isinstance(self.reuse_skips, bool) and self.reuse_skips >= 0),
             "None or an integer >= 0 (skip connections kept computed; 0: the whole UNet call reused)"),
        )
        for name, ok, expected in checks:
            if not ok:
                raise FragmentError(f"extraction settings: {name}: expected {expected}, found {getattr(self, name)!r}")
        if not isinstance(self.levers, Mapping):
            raise FragmentError(f"extraction settings: levers: expected an object of lever name -> amount, "
                                f"found {type(self.levers).__name__}")
        object.__setattr__(self, "levers", LeverAmounts(self.levers, where="extraction settings: levers", settings=self))

    def amount(self, name: str) -> Any:
        """The amount of lever ``name`` (its off value when it is off).

        >>> ExtractionSettings().amount("heads"), ExtractionSettings().amount("ff")
        (0.3, 0.0)
        """
        return self.levers.amount(name)

    def on(self, name: str) -> bool:
        return name in self.levers

    @property
    def label(self) -> str:
        """A short name of the levers that are on, for tables and logs."""
        return label(self.levers, self)

    def with_levers(self, amounts: Mapping[str, Any]) -> "ExtractionSettings":
        """These settings (the how) with other amounts.

        >>> ExtractionSettings(precision_format="int8").with_levers({"precision": 0.5}).label
        'int8 50%'
        """
        return dataclasses.replace(self, levers=dict(amounts))

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**out, "weights": self.weights.to_dict(), "levers": {k: (dict(v) if isinstance(v, Mapping) else v)
                                                                       for k, v in self.levers.items()}}


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
    amounts = {"heads": heads, "kv_fold": kv_fold, "ff": ff, "low_bit": low_bit,
               "precision": precision_ratio if precision else 0.0}
    return ExtractionSettings(levers=amounts, precision_format=precision or "fp8", low_bit_bits=low_bit_bits,
                              low_bit_group=low_bit_group)
