"""DeepCache-style step reuse: on scheduled steps the deep UNet blocks replay their last outputs.

Between neighbouring denoising steps the deep, low-resolution features of a
UNet change little, while the shallow full-resolution blocks carry the detail
that moves (DeepCache, Ma et al. 2023).  On a *reuse* step every block except
the ``shallow`` outermost ones on each side returns what it returned on the
last *computed* step, so at ``shallow=1`` only the stem, the first down level
and the last up level run.  A schedule may instead count its depth in skip
connections (``skips``, after DeepCache's cached *branch*): the cut then falls
inside a level, and at ``skips=1`` a reuse step runs only the stem and the
last up layer.  The deepest rung, ``skips=0``, keeps no skip connection
computed: a reuse step skips the whole UNet call and returns the call's output
from the last computed step (``WholeStepReplay`` on diffusers; in ComfyUI the
schedule's call wrapper, where the model's forward is called).  Which steps
reuse is a per-prompt schedule calibrated from how much
the deep features really change (``profiling.step_change``) and gated on
quality (``fragment.schedule.calibrate``).

Two module layouts are supported without importing either host:

* diffusers ``UNet2DConditionModel`` (``down_blocks``/``mid_block``/``up_blocks``):
  blocks are called as modules, so a deep block is wrapped in ``ReplayCall``;
* ComfyUI's ``UNetModel`` (``input_blocks``/``middle_block``/``output_blocks``):
  its forward *iterates* each ``TimestepEmbedSequential`` and calls the layers
  itself, so a deep block is replaced by ``ReplaySequence``, the same layers
  behind an ``__iter__`` that yields either them plus a recorder, or a replayer.

The wrappers hold no weights of their own (children are shared, not copied) and
never change the module they wrap; hosts install them as replacements or object
patches on a clone.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator

import torch
import torch.nn as nn

from ...errors import FragmentError
from ...profiling.discovery import block_layout
from .state import WHOLE_STEP, ScheduleState

log = logging.getLogger(__name__)


class _Wrapper(nn.Module):
    """A module around ``inner`` that reads through to it: hosts read the wrapped module's attributes (diffusers'
    UNet reads a block's ``has_cross_attention`` and ``resnets``; samplers read a UNet's ``config`` and ``dtype``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


class ReplayCall(_Wrapper):
    """A block that, on reuse steps, returns its output from the last computed step instead of running.

    >>> state = ScheduleState(reuse_steps=[1], total_steps=2)
    >>> block = ReplayCall(nn.Linear(1, 1), "b", state); state.expect_keys(["b"])
    >>> state.begin_call(999.0); first = block(torch.ones(1, 1))
    >>> state.begin_call(500.0); bool(torch.equal(block(torch.zeros(1, 1)), first))
    True
    """

    def __init__(self, inner: nn.Module, key: str, state: ScheduleState) -> None:
        super().__init__()
        self.inner = inner
        self.key = key
        self.state = state

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.state.replaying:
            cached = self.state.replay(self.key)
            if cached is not None:
                return cached
        out = self.inner(*args, **kwargs)
        self.state.store(self.key, out)
        return out


class _Recorder:
    """The last 'layer' of a computed deep block: keeps the block's output for later replays."""

    def __init__(self, key: str, state: ScheduleState) -> None:
        self.key, self.state = key, state

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.state.store(self.key, x)
        return x


class _Replayer:
    """The only 'layer' of a replayed deep block: its output from the last computed step."""

    def __init__(self, key: str, state: ScheduleState) -> None:
        self.key, self.state = key, state

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        cached = self.state.replay(self.key)
        if cached is None:  # ScheduleState only replays when every block has an entry; this is a bug guard
            raise FragmentError(f"step reuse: no cached output for {self.key} at step {self.state.step}")
        return cached


class ReplaySequence(nn.Sequential):
    """The layers of a ComfyUI ``TimestepEmbedSequential``, iterated so that reuse steps replay its output.

    ComfyUI's ``forward_timestep_embed`` runs a block as ``for layer in block``;
    plain callables fall through to ``layer(x)``, which is all the recorder and
    the replayer need.  The children are the original layers (shared), so
    object patches that reach into the block by path still find them.
    """

    def __init__(self, block: nn.Module, key: str, state: ScheduleState) -> None:
        super().__init__(*block)
        self.key = key
        self.state = state
        self._recorder = _Recorder(key, state)
        self._replayer = _Replayer(key, state)

    def __iter__(self) -> Iterator[Any]:
        if self.state.replaying and self.state.cached(self.key) is not None:
            return iter([self._replayer])
        return iter([*self._modules.values(), self._recorder])


class WholeStepReplay(_Wrapper):
    """A whole UNet whose call, on a reuse step, returns its output from the last computed step (``skips=0``).

    The output's first tensor (diffusers' ``sample``) is what is cached, under
    ``WHOLE_STEP``, so ScheduleState's rules hold as for a deep block: one slot
    per call of a step, replayed only for the same input shape, or for the rows
    of a narrowed call (CFG truncation); the call's form (a tensor, a tuple, a
    ``ModelOutput``) is rebuilt around it.

    >>> state = ScheduleState(reuse_steps=[1], total_steps=2)
    >>> unet = WholeStepReplay(nn.Linear(1, 1), state)
    >>> state.begin_call(999.0, (1, 1)); first = unet(torch.ones(1, 1))
    >>> state.begin_call(500.0, (1, 1)); bool(torch.equal(unet(torch.zeros(1, 1)), first))
    True
    """

    def __init__(self, inner: nn.Module, state: ScheduleState) -> None:
        super().__init__()
        self.inner = inner
        self.state = state
        self._form: Any = None  # rebuilds the computed call's output form around a replayed tensor
        state.expect_keys([WHOLE_STEP])
        # the sampler owns what the call returns and may update it in place: cache and replay copies
        state.protect([WHOLE_STEP])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.state.replaying and self._form is not None:
            cached = self.state.replay(WHOLE_STEP)
            if cached is not None:
                return self._form(cached)
        out = self.inner(*args, **kwargs)
        sample, self._form = _output_form(out)
        self.state.store(WHOLE_STEP, sample)
        return out


def _output_form(out: Any) -> tuple[torch.Tensor, Any]:
    """The first tensor of a UNet call's output and a function that rebuilds that output around another one.

    >>> sample, form = _output_form((torch.zeros(1), "extra")); form(torch.ones(1))
    (tensor([1.]), 'extra')
    """
    if isinstance(out, torch.Tensor):
        return out, lambda t: t
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        rest = tuple(out[1:])
        return out[0], lambda t: type(out)((t, *rest))
    keys = list(out.keys()) if hasattr(out, "keys") else []
    if keys and isinstance(out[keys[0]], torch.Tensor):  # diffusers' ModelOutput (UNet2DConditionOutput: sample)
        # only the type and the field name are kept: a closure over ``out`` would pin a whole step's output
        kind, first = type(out), keys[0]
        return out[first], lambda t: kind(**{first: t})
    raise FragmentError(f"whole-step reuse: expected the UNet to return a tensor, a tuple or a ModelOutput whose "
                        f"first field is a tensor, found {type(out).__name__}")


def model_output_of_denoised(model_sampling: Any, sigma: torch.Tensor, denoised: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """The UNet's raw output (eps, v) behind ComfyUI's ``apply_model`` result ``denoised``, or ``None`` where
    it cannot be recovered (a row whose output does not enter the denoised image, as at sigma 0).

    ``model_sampling`` is ComfyUI's (only its ``calculate_denoised`` is used, so the core imports no ComfyUI);
    the schedule's call wrapper (``nodes.schedule_patch``) caches this on computed steps of a whole-step
    schedule and hands it back through ``calculate_denoised`` with the reuse step's own ``x`` and sigma.

    ``calculate_denoised(sigma, out, x)`` is affine in ``out`` for every discrete parameterization (EPS:
    ``x - out * sigma``; V: ``x * a - out * b``), so the output is ``(denoised - D(0, x)) / D(1, 0)``.  The
    whole-step reuse caches this, not ``denoised``: the UNet's output is what the diffusers host and the
    profile's depth 0 reuse, and ``denoised`` also depends on the call's own ``x`` and sigma.

    >>> ms = type("EPS", (), {"calculate_denoised": staticmethod(lambda s, o, x: x - o * s.view(-1, 1))})()
    >>> model_output_of_denoised(ms, torch.tensor([2.0]), torch.tensor([[1.0]]), torch.tensor([[5.0]]))
    tensor([[2.]])
    """
    offset = model_sampling.calculate_denoised(sigma, torch.zeros_like(x), x)
    scale = model_sampling.calculate_denoised(sigma, torch.ones_like(x), torch.zeros_like(x))
    if not bool(torch.all(scale != 0)):
        return None
    return (denoised - offset) / scale


def reuse_replacements(model: nn.Module, shallow: int, state: ScheduleState, skips: int | None = None) -> dict[str, nn.Module]:
    """Path -> wrapper for every deep block of ``model`` (for diffusers: the fragment model, already pruned).

    ``skips`` (when given) counts the depth in skip connections instead of
    blocks (``BlockLayout.replay_paths``): ``skips=1`` replays all but the stem
    and the last up layer, DeepCache's shallowest branch.  Inside a diffusers
    block the wrappers sit on the resnets and attentions, which the block calls
    one by one; ComfyUI's blocks already are single skip units.

    ``skips=0`` (the whole call) replaces no block: the host wraps the call
    itself (``WholeStepReplay``, or ComfyUI's call wrapper), so this only tells
    ``state`` to expect the whole output, and needs no known block layout.

    >>> # small = replace_modules(small, reuse_replacements(small, 1, ScheduleState(reuse_steps=[2, 4], total_steps=6)))
    """
    if skips == 0:
        state.expect_keys([WHOLE_STEP])
        state.protect([WHOLE_STEP])
        return {}
    layout = block_layout(model)
    deep = layout.deep(shallow) if skips is None else layout.replay_paths(skips)
    state.expect_keys(deep)
    state.protect(deep[-1:])  # the last replayed block (forward order) feeds the first computed one
    wrap = ReplaySequence if layout.kind == "comfy" else ReplayCall
    return {path: wrap(model.get_submodule(path), path, state) for path in deep}
