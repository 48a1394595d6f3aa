"""The lever registry: every lever class in one ordered list, and the amounts keyed by lever name.

Each lever class (``surgery/*.py``, ``schedule/*_lever.py``) owns its name,
planning, predicted damage, calibration grid and goals, label, and its
build/apply/check (:class:`~.surgery.lever.LeverBase`).  Planning, prediction,
the calibration ladder, labels and the builder loop over :data:`LEVERS`, so a
new lever is one module plus one line here (or one ``register(MyLever)`` call).

The order is the build order: heads, K/V fold, feed-forward, low rank, low-bit
weights, precision (weights, built by ``build.build_fragment``), then step reuse
the CFG cut-off and the cross-attention cache (the manifest's ``schedule`` block).

>>> [cls.name for cls in LEVERS]
['heads', 'kv_fold', 'ff', 'low_rank', 'low_bit', 'precision', 'step_reuse', 'cfg_cutoff', 'cross_attn_cache']
>>> label(LeverAmounts({"ff": 0.1, "heads": 0.2}))
'heads 20% + ff 10%'
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

from ..errors import FragmentError
from .schedule.cfg_lever import CfgCutoffLever
from .schedule.cross_attn_lever import CrossAttnCacheLever
from .schedule.reuse_lever import StepReuseLever
from .surgery.feed_forward import FeedForwardLever
from .surgery.heads import HeadLever
from .surgery.kv_fold import KVFoldLever
from .surgery.lever import GOALS, LeverBase
from .surgery.low_bit import LowBitLever
from .surgery.lowrank import LowRankLever
from .surgery.precision import PrecisionLever

LEVERS: list[type[LeverBase]] = []


def register(cls: type[LeverBase]) -> type[LeverBase]:
    """Add a lever class (after those registered before it; usable as a class decorator).

    >>> register(HeadLever)
    Traceback (most recent call last):
    ...
    prompt_fragments.errors.FragmentError: lever registry: expected a new lever name, found 'heads' registered already
    """
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise FragmentError(f"lever registry: expected a class with an identifier `name`, found {name!r} on {cls!r}")
    if any(other.name == name for other in LEVERS):
        raise FragmentError(f"lever registry: expected a new lever name, found {name!r} registered already")
    LEVERS.append(cls)
    return cls


def unregister(name: str) -> None:
    """Remove a lever class by name (tests plant levers and take them away again)."""
    LEVERS[:] = [cls for cls in LEVERS if cls.name != name]


def lever(name: str) -> type[LeverBase]:
    """The lever class called ``name``.

    >>> lever("ff").__name__
    'FeedForwardLever'
    """
    for cls in LEVERS:
        if cls.name == name:
            return cls
    raise FragmentError(f"lever {name!r}: expected one of {', '.join(names())}")


def names() -> tuple[str, ...]:
    return tuple(cls.name for cls in LEVERS)


def stage(which: str) -> tuple[type[LeverBase], ...]:
    """The lever classes of one stage, in registry order: ``"weights"`` or ``"schedule"``.

    >>> [cls.name for cls in stage("schedule")]
    ['step_reuse', 'cfg_cutoff', 'cross_attn_cache']
    """
    return tuple(cls for cls in LEVERS if cls.stage == which)


def goal_levers(goal: str) -> tuple[str, ...]:
    """The levers whose amount a calibration goal moves by predicted damage: ``memory`` (bytes), ``speed``
    (time) or ``both``.

    Pruned heads and FF channels save bytes but little time (attention and feed-forward are a small
    share of a step: FF 10 % measured 0.97x on the reference model), and in a joint ladder they
    would spend the quality budget that step reuse turns into time, so ``speed`` leaves them out.

    >>> goal_levers("speed")
    ('step_reuse',)
    """
    if goal not in GOALS:
        raise FragmentError(f"calibration goal: expected one of {', '.join(GOALS)}, found {goal!r}")
    return tuple(cls.name for cls in LEVERS if goal in cls.goals and cls.ladder == "predicted")


def goal_evidence(goal: str) -> frozenset[str]:
    """The ``ProfileEvidence`` measurements the levers of a calibration goal read (``LeverBase.evidence``), beyond
    the head profile: what a profile made for that goal measures (``profiling.session.stack_flags``).  Goal
    ``speed`` moves only schedule levers, so its profile skips the feed-forward and activation probes, which cost
    most of the profile's hooks on small UNets.

    >>> sorted(goal_evidence("speed"))
    ['cfg_gaps', 'cross_attn_changes', 'reuse_depths', 'step_changes']
    >>> sorted(goal_evidence("memory"))
    ['activation_stats', 'ff_scores']
    """
    if goal not in GOALS:
        raise FragmentError(f"calibration goal: expected one of {', '.join(GOALS)}, found {goal!r}")
    return frozenset(field for cls in LEVERS if goal in cls.goals for field in cls.evidence)


class LeverAmounts(Mapping[str, Any]):
    """Lever name -> amount, only the levers that are on, in registry order; immutable and hashable.

    >>> a = LeverAmounts({"ff": 0.2, "heads": 0.0, "kv_fold": True})
    >>> dict(a), a == LeverAmounts({"kv_fold": True, "ff": 0.2}), hash(a) == hash(LeverAmounts(a))
    ({'kv_fold': True, 'ff': 0.2}, True, True)
    """

    __slots__ = ("_items",)

    def __init__(self, amounts: Mapping[str, Any] | None = None, *, where: str = "levers", settings: Any = None) -> None:
        amounts = dict(amounts or {})
        unknown = sorted(set(amounts) - set(names()))
        if unknown:
            raise FragmentError(f"{where}: unknown lever {unknown[0]!r}; expected one of {', '.join(names())}")
        items = []
        for cls in LEVERS:
            if cls.name not in amounts:
                continue
            value = amounts[cls.name]
            expected = cls.check_amount(value, settings)
            if expected is not None:
                raise FragmentError(f"{where}: {cls.name}: expected {expected}, found {value!r}")
            if cls.is_on(value):
                items.append((cls.name, dict(value) if isinstance(value, Mapping) else value))
        self._items = tuple(items)

    def __getitem__(self, name: str) -> Any:
        for key, value in self._items:
            if key == name:
                return value
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return (key for key, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple((k, tuple(sorted(v.items())) if isinstance(v, Mapping) else v) for k, v in self._items))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self) == dict(other)

    def __repr__(self) -> str:
        return f"LeverAmounts({dict(self)!r})"

    def amount(self, name: str) -> Any:
        """The amount of ``name``, its ``off`` value when it is off."""
        return self[name] if name in self else lever(name).off


def label(amounts: Mapping[str, Any], settings: Any = None, empty: str = "base") -> str:
    """The levers that are on, in registry order, each by its own label (``settings``: the how).

    >>> label({"cfg_cutoff": 350.0, "step_reuse": 0.3}, empty="full model")
    'step reuse 30% + CFG off below t=350'
    """
    parts = [cls.label(amounts[cls.name], settings) for cls in LEVERS
             if cls.name in amounts and cls.is_on(amounts[cls.name])]
    return " + ".join(parts) or empty


for _cls in (HeadLever, KVFoldLever, FeedForwardLever, LowRankLever, LowBitLever, PrecisionLever,
             StepReuseLever, CfgCutoffLever, CrossAttnCacheLever):
    register(_cls)
