"""The MODEL patch that runs a fragment's schedule inside ComfyUI's samplers.

Three pieces go on a clone of the ModelPatcher:

* object patches: ``BucketMask`` output projections and ``ReplaySequence`` deep
  blocks (``fragment.speed.schedule_replacements``), installed with the
  fragment's own patches;
* a ``model_function_wrapper`` that converts each call's sigma to the training
  timestep and tells the ``ScheduleState`` before the UNet runs (ComfyUI gives
  the UNet sigmas, the schedule is stored in timesteps), and that skips the
  unconditional rows below the CFG cut-off;
* the state itself, reachable from the wrapper, so BatchGenerator can give it
  the step count and turn parts off for one batch.

Any wrapper installed before (another node's) keeps running inside ours.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from ..fragment.schedule import Schedule, ScheduleState

log = logging.getLogger(__name__)
COND, UNCOND = 0, 1


def _call(previous: Callable | None, apply_model: Callable, args: dict[str, Any]) -> Any:
    if previous is not None:
        return previous(apply_model, args)
    return apply_model(args["input"], args["timestep"], **args["c"])


def _cond_rows_only(args: dict[str, Any]) -> tuple[dict[str, Any], int] | None:
    """The call restricted to its one cond chunk when it holds exactly one cond and one uncond chunk, else None."""
    chunks = list(args["cond_or_uncond"])
    if sorted(chunks) != [COND, UNCOND] or args["c"].get("control") is not None:
        return None  # area conds, ControlNet residuals: not worth slicing, run the full call
    x = args["input"]
    size = x.shape[0] // 2
    rows = slice(chunks.index(COND) * size, (chunks.index(COND) + 1) * size)
    c = {}
    for key, value in args["c"].items():
        if isinstance(value, torch.Tensor) and value.shape[:1] == x.shape[:1]:
            value = value[rows]
        elif key == "transformer_options":
            value = {**value, "cond_or_uncond": [COND]}
        c[key] = value
    timestep = args["timestep"][rows] if args["timestep"].shape[:1] == x.shape[:1] else args["timestep"]
    return {**args, "input": x[rows], "timestep": timestep, "c": c, "cond_or_uncond": [COND]}, size


def schedule_wrapper(state: ScheduleState, model_sampling: Any, cfg_cutoff: float | None,
                     previous: Callable | None) -> Callable:
    """A ``model_function_wrapper`` that drives ``state`` and applies CFG truncation below ``cfg_cutoff``.

    Below the cut-off the uncond rows get the cond prediction, so ComfyUI's
    ``uncond + (cond - uncond) * cfg`` is the cond prediction itself, as in
    the reference sampler's truncation.
    """

    def wrapper(apply_model: Callable, args: dict[str, Any]) -> Any:
        sigma = args["timestep"]
        t = float(model_sampling.timestep(sigma.max() if isinstance(sigma, torch.Tensor) else torch.tensor(sigma)))
        sample_sigmas = args["c"].get("transformer_options", {}).get("sample_sigmas")
        if sample_sigmas is not None:  # newer ComfyUI says how many steps run
            state.run_total_steps = max(1, len(sample_sigmas) - 1)
        if cfg_cutoff is not None and state.cfg_enabled and t < cfg_cutoff:
            sliced = _cond_rows_only(args)
            if sliced is not None:
                cond_args, size = sliced
                state.begin_call(t, tuple(cond_args["input"].shape))
                cond = _call(previous, apply_model, cond_args)
                return torch.cat([cond] * (args["input"].shape[0] // size))
        state.begin_call(t, tuple(args["input"].shape))
        return _call(previous, apply_model, args)

    wrapper.prompt_fragments_schedule = state  # type: ignore[attr-defined]
    wrapper.previous = previous  # type: ignore[attr-defined]
    return wrapper


def find_schedule_state(patcher: Any) -> ScheduleState | None:
    """The ``ScheduleState`` of a MODEL patched by FragmentLoader (through any wrappers stacked on it)."""
    wrapper = patcher.model_options.get("model_function_wrapper")
    while wrapper is not None:
        state = getattr(wrapper, "prompt_fragments_schedule", None)
        if state is not None:
            return state
        wrapper = getattr(wrapper, "previous", None)
    return None


def describe_schedule(schedule: Schedule) -> str:
    """One status line about what a loaded schedule will do.

    >>> describe_schedule(Schedule(total_steps=20, reuse_steps=(2, 4, 6), cfg_cutoff=300.0))
    'schedule: deep blocks reused on 3 of 20 steps, CFG truncated below t=300'
    """
    parts = []
    if schedule.bucket_heads:
        parts.append(f"{schedule.buckets} per-noise-level head sets")
    if schedule.reuse_steps:
        parts.append(f"deep blocks reused on {len(schedule.reuse_steps)} of {schedule.total_steps} steps")
    if schedule.cfg_cutoff is not None:
        parts.append(f"CFG truncated below t={schedule.cfg_cutoff:.0f}")
    return "schedule: " + ", ".join(parts)
