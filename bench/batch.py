"""The batch benchmark behind H4 and H5: stock sampling versus the calibrated fragment, in one run, costs counted.

For a target (the trained reference model, or a random-weight SD1.5 UNet at
small size) and the same sampler, steps, size and seeds, the user's batch is
``variants`` seeds: the profiled seeds, the held-out confirmation seeds, and
the rest.

1. stock: the full model generates the whole batch (timed): one stock image's
   seconds is the cost unit ``u`` (``metrics.costs``), measured in this run;
2. profile: the full model runs the profile seeds with ``HeadProfiler`` and
   the probes the goal's levers read attached (``fragment.levers.goal_evidence``;
   timed; these images are the user's first images and the calibration's
   reference: delivered, so only the hooks' extra time is overhead);
3. calibrate: ``fragment.extract.calibrated_fragment`` predicts a ladder of
   lever combinations from the profile and judges them on the profile seeds,
   then confirms the strongest pass on the held-out seeds, within what the
   batch can repay (``Budget.for_batch``).  The held-out references are
   full-model images of batch seeds: delivered too;
4. batch: each lever of the chosen fragment added in turn renders the seeds no
   full-model render delivered (:func:`batch_phase`, timed), judged against the
   stock images of the same seeds, which neither the profile nor the
   calibration saw.  The chosen fragment's own row is the user's batch as the
   pack makes it: with the running audit (:func:`audited_phase`,
   ``fragment.audit``) every k-th seed is also rendered by the full model (k
   from the cost model, ``audit_interval`` on ``audit_allowance``; ``audit_every=0`` turns it off; the
   stretches render ``AUDIT_BLOCK`` images at a time),
   the user keeps that full-model image (delivered), the fragment's image of
   the seed is judged against it, and an audit failure switches the rest of
   the batch to the full model;
5. paired timing (verification, not a user cost): stock and the chosen
   fragment render the same ``paired_seeds`` batch seeds back to back, in
   ``paired_units`` units of rotating order (``bench.paired``); the median
   per-unit ratio and its range sit beside the raw ratio, which a load that
   changed between stock's timing and the fragment's can move;
6. fresh check (verification, not a user cost): the chosen fragment against
   stock on ``fresh_seeds`` seeds that nothing above saw.

The raw ratio is stock time / fragment time per image.  The amortized figures
come from the ``CostLedger``: N stock images against the pack's overhead (in u)
+ the delivered full-model images + the fragment's images for the rest.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn as nn

from ..fragment.audit import AUDIT_BLOCK, FULL, AuditedBatch, AuditRule, planned_audit_every
from ..fragment.build import describe_base
from ..fragment.calibration import GOALS, Budget, lever_ladder
from ..fragment.extract import calibrated_fragment, candidate_fragment
from ..fragment.levers import goal_evidence
from ..fragment.library.prior import PriorPlace, prior_evidence, record_audit
from ..fragment.schedule.apply import apply_schedule, fragment_schedule
from ..fragment.schedule.state import ScheduleState
from ..judge.audited_run import render_audited
from ..judge.fragment_judge import fragment_judge, prepared_render, render, stack
from ..errors import FragmentError
from ..metrics.costs import CostLedger, amortized_ratio, break_even_images, cost_line
from ..metrics.memory import peak_memory, peak_memory_metrics
from ..metrics.performance import AMORTIZED_NS, synchronize
from ..profiling.evidence import ProfileEvidence
from ..profiling.session import profiled
from . import BENCH_BUDGET_IMAGES
from .overhead import profiling_overhead
from .paired import paired_timing
from .weights import resident_bytes

log = logging.getLogger(__name__)


class BenchTarget(Protocol):
    """What the bench needs from a model: its UNet, a sampler, and a quality judge."""

    name: str
    unet: nn.Module
    steps: int

    def run(self, unet: nn.Module, seeds: Sequence[int], *, state: ScheduleState | None = None,
            cfg_cutoff: float | None = None) -> Any: ...

    def judge(self, full: Any, images: Any) -> tuple[bool, dict[str, Any]]: ...

    def describe(self) -> dict[str, Any]: ...


#: How the chosen setting is confirmed: judged held-out seeds before the batch, or the batch's running audit.
CONFIRMS = ("judge", "batch")


@dataclass(frozen=True)
class BenchConfig:
    variants: int = 32
    profile_seeds: int = 8
    holdout_seeds: int = 4  # the calibration's confirmation seeds: not profiled, but seeds of the batch (delivered)
    goal: str = "speed"
    budget_images: int = BENCH_BUDGET_IMAGES
    shallow: int = 1
    first_variant_seed: int = 10_000  # the seeds only the fragment renders: the quality rows are on them
    first_holdout_seed: int = 20_000
    budget_batch: int | None = None  # the batch whose savings must repay the calibration (None: variants)
    fresh_seeds: int = 64  # the fresh-seed check: seeds neither the calibration nor the batch saw (0: not run)
    first_fresh_seed: int = 30_000
    audit_every: int | None = None  # the running audit: every k-th batch image (None: k from the cost model; 0: off)
    paired_units: int = 3  # paired timing of stock vs the chosen fragment: units (0: not run)
    paired_seeds: int = 4  # the batch seeds each paired unit renders with both
    # "judge": judged tries, confirmed on held-out seeds; "batch": no try, the running audit confirms (see
    # fragment.calibration's module docstring)
    confirm: str = "judge"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.goal not in GOALS:
            raise ValueError(f"bench config goal: expected one of {', '.join(GOALS)}, found {self.goal!r}")
        if self.variants <= self.profile_seeds + self.holdout_seeds:
            raise FragmentError(f"bench config variants: expected more than the profiled + held-out seeds "
                                f"({self.profile_seeds} + {self.holdout_seeds}), which are seeds of the batch; "
                                f"found {self.variants}")
        if self.fresh_seeds < 0:
            raise FragmentError(f"bench config fresh_seeds: expected an integer >= 0, found {self.fresh_seeds}")
        if self.audit_every is not None and (not isinstance(self.audit_every, int) or self.audit_every < 0):
            raise FragmentError(f"bench config audit_every: expected None (from the cost model) or an integer >= 0 "
                                f"(0: no audit), found {self.audit_every!r}")
        if self.confirm not in CONFIRMS:
            raise FragmentError(f"bench config confirm: expected one of {', '.join(CONFIRMS)}, found {self.confirm!r}")
        if self.confirm == "batch" and self.audit_every == 0:
            raise FragmentError("bench config: confirm 'batch' moves the confirmation into the running audit; expected "
                                "an audit (audit_every None or >= 1), found audit_every 0")
        for name in ("paired_units", "paired_seeds"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "paired_seeds" else 0):
                raise FragmentError(f"bench config {name}: expected an integer >= "
                                    f"{1 if name == 'paired_seeds' else '0 (0: no paired timing)'}, found {value!r}")


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    synchronize(device)
    started = time.perf_counter()
    with torch.no_grad():
        out = fn()
    synchronize(device)
    return out, time.perf_counter() - started


@dataclass
class BatchRun:
    """What a batch run leaves besides its JSON report, for benches that compare more methods on the same run.

    ``stock`` are the full model's images of ``variants`` (the whole batch: profiled, held-out and
    ``rendered`` seeds, in that order; the reference every row is judged against); ``rendered`` are
    the seeds no full-model render delivered, which the fragment renders;
    ``judge_fragment``, ``evidence`` (the profile and what the probes measured) and ``base`` let a caller
    build and judge other fragments of the same profile, as the calibration did.  A run planned from a prior
    (``evidence.source`` "prior") has no profiled seeds, and its ``judge_fragment`` refuses: nothing to judge against.
    """

    stock: Any
    variants: list[int]
    profile_seeds: list[int]
    holdout_seeds: list[int]
    evidence: ProfileEvidence
    base: dict[str, Any]
    judge_fragment: Callable[..., Any]
    chosen: Any  # the calibration's Candidate, or None when the full model was chosen
    rendered: list[int] = field(default_factory=list)
    ledger: CostLedger | None = None
    audit: AuditedBatch | None = None  # the chosen fragment's batch with the running audit (None: no audit)


def batch_phase(target: BenchTarget, fragment: Any, seeds: Sequence[int], device: torch.device) -> tuple[Any, list[int], float]:
    """The batch's own images: ``fragment`` renders ``seeds`` (the batch less its delivered full-model seeds);
    its images, the steps it reused, and the seconds.  One function, so that an audit can wrap it.

    >>> images, reused, seconds = batch_phase(target, fragment, [10_012, 10_013], torch.device("cpu"))  # doctest: +SKIP
    """
    (images, applied), seconds = timed(lambda: render(target.unet, fragment, seeds, target.run), device)
    return images, applied, seconds


def audited_phase(target: BenchTarget, fragments: Sequence[Any], seeds: Sequence[int], device: torch.device, every: int,
                  rule: AuditRule | None = None, lead: int = 0) -> tuple[AuditedBatch, dict[str, Any]]:
    """The user's batch with the running audit: ``fragments[0]`` renders ``seeds``, every ``every``-th seed is also
    rendered by the full model and judged (``judge.audited_run.render_audited``); a failed audit moves to the next
    fragment, then to the full model.  Returns the batch and its timings: ``fragment_s``/``fragment_images`` (every
    fragment render, the audited seeds' included), ``full_s``/``full_images`` (the full model's renders: delivered),
    ``audited`` and ``judge_s`` (the rest of the wall time: the audits' comparisons).

    >>> batch, t = audited_phase(target, [chosen], range(10_000, 10_020), torch.device("cpu"), every=8)  # doctest: +SKIP
    >>> batch.summary(), t["audited"]  # doctest: +SKIP
    ('audited 3 of 20: 3 passed', 3)
    """
    pending: list[float] = []
    spent = {"fragment": [0.0, 0], "full": [0.0, 0]}
    reused: list[int] = []  # the steps the last fragment render really reused (its schedule's state says)

    def run(model: nn.Module, group: Sequence[int], **kwargs: Any) -> Any:
        out, seconds = timed(lambda: target.run(model, list(group), **kwargs), device)
        pending.append(seconds)
        if kwargs.get("state") is not None:
            reused[:] = kwargs["state"].reused_steps()
        return out

    def on_render(what: str, count: int) -> None:  # called right after each run: its seconds are the last pending
        spent[what][0] += pending.pop() if pending else 0.0
        spent[what][1] += count

    synchronize(device)
    started = time.perf_counter()
    # a lead (an untried pick) is also judged as one sample: the gate on its images' means
    batch = render_audited(target.unet, run, target.judge, list(fragments), list(seeds), every=every, rule=rule,
                           on_render=on_render, block=AUDIT_BLOCK, lead=lead, lead_means=bool(lead))
    synchronize(device)
    wall = time.perf_counter() - started
    (frag_s, frag_n), (full_s, full_n) = spent["fragment"], spent["full"]
    return batch, {"fragment_s": frag_s, "fragment_images": frag_n, "full_s": full_s, "full_images": full_n,
                   "audited": len(batch.records), "judge_s": max(wall - frag_s - full_s, 0.0), "wall_s": wall,
                   "reused_steps": list(reused)}


def chosen_audit_every(config: BenchConfig, cal: Any, images: int, lead: int = 0) -> int:
    """The running audit's interval for a batch of ``images`` fragment images: ``config.audit_every`` when set, else
    ``fragment.audit.audit_interval`` from the cost model: the raw ratio the calibration budgeted with, and what is
    left of what the batch can repay after the profile, the build and the calibration (``Budget.units`` less the
    calibration's own u), at most ``AUDIT_SHARE`` of the batch's saving (``fragment.audit.audit_allowance``).
    0 when the calibration chose the full model.  With a ``lead`` (the first images all audited, already the fewest
    that can switch) the interval is the one after the lead, for the audits the allowance still pays for (the
    whole batch when none: the lead alone).

    >>> chosen_audit_every(BenchConfig(audit_every=0), None, 20)
    0
    """
    if config.audit_every is not None:
        return config.audit_every
    if cal is None or cal.chosen is None:
        return 0
    left = max((cal.budget.units or 0.0) - cal.units, 0.0)
    return planned_audit_every(cal.budget.raw_ratio, images, lead=lead, left_u=left)


def fresh_check(target: BenchTarget, fragment: Any, seeds: Sequence[int]) -> dict[str, Any]:
    """The chosen fragment judged against stock on ``seeds`` that neither the calibration nor the batch saw.
    Verification, not a user cost: the ledger does not count it.

    >>> fresh_check(target, fragment, range(30_000, 30_064))["passes_gate"]  # doctest: +SKIP
    True
    """
    with torch.no_grad():
        stock = target.run(target.unet, list(seeds))
    images, _ = render(target.unet, fragment, seeds, target.run)
    ok, quality = target.judge(stock, images)
    return {"seeds": len(seeds), "first_seed": seeds[0], "passes_gate": ok, **quality}


def timing_seeds(rendered: Sequence[int], judged: Sequence[int], count: int) -> list[int]:
    """The first ``count`` of the ``rendered`` batch seeds that are not ``judged`` (profiled or held out): paired
    timing renders them with stock and each method.

    Not the judged seeds: a target records the full model's states of those (``watch``), which would count as
    stock time.

    >>> timing_seeds([20_000, 10_000, 10_001, 10_002], [0, 1, 20_000], 2)
    [10000, 10001]
    """
    skip = set(judged)
    return [s for s in rendered if s not in skip][:count]


def paired_phase(target: BenchTarget, fragment: Any, seeds: Sequence[int], device: torch.device,
                 units: int) -> dict[str, Any]:
    """Stock and ``fragment`` timed in ``units`` paired units on the same ``seeds`` (``bench.paired.paired_timing``).

    The fragment model is built once, before the units: the figure is its renders', as a batch renders many images
    on one build.  Returns ``raw_ratio`` (the median of the per-unit ratios stock / fragment), ``range``
    (``[min, max]``), ``ratios``, ``units``, ``seeds_per_unit``, ``first_seed``, ``seconds`` and ``order``.

    >>> paired_phase(target, fragment, [10_000, 10_001, 10_002, 10_003], torch.device("cpu"), 3)["range"]  # doctest: +SKIP
    [1.48, 1.61]
    """
    seeds = list(seeds)
    t = paired_timing({"stock": lambda: target.run(target.unet, seeds),
                       "fragment": prepared_render(target.unet, fragment, seeds, target.run)},
                      units, sync=lambda: synchronize(device))
    return {"raw_ratio": t["median"]["fragment"], "range": t["range"]["fragment"], "ratios": t["ratios"]["fragment"],
            "units": units, "seeds_per_unit": len(seeds), "first_seed": seeds[0], "seconds": t["seconds"],
            "order": t["order"]}


def ledger_amortized(ledger: CostLedger, raw_ratio: float, ns: Sequence[int] = AMORTIZED_NS) -> dict[str, Any]:
    """The amortized table from the ledger: per N, stock u against the pack's u (overhead + delivered + the rest
    at ``raw_ratio``), their seconds, the ratio; the break-even batch.

    >>> ledger = CostLedger(0.5); ledger.add("judged", 2.0, images=8)
    >>> r = ledger_amortized(ledger, 2.0, ns=(8, 32)); [row["amortized_ratio"] for row in r["rows"]], r["break_even_images"]
    ([1.0, 1.6], 8)
    """
    u, d = ledger.overhead_u, ledger.delivered
    rows = []
    for n in ns:
        pack_u = u + min(d, n) + max(n - d, 0) / raw_ratio
        rows.append({"n": n, "stock_u": float(n), "pack_u": pack_u, "stock_s": n * ledger.unit_s,
                     "pack_s": pack_u * ledger.unit_s, "amortized_ratio": amortized_ratio(u, raw_ratio, n, d)})
    even = break_even_images(u, raw_ratio, d)
    return {"rows": rows, "raw_ratio": raw_ratio, "overhead_u": u, "overhead_s": ledger.overhead_s, "delivered": d,
            "unit_s": ledger.unit_s, "break_even_images": even, "profiled_images": None,
            "verdict": "never: the fragment is not faster than stock" if even is None else f"pays back from image {even}"}


def bench_batch(target: BenchTarget, config: BenchConfig = BenchConfig(), *,
                prior: PriorPlace | None = None) -> dict[str, Any]:
    """Run the benchmark on ``target``; a JSON-ready report (see ``format_batch_report``).

    >>> report = bench_batch(RandomSDTarget(size=8, steps=4), BenchConfig(variants=6, profile_seeds=2, holdout_seeds=1))  # doctest: +SKIP
    >>> sorted(report["rows"][0])  # doctest: +SKIP
    ['label', 'quality', 'resident_unet_bytes', 's_per_image', 'seconds', 'speedup']
    """
    return run_batch(target, config, prior=prior)[0]


def run_batch(target: BenchTarget, config: BenchConfig = BenchConfig(), *,
              prior: PriorPlace | None = None) -> tuple[dict[str, Any], BatchRun]:
    """``bench_batch``'s report and the run behind it (stock images, profile, judge: see ``BatchRun``).

    With ``prior`` (``fragment.library.prior.PriorPlace``) the calibration starts from that model configuration's
    prior (warm when it predicts a rung, else cold) and records its tries into it; the report's
    ``calibration.start`` says which.

    >>> report, run = run_batch(RandomSDTarget(size=8, steps=4), BenchConfig(variants=6, profile_seeds=2, holdout_seeds=1))  # doctest: +SKIP
    >>> len(run.stock) == report["variants"]  # doctest: +SKIP
    True
    """
    unet = target.unet
    device = next(unet.parameters()).device
    # No profile: a pick the running audit confirms (confirm "batch") plans from the prior's curves when an earlier
    # prompt's profile left every measurement the goal's levers read (``Prior.evidence``); the batch then has no
    # profiled seed (decided before the seeds, so stock renders the same batch)
    planned = (prior_evidence(prior.directory, prior.key, goal_evidence(config.goal))
               if prior is not None and config.confirm == "batch" else None)
    profile_seeds = list(range(config.profile_seeds)) if planned is None else []
    holdout = list(range(config.first_holdout_seed, config.first_holdout_seed + config.holdout_seeds))
    rest = config.variants - len(profile_seeds) - len(holdout)
    variants = profile_seeds + holdout + list(range(config.first_variant_seed, config.first_variant_seed + rest))
    target.run(unet, variants[:1])  # warm-up: the first call pays for allocation, not the model

    stock, stock_s = timed(lambda: target.run(unet, variants), device)
    ledger = CostLedger(unit_s=stock_s / len(variants))  # u: one stock image, measured beside stock in this run

    if hasattr(target, "watch"):  # record the full model's per-step states of the judged seeds (branched renders)
        target.watch(profile_seeds + holdout)
    overhead = None
    started = time.perf_counter()
    if planned is None:
        # only the probes the goal's levers read (fragment.levers.goal_evidence)
        with profiled(unet, goal_evidence(config.goal), buckets=4, shallow=config.shallow) as (prof, probes):
            prof.begin_sample("profile")  # one batched run: the bench needs scores, not rank stability
            with torch.no_grad():
                reference = target.run(unet, profile_seeds)
        profile_s = time.perf_counter() - started
        ledger.add("profile_hooks", profile_s, images=len(profile_seeds), delivered=len(profile_seeds))
        # What the hooks cost on the profile seeds (issue #15: <= 50 %), timed apart so profile_s stays one run.
        overhead = profiling_overhead(unet, lambda head: target.run(unet, profile_seeds), buckets=4,
                                      shallow=config.shallow, warmup=False)
        started = time.perf_counter()
        evidence = ProfileEvidence.from_probes(prof.result(), probes)
        judge_fragment = (target.fragment_judge(profile_seeds, reference) if hasattr(target, "fragment_judge")
                          else fragment_judge(unet, target.run, target.judge, profile_seeds, reference))  # branch + stop
    else:
        profile_s, evidence = 0.0, planned
        judge_fragment = _no_references
    base = describe_base(unet, target.name, sha256="0" * 64, hash_kind="none")
    build_s = time.perf_counter() - started
    ledger.add("build", build_s)

    # The budget is what the batch can repay, less what profiling and building already cost.
    budget = Budget.for_batch(config.budget_batch or len(variants), delivered=len(profile_seeds) + len(holdout), spent_u=ledger.overhead_u,
                              unit_s=ledger.unit_s, images=config.budget_images)
    started = time.perf_counter()
    chosen_fragment, cal = calibrated_fragment(
        evidence, unet, judge_fragment, base=base, name=f"bench-{target.name}", calibration_seeds=profile_seeds,
        holdout_seeds=holdout, goal=config.goal, budget=budget,
        judge_name=target.describe().get("judge", "target judge"), prior=prior,
        confirm_in_batch=config.confirm == "batch")
    calibrate_s = time.perf_counter() - started
    ledger.add("judged", calibrate_s, images=cal.images, delivered=cal.delivered)
    # Held-out seeds that no confirmation rendered are not delivered: the batch renders them.
    delivered = profile_seeds + (holdout if cal.delivered else [])
    rendered = [s for s in variants if s not in delivered]
    index = {s: i for i, s in enumerate(variants)}
    stock_rendered = stock[[index[s] for s in rendered]]  # numpy images or latent tensors: both index by a list

    rows = [{"label": "stock (full model)", "seconds": stock_s, "s_per_image": stock_s / len(variants), "speedup": 1.0,
             "quality": None, "resident_unet_bytes": resident_bytes(unet)}]
    applied: list[int] = []
    ladder = lever_ladder(cal.chosen) if cal.chosen else []
    # a setting no judged try confirmed meets its confirmation first: the rule's fewest audits lead the batch
    lead = AuditRule().min_audits if cal.untried else 0
    every = chosen_audit_every(config, cal, len(rendered), lead)
    audit: AuditedBatch | None = None
    for i, (label, candidate) in enumerate(ladder):
        fragment = candidate_fragment(evidence, unet, candidate, base=base, name="row")
        if i == len(ladder) - 1 and every > 0:
            # the user's batch: the chosen fragment (built as the calibration saved it) with the running audit
            audit, at = audited_phase(target, [chosen_fragment], rendered, device, every, lead=lead)
            kept = [j for j, s in enumerate(audit.setting) if s != FULL]  # the fragment's images the user keeps
            seconds, count = at["fragment_s"], at["fragment_images"]
            # an audited seed's full-model image is output (delivered); its fragment render and the comparison are
            # the audit's cost: one ledger entry, whose overhead is its seconds less one u per delivered image
            waste_s = at["fragment_s"] / max(at["fragment_images"], 1) * at["audited"]
            ledger.add("audit", at["full_s"] + waste_s + at["judge_s"], images=at["full_images"] + at["audited"],
                       delivered=at["full_images"])
            ok, quality = (target.judge(stock_rendered[kept], stack([audit.images[j] for j in kept])) if kept
                           else (None, None))
            applied = at["reused_steps"]
            if prior is not None:  # the audit's verdict is a judged try: the next prompt starts from it
                record_audit(prior, cal.chosen, audit, cal.judge)
        else:
            images, applied, seconds = batch_phase(target, fragment, rendered, device)
            count = len(rendered)
            ok, quality = target.judge(stock_rendered, images)
        per_image = seconds / count if count else None
        rows.append({"label": label, "candidate": candidate.to_dict(), "seconds": seconds, "images": count,
                     "s_per_image": per_image, "speedup": rows[0]["s_per_image"] / per_image if per_image else None,
                     "quality": None if quality is None else {**quality, "passes_gate": ok},
                     "schedule": fragment_schedule(fragment).to_manifest(),
                     "resident_unet_bytes": resident_bytes(apply_schedule(unet, fragment)[0])})
    if not cal.chosen:
        log.info("calibration chose the full model (%s): the bench has no fragment row", cal.reason)
    best = rows[-1]
    raw = best["speedup"] or 1.0
    paired = None
    if chosen_fragment is not None and config.paired_units:
        seeds = timing_seeds(rendered, profile_seeds + holdout, config.paired_seeds)
        paired = paired_phase(target, chosen_fragment, seeds, device, config.paired_units)
    fresh = None
    if chosen_fragment is not None and config.fresh_seeds:
        fresh = fresh_check(target, chosen_fragment, list(range(config.first_fresh_seed,
                                                                config.first_fresh_seed + config.fresh_seeds)))
    memory = batch_peak_memory(target, variants, chosen_fragment, device)
    costs = ledger_amortized(ledger, raw)
    at = {row["n"]: row for row in costs["rows"]}
    report = {
        "target": target.describe(), "device": str(device), "variants": len(variants), "steps": target.steps,
        "profile_seeds": len(profile_seeds), "delivered_seeds": delivered, "rendered_seeds": len(rendered),
        # "prior": the prior's curves stood in for a profile (no profiled seed, no hooks)
        "profile_source": "profile" if planned is None else "prior",
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "extra"},
        "timing_s": {"stock": stock_s, "profile": profile_s, "build": build_s, "calibrate": calibrate_s},
        "rows": rows, "throughput_ratio": best["speedup"], "paired": paired, "amortized": costs,
        "amortized_ratio_32": at.get(32, {}).get("amortized_ratio"), "break_even_images": costs["break_even_images"],
        "costs": ledger.record(raw_ratio=raw, n=32), "cost_line": cost_line(ledger, raw, 32),
        "calibration": cal.record(), "chosen": cal.chosen.to_dict() if cal.chosen else None,
        "schedule": best.get("schedule"), "reused_steps_applied": applied,
        "fragment_passes_gate_on_fresh_seeds": best["quality"]["passes_gate"] if best["quality"] else None,
        "fresh_check": fresh,
        "manifest_quality": chosen_fragment.manifest["quality"] if chosen_fragment else None,
        "profiling_overhead": overhead, "peak_memory": memory,
        "audit": None if audit is None else {**audit.record(), "every": every}, "audit_every": every,
        "audit_summary": audit.summary() if audit is not None else ("off (--audit-every 0)" if config.audit_every == 0
                                                                     else "no audit (batch too small or no fragment)"),
        "prior": None if prior is None else {"key": prior.key.to_dict(), "directory": str(prior.directory)},
    }
    return report, BatchRun(stock=stock, variants=variants, profile_seeds=profile_seeds, holdout_seeds=holdout,
                            evidence=evidence, base=base, judge_fragment=judge_fragment, chosen=cal.chosen,
                            rendered=rendered, ledger=ledger, audit=audit)


def _no_references(fragment: Any, seeds: Sequence[int]) -> Any:
    """The judge of a calibration planned from a prior: it has no profiled images to judge against, and a pick the
    batch confirms never calls it (``calibrated_fragment`` refuses a judged try on a prior's evidence)."""
    raise FragmentError(f"bench batch: fragment {getattr(fragment, 'name', '?')!r}: no profiled full-model images to "
                        f"judge seeds {list(seeds)} against (the ladder was planned from the prior's curves)")


def batch_peak_memory(target: BenchTarget, seeds: Sequence[int], fragment: Any, device: torch.device) -> dict[str, Any]:
    """Peak memory of one batch (``seeds``) and of its largest sampler step, stock and with ``fragment`` (or None).

    A run of its own per model, after the timed ones: the tracker's bookkeeping costs time.  ``peak_tensor_bytes``
    on any device; ``peak_vram_bytes`` too on CUDA (``metrics.memory.peak_memory``).

    >>> batch_peak_memory(RandomSDTarget(size=8, steps=2), [0, 1], None, torch.device("cpu"))["full"]["step"]["calls"]  # doctest: +SKIP
    2
    """
    runs: dict[str, tuple[nn.Module, dict[str, Any]]] = {"full": (target.unet, {})}
    if fragment is not None:
        small, state = apply_schedule(target.unet, fragment)
        runs["fragment"] = (small, {"state": state, "cfg_cutoff": fragment_schedule(fragment).cfg_cutoff})
    measured: dict[str, dict[str, Any]] = {}
    for label, (model, kwargs) in runs.items():
        with torch.no_grad():
            batch = peak_memory(lambda: target.run(model, list(seeds), **kwargs), [model], device=device, step_module=model)
        measured[label] = {"step": batch.pop("step"), "batch": batch}
    return {**measured, "batch_images": len(seeds), "metrics": peak_memory_metrics(measured)}


def format_batch_report(report: dict[str, Any]) -> str:
    """A short fixed-width table: seconds per image, ratio and quality per lever, then the costs the user pays.

    >>> r = {"target": {"name": "x"}, "device": "cpu", "variants": 2, "steps": 4, "rows": [
    ...     {"label": "stock", "s_per_image": 2.0, "speedup": 1.0, "quality": None}], "throughput_ratio": 1.0,
    ...     "amortized": {"rows": [{"n": 8, "stock_u": 8.0, "pack_u": 10.0, "stock_s": 16.0, "pack_s": 20.0,
    ...                             "amortized_ratio": 0.8}], "verdict": "never: the fragment is not faster than stock",
    ...                   "unit_s": 2.0, "delivered": 1, "overhead_u": 2.0},
    ...     "cost_line": "spent 2.0 u (4.0 s), never pays back (the fragment is not faster) at 1.00x raw; ...",
    ...     "calibration": {"status": "fallback_full_model", "reason": "nothing passed", "chosen": None,
    ...                     "cost": {"images": 8, "seconds": 1.0}, "tries": []},
    ...     "timing_s": {"profile": 1, "build": 0, "calibrate": 1}}
    >>> print(format_batch_report(r).splitlines()[2])
    stock                                           2.000    1.00x  -
    """
    lines = [f"batch bench: {report['target']['name']} on {report['device']}, {report['variants']} variants x {report['steps']} steps",
             f"{'configuration':<44}{'s/image':>9}{'ratio':>9}  quality vs stock (same fresh seeds)"]
    for row in report["rows"]:
        q = row["quality"]
        text = "-" if not q else ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in q.items()
                                           if k != "gate_failures" or v)
        per, ratio = row["s_per_image"], row["speedup"]
        lines.append(f"{row['label']:<44}" + (f"{per:>9.3f}" if per is not None else f"{'n/a':>9}")
                     + (f"{ratio:>8.2f}x" if ratio is not None else f"{'n/a':>9}") + f"  {text}")
    cal, t = report["calibration"], report["timing_s"]
    chosen = cal["chosen"]["label"] if cal["chosen"] else f"the full model ({cal['reason']})"
    start = f", {cal['start']}" if cal.get("start") else ""
    lines.append(f"calibration ({cal['status']}{start}): {chosen}; {len(cal['tries'])} tries, {cal['cost']['images']} images, "
                 f"{cal['cost']['seconds']:.1f} s")
    if "audit_summary" in report:
        every = report.get("audit_every") or 0
        lines.append(f"running audit{f' (1 in {every} batch images, from the first)' if every else ''}: "
                     f"{report['audit_summary']}")
    if report.get("profile_source") == "prior":
        lines.append("profile: none; the ladder was planned from the prior's curves (earlier prompts' profiles)")
    if report.get("profiling_overhead"):
        o = report["profiling_overhead"]
        lines.append(f"profiling overhead on the profile seeds: {o['base_s']:.2f} s -> {o['profiled_s']:.2f} s "
                     f"(+{o['overhead_pct']:.0f} %)")
    paired = report.get("paired")
    paired_text = "" if not paired else (
        f" (paired: {paired['raw_ratio']:.2f}x, the median of {paired['units']} units of {paired['seeds_per_unit']} "
        f"seeds, range {paired['range'][0]:.2f}-{paired['range'][1]:.2f}x)")
    lines.append(f"raw throughput ratio {report['throughput_ratio']:.2f}x{paired_text}; profile {t['profile']:.1f} s + "
                 f"build {t['build']:.1f} s + calibrate {t['calibrate']:.1f} s")
    amortized = report["amortized"]
    lines.append(f"costs: {report['cost_line']}")
    lines.append(f"amortized (u = {amortized['unit_s']:.3f} s, one stock image; {amortized['delivered']} full-model "
                 f"images delivered as batch images count as output; overhead {amortized['overhead_u']:.2f} u):")
    for row in amortized["rows"]:
        ratio = "n/a" if row["amortized_ratio"] is None else f"{row['amortized_ratio']:.2f}x"
        lines.append(f"  N={row['n']:<4} stock {row['stock_u']:6.1f} u {row['stock_s']:8.2f} s  pack {row['pack_u']:6.1f} u "
                     f"{row['pack_s']:8.2f} s  amortized ratio {ratio}")
    lines.append(f"break-even: {amortized['verdict']}")
    fresh = report.get("fresh_check")
    if fresh:
        figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fresh.items()
                            if k not in ("seeds", "first_seed", "passes_gate") and (k != "gate_failures" or v))
        lines.append(f"fresh-seed check ({fresh['seeds']} seeds from {fresh['first_seed']}, seen by neither the "
                     f"calibration nor the batch; not a user cost): {'PASS' if fresh['passes_gate'] else 'FAIL'}; {figures}")
    pm = report.get("peak_memory")
    if pm:
        m = pm["metrics"]

        def mib(v: Any) -> str:
            return "n/a" if v is None else f"{v / 2**20:.2f}"

        lines.append(f"peak_tensor_bytes MiB (live tensors incl. activations, {pm['full']['batch']['device']}), "
                     f"full -> fragment:")
        for window in ("step", "batch"):
            lines.append(f"  {window:<6} {mib(m[f'peak_tensor_bytes_{window}_full'])} -> "
                         f"{mib(m[f'peak_tensor_bytes_{window}_fragment'])}  (activations "
                         f"{mib(m[f'peak_tensor_bytes_activations_{window}_full'])} -> "
                         f"{mib(m[f'peak_tensor_bytes_activations_{window}_fragment'])})")
        red = m["peak_tensor_reduction"]
        lines.append("  reduction (batch): " + ("n/a (no fragment)" if red is None else f"{red:.1%}")
                     + ("" if m["vram_reduction"] is None else f"; peak VRAM reduction {m['vram_reduction']:.1%}"))
    return "\n".join(lines)
