"""Calibration: the strongest combination of levers that the judge passes, confirmed on seeds it never chose with.

The judge step of the pipeline (profile, score, select, build, **judge**, record),
shared by FragmentExtractor, the demo and ``bench batch``.  Plain data in, plain
data out:

* :class:`Predictors` hold what the profile already measured, one entry per
  registered lever (``fragment.levers``), each computed once by the lever's own
  ``predictor`` (head scores, feed-forward channel scores, the per-step change
  of the deep features, the precision format's and the low-bit weights' error,
  on the prompt's sampled layer inputs when the profile has them).  Each lever's ``predict`` turns an amount into a
  *predicted damage*: the share of that lever's measured importance it removes.
* :func:`candidate_ladder` lists candidates from strongest to weakest: at each
  damage level, every lever the ``goal`` allows goes as far as its prediction
  stays within the level.  Stronger means more of every lever, so one order
  serves bytes (``memory``), time (``speed``) and ``both``.  Step reuse also
  picks its depth there (after DeepCache's choice of cached branch): of the
  profiled cuts, the one whose reuse within the level saves the most of a
  call's measured time.
* :func:`calibrate` spends a :class:`Budget` of judged images: it starts at
  the level the caller predicts (by default the middle), then moves by the
  judge's *slack* (how far inside or outside the gate a try landed), fitted
  against the predicted damage, instead of halving blindly.  The strongest
  candidate that passes the calibration seeds is then judged on held-out
  seeds, because one seed set overfits (the CI gate showed 11.4 % of heads
  passing the profile's seeds and failing fresh ones).  If it fails there, the
  next weaker one is confirmed instead; if nothing is confirmed, the answer is
  the full model.
* A CFG cut-off is not predicted by the profile (no profiled quantity measures
  what the unconditional pass adds), so for ``speed`` and ``both`` it is tried
  after the levers, latest cut-off first, with what is left of the budget: on
  top of the confirmed candidate, or on the full model when none was.  As in
  T-GATE, the cross-attention cache rides in the same try (``cross_attn_gate``:
  the profile's predicted gate; the cache starts at the later of the two, so
  at or below the cut-off), at no judged image of its own.
* With ``confirm_in_batch`` the confirmation moves into the user's batch
  (``fragment.audit``, the running audit) and no try is made: a warm start
  picks the rung a prior predicts, a cold one the rung the search would have
  started at (or the ``start`` a caller gives), with the weakest planned CFG
  cut-off on top.  On the reference model a judged search on 8 seeds cost
  18.7-31.5 u before a batch of 128 and its audit 7.4-11.1 u, and the audit's
  verdict is on the batch's own seeds.  Status ``"in_batch"``: the caller must run the
  audit, whose verdicts are the confirmation.  With ``judge_pick`` as well, the
  pick is judged once on the calibration seeds (the profiled seeds, whose
  full-model images the profile already rendered: only the candidate's renders
  are waste), one rung weaker after each failure, at most ``PICK_TRIES`` tries
  within the budget; no held-out seed is rendered, and the audit needs no lead
  of untried images (``Calibration.untried``).

Every try (candidate, phase, seeds, metrics, verdict, seconds, images) is kept
for the manifest's ``quality.refinement`` block.  The judge is a callable, so
this module needs no sampler: ``judge(candidate, seeds) -> Judgement``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import FragmentError
from ..profiling.evidence import ProfileEvidence
from ..profiling.step_change import ReuseDepth
from .levers import GOALS, LEVERS, LeverAmounts, goal_levers, label, lever
from .schedule.cfg_lever import CFG_CUTOFFS, CfgCutoffLever, cutoff_tries
from .schedule.cross_attn_lever import CrossAttnCacheLever, predicted_gate
from .schedule.reuse_lever import StepReuseLever
from .settings import ExtractionSettings

log = logging.getLogger(__name__)

# Damage levels of the ladder, strongest first: a lever at level d removes at most d of its measured importance.
DEFAULT_LEVELS = (0.6, 0.45, 0.35, 0.27, 0.2, 0.15, 0.11, 0.08, 0.06, 0.045, 0.03, 0.02)
# Least share of a run's measured time a step-reuse candidate must save: the demo's `both` ladder otherwise
# added 15 % of the steps below skip 3, which bought 1.00x and cost 1 % of peak memory for the cache.
MIN_REUSE_SAVING = 0.1


@dataclass(frozen=True)
class Candidate:
    """One combination of levers: ``levers`` (lever name -> amount, as in ``ExtractionSettings``), the reuse
    depth, and the damage level the ladder built it at.  Hashable: the calibration keys its tries by it.

    >>> Candidate({"heads": 0.2, "ff": 0.1, "step_reuse": 0.3}).label
    'heads 20% + ff 10% + step reuse 30%'
    >>> Candidate().is_full_model, Candidate({"heads": 0.2}) == Candidate({"heads": 0.2, "ff": 0.0})
    (True, True)
    """

    levers: Mapping[str, Any] = field(default_factory=dict)
    reuse_skips: int | None = None  # the reuse depth in skip connections (None: the block depth)
    level: float = 0.0  # the predicted damage level the ladder built it at (0: not from the ladder)
    # the settings it is built with (format, bits...), for its label only: not part of what the candidate is
    how: ExtractionSettings | None = field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "levers", LeverAmounts(self.levers, where="calibration candidate"))

    def amount(self, name: str) -> Any:
        """The amount of lever ``name`` (its off value when it is off)."""
        return self.levers.amount(name)

    def with_levers(self, **amounts: Any) -> "Candidate":
        """This candidate with some amounts changed.

        >>> Candidate({"heads": 0.2}).with_levers(cfg_cutoff=350.0).label
        'heads 20% + CFG off below t=350'
        """
        return dataclasses.replace(self, levers={**self.levers, **amounts})

    @property
    def is_full_model(self) -> bool:
        return not self.levers

    @property
    def label(self) -> str:
        """The one label of settings and candidates (``levers.label``), in the format it is built with.

        >>> Candidate({"precision": 0.5}, how=ExtractionSettings(precision_format="int8")).label
        'int8 50%'
        """
        return label(self.levers, self.settings(self.how or ExtractionSettings()), empty="full model")

    def settings(self, base: ExtractionSettings = ExtractionSettings()) -> ExtractionSettings:
        """``base`` (strategy, scope, format, ...) with this candidate's amounts.

        >>> Candidate({"heads": 0.1, "precision": 0.5}).settings().label
        'heads 10% + fp8 50%'
        """
        return dataclasses.replace(base, strategy="ratio", levers=self.levers,
                                   reuse_skips=self.reuse_skips if "step_reuse" in self.levers else None)

    def to_dict(self) -> dict[str, Any]:
        amounts = {cls.name: self.amount(cls.name) for cls in LEVERS if cls.ladder}
        return {**amounts, "reuse_skips": self.reuse_skips, "level": self.level, "label": self.label}


@dataclass(frozen=True)
class Predictors:
    """What the profile measured, per lever, as its ``predictor`` data (``data``: lever name -> data); each lever
    turns an amount into a *predicted damage*: the share of its measured importance removed, as a relative
    error.  A lever without its data is not offered.

    >>> p = Predictors({"heads": {"a": torch.tensor([1.0, 1.0, 2.0, 4.0])}})
    >>> p.damage("heads", 0.25), p.damage("heads", 0.5)  # sqrt of 1/8 and 2/8 of the score mass
    (0.3535533905932738, 0.5)
    """

    data: Mapping[str, Any] = field(default_factory=dict)

    def offers(self, name: str) -> bool:
        return self.data.get(name) is not None and lever(name).offers(self.data[name])

    @property
    def depths(self) -> dict[int, ReuseDepth]:
        """The profiled reuse depths with enough steps and a counted cost."""
        data = self.data.get(StepReuseLever.name)
        return data.depths if data is not None else {}

    def cfg_cutoffs(self) -> tuple[float, ...]:
        """The CFG cut-offs to try, latest first: predicted from the profiled cond/uncond gap when there is one
        (``cfg_lever.cutoff_tries``), else the fixed ones; none when the lever is not offered.

        >>> Predictors({"cfg_cutoff": True}).cfg_cutoffs(), Predictors().cfg_cutoffs()
        ((500.0, 350.0, 200.0), ())
        """
        data = self.data.get(CfgCutoffLever.name)
        return cutoff_tries(data) if data is not None else ()

    def cross_attn_gate(self) -> float | None:
        """The timestep below which the profile says cross-attention has converged (``None``: not offered).

        >>> Predictors().cross_attn_gate() is None
        True
        """
        data = self.data.get(CrossAttnCacheLever.name)
        return predicted_gate(data.changes) if self.offers(CrossAttnCacheLever.name) else None

    def reuse_damage(self, skips: int, amount: float) -> float:
        """Predicted damage of reusing ``amount`` of the steps at depth ``skips`` (its drift budget)."""
        return StepReuseLever.depth_damage(self.data[StepReuseLever.name], skips, amount)

    def damage(self, name: str, amount: float) -> float:
        """Predicted share of lever ``name``'s measured importance removed at ``amount``."""
        cls = lever(name)
        if cls.ladder != "predicted" or not cls.grid:
            raise FragmentError(f"calibration: lever {name!r} has no predicted damage; expected one of "
                                f"{', '.join(c.name for c in LEVERS if c.ladder == 'predicted' and c.grid)}")
        if amount <= 0:
            return 0.0
        return cls.predict(self.data[name], amount)


def profile_predictors(evidence: ProfileEvidence, model: torch.nn.Module, settings: ExtractionSettings = ExtractionSettings(),
               goal: str | None = None) -> Predictors:
    """Each lever's predictor data from the evidence and the model, once; with ``goal``, only the levers it
    moves (the precision and low-bit predictors quantize every layer: only worth it when the goal moves them).

    >>> p = profile_predictors(evidence, unet, goal="memory")  # doctest: +SKIP
    """
    # the levers the goal moves by prediction, the exact ones, and those it tries after the ladder (the CFG cut-off)
    moved = (set(goal_levers(goal)) | {cls.name for cls in LEVERS if cls.ladder == "always"}
             | {cls.name for cls in LEVERS if cls.ladder == "after" and goal in cls.goals}) if goal else None
    data = {}
    for cls in LEVERS:
        if cls.ladder and (moved is None or cls.name in moved):
            data[cls.name] = cls.predictor(evidence, model, settings)
    return Predictors(data)


def lever_ladder(chosen: Candidate) -> list[tuple[str, Candidate]]:
    """The chosen candidate's levers added one at a time, for the bench's rows (the last row is ``chosen``).

    >>> [label for label, _ in lever_ladder(Candidate({"heads": 0.2, "step_reuse": 0.3, "cfg_cutoff": 350.0}))]
    ['fragment: heads 20%', '+ step reuse 30%', '+ CFG off below t=350 (final)']
    """
    steps: list[tuple[str, Candidate]] = []
    current = Candidate(how=chosen.how)
    for name, value in chosen.levers.items():
        before = current.label
        depth = {"reuse_skips": chosen.reuse_skips} if name == StepReuseLever.name else {}
        current = dataclasses.replace(current.with_levers(**{name: value}), **depth)
        part = current.label if before == "full model" else current.label[len(before) + 3:]
        steps.append(((("fragment: " if not steps else "+ ") + part), current))
    if steps:
        steps[-1] = (steps[-1][0] + " (final)", steps[-1][1]) if len(steps) > 1 else steps[-1]
    return steps


def candidate_ladder(predictors: Predictors, goal: str = "both", levels: Sequence[float] = DEFAULT_LEVELS,
                     grids: Mapping[str, Sequence[float]] | None = None) -> list[Candidate]:
    """Candidates from strongest to weakest: each lever goes as far as its predicted damage stays within a level.

    Duplicates (levels where no lever moves) are dropped; the full model is not listed (it is the fallback).
    A lever that is exact (``ladder == "always"``, the K/V fold) is on at every level where it is offered.

    >>> p = Predictors({"heads": {"a": torch.arange(1.0, 11.0)}})
    >>> [c.amount("heads") for c in candidate_ladder(p, "memory", levels=(0.5, 0.3, 0.1))]
    [0.4, 0.2]
    """
    grids = {**{cls.name: cls.grid for cls in LEVERS}, **(grids or {})}
    levers = [name for name in goal_levers(goal) if predictors.offers(name)]
    always = {cls.name: True for cls in LEVERS if cls.ladder == "always" and goal in cls.goals and predictors.offers(cls.name)}
    reuse = StepReuseLever.name
    depths = predictors.depths if reuse in levers else {}
    # the damage of a grid amount does not depend on the level: predicted once per lever, read at every level
    damages = {lv: {a: predictors.damage(lv, a) for a in grids[lv]} for lv in levers if not (lv == reuse and depths)}
    depth_damages = {k: {a: predictors.reuse_damage(k, a) for a in grids[reuse]} for k in depths}
    ladder: list[Candidate] = []
    seen: set[tuple] = set()
    for level in sorted(levels, reverse=True):
        amounts = {lv: _amount_at(damages[lv], level) for lv in damages}
        skips = None
        if depth_damages:
            # DeepCache's lesson: a deeper cut replays less of the step but saves more of it; the depth is the
            # one whose reuse within this level saves the most measured time (ties: the depth that computes more).
            share, skips = max(((_amount_at(d, level), k) for k, d in depth_damages.items()),
                               key=lambda option: (depths[option[1]].saving(option[0]), option[1]))
            if depths[skips].saving(share) < MIN_REUSE_SAVING:
                share = 0.0  # the cache costs memory on every step: a reuse that saves this little is not worth it
            amounts[reuse] = share
            skips = skips if share else None
        candidate = Candidate({**always, **amounts}, level=float(level), reuse_skips=skips)
        key = (*(amounts.get(lv, 0.0) for lv in grids), skips)
        if candidate.is_full_model or not any(amounts.values()) or key in seen:
            continue
        seen.add(key)
        ladder.append(candidate)
    return ladder


def _amount_at(damages: Mapping[float, float], level: float) -> float:
    """The largest amount (of ``damages``: amount -> predicted damage) within ``level``, lowered to the smallest
    amount with the same predicted damage (a share that rounds to the same whole heads or steps is the same
    fragment under another name)."""
    best = max((a for a, d in damages.items() if d <= level), default=0.0)
    return min(a for a, d in damages.items() if d == damages.get(best, 0.0)) if best else 0.0


@dataclass(frozen=True)
class Judgement:
    """A judge's answer: passed or not, the metrics, the reasons, and the slack (> 0 inside the gate, < 0 outside).

    ``slack`` is the smallest relative distance to a limit (``metrics.limits.slack``); ``None`` when unknown,
    in which case the search halves instead of interpolating.  ``images`` and ``seconds``: what the try
    really cost, when the judge knows (``None``: the calibration counts every seed).
    """

    passed: bool
    metrics: Mapping[str, Any] = field(default_factory=dict)
    reasons: Sequence[str] = ()
    slack: float | None = None
    images: int | None = None  # images actually rendered for this try (a sequential stop renders fewer than all seeds)
    seconds: float | None = None  # what the try cost when the judge measured it, full-model references included


Judge = Callable[[Candidate, Sequence[int]], Judgement]


@dataclass(frozen=True)
class Budget:
    """How much the calibration may spend: judged images (every seed of every try, plus the held-out
    full-model references), optionally seconds, and optionally a cost in ``u`` (one stock image).

    The cost limit follows from the batch (:meth:`for_batch`): a batch of ``batch`` images at ``raw_ratio``
    can repay ``(batch - delivered) * (1 - 1 / raw_ratio)`` u (``metrics.costs.repayable_units``), less what was spent before the calibration (``spent_u``,
    the profile hooks and the build).  A try is not started when its estimated cost (from the tries so far,
    else ``image_u`` per image) would go past it.

    >>> Budget(images=40).allows(spent=32, more=8), Budget(images=40).allows(spent=33, more=8)
    (True, False)
    >>> b = Budget.for_batch(32, 2.0, delivered=12, spent_u=2.0); b.units, b.allows(0, 8, spent_u=3.0, more_u=5.0)
    (8.0, True)
    """

    images: int = 48
    seconds: float | None = None
    batch: int | None = None  # the batch the user is about to make (None: no cost limit)
    raw_ratio: float | None = None  # its expected raw ratio (None with a batch: estimated from the ladder)
    delivered: int = 0  # full-model images of the batch the pack makes anyway (profiled and confirmation seeds)
    spent_u: float = 0.0  # overhead already spent before the calibration, in u
    unit_s: float | None = None  # seconds of one stock image, when measured beside stock
    # a judged image's cost before any try is measured (and when no unit is known): the first try's estimate, so
    # the limit holds only if this is an upper bound; one stock image is one only when the judge renders batches as
    # large as the stock timing's (the demo passes its profiled batch's measured cost per image)
    image_u: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.images, int) or self.images < 1:
            raise FragmentError(f"calibration budget images: expected an integer >= 1, found {self.images!r}")
        if self.seconds is not None and not (math.isfinite(self.seconds) and self.seconds > 0):
            raise FragmentError(f"calibration budget seconds: expected a number > 0 or None, found {self.seconds!r}")
        if self.batch is not None and (not isinstance(self.batch, int) or self.batch < 1):
            raise FragmentError(f"calibration budget batch: expected an integer >= 1 or None, found {self.batch!r}")
        for name in ("raw_ratio", "unit_s"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise FragmentError(f"calibration budget {name}: expected a number > 0 or None, found {value!r}")
        if not (math.isfinite(self.spent_u) and self.spent_u >= 0) or not (math.isfinite(self.image_u) and self.image_u > 0):
            raise FragmentError(f"calibration budget spent_u / image_u: expected finite numbers >= 0 / > 0, found "
                                f"{self.spent_u!r} / {self.image_u!r}")
        if not isinstance(self.delivered, int) or self.delivered < 0:
            raise FragmentError(f"calibration budget delivered: expected an integer >= 0, found {self.delivered!r}")

    @classmethod
    def for_batch(cls, n: int = 32, raw_ratio: float | None = None, *, delivered: int = 0, spent_u: float = 0.0,
                  unit_s: float | None = None, images: int = 48, image_u: float = 1.0) -> "Budget":
        """The budget a batch of ``n`` can repay (``raw_ratio`` None: estimated from the ladder by the caller of
        :func:`calibrate`, see :func:`estimated_raw_ratio`).

        >>> Budget.for_batch(32, 1.5).units, Budget.for_batch(32).units is None
        (10.666666666666668, True)
        """
        return cls(images=images, batch=n, raw_ratio=raw_ratio, delivered=delivered, spent_u=spent_u, unit_s=unit_s,
                   image_u=image_u)

    def with_raw_ratio(self, raw_ratio: float | None) -> "Budget":
        """This budget with the raw ratio filled in (kept when it is already set; None: no cost limit)."""
        if self.raw_ratio is not None or raw_ratio is None:
            return self
        return dataclasses.replace(self, raw_ratio=raw_ratio)

    @property
    def units(self) -> float | None:
        """The most the calibration may spend, in u (``None``: no cost limit)."""
        if self.batch is None or self.raw_ratio is None:
            return None
        # metrics.costs.repayable_units' arithmetic (the core imports nothing above it; tests/test_costs.py
        # checks that the two agree): each image the fragment still renders saves 1 - 1/r of a stock image
        saved = 1.0 - 1.0 / self.raw_ratio if self.raw_ratio > 1 else 0.0
        return max(max(self.batch - self.delivered, 0) * saved - self.spent_u, 0.0)

    def allows(self, spent: int, more: int, elapsed: float = 0.0, *, spent_u: float = 0.0, more_u: float = 0.0) -> bool:
        limit = self.units
        return (spent + more <= self.images and (self.seconds is None or elapsed < self.seconds)
                and (limit is None or spent_u + more_u <= limit + 1e-9))

    def record(self) -> dict[str, Any]:
        return {"images": self.images, "seconds": self.seconds, "batch": self.batch, "raw_ratio": self.raw_ratio,
                "delivered": self.delivered, "spent_u": self.spent_u, "units": self.units, "unit_s": self.unit_s,
                "image_u": self.image_u}


PICK_TRIES = 3  # judge_pick: the most rungs tried on the profiled seeds before the batch runs on the full model


def cold_start(rungs: int) -> int:
    """The rung a search with nothing to go on starts at: below the middle (3/5 down the ladder), where a pass is
    likelier and teaches the slack fit as much.  The budget's estimate, a pick confirmed in the batch and a prior's
    cold start all start there too.

    >>> cold_start(12), cold_start(1)
    (7, 0)
    """
    return (3 * rungs) // 5


def estimated_raw_ratio(ladder: Sequence[Candidate], predictors: Predictors, goal: str = "speed",
                        cfg_cutoffs: Sequence[float] = CFG_CUTOFFS) -> float | None:
    """The raw ratio to budget with before any fragment exists, from what the ladder predicts (``None`` for
    ``memory``: that goal is repaid in bytes, not time, so no time limit applies).

    Deliberately low: an estimate too high lets the calibration spend what the batch cannot repay, one too low
    only stops it early (the full model, or a weaker rung, is still a safe answer).  So it takes the step-reuse
    saving the profile measured at the rung where the search starts (below the middle, likelier to pass than
    the strongest), and for the CFG cut-off only the weakest one's share of the unconditional passes: steps
    below t = cutoff (of 1000) skip the unconditional half of their call.

    >>> estimated_raw_ratio([], Predictors(), "speed", cfg_cutoffs=(200.0,))  # no reuse: the weakest cut-off only
    1.1111111111111112
    >>> estimated_raw_ratio([], Predictors(), "memory") is None
    True
    """
    if goal not in ("speed", "both"):
        return None
    saving = 0.0
    if ladder:
        rung = ladder[min(cold_start(len(ladder)), len(ladder) - 1)]
        share, skips = rung.amount(StepReuseLever.name), rung.reuse_skips
        if share and skips in predictors.depths:
            saving = predictors.depths[skips].saving(float(share))
    remaining = 1.0 - min(max(saving, 0.0), 0.9)
    if cfg_cutoffs:
        remaining *= 1.0 - min(cfg_cutoffs) / 1000.0 / 2.0
    return 1.0 / remaining


@dataclass
class Calibration:
    """The outcome: the chosen candidate (``None``: the full model), every try, and what they cost."""

    goal: str
    chosen: Candidate | None
    status: str  # "passed" (confirmed on held-out seeds), "in_batch" (the running audit confirms), or "fallback_full_model"
    calibration_seeds: list[int]
    holdout_seeds: list[int]
    budget: Budget
    judge: str
    tries: list[dict[str, Any]] = field(default_factory=list)
    images: int = 0
    seconds: float = 0.0
    reason: str = ""
    units: float = 0.0  # the overhead spent, in u (the held-out references are delivered: output, not overhead)
    delivered: int = 0  # full-model images rendered as references that the user keeps
    warm_start: int | None = None  # the ladder rung a prior started the search at (None: a cold search)
    prior: str | None = None  # the model configuration whose prior was consulted (``PriorKey.name``; None: none was)
    prior_prompts: int = 0  # the earlier prompts with judged tries in that prior
    warnings: list[str] = field(default_factory=list)  # what the user must read (an unreadable prior: a cold start)
    cfg_cutoffs: list[float] = field(default_factory=list)  # the CFG cut-offs planned, in try order (predicted first)
    in_batch: bool = False  # chosen to be confirmed by the batch's running audit (``confirm_in_batch``), not held-out seeds

    @property
    def untried(self) -> bool:
        """Whether the chosen candidate is confirmed in the batch with no judged try of its own: its running audit
        must lead with ``AuditRule.min_audits`` audited images.

        >>> Calibration("speed", Candidate({"heads": 0.2}), "in_batch", [0], [9], Budget(8), "toy").untried
        True
        """
        if self.chosen is None or self.status != "in_batch":
            return False
        return not any(t["passed"] and t["candidate"]["label"] == self.chosen.label for t in self.tries)

    @property
    def confirmed(self) -> dict[str, Any] | None:
        """The held-out try of the chosen candidate (its metrics are the ones to report)."""
        if self.chosen is None:
            return None
        return next((t for t in reversed(self.tries) if t["phase"] == "holdout" and t["passed"]
                     and t["candidate"]["label"] == self.chosen.label), None)

    def record(self) -> dict[str, Any]:
        """The manifest's ``quality.refinement`` block (plain JSON data).

        >>> cal = Calibration("speed", None, "fallback_full_model", [0], [9], Budget(8), "toy", reason="nothing passed")
        >>> r = cal.record(); r["status"], r["fallback_full_model"], r["chosen"]
        ('fallback_full_model', True, None)
        """
        return {
            "method": ("predicted ladder + slack search, confirmed on held-out seeds" if not self.in_batch
                       else "predicted rung, untried, confirmed by the running audit of the batch" if self.untried
                       else "predicted rung, judged on the profiled seeds, confirmed by the running audit of the batch"
                       if self.chosen is not None else "predicted rung, judged on the profiled seeds: none passed"
                       if self.tries else "predicted rung: none to pick"),
            "untried": self.untried,
            "goal": self.goal, "judge": self.judge, "status": self.status,
            "fallback_full_model": self.chosen is None, "reason": self.reason,
            "chosen": self.chosen.to_dict() if self.chosen else None,
            "calibration_seeds": list(self.calibration_seeds), "holdout_seeds": list(self.holdout_seeds),
            "budget": self.budget.record(), "start": "warm (prior)" if self.warm_start is not None else "cold",
            "warm_start": self.warm_start, "prior": self.prior, "prior_prompts": self.prior_prompts,
            "warnings": list(self.warnings), "cfg_cutoffs": list(self.cfg_cutoffs),
            "cost": {"images": self.images, "seconds": round(self.seconds, 4), "units": round(self.units, 4),
                     "delivered": self.delivered},
            "tries": [dict(t) for t in self.tries],
        }


def calibrate(
    ladder: Sequence[Candidate],
    judge: Judge,
    *,
    calibration_seeds: Sequence[int],
    holdout_seeds: Sequence[int],
    budget: Budget = Budget(),
    goal: str = "both",
    judge_name: str = "judge",
    start: int | None = None,
    cfg_cutoffs: Sequence[float] = CFG_CUTOFFS,
    holdout_reference_images: int | None = None,
    images_per_seed: int = 1,
    confirm_only: bool = False,
    confirm_in_batch: bool = False,
    cross_attn_gate: float | None = None,
    judge_pick: bool = False,
) -> Calibration:
    """The strongest candidate of ``ladder`` that passes ``judge`` on both seed sets, within ``budget``.

    ``ladder`` is strongest first (:func:`candidate_ladder`).  Each try costs ``images_per_seed``
    images per seed (a ComfyUI seed renders a whole latent batch); the held-out seeds also cost
    their full-model references (``holdout_reference_images``, default the same count), paid once,
    before the first confirmation.  With ``confirm_only`` (a warm ``start`` from a prior,
    ``fragment.library.prior``), a pass at ``start`` goes straight to confirmation instead of probing
    stronger rungs; a fail there searches weaker, and its first pass ends the search.
    With ``confirm_in_batch`` the running audit of the batch confirms instead (see the module docstring); with
    ``judge_pick`` as well, the pick is first judged on ``calibration_seeds`` (a failure steps one rung weaker).
    ``cross_attn_gate`` (``Predictors.cross_attn_gate``) puts the cross-attention cache on every cut-off.

    >>> ladder = [Candidate({"heads": h}, level=h) for h in (0.5, 0.4, 0.3, 0.2, 0.1)]
    >>> fair = lambda c, seeds: Judgement(c.amount("heads") <= 0.3, slack=(0.3 - c.amount("heads")) / 0.3)
    >>> cal = calibrate(ladder, fair, calibration_seeds=[0, 1], holdout_seeds=[7], goal="memory")
    >>> cal.status, cal.chosen.label, [(t["phase"], t["candidate"]["heads"]) for t in cal.tries]
    ('passed', 'heads 30%', [('calibration', 0.2), ('calibration', 0.4), ('calibration', 0.3), ('holdout', 0.3)])
    >>> calibrate(ladder, lambda c, s: Judgement(False), calibration_seeds=[0], holdout_seeds=[1]).chosen is None
    True
    >>> warm = calibrate(ladder, fair, calibration_seeds=[0, 1], holdout_seeds=[7], goal="memory", start=3,
    ...                  confirm_only=True, confirm_in_batch=True)
    >>> warm.status, warm.chosen.label, warm.tries
    ('in_batch', 'heads 20%', [])
    >>> tried = calibrate(ladder, fair, calibration_seeds=[0, 1], holdout_seeds=[7], goal="memory", start=1,
    ...                   confirm_in_batch=True, judge_pick=True)
    >>> tried.chosen.label, tried.untried, [(t["phase"], t["candidate"]["heads"], t["passed"]) for t in tried.tries]
    ('heads 30%', False, [('pick', 0.4, False), ('pick', 0.3, True)])
    """
    goal_levers(goal)
    calibration_seeds, holdout_seeds = list(calibration_seeds), list(holdout_seeds)
    # a pick the batch confirms untried judges nothing: it may come with no profiled seeds (a prior's evidence)
    if (not calibration_seeds and (judge_pick or not confirm_in_batch)) or not holdout_seeds:
        raise FragmentError(f"calibration: expected calibration and held-out seeds, found {len(calibration_seeds)} "
                            f"and {len(holdout_seeds)}")
    if set(calibration_seeds) & set(holdout_seeds):
        raise FragmentError(f"calibration: held-out seeds must differ from the calibration seeds, found "
                            f"{sorted(set(calibration_seeds) & set(holdout_seeds))} in both")
    if not isinstance(images_per_seed, int) or images_per_seed < 1:
        raise FragmentError(f"calibration images_per_seed: expected an integer >= 1, found {images_per_seed!r}")
    reference_cost = len(holdout_seeds) * images_per_seed if holdout_reference_images is None else holdout_reference_images
    started = time.perf_counter()
    cal = Calibration(goal, None, "fallback_full_model", calibration_seeds, holdout_seeds, budget, judge_name,
                      warm_start=start if confirm_only and start is not None else None,
                      cfg_cutoffs=[float(c) for c in cfg_cutoffs] if goal in ("speed", "both") else [])
    results: dict[tuple[str, str], Judgement] = {}
    references_paid = False
    per_image_u: list[float] = []  # each try's cost per candidate image, in u
    refused = False  # a try was refused by the budget: the search ended on cost, not on the verdicts

    def estimate_u(images: int) -> float:
        """The next try's cost in u: the dearest image of the tries so far (a held-out try that also rendered
        references would pull a mean down), else ``budget.image_u``."""
        return images * (max(per_image_u) if per_image_u else budget.image_u)

    def attempt(candidate: Candidate, phase: str) -> Judgement | None:
        nonlocal references_paid, refused
        seeds = holdout_seeds if phase == "holdout" else calibration_seeds  # "pick": the judged pick's one try
        references = reference_cost if phase == "holdout" and not references_paid else 0
        cost = len(seeds) * images_per_seed + references
        if (phase, candidate.label) in results:
            return results[(phase, candidate.label)]
        estimate = estimate_u(len(seeds) * images_per_seed)
        if not budget.allows(cal.images, cost, time.perf_counter() - started, spent_u=cal.units, more_u=estimate):
            refused = True
            return None
        t0 = time.perf_counter()
        verdict = judge(candidate, seeds)
        seconds = time.perf_counter() - t0 if verdict.seconds is None else float(verdict.seconds)
        rendered = len(seeds) * images_per_seed if verdict.images is None else int(verdict.images)
        # The references are full-model images of seeds the user keeps: output, not overhead (one u each).
        units = (max(seconds - references * budget.unit_s, 0.0) / budget.unit_s if budget.unit_s
                 else rendered * budget.image_u)
        cal.images += rendered + references
        cal.units += units
        cal.delivered += references
        if rendered:
            per_image_u.append(units / rendered)
        references_paid = references_paid or phase == "holdout"
        results[(phase, candidate.label)] = verdict
        cal.tries.append({"phase": phase, "candidate": candidate.to_dict(), "seeds": list(seeds),
                          "passed": bool(verdict.passed), "reasons": list(verdict.reasons),
                          "slack": verdict.slack, "metrics": dict(verdict.metrics),
                          "images": rendered + references, "seconds": round(seconds, 4), "units": round(units, 4),
                          # what the budget expected before the try: the limit holds on estimates, so a try
                          # dearer than its estimate can end the calibration past the limit (units says by how much)
                          "estimate_u": round(estimate, 4)})
        log.info("calibration %s try %d: %s: %s%s", phase, len(cal.tries), candidate.label,
                 "pass" if verdict.passed else "fail", "" if verdict.passed else f" ({'; '.join(verdict.reasons)})")
        return verdict

    order = list(ladder)
    if confirm_in_batch:
        return _in_batch(cal, order, start, confirm_only, cfg_cutoffs, cross_attn_gate, started=started,
                         attempt=(lambda c: attempt(c, "pick")) if judge_pick else None)
    passing = _search(order, lambda i: attempt(order[i], "calibration"), start, confirm_only=confirm_only and start is not None)
    # Confirm on held-out seeds, strongest calibration pass first; a failure there steps one rung weaker.
    index = passing
    while index is not None and index < len(order):
        confirmed = attempt(order[index], "holdout")
        if confirmed is None:
            cal.reason = "budget spent before a held-out confirmation"
            break
        if confirmed.passed:
            cal.chosen, cal.status = order[index], "passed"
            break
        index += 1
        weaker = attempt(order[index], "calibration") if index < len(order) else None
        while weaker is not None and not weaker.passed and index + 1 < len(order):
            index += 1
            weaker = attempt(order[index], "calibration")
        if weaker is None or not weaker.passed:
            cal.reason = "no weaker candidate passed both seed sets within the budget"
            break
    if cal.chosen is None and not cal.reason:
        cal.reason = ("no lever candidate to try: none saves enough within a damage level" if not order
                      else "budget spent before the first try" if not cal.tries
                      else "budget spent before a candidate passed the calibration seeds" if passing is None and refused
                      else "no candidate passed the calibration seeds" if passing is None
                      else "budget spent before a candidate was confirmed")
    if goal in ("speed", "both"):
        def confirmable() -> bool:  # a cut-off is only worth its calibration try if its held-out try fits too
            both = (len(calibration_seeds) + len(holdout_seeds)) * images_per_seed
            return budget.allows(cal.images, both + (0 if references_paid else reference_cost), time.perf_counter() - started,
                                 spent_u=cal.units, more_u=estimate_u(both))

        # With no lever chosen (none passed, or none saves enough to offer) the cut-off is tried on the full
        # model: CFG truncation alone is a speed-up a user would otherwise get from a peer.
        base = cal.chosen or Candidate()
        truncated = _cfg_cutoff(base, cfg_cutoffs, attempt, confirmable, cross_attn_gate)
        if truncated is not base:
            cal.chosen, cal.status, cal.reason = truncated, "passed", ""
    cal.seconds = time.perf_counter() - started
    if cal.chosen is None and budget.units is not None and cal.reason.startswith("budget"):
        cal.reason += f" (the batch of {budget.batch} repays {budget.units:.1f} u at {budget.raw_ratio:.2f}x raw)"
    log.info("calibration (%s): %s after %d tries, %d images, %.2f u, %.1f s", goal,
             cal.chosen.label if cal.chosen else f"full model ({cal.reason})", len(cal.tries), cal.images, cal.units,
             cal.seconds)
    return cal


def _in_batch(cal: Calibration, order: Sequence[Candidate], start: int | None, warm: bool,
              cfg_cutoffs: Sequence[float], gate: float | None, *, started: float,
              attempt: Callable[[Candidate], Judgement | None] | None = None) -> Calibration:
    """``calibrate``'s choice when the running audit confirms in the batch (``confirm_in_batch``): no try, or with
    ``attempt`` (``judge_pick``) the pick judged on the calibration seeds, one rung weaker after each failure."""
    cal.in_batch = True
    pick: int | None = None
    if order and (start is None or start < len(order)):  # a start past the ladder: earlier prompts failed every rung
        pick = max(start, 0) if start is not None else cold_start(len(order))
    why = ("the prior's predicted rung" if warm and start is not None else
           "the cut-off alone (earlier prompts failed every rung)" if start is not None and pick is None else
           "the rung below the earlier prompts' failures" if start is not None else
           "the rung a cold search starts at (below the middle, likelier to pass)")
    cutoff = min(cfg_cutoffs) if cfg_cutoffs and cal.goal in ("speed", "both") else None
    if pick is None and cutoff is None:
        cal.reason = ("no lever candidate to try: none saves enough within a damage level" if not order
                      else "earlier prompts on this model configuration failed every rung and every cut-off")
    else:
        def at(i: int | None) -> Candidate:
            rung = order[i] if i is not None else Candidate()
            return truncate(rung, cutoff, gate) if cutoff is not None else rung

        cal.chosen, cal.status = at(pick), "in_batch"
        cal.reason = f"{why}, untried; the running audit confirms it in the batch"
        tries = 0
        while attempt is not None and tries < PICK_TRIES:
            verdict = attempt(cal.chosen)
            tries += 1
            if verdict is None:  # the budget refused it: this rung stays, untried, and the audit leads
                cal.reason = (f"{why}, untried (the budget refused its try on the profiled seeds)" if tries == 1 else
                              f"{why} failed on the profiled seeds; {cal.chosen.label} is untried (the budget refused "
                              f"its try)") + "; the running audit confirms it in the batch"
                break
            if verdict.passed:
                cal.reason = (f"{why}, passed on the profiled seeds" if tries == 1 else
                              f"{why} failed on the profiled seeds; {cal.chosen.label}, {tries - 1} rung(s) weaker, "
                              f"passed them") + "; the running audit confirms it in the batch"
                break
            if pick is None or pick + 1 >= len(order):  # nothing weaker to try: the full model
                cal.chosen, cal.status = None, "fallback_full_model"
                cal.reason = ("the cut-off alone failed its try on the profiled seeds" if pick is None
                              else "no rung passed its try on the profiled seeds")
                break
            pick += 1
            cal.chosen = at(pick)
        else:
            if attempt is not None:  # PICK_TRIES failures: the full model, not an untried rung after them
                cal.chosen, cal.status = None, "fallback_full_model"
                cal.reason = f"{PICK_TRIES} rungs failed their tries on the profiled seeds"
    cal.seconds = time.perf_counter() - started
    log.info("calibration (%s, confirmed in the batch): %s", cal.goal,
             cal.chosen.label if cal.chosen else f"full model ({cal.reason})")
    return cal


def _search(order: Sequence[Candidate], attempt: Callable[[int], Judgement | None], start: int | None,
            confirm_only: bool = False) -> int | None:
    """The index of the strongest rung known to pass (``None``: none), moving by fitted slack, else halving.

    Invariant: every rung weaker than a pass passes, every rung stronger than a fail fails (damage is
    monotone along the ladder), so the answer lies between the strongest fail and the weakest pass.
    """
    if not order:
        return None
    fail, ok = -1, len(order)  # fail: strongest known failing index; ok: strongest known passing (len: the full model)
    points: list[tuple[float, float]] = []  # (log level, slack)
    index = cold_start(len(order)) if start is None else min(max(start, 0), len(order) - 1)
    while True:
        verdict = attempt(index)
        if verdict is None:  # out of budget
            break
        if verdict.passed:
            ok = min(ok, index)
        else:
            fail = max(fail, index)
        if verdict.slack is not None and order[index].level > 0:
            points.append((math.log(order[index].level), float(verdict.slack)))
        if ok - fail <= 1 or (confirm_only and verdict.passed):
            break
        index = _next_index(order, fail, ok, points)
    return ok if ok < len(order) else None


def _next_index(order: Sequence[Candidate], fail: int, ok: int, points: list[tuple[float, float]]) -> int:
    low, high = fail + 1, ok - 1  # the untried interval, strongest to weakest
    if len(points) >= 2:
        (x0, y0), (x1, y1) = points[-2], points[-1]
        if x0 != x1 and y0 != y1:
            # where the slack line crosses a small positive margin: the strongest rung predicted to pass
            target = x1 + (0.05 - y1) * (x1 - x0) / (y1 - y0)
            predicted = [i for i in range(low, high + 1) if order[i].level > 0 and math.log(order[i].level) <= target]
            if predicted:
                return predicted[0]
            return high
    return (low + high + 1) // 2 if fail < 0 or ok >= len(order) else (low + high) // 2


def truncate(chosen: Candidate, cutoff: float, gate: float | None = None) -> Candidate:
    """``chosen`` with CFG off below ``cutoff`` and, with a predicted ``gate``, cross-attention cached below the
    lower of the two (T-GATE drops both at one step; the cache never starts while both passes still run).

    >>> truncate(Candidate(), 700.0, 750.0).label
    'CFG off below t=700 + cross-attention cached below t=700'
    >>> truncate(Candidate(), 700.0).label
    'CFG off below t=700'
    """
    levers: dict[str, Any] = {CfgCutoffLever.name: float(cutoff)}
    if gate is not None:
        levers[CrossAttnCacheLever.name] = float(min(cutoff, gate))
    return chosen.with_levers(**levers)


def _cfg_cutoff(chosen: Candidate, cutoffs: Sequence[float],
                attempt: Callable[[Candidate, str], Judgement | None], confirmable: Callable[[], bool],
                gate: float | None = None) -> Candidate:
    """The latest CFG cut-off that passes both seed sets on top of ``chosen`` (``chosen`` itself if none does),
    with the cross-attention cache below the predicted ``gate`` in the same try (:func:`truncate`).

    A cut-off is not tried when the budget left cannot also confirm it: a
    calibration pass that can never be confirmed is time the user pays for nothing.
    """
    for cutoff in sorted(cutoffs, reverse=True):
        if not confirmable():
            break
        candidate = truncate(chosen, cutoff, gate)
        first = attempt(candidate, "calibration")
        if first is None:
            break
        if not first.passed:
            continue
        second = attempt(candidate, "holdout")
        if second is None:
            break
        if second.passed:
            return candidate
    return chosen
