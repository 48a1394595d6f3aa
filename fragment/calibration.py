"""Calibration: the strongest combination of levers that the judge passes, confirmed on seeds it never chose with.

The judge step of the pipeline (profile, score, select, build, **judge**, record),
shared by FragmentExtractor, the demo and ``bench batch``.  Plain data in, plain
data out:

* :class:`Predictors` hold what the profile already measured: head scores,
  feed-forward channel scores, the per-step change of the deep features, and
  the weight error of the precision format and the low-bit weights' error
  (on the prompt's sampled layer inputs when the profile has them).  Each turns a lever amount into a
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
  top of the confirmed candidate, or on the full model when none was.

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
from ..profiling.step_change import ReuseDepth, reuse_steps_for_count
from .settings import ExtractionSettings

log = logging.getLogger(__name__)

GOALS = ("memory", "speed", "both")
# Damage levels of the ladder, strongest first: a lever at level d removes at most d of its measured importance.
DEFAULT_LEVELS = (0.6, 0.45, 0.35, 0.27, 0.2, 0.15, 0.11, 0.08, 0.06, 0.045, 0.03, 0.02)
HEAD_GRID = tuple(round(0.05 * i, 2) for i in range(0, 13))  # 0 .. 60 % of heads
FF_GRID = tuple(round(0.05 * i, 2) for i in range(0, 13))  # 0 .. 60 % of feed-forward channels
PRECISION_GRID = tuple(round(0.1 * i, 1) for i in range(0, 11))  # 0 .. 100 % of retained Linear parameters
LOW_BIT_GRID = tuple(round(0.1 * i, 1) for i in range(0, 11))  # 0 .. 100 % of Linear and Conv2d parameters
REUSE_GRID = tuple(round(0.05 * i, 2) for i in range(0, 17))  # 0 .. 80 % of steps
CFG_CUTOFFS = (500.0, 350.0, 200.0)
# Least share of a run's measured time a step-reuse candidate must save: the demo's `both` ladder otherwise
# added 15 % of the steps below skip 3, which bought 1.00x and cost 1 % of peak memory for the cache.
MIN_REUSE_SAVING = 0.1


@dataclass(frozen=True)
class Candidate:
    """One combination of levers: shares of heads, FF channels, low-bit and precision weights and steps, K/V fold
    and CFG cut-off.

    >>> Candidate(heads=0.2, ff_ratio=0.1, step_reuse=0.3).label
    'heads 20% + ff 10% + step reuse 30%'
    >>> Candidate().is_full_model
    True
    """

    heads: float = 0.0
    ff_ratio: float = 0.0
    kv_fold: bool = False
    precision_ratio: float = 0.0
    step_reuse: float = 0.0
    cfg_cutoff: float | None = None
    low_bit_ratio: float = 0.0
    reuse_skips: int | None = None  # the reuse depth in skip connections (None: the block depth)
    level: float = 0.0  # the predicted damage level the ladder built it at (0: not from the ladder)

    @property
    def is_full_model(self) -> bool:
        return not (self.heads or self.ff_ratio or self.kv_fold or self.low_bit_ratio or self.precision_ratio
                    or self.step_reuse or self.cfg_cutoff is not None)

    @property
    def label(self) -> str:
        parts = [f"heads {self.heads:.0%}"] if self.heads else []
        parts += ["kv-fold"] if self.kv_fold else []
        parts += [f"ff {self.ff_ratio:.0%}"] if self.ff_ratio else []
        parts += [f"low-bit {self.low_bit_ratio:.0%}"] if self.low_bit_ratio else []
        parts += [f"precision {self.precision_ratio:.0%}"] if self.precision_ratio else []
        depth = f" below skip {self.reuse_skips}" if self.reuse_skips is not None else ""
        parts += [f"step reuse {self.step_reuse:.0%}{depth}"] if self.step_reuse else []
        parts += [f"CFG off below t={self.cfg_cutoff:g}"] if self.cfg_cutoff is not None else []
        return " + ".join(parts) or "full model"

    def settings(self, base: ExtractionSettings = ExtractionSettings()) -> ExtractionSettings:
        """``base`` (strategy, scope, format, ...) with this candidate's amounts; the CFG cut-off is the schedule's.

        >>> Candidate(heads=0.1, precision_ratio=0.5).settings().label
        'heads 10% + fp8 50%'
        """
        return dataclasses.replace(base, strategy="ratio", amount=self.heads, ff_ratio=self.ff_ratio,
                                   kv_fold=self.kv_fold, precision_ratio=self.precision_ratio, step_reuse=self.step_reuse,
                                   low_bit_ratio=self.low_bit_ratio,
                                   reuse_skips=self.reuse_skips if self.step_reuse else None)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "label": self.label}


@dataclass(frozen=True)
class Predictors:
    """What the profile measured, as the predicted damage of each lever amount (the share of importance removed).

    ``head_scores``: ``score_profile(...).heads``; ``ff_scores``: ``FFProfiler.scores()``;
    ``step_changes``: ``StepChangeProbe.changes()``; ``precision_errors``: ``(parameters,
    relative error)`` per retained Linear (:func:`precision_errors`); ``low_bit_errors``: ``(parameters,
    relative error)`` per Linear and Conv2d (:func:`low_bit_errors`); ``kv_fold``: whether a
    context to fold is available; ``reuse_depths``: ``StepChangeProbe.depths()``, the finer
    cuts step reuse may choose among by what a reuse step still costs (with them,
    ``step_changes`` is not used).  A lever without its data is not offered.

    >>> p = Predictors(head_scores={"a": torch.tensor([1.0, 1.0, 2.0, 4.0])})
    >>> p.damage("heads", 0.25), p.damage("heads", 0.5)  # sqrt of 1/8 and 2/8 of the score mass
    (0.3535533905932738, 0.5)
    """

    head_scores: Mapping[str, torch.Tensor] | None = None
    ff_scores: Mapping[str, torch.Tensor] | None = None
    step_changes: Sequence[float | None] | None = None
    precision_errors: Sequence[tuple[int, float]] | None = None
    kv_fold: bool = False
    low_bit_errors: Sequence[tuple[int, float]] | None = None
    reuse_depths: Mapping[int, ReuseDepth] | None = None

    @property
    def depths(self) -> dict[int, ReuseDepth]:
        """The reuse depths with enough profiled steps and a counted cost."""
        return {k: d for k, d in (self.reuse_depths or {}).items() if d.cost is not None and len(d.changes) >= 3}

    def offers(self, lever: str) -> bool:
        data = {"heads": self.head_scores, "ff_ratio": self.ff_scores, "step_reuse": self.step_changes,
                "precision_ratio": self.precision_errors, "low_bit_ratio": self.low_bit_errors}
        if lever == "step_reuse":
            return bool(self.depths) or (bool(self.step_changes) and len(self.step_changes) >= 3)
        return bool(data.get(lever))

    def reuse_damage(self, skips: int, amount: float) -> float:
        """Predicted damage of reusing ``amount`` of the steps at depth ``skips`` (its drift budget)."""
        if amount <= 0:
            return 0.0
        return _reuse_damage(list(self.depths[skips].changes), amount)

    def damage(self, lever: str, amount: float) -> float:
        """Predicted share of ``lever``'s measured importance removed at ``amount``."""
        if amount <= 0:
            return 0.0
        # Every damage is a relative error: a removed share m of the output energy is an error of
        # norm sqrt(m); a replayed drift budget and a weight round-trip error already are relative errors.
        if lever == "heads":
            return math.sqrt(_removed_share(torch.cat([s.flatten().float() for s in self.head_scores.values()]), amount))
        if lever == "ff_ratio":  # the FF lever cuts the same share from every block
            shares = [_removed_share(s.flatten().float(), amount) for s in self.ff_scores.values()]
            return math.sqrt(sum(shares) / len(shares))
        if lever == "step_reuse":
            return _reuse_damage(list(self.step_changes), amount)
        if lever in ("precision_ratio", "low_bit_ratio"):  # the least-error layers first, as those levers pick them
            rows = sorted(self.precision_errors if lever == "precision_ratio" else self.low_bit_errors, key=lambda r: r[1])
            total = sum(n for n, _ in rows)
            budget, used, err, energy = amount * total + 1e-9, 0, 0.0, 0.0
            for n, e in rows:
                if used + n > budget:
                    continue
                used, err, energy = used + n, err + n * e, energy + e * e
            if lever == "low_bit_ratio":
                # int4 errors (~5 % per layer) compound through the network: independent errors of the
                # quantized layers add in energy.  The parameter-weighted mean (precision's model) put int4 on
                # every layer at damage 0.05 on the reference model, where the judge measured SSIM 0.54.
                return math.sqrt(energy)
            return err / total if total else 0.0
        raise FragmentError(f"calibration: unknown lever {lever!r}; expected heads, ff_ratio, step_reuse, "
                            "low_bit_ratio or precision_ratio")


def _reuse_damage(changes: list[float | None], amount: float) -> float:
    """The drift budget (the relative change the reused steps replay over) of reusing ``amount`` of the steps.

    A share that reuses no step (it rounds to none, or no run of steps fits) is no candidate: infinite damage,
    where a budget of 0 made it look free at every level (a "step reuse 5 %" fragment that was the full model).
    """
    steps, budget = reuse_steps_for_count(changes, int(amount * len(changes)))
    return float(budget) if steps else math.inf


def _removed_share(scores: torch.Tensor, share: float) -> float:
    """Share of the (non-negative) score mass in the lowest ``share`` of entries."""
    values = scores.clamp_min(0).sort().values
    count = int(share * values.numel())
    total = float(values.sum())
    return float(values[:count].sum()) / total if total > 0 else 0.0


def precision_errors(linears: Mapping[str, torch.nn.Linear], fmt: str) -> list[tuple[int, float]]:
    """``(parameters, relative round-trip error in fmt)`` per Linear: the precision lever's damage data.

    >>> precision_errors({"a": torch.nn.Linear(4, 4)}, "int8")[0][0]
    16
    """
    from .surgery.precision import relative_error

    return [(lin.weight.numel(), relative_error(lin.weight, fmt)) for lin in linears.values()]


def low_bit_errors(model: torch.nn.Module, stats: Mapping[str, Mapping[str, torch.Tensor]] | None = None, *,
                   bits: int = 4, group: int = 64) -> list[tuple[int, float]]:
    """``(parameters, relative low-bit error)`` per Linear and Conv2d: the low-bit lever's damage data.

    The error is the one the lever ranks by: the output error on the layer's sampled inputs when
    ``stats`` (``ActivationStats.stats()``) have them, else the round-trip weight error.

    >>> low_bit_errors(torch.nn.Sequential(torch.nn.Linear(64, 4)))[0][0]
    256
    """
    from .surgery.low_bit import quantizable_layers, quantization_error

    rows = []
    for path, layer in quantizable_layers(model).items():
        entry = (stats or {}).get(path) or {}
        a, x = entry.get("abs_mean"), entry.get("inputs")
        usable = a is not None and a.numel() == layer.weight.shape[1]
        rows.append((layer.weight.numel(), quantization_error(layer.weight, bits=bits, group=group,
                                                              act_abs_mean=a if usable else None,
                                                              inputs=x if usable else None)))
    return rows


def goal_levers(goal: str) -> tuple[str, ...]:
    """The levers a goal moves: ``memory`` (bytes), ``speed`` (time) or ``both``.

    Pruned heads and FF channels save bytes but little time (attention and feed-forward are a small
    share of a step: FF 10 % measured 0.97x on the reference model), and in a joint ladder they
    would spend the quality budget that step reuse turns into time, so ``speed`` leaves them out.

    >>> goal_levers("speed")
    ('step_reuse',)
    """
    if goal not in GOALS:
        raise FragmentError(f"calibration goal: expected one of {', '.join(GOALS)}, found {goal!r}")
    return {"memory": ("heads", "ff_ratio", "low_bit_ratio", "precision_ratio"), "speed": ("step_reuse",),
            "both": ("heads", "ff_ratio", "low_bit_ratio", "precision_ratio", "step_reuse")}[goal]


def lever_ladder(chosen: Candidate) -> list[tuple[str, Candidate]]:
    """The chosen candidate's levers added one at a time, for the bench's rows (the last row is ``chosen``).

    >>> [label for label, _ in lever_ladder(Candidate(heads=0.2, step_reuse=0.3, cfg_cutoff=350.0))]
    ['fragment: heads 20%', '+ step reuse 30%', '+ CFG off below t=350 (final)']
    """
    steps: list[tuple[str, Candidate]] = []
    current = Candidate()
    for name, value in (("heads", chosen.heads), ("kv_fold", chosen.kv_fold), ("ff_ratio", chosen.ff_ratio),
                        ("low_bit_ratio", chosen.low_bit_ratio), ("precision_ratio", chosen.precision_ratio),
                        ("step_reuse", chosen.step_reuse),
                        ("cfg_cutoff", chosen.cfg_cutoff)):
        if not value:
            continue
        before = current.label
        depth = {"reuse_skips": chosen.reuse_skips} if name == "step_reuse" else {}
        current = dataclasses.replace(current, **{name: value}, **depth)
        part = current.label if before == "full model" else current.label[len(before) + 3:]
        steps.append(((("fragment: " if not steps else "+ ") + part), current))
    if steps:
        steps[-1] = (steps[-1][0] + " (final)", steps[-1][1]) if len(steps) > 1 else steps[-1]
    return steps


GRIDS = {"heads": HEAD_GRID, "ff_ratio": FF_GRID, "precision_ratio": PRECISION_GRID, "step_reuse": REUSE_GRID,
         "low_bit_ratio": LOW_BIT_GRID}


def candidate_ladder(predictors: Predictors, goal: str = "both", levels: Sequence[float] = DEFAULT_LEVELS,
                     grids: Mapping[str, Sequence[float]] | None = None) -> list[Candidate]:
    """Candidates from strongest to weakest: each lever goes as far as its predicted damage stays within a level.

    Duplicates (levels where no lever moves) are dropped; the full model is not listed (it is the fallback).
    The K/V fold is exact for the folded prompt, so it is on at every level where it is offered and
    the goal counts bytes or time.

    >>> p = Predictors(head_scores={"a": torch.arange(1.0, 11.0)})
    >>> [c.heads for c in candidate_ladder(p, "memory", levels=(0.5, 0.3, 0.1))]
    [0.4, 0.2]
    """
    grids = {**GRIDS, **(grids or {})}
    levers = [lv for lv in goal_levers(goal) if predictors.offers(lv)]
    depths = predictors.depths if "step_reuse" in levers else {}
    # the damage of a grid amount does not depend on the level: predicted once per lever, read at every level
    damages = {lv: {a: predictors.damage(lv, a) for a in grids[lv]} for lv in levers if not (lv == "step_reuse" and depths)}
    depth_damages = {k: {a: predictors.reuse_damage(k, a) for a in grids["step_reuse"]} for k in depths}
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
            amounts["step_reuse"] = share
            skips = skips if share else None
        candidate = Candidate(kv_fold=predictors.kv_fold, level=float(level), reuse_skips=skips, **amounts)
        key = (*(amounts.get(lv, 0.0) for lv in GRIDS), skips)
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
    in which case the search halves instead of interpolating.
    """

    passed: bool
    metrics: Mapping[str, Any] = field(default_factory=dict)
    reasons: Sequence[str] = ()
    slack: float | None = None


Judge = Callable[[Candidate, Sequence[int]], Judgement]


@dataclass(frozen=True)
class Budget:
    """How much the calibration may spend: judged images (every seed of every try, plus the held-out
    full-model references) and, optionally, seconds.

    >>> Budget(images=40).allows(spent=32, more=8), Budget(images=40).allows(spent=33, more=8)
    (True, False)
    """

    images: int = 48
    seconds: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.images, int) or self.images < 1:
            raise FragmentError(f"calibration budget images: expected an integer >= 1, found {self.images!r}")
        if self.seconds is not None and not (math.isfinite(self.seconds) and self.seconds > 0):
            raise FragmentError(f"calibration budget seconds: expected a number > 0 or None, found {self.seconds!r}")

    def allows(self, spent: int, more: int, elapsed: float = 0.0) -> bool:
        return spent + more <= self.images and (self.seconds is None or elapsed < self.seconds)


@dataclass
class Calibration:
    """The outcome: the chosen candidate (``None``: the full model), every try, and what they cost."""

    goal: str
    chosen: Candidate | None
    status: str  # "passed" (confirmed on held-out seeds), or "fallback_full_model"
    calibration_seeds: list[int]
    holdout_seeds: list[int]
    budget: Budget
    judge: str
    tries: list[dict[str, Any]] = field(default_factory=list)
    images: int = 0
    seconds: float = 0.0
    reason: str = ""

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
            "method": "predicted ladder + slack search, confirmed on held-out seeds",
            "goal": self.goal, "judge": self.judge, "status": self.status,
            "fallback_full_model": self.chosen is None, "reason": self.reason,
            "chosen": self.chosen.to_dict() if self.chosen else None,
            "calibration_seeds": list(self.calibration_seeds), "holdout_seeds": list(self.holdout_seeds),
            "budget": {"images": self.budget.images, "seconds": self.budget.seconds},
            "cost": {"images": self.images, "seconds": round(self.seconds, 4)},
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
) -> Calibration:
    """The strongest candidate of ``ladder`` that passes ``judge`` on both seed sets, within ``budget``.

    ``ladder`` is strongest first (:func:`candidate_ladder`).  Each try costs ``images_per_seed``
    images per seed (a ComfyUI seed renders a whole latent batch); the held-out seeds also cost
    their full-model references (``holdout_reference_images``, default the same count), paid once,
    before the first confirmation.

    >>> ladder = [Candidate(heads=h, level=h) for h in (0.5, 0.4, 0.3, 0.2, 0.1)]
    >>> fair = lambda c, seeds: Judgement(c.heads <= 0.3, slack=(0.3 - c.heads) / 0.3)
    >>> cal = calibrate(ladder, fair, calibration_seeds=[0, 1], holdout_seeds=[7], goal="memory")
    >>> cal.status, cal.chosen.label, [(t["phase"], t["candidate"]["heads"]) for t in cal.tries]
    ('passed', 'heads 30%', [('calibration', 0.2), ('calibration', 0.4), ('calibration', 0.3), ('holdout', 0.3)])
    >>> calibrate(ladder, lambda c, s: Judgement(False), calibration_seeds=[0], holdout_seeds=[1]).chosen is None
    True
    """
    goal_levers(goal)
    calibration_seeds, holdout_seeds = list(calibration_seeds), list(holdout_seeds)
    if not calibration_seeds or not holdout_seeds:
        raise FragmentError(f"calibration: expected calibration and held-out seeds, found {len(calibration_seeds)} "
                            f"and {len(holdout_seeds)}")
    if set(calibration_seeds) & set(holdout_seeds):
        raise FragmentError(f"calibration: held-out seeds must differ from the calibration seeds, found "
                            f"{sorted(set(calibration_seeds) & set(holdout_seeds))} in both")
    if not isinstance(images_per_seed, int) or images_per_seed < 1:
        raise FragmentError(f"calibration images_per_seed: expected an integer >= 1, found {images_per_seed!r}")
    reference_cost = len(holdout_seeds) * images_per_seed if holdout_reference_images is None else holdout_reference_images
    started = time.perf_counter()
    cal = Calibration(goal, None, "fallback_full_model", calibration_seeds, holdout_seeds, budget, judge_name)
    results: dict[tuple[str, str], Judgement] = {}
    references_paid = False

    def attempt(candidate: Candidate, phase: str) -> Judgement | None:
        nonlocal references_paid
        seeds = calibration_seeds if phase == "calibration" else holdout_seeds
        cost = len(seeds) * images_per_seed + (reference_cost if phase == "holdout" and not references_paid else 0)
        if (phase, candidate.label) in results:
            return results[(phase, candidate.label)]
        if not budget.allows(cal.images, cost, time.perf_counter() - started):
            return None
        t0 = time.perf_counter()
        verdict = judge(candidate, seeds)
        seconds = time.perf_counter() - t0
        cal.images += cost
        references_paid = references_paid or phase == "holdout"
        results[(phase, candidate.label)] = verdict
        cal.tries.append({"phase": phase, "candidate": candidate.to_dict(), "seeds": list(seeds),
                          "passed": bool(verdict.passed), "reasons": list(verdict.reasons),
                          "slack": verdict.slack, "metrics": dict(verdict.metrics),
                          "images": cost, "seconds": round(seconds, 4)})
        log.info("calibration %s try %d: %s: %s%s", phase, len(cal.tries), candidate.label,
                 "pass" if verdict.passed else "fail", "" if verdict.passed else f" ({'; '.join(verdict.reasons)})")
        return verdict

    order = list(ladder)
    passing = _search(order, lambda i: attempt(order[i], "calibration"), start)
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
                      else "no candidate passed the calibration seeds" if passing is None
                      else "budget spent before a candidate was confirmed")
    if goal in ("speed", "both"):
        def confirmable() -> bool:  # a cut-off is only worth its calibration try if its held-out try fits too
            both = (len(calibration_seeds) + len(holdout_seeds)) * images_per_seed
            return budget.allows(cal.images, both + (0 if references_paid else reference_cost), time.perf_counter() - started)

        # With no lever chosen (none passed, or none saves enough to offer) the cut-off is tried on the full
        # model: CFG truncation alone is a speed-up a user would otherwise get from a peer.
        base = cal.chosen or Candidate()
        truncated = _cfg_cutoff(base, cfg_cutoffs, attempt, confirmable)
        if truncated is not base:
            cal.chosen, cal.status, cal.reason = truncated, "passed", ""
    cal.seconds = time.perf_counter() - started
    log.info("calibration (%s): %s after %d tries, %d images, %.1f s", goal,
             cal.chosen.label if cal.chosen else f"full model ({cal.reason})", len(cal.tries), cal.images, cal.seconds)
    return cal


def _search(order: Sequence[Candidate], attempt: Callable[[int], Judgement | None], start: int | None) -> int | None:
    """The index of the strongest rung known to pass (``None``: none), moving by fitted slack, else halving.

    Invariant: every rung weaker than a pass passes, every rung stronger than a fail fails (damage is
    monotone along the ladder), so the answer lies between the strongest fail and the weakest pass.
    """
    if not order:
        return None
    fail, ok = -1, len(order)  # fail: strongest known failing index; ok: strongest known passing (len: the full model)
    points: list[tuple[float, float]] = []  # (log level, slack)
    # no slack known yet: start below the middle, where a pass is likelier and teaches the fit as much
    index = (3 * len(order)) // 5 if start is None else min(max(start, 0), len(order) - 1)
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
        if ok - fail <= 1:
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


def _cfg_cutoff(chosen: Candidate, cutoffs: Sequence[float],
                attempt: Callable[[Candidate, str], Judgement | None], confirmable: Callable[[], bool]) -> Candidate:
    """The latest CFG cut-off that passes both seed sets on top of ``chosen`` (``chosen`` itself if none does).

    A cut-off is not tried when the budget left cannot also confirm it: a
    calibration pass that can never be confirmed is time the user pays for nothing.
    """
    for cutoff in sorted(cutoffs, reverse=True):
        if not confirmable():
            break
        candidate = dataclasses.replace(chosen, cfg_cutoff=float(cutoff))
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
