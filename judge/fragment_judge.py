"""The calibration's judge for hosts that run a diffusers UNet: render with a fragment, compare with the full model.

``fragment_judge`` turns a sampler and a comparison into the ``judge_fragment``
callable that ``fragment.extract.calibrated_fragment`` takes.  The full
model's images of the calibration seeds are given (the profiled run made
them); the held-out seeds' references are rendered once, on first use, and
that cost lands in the calibration's time, where it belongs.

Two things keep the candidates' own renders cheap (issue #26):

* **branching** (``branch_step``): a candidate whose model equals the full
  model until some step (a schedule-only candidate: step reuse, CFG cut-off)
  starts from the full model's recorded state at that step
  (``reference.sampling.Trajectory``) instead of from the noise;
* **a sequential stop** (:class:`SequentialStop`): the seeds are judged in
  small groups, and a candidate stops at its first clear failure.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..fragment.calibration import Judgement
from ..fragment.format.manifest import Fragment
from ..fragment.build import fragment_replacements
from ..fragment.schedule.apply import apply_schedule, fragment_schedule
from ..fragment.schedule.state import Schedule, nearest_step
from .gate import gate_failures

Run = Callable[..., Any]  # run(unet, seeds, *, state=None, cfg_cutoff=None) -> images [N, ...]
Compare = Callable[[Any, Any], "tuple[bool, dict[str, Any]]"]  # compare(full, images) -> (passed, metrics)


def stack(items: Sequence[Any]) -> Any:
    """Per-seed outputs back into one batch (numpy images or torch latents).

    >>> stack([np.zeros((2, 2)), np.ones((2, 2))]).shape
    (2, 2, 2)
    """
    return torch.stack(list(items)) if isinstance(items[0], torch.Tensor) else np.stack(list(items))


def branch_step(schedule: Schedule, timesteps: Sequence[float], weights_changed: bool) -> int:
    """The first step of a ``len(timesteps)``-step run at which a fragment's model may differ from the full model.

    Before it, the fragment's run is the full model's, so a judge may start
    there from the full model's recorded state.  A weight lever (heads, ff,
    precision, ...; ``weights_changed``) or per-timestep head sets change every
    step: 0.  A CFG cut-off changes the first step whose timestep lies below
    it.  Step reuse changes the first reused step, but that step replays the
    deep features of the step before it, so the step before must run on the
    fragment model to fill its cache: the branch is one step earlier.  A reuse
    schedule stored without timesteps is matched by the state's step counter,
    which counts from the branch: it gets 0.  The cross-attention cache, like
    reuse, replays what the step before its first cached step computed: one
    step earlier too.  ``len(timesteps)``: never differs.

    >>> ts = [999.0, 799.0, 599.0, 399.0, 199.0]
    >>> branch_step(Schedule(cfg_cutoff=500.0), ts, False), branch_step(Schedule(cfg_cutoff=500.0), ts, True)
    (3, 0)
    >>> reuse = Schedule(reuse_steps=(2, 4), total_steps=5, step_timesteps=tuple(ts))
    >>> branch_step(reuse, ts, False), branch_step(Schedule(), ts, False)
    (1, 5)
    >>> branch_step(Schedule(cfg_cutoff=500.0, cross_attn_cache=500.0), ts, False)
    2
    >>> branch_step(Schedule(cfg_cutoff=500.0, cross_attn_cache=100.0), ts, False)  # no step below: no earlier branch
    3
    """
    if weights_changed or schedule.bucket_heads:
        return 0
    first = len(timesteps)
    if schedule.cfg_cutoff is not None:
        first = min(first, next((i for i, t in enumerate(timesteps) if float(t) < schedule.cfg_cutoff), first))
    if schedule.cross_attn_cache is not None:
        cached = next((i for i, t in enumerate(timesteps) if float(t) < schedule.cross_attn_cache), None)
        first = first if cached is None else min(first, max(cached - 1, 0))
    if schedule.reuse_steps:
        if not schedule.step_timesteps:
            return 0
        reused = next((i for i, t in enumerate(timesteps)
                       if nearest_step(float(t), schedule.step_timesteps) in schedule.reuse_steps), first)
        first = min(first, max(reused - 1, 0))
    return first


def fragment_branch(model: nn.Module, fragment: Fragment, timesteps: Sequence[float]) -> int:
    """``branch_step`` of a fragment on ``model``: its stored schedule, and whether it replaces any module.

    The replacements are what the build installs (a manifest always carries a ``pruning`` record, even
    with no head removed), so an empty set means the weights are the full model's, bit for bit.
    """
    return branch_step(fragment_schedule(fragment), timesteps, bool(fragment_replacements(model, fragment)))


def render(unet: nn.Module, fragment: Fragment, seeds: Sequence[int], run: Run,
           branch: tuple[int, Any] | None = None) -> tuple[Any, list[int]]:
    """The fragment's outputs for ``seeds`` with its schedule on, and the steps it really reused.

    ``branch=(step, trajectory)`` is passed to ``run``: the run starts at ``step`` from the full model's
    recorded states (``branch_step`` says which step is safe).
    """
    return prepared_render(unet, fragment, seeds, run, branch)()


def prepared_render(unet: nn.Module, fragment: Fragment, seeds: Sequence[int], run: Run,
                    branch: tuple[int, Any] | None = None) -> Callable[[], tuple[Any, list[int]]]:
    """``render`` in two halves: the fragment model is built now, and each call of the result renders ``seeds`` on
    it, so a timing loop times the renders, not the build.

    >>> again = prepared_render(unet, fragment, [10_000, 10_001], target.run)  # doctest: +SKIP
    >>> images, reused = again()  # doctest: +SKIP
    """
    small, state = apply_schedule(unet, fragment)
    cutoff = fragment_schedule(fragment).cfg_cutoff
    return lambda: render_with(small, state, cutoff, seeds, run, branch)


def render_with(small: nn.Module, state: Any, cfg_cutoff: float | None, seeds: Sequence[int], run: Run,
                branch: tuple[int, Any] | None = None) -> tuple[Any, list[int]]:
    """``render`` on a fragment model already built (``apply_schedule``): a judge renders its seed groups on one."""
    extra = {"branch": branch} if branch is not None and branch[0] > 0 else {}
    with torch.no_grad():
        images = run(small, list(seeds), state=state, cfg_cutoff=cfg_cutoff, **extra)
    return images, state.reused_steps()


# The gated metrics that are means over images, with the best value one image can have.
MEAN_METRICS = {"ssim_mean": ("ssim_min", "min"), "lpips_mean": ("lpips_max", "max"),
                "latent_rel_error": ("latent_rel_error_max", "max")}


@dataclass(frozen=True)
class SequentialStop:
    """Judge a candidate's seeds ``group`` at a time; stop at its first clear failure.

    The rule (:meth:`clear_failure`), after at least ``min_seen`` seeds: a gated
    mean (SSIM, LPIPS, latent error: ``MEAN_METRICS``) fails the gate even if
    every seed not yet rendered does as well as the best group seen so far.
    The final mean is ``(k * mean_k + (n - k) * rest) / n``; taking ``rest`` as
    the best group yet is optimistic for the candidate (a damaged model seldom
    does better on new seeds than on its best seeds so far), so a stop means
    the running mean is outside the gate by more than the remaining seeds can
    plausibly recover.  Taking ``rest`` as a perfect image instead would stop
    only on certain failures, and almost never before the last seeds.  The
    adherence drop is not a per-image mean (it is quantised by attribute), so
    it never stops a candidate early: the full judge decides it.

    >>> stop = SequentialStop({"ssim_min": 0.9}, group=1)
    >>> stop.clear_failure([(1, {"ssim_mean": 0.6}), (1, {"ssim_mean": 0.7})], 8)
    'ssim_mean 0.6875 even if the remaining 6 seeds match the best so far (0.7000): < 0.9'
    >>> stop.clear_failure([(1, {"ssim_mean": 0.85}), (1, {"ssim_mean": 0.95})], 8) is None
    True
    """

    limits: Mapping[str, float]
    group: int = 2
    min_seen: int = 2

    def clear_failure(self, groups: Sequence[tuple[int, Mapping[str, Any]]], total: int) -> str | None:
        """Why the candidate clearly fails, from ``groups`` (seed count, metrics of that group), or ``None``."""
        seen = sum(count for count, _ in groups)
        if seen < self.min_seen or seen >= total:
            return None
        for metric, (name, kind) in MEAN_METRICS.items():
            if name not in self.limits:
                continue
            values = [(count, m.get(metric)) for count, m in groups]
            if any(v is None or not np.isfinite(v) for _, v in values):
                continue
            mean = sum(c * float(v) for c, v in values) / seen
            best = (max if kind == "min" else min)(float(v) for _, v in values)
            final = (seen * mean + (total - seen) * best) / total
            if gate_failures({metric: final}, {name: self.limits[name]}):
                symbol = "<" if kind == "min" else ">"
                return (f"{metric} {final:.4f} even if the remaining {total - seen} seeds match the best so far "
                        f"({best:.4f}): {symbol} {self.limits[name]}")
        return None


def fragment_judge(unet: nn.Module, run: Run, compare: Compare, known_seeds: Sequence[int],
                   known_images: Any, *, trajectory: Any = None, timesteps: Sequence[float] | None = None,
                   sequential: SequentialStop | None = None) -> Callable[[Fragment, Sequence[int]], Judgement]:
    """A ``judge_fragment(fragment, seeds)`` over ``run`` and ``compare``; ``known_images`` are the full model's for ``known_seeds``.

    ``compare`` returns ``(passed, metrics)``; ``metrics["gate_failures"]`` and ``metrics["gate_slack"]``,
    when present, become the judgement's reasons and slack.  With ``trajectory`` (the full model's recorded
    states, ``reference.sampling.Trajectory``) and the run's ``timesteps``, ``run`` takes ``record=`` and
    ``branch=``: the references it renders are recorded, and each candidate starts at its ``branch_step``.
    With ``sequential``, the seeds are judged in groups and a clear failure stops the try early.  The
    judgement's ``images`` counts the candidate's renders and ``seconds`` the try's time.

    >>> judge = fragment_judge(unet, target.run, target.judge, range(8), profile_images)  # doctest: +SKIP
    >>> judge(fragment, [100, 101]).passed  # doctest: +SKIP
    True
    """
    references: dict[int, Any] = dict(zip(list(known_seeds), list(known_images)))
    branching = trajectory is not None and timesteps is not None

    def judge(fragment: Fragment, seeds: Sequence[int]) -> Judgement:
        started = time.perf_counter()
        seeds = list(seeds)
        missing = [s for s in seeds if s not in references]
        if missing:
            with torch.no_grad():
                references.update(zip(missing, list(run(unet, missing, record=trajectory) if branching
                                                     else run(unet, missing))))
        step = fragment_branch(unet, fragment, timesteps) if branching else 0
        branch = (step, trajectory) if step > 0 else None
        size = sequential.group if sequential is not None else len(seeds)
        small, state = apply_schedule(unet, fragment)
        cutoff = fragment_schedule(fragment).cfg_cutoff
        rendered: list[Any] = []
        groups: list[tuple[int, Mapping[str, Any]]] = []
        stopped = None
        for first in range(0, len(seeds), max(size, 1)):
            chunk = seeds[first:first + size]
            images, _steps = render_with(small, state, cutoff, chunk, run, branch)
            rendered.extend(list(images))
            if sequential is None or first + len(chunk) >= len(seeds):
                continue
            groups.append((len(chunk), compare(stack([references[s] for s in chunk]), images)[1]))
            stopped = sequential.clear_failure(groups, len(seeds))
            if stopped:
                break
        judged = seeds[:len(rendered)]
        ok, metrics = compare(stack([references[s] for s in judged]), stack(rendered))
        metrics = {**metrics, "branch_step": step, "seeds_judged": len(judged)}
        reasons = list(metrics.get("gate_failures", []))
        if stopped:
            ok, metrics["sequential_stop"] = False, stopped
            reasons.append(f"sequential stop after {len(judged)} of {len(seeds)} seeds: {stopped}")
        return Judgement(bool(ok), metrics, reasons, metrics.get("gate_slack"),
                         images=len(rendered), seconds=time.perf_counter() - started)

    return judge


