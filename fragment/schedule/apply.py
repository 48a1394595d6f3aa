"""Putting a fragment's schedule on a model (``calibrate.py`` chooses the schedule).

``schedule_replacements`` returns the modules that make a model follow a
schedule: ``bucket_masked`` output projections (folded into the fragment's pruned
copies, so no patch sits inside another), ``CrossAttnReplay`` cross-attention
modules and ``ReplayCall``/``ReplaySequence`` deep blocks.  For diffusers models ``apply_schedule`` installs them on a new
model; ComfyUI installs the same dict as object patches on a clone.
"""
from __future__ import annotations

import logging
from typing import Mapping

import torch.nn as nn

from ...errors import FragmentError
from ..build import apply_fragment, fragment_replacements
from ..format.manifest import Fragment
from ..surgery.tree import replace_modules
from .state import Schedule, ScheduleState, fragment_schedule, with_schedule
from .cross_attn import cross_attn_replacements
from .step_reuse import WholeStepReplay, reuse_replacements
from .timestep_heads import bucket_mask_replacements

# fragment_schedule and with_schedule live with the schedule (the schedule levers use them without this module's
# import of build); they are kept importable from here, where their callers have always found them.
__all__ = ["apply_schedule", "fragment_schedule", "schedule_replacements", "with_schedule"]

log = logging.getLogger(__name__)


def schedule_replacements(model: nn.Module, fragment: Fragment, replacements: Mapping[str, nn.Module],
                          schedule: Schedule, state: ScheduleState, *, reuse_on: nn.Module | None = None) -> dict[str, nn.Module]:
    """``replacements`` (the fragment's) plus what ``schedule`` needs, on ``model`` (the full base model).

    ``reuse_on`` is the model whose deep blocks get wrapped: the base model for
    hosts whose wrappers share children (ComfyUI), or ``None`` to leave the
    reuse wrappers out (diffusers: ``apply_schedule`` wraps the pruned model's
    blocks in a second pass).  A whole-step schedule (``skips=0``) adds no
    module: the host replays the call where it calls the model (ComfyUI: the
    schedule's call wrapper, ``nodes.schedule_patch``).

    >>> # patches = schedule_replacements(unet, frag, plan.replacements, Schedule.from_manifest(...), state, reuse_on=unet)
    """
    out = dict(replacements)
    if schedule.bucket_heads:
        view = replace_modules(model, replacements)  # the fragment model, sharing every untouched module
        masks = bucket_mask_replacements(view, fragment.kept, schedule.bucket_heads, schedule.buckets, state)
        for path, mask in masks.items():
            owner = path[: -len(".to_out.0")]
            if owner in out:  # fold into the pruned copy: a patch inside another would be restored in the wrong order
                out[owner] = replace_modules(out[owner], {"to_out.0": mask})
            else:
                out[path] = mask
    if schedule.cross_attn_cache is not None:  # after the masks: they fold into the attention copies it wraps
        out = cross_attn_replacements(model, out, state)
    if schedule.reuse_steps and reuse_on is not None:
        out.update(_reuse_replacements(reuse_on, fragment, schedule, state))
    return out


def apply_schedule(model: nn.Module, fragment: Fragment, schedule: Schedule | None = None,
                   state: ScheduleState | None = None) -> tuple[nn.Module, ScheduleState]:
    """The fragment model of a diffusers UNet with its schedule on, and the state the host must drive.

    ``schedule`` defaults to the one stored in the manifest.  Before each UNet
    call the host calls ``state.begin_call(t, x.shape)``; ``state.reuse_enabled``,
    ``state.attn_enabled`` and ``state.heads_enabled`` turn the parts off (the model is then the
    plain fragment, output for output).

    >>> small, state = apply_schedule(unet, load_fragment("dog.json"))  # doctest: +SKIP
    """
    schedule = schedule if schedule is not None else fragment_schedule(fragment)
    state = state if state is not None else ScheduleState.for_schedule(schedule)
    if state.attn_gate is None:  # a caller's own state still follows the schedule's cross-attention cache
        state.attn_gate = schedule.cross_attn_cache
    if schedule.empty:
        return apply_fragment(model, fragment), state
    small = replace_modules(model, schedule_replacements(model, fragment, fragment_replacements(model, fragment), schedule, state))
    if schedule.whole_step:  # skips=0: the whole call replays, so the wrapper goes around the fragment model
        small = WholeStepReplay(small, state)
    elif schedule.reuse_steps:
        small = replace_modules(small, _reuse_replacements(small, fragment, schedule, state))
    return small, state


def _reuse_replacements(model: nn.Module, fragment: Fragment, schedule: Schedule,
                        state: ScheduleState) -> dict[str, nn.Module]:
    try:
        return reuse_replacements(model, schedule.shallow, state, schedule.skips)
    except FragmentError as exc:  # a depth this UNet lacks: say which fragment and which field asked for it
        field = "skips" if schedule.skips is not None else "shallow"
        raise FragmentError(f"fragment {fragment.name!r}: schedule.step_reuse.{field}: {exc}") from None


