"""Sampling the reference model: DDIM with classifier-free guidance, one seed per image.

Each image's starting noise comes from its own seeded generator, so image i
is the same whether it is made alone or inside a batch, with the full model
or with a fragment; that is what makes same-seed comparisons (SSIM, LPIPS,
adherence drop) measure the fragment and nothing else.
"""
from __future__ import annotations

import logging
import operator
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..errors import FragmentError
from ..fragment.schedule.state import ScheduleState
from .model import SCHEDULER_CONFIG, ReferenceModel, build_scheduler, predict

log = logging.getLogger(__name__)

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 3.0  # chosen on the validation set (reference/MODEL_CARD.md)


def seeded_noise(seeds: Sequence[int], size: int = 32) -> torch.Tensor:
    """``[N, 3, size, size]`` starting noise, row i from ``torch.Generator().manual_seed(seeds[i])``.

    >>> torch.equal(seeded_noise([5, 6])[1], seeded_noise([6])[0])
    True
    """
    return torch.cat([torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Model pixels ``[N, 3, H, W]`` in -1..1 -> uint8 ``[N, H, W, 3]``.

    >>> to_uint8(torch.zeros(1, 3, 1, 1))[0, 0, 0].tolist()
    [128, 128, 128]
    """
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def ddim_timesteps(steps: int) -> list[float]:
    """The training timesteps of a ``steps``-step DDIM run, in sampling order (what ``sample`` runs).

    >>> ddim_timesteps(4)[0] > ddim_timesteps(4)[-1]
    True
    """
    scheduler = build_scheduler("ddim")
    scheduler.set_timesteps(check_steps(steps, "ddim_timesteps"))
    return [float(t) for t in scheduler.timesteps]


class Trajectory:
    """The full model's state ``x`` before every denoising step (and its final output), per seed, on the CPU.

    ``sample(..., record=trajectory)`` fills it for a run of the full model, and
    ``sample(..., branch=(k, trajectory))`` starts a run at step ``k`` from the
    recorded ``x``: a candidate that equals the full model until step ``k``
    need not render those steps again (``judge.fragment_judge.branch_step``).
    At most ``max_seeds`` seeds are kept (later seeds are not recorded), so the
    memory is bounded: 26 states of 3x32x32 float32 are 320 KB a seed on the
    reference model.

    >>> traj = Trajectory(max_seeds=1)
    >>> traj.add([4, 5], 0, torch.zeros(2, 3, 2, 2)); traj.seeds
    [4]
    >>> traj.start([4], 0).shape, traj.start([5], 0) is None
    (torch.Size([1, 3, 2, 2]), True)
    """

    def __init__(self, max_seeds: int = 64) -> None:
        self.max_seeds = int(max_seeds)
        self.states: dict[int, dict[int, torch.Tensor]] = {}  # seed -> step -> x before that step

    @property
    def seeds(self) -> list[int]:
        return list(self.states)

    def add(self, seeds: Sequence[int], step: int, x: torch.Tensor) -> None:
        """Record ``x`` (row i for ``seeds[i]``) as the state before ``step``; seeds past ``max_seeds`` are dropped."""
        rows = x.detach().to("cpu", torch.float32)
        for i, seed in enumerate(seeds):
            seed = int(seed)
            if seed not in self.states and len(self.states) >= self.max_seeds:
                continue
            self.states.setdefault(seed, {})[int(step)] = rows[i].clone()

    def start(self, seeds: Sequence[int], step: int) -> torch.Tensor | None:
        """The recorded states of ``seeds`` before ``step``, stacked; ``None`` when any is missing."""
        rows = [self.states.get(int(s), {}).get(int(step)) for s in seeds]
        return None if any(r is None for r in rows) else torch.stack(rows)  # type: ignore[arg-type]


def check_steps(steps: object, where: str = "sample") -> int:
    """``steps`` if it is a DDIM step count the scheduler can make (1 up to its training timesteps), else a ``FragmentError``.

    Zero steps divided by zero inside diffusers, and more steps than training timesteps raised its ValueError.

    >>> check_steps(25)
    25
    """
    top = int(SCHEDULER_CONFIG["num_train_timesteps"])
    try:  # any integer type (numpy's too), never a bool or a float
        count = None if isinstance(steps, bool) else operator.index(steps)  # type: ignore[arg-type]
    except TypeError:
        count = None
    if count is None or not 1 <= count <= top:
        raise FragmentError(f"{where}: steps: expected an integer in 1..{top}, found {steps!r}")
    return count


@torch.no_grad()
def sample(
    unet: nn.Module,
    context: torch.Tensor,
    uncond: torch.Tensor,
    seeds: Sequence[int],
    *,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    batch_size: int = 32,
    on_step: Callable[[int], None] | None = None,
    state: ScheduleState | None = None,
    cfg_cutoff: float | None = None,
    record: Trajectory | None = None,
    branch: tuple[int, Trajectory] | None = None,
    raw: bool = False,
) -> Any:
    """DDIM (eta 0) with CFG for each seed; ``context`` is ``[1 or N, T, D]``; returns uint8 ``[N, 32, 32, 3]``.

    ``unet`` may be the full model or a fragment applied to it; ``uncond`` is the
    empty prompt's context.  ``on_step`` is called after each denoising step of a
    sub-batch with that sub-batch's image count (progress bars count image-steps).  ``state`` is the ``ScheduleState`` of a
    fragment with a schedule (``fragment.schedule.apply.apply_schedule``): it is told
    every call's timestep and input shape.  Below timestep ``cfg_cutoff`` the
    unconditional pass is skipped and the conditional prediction used alone.

    ``record`` (a :class:`Trajectory`; only for runs of the full model) keeps every step's ``x``;
    ``branch=(k, trajectory)`` starts at step ``k`` from the recorded states (a sub-batch whose
    seeds were not all recorded runs from the noise).  ``raw`` returns the final float ``x``
    ``[N, 3, 32, 32]`` on the CPU (what ``to_uint8`` would round), for the latent-space judge.

    >>> # images = sample(model.unet, model.encode([p]), model.encode([""]), seeds=range(8))
    """
    check_steps(steps)
    out = []
    seeds = list(seeds)
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start:start + batch_size]
        n = len(chunk)
        cond = context.expand(n, -1, -1) if context.shape[0] == 1 else context[start:start + n]
        p = next(unet.parameters())
        both = torch.cat([uncond.expand(n, -1, -1), cond]).to(device=p.device, dtype=p.dtype)
        scheduler = build_scheduler("ddim")
        scheduler.set_timesteps(steps)
        x = seeded_noise(chunk).to(device=p.device, dtype=p.dtype)  # drawn on the CPU: the same images on any device
        first = 0
        if branch is not None and branch[0] > 0:
            recorded = branch[1].start(chunk, branch[0])
            if recorded is not None:
                first, x = branch[0], recorded.to(device=p.device, dtype=p.dtype)
        if state is not None:
            state.run_total_steps = steps
        for i, t in enumerate(scheduler.timesteps):
            if i < first:
                continue
            if record is not None:
                record.add(chunk, i, x)
            alone = cfg_cutoff is not None and float(t) < cfg_cutoff
            x_in, ctx = (x, both[n:]) if alone else (torch.cat([x, x]), both)
            if state is not None:
                state.begin_call(float(t), tuple(x_in.shape), rows=slice(n, 2 * n) if alone else None)
            pred = predict(unet, x_in, t, ctx)
            if alone:
                guided = pred
            else:
                uncond_pred, cond_pred = pred.chunk(2)
                guided = uncond_pred + guidance * (cond_pred - uncond_pred)
            x = scheduler.step(guided, t, x).prev_sample
            if on_step is not None:
                on_step(n)
        if record is not None:
            record.add(chunk, len(scheduler.timesteps), x)
        if state is not None:  # the run is over: free the cached deep features
            state.reset()
        out.append(x.detach().float().cpu() if raw else to_uint8(x.float()))
    if raw:
        return torch.cat(out) if out else torch.zeros(0, 3, 32, 32)
    return np.concatenate(out) if out else np.zeros((0, 32, 32, 3), np.uint8)


def generate(model: ReferenceModel, prompts: Sequence[str], seeds: Sequence[int], *, unet: nn.Module | None = None,
             steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, batch_size: int = 32) -> np.ndarray:
    """Images for (prompt i, seed i) pairs, or one prompt for every seed; ``unet`` overrides the model's own.

    >>> # generate(load_reference(), ["a red circle in the center"], seeds=[0, 1]).shape == (2, 32, 32, 3)
    """
    if len(prompts) not in (1, len(seeds)):
        raise ValueError(f"reference.sampling.generate: {len(prompts)} prompts for {len(seeds)} seeds; "
                         "expected one prompt or one per seed")
    context = model.encode(list(prompts))
    uncond = model.encode([""])
    return sample(unet if unet is not None else model.unet, context, uncond, seeds,
                  steps=steps, guidance=guidance, batch_size=batch_size)
