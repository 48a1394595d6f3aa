"""The MODEL patch that runs a fragment's schedule inside ComfyUI's samplers.

Three pieces go on a clone of the ModelPatcher:

* object patches: ``bucket_masked`` output projections and ``ReplaySequence`` deep
  blocks (``fragment.schedule.apply.schedule_replacements``), installed with the
  fragment's own patches;
* a call wrapper (``comfy_versions.add_call_wrapper``: a keyed ``APPLY_MODEL``
  wrapper on ComfyUI 0.3.x, the chained ``model_function_wrapper`` on 2024)
  that converts each call's sigma to the training timestep and tells the
  ``ScheduleState`` before the UNet runs (ComfyUI gives the UNet sigmas, the
  schedule is stored in timesteps), and that skips the unconditional rows
  below the CFG cut-off; with a whole-step schedule (``skips=0``) it is also
  where a reuse step skips the model call and replays the UNet's last output;
* on 0.3.x, a keyed ``OUTER_SAMPLE`` wrapper that starts every sampler run
  from a clean state with its real step count and frees the cached deep
  features when the run ends, also when it fails or is interrupted;
* the state itself, reachable from the wrapper, so BatchGenerator can give it
  the step count and turn parts off for one batch.

Any wrapper installed before (another node's) keeps running inside ours.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from ..errors import FragmentError
from ..fragment.schedule.state import WHOLE_STEP, Schedule, ScheduleState
from ..fragment.schedule.step_reuse import model_output_of_denoised
from .comfy_versions import add_call_wrapper, add_run_wrapper, call_next, call_wrappers

log = logging.getLogger(__name__)
COND, UNCOND = 0, 1
SCHEDULE_KEY = "prompt_fragments.schedule"
SCHEDULE_MARK = "prompt_fragments_schedule"


def require_discrete_sampling(model_sampling: Any, where: str) -> None:
    """Refuse models whose sigmas do not come from SD's 1000 discrete training timesteps.

    Schedules are stored in those timesteps; an EDM or Stable Cascade model's
    ``timestep()`` means something else, and every comparison would be wrong.
    """
    import comfy.model_sampling as ms

    if not isinstance(model_sampling, ms.ModelSamplingDiscrete) or type(model_sampling).timestep is not ms.ModelSamplingDiscrete.timestep:
        raise FragmentError(f"{where}: a fragment schedule is stored in SD's discrete training timesteps (0..999); this "
                            f"model samples with {type(model_sampling).__name__}. Load the fragment with schedule=off")


def training_timestep(model_sampling: Any, sigma: torch.Tensor) -> float:
    """The training timestep of ``sigma`` as a real number, by interpolating the model's log sigmas.

    ComfyUI's own ``timestep()`` rounds to the nearest integer, which merges the
    last steps of long exponential or Karras schedules into one timestep.
    """
    log_sigmas = model_sampling.log_sigmas.float()
    target = torch.log(sigma.float().max().to(log_sigmas.device)).clamp(log_sigmas[0], log_sigmas[-1])
    high = int(torch.searchsorted(log_sigmas, target.reshape(1)).clamp(1, len(log_sigmas) - 1))
    low_value, high_value = log_sigmas[high - 1], log_sigmas[high]
    frac = float((target - low_value) / (high_value - low_value).clamp_min(1e-12))
    return (high - 1) + min(max(frac, 0.0), 1.0)


def _cond_rows_only(args: dict[str, Any]) -> tuple[dict[str, Any], int, slice] | None:
    """The call restricted to its one cond chunk when it holds exactly one cond and one uncond chunk, else None."""
    chunks = list(args["cond_or_uncond"])
    if sorted(chunks) != [COND, UNCOND] or args["c"].get("control") is not None:
        return None  # area conds, ControlNet residuals: not worth slicing, run the full call
    x = args["input"]
    size = x.shape[0] // 2
    rows = slice(chunks.index(COND) * size, (chunks.index(COND) + 1) * size)

    def narrow(value: Any) -> Any:
        return value[rows] if isinstance(value, torch.Tensor) and value.shape[:1] == x.shape[:1] else value

    c = {}
    for key, value in args["c"].items():
        if key == "transformer_options":
            # 0.3.x also passes the call's sigmas and one uuid per chunk here; keep them in step with the rows.
            value = {**value, "cond_or_uncond": [COND]}
            if "sigmas" in value:
                value["sigmas"] = narrow(value["sigmas"])
            if isinstance(value.get("uuids"), list) and len(value["uuids"]) == len(chunks):
                value["uuids"] = [value["uuids"][chunks.index(COND)]]
        c[key] = narrow(value)
    return {**args, "input": x[rows], "timestep": narrow(args["timestep"]), "c": c, "cond_or_uncond": [COND]}, size, rows


def schedule_wrapper(state: ScheduleState, model_sampling: Any, cfg_cutoff: float | None,
                     whole_step: bool = False) -> Callable:
    """A call wrapper that drives ``state`` and applies CFG truncation below ``cfg_cutoff``.

    Below the cut-off the uncond rows get the cond prediction, so ComfyUI's
    ``uncond + (cond - uncond) * cfg`` is the cond prediction itself, as in
    the reference sampler's truncation.  With ``whole_step`` (a ``skips=0``
    schedule) a reuse step does not call the model: the UNet output cached on
    the last computed step (``model_output_of_denoised``) is turned into this call's
    denoised prediction with this call's ``x`` and sigma, exactly as
    ``apply_model`` would have turned a fresh one.
    """

    require_discrete_sampling(model_sampling, "FragmentLoader")
    skipped_truncation: list[str] = []  # said once per loaded model, not once per step
    if whole_step:
        state.expect_keys([WHOLE_STEP])
        state.protect([WHOLE_STEP])

    def run(apply_model: Callable, call_args: dict[str, Any], live: Any) -> Any:
        x, sigma = call_args["input"], call_args["timestep"]
        if not whole_step or not isinstance(sigma, torch.Tensor):  # calculate_denoised needs ComfyUI's per-row sigmas
            return call_next(wrapper, apply_model, call_args)
        if state.replaying:
            cached = state.replay(WHOLE_STEP)
            if cached is not None:
                return live.calculate_denoised(sigma, cached.to(x.dtype), x)
        denoised = call_next(wrapper, apply_model, call_args)
        if not state.replaying and state.reuse_steps and state.reuse_enabled:  # else nothing would read it
            raw = model_output_of_denoised(live, sigma, denoised, x)
            if raw is not None:
                state.store(WHOLE_STEP, raw)
        return denoised

    def wrapper(apply_model: Callable, args: dict[str, Any]) -> Any:
        # The model's sampling as it runs now: a node stacked after FragmentLoader may have patched it.
        live = getattr(getattr(apply_model, "__self__", None), "model_sampling", None) or model_sampling
        if live is not model_sampling:
            require_discrete_sampling(live, "fragment schedule (at sampling time)")
        sigma = args["timestep"]
        t = training_timestep(live, sigma if isinstance(sigma, torch.Tensor) else torch.tensor(sigma))
        sample_sigmas = args["c"].get("transformer_options", {}).get("sample_sigmas")
        if sample_sigmas is not None:  # newer ComfyUI says how many steps run
            state.run_total_steps = max(1, len(sample_sigmas) - 1)
        if cfg_cutoff is not None and state.cfg_enabled and t < cfg_cutoff:
            sliced = _cond_rows_only(args)
            if sliced is not None:
                cond_args, size, rows = sliced
                state.begin_call(t, tuple(cond_args["input"].shape), rows=rows)
                cond = run(apply_model, cond_args, live)
                return torch.cat([cond] * (args["input"].shape[0] // size))
            if not skipped_truncation:
                skipped_truncation.append(str(list(args["cond_or_uncond"])))
                log.warning("CFG truncation: this sampler call holds %s (cond=0, uncond=1) rather than one cond and one "
                            "uncond chunk, or carries ControlNet residuals; those calls run in full", skipped_truncation[0])
        state.begin_call(t, tuple(args["input"].shape))
        return run(apply_model, args, live)

    setattr(wrapper, SCHEDULE_MARK, state)
    return wrapper


def install_schedule(patcher: Any, state: ScheduleState, model_sampling: Any, cfg_cutoff: float | None,
                     whole_step: bool = False) -> None:
    """Put the schedule's wrappers on ``patcher`` (a clone FragmentLoader owns); see the module docstring."""
    add_call_wrapper(patcher, SCHEDULE_KEY, schedule_wrapper(state, model_sampling, cfg_cutoff, whole_step))

    def run_starts(steps: int) -> None:
        state.reset()
        if steps:
            state.run_total_steps = steps

    add_run_wrapper(patcher, SCHEDULE_KEY, run_starts, state.reset)


def find_schedule_state(patcher: Any, where: str = "BatchGenerator") -> ScheduleState | None:
    """The ``ScheduleState`` of a MODEL patched by FragmentLoader (through any wrappers stacked on it).

    Raises when the MODEL carries a schedule's modules but our wrapper is gone
    (on a 2024 ComfyUI, a node installed its own ``model_function_wrapper``
    without chaining it): nothing would tell the schedule which step runs, so
    it would run wrongly.
    """
    for wrapper in call_wrappers(patcher, SCHEDULE_KEY):
        state = getattr(wrapper, SCHEDULE_MARK, None)
        if state is not None:
            return state
    for patch in patcher.object_patches.values():
        modules = patch.modules() if isinstance(patch, torch.nn.Module) else ()
        if any(isinstance(getattr(m, "state", getattr(m, "bucket_state", None)), ScheduleState) for m in modules):
            raise FragmentError(
                f"{where}: the MODEL carries a fragment schedule, but its model_function_wrapper was replaced by another "
                "node after FragmentLoader, so the schedule cannot follow the sampler's steps. Put FragmentLoader after "
                "that node, or load the fragment with schedule=off")
    return None


def describe_schedule(schedule: Schedule) -> str:
    """One status line about what a loaded schedule will do.

    >>> describe_schedule(Schedule(total_steps=20, reuse_steps=(2, 4, 6), cfg_cutoff=300.0, cross_attn_cache=300.0))
    'schedule: deep blocks reused on 3 of 20 steps, CFG truncated below t=300, cross-attention cached below t=300'
    """
    parts = []
    if schedule.bucket_heads:
        parts.append(f"{schedule.buckets} per-noise-level head sets")
    if schedule.reuse_steps:
        what = "whole UNet calls" if schedule.whole_step else "deep blocks"
        parts.append(f"{what} reused on {len(schedule.reuse_steps)} of {schedule.total_steps} steps")
    if schedule.cfg_cutoff is not None:
        parts.append(f"CFG truncated below t={schedule.cfg_cutoff:.0f}")
    if schedule.cross_attn_cache is not None:
        parts.append(f"cross-attention cached below t={schedule.cross_attn_cache:.0f}")
    return "schedule: " + ", ".join(parts)
