"""A profiling session that lives across sampler runs, for hosts that only let us wrap model calls.

ComfyUI calls the UNet through a per-clone ``model_function_wrapper`` and
never tells the model which seed the sampler used.  A session therefore
counts *runs*: the noise level only falls during one sampling run, so a call
whose sigma is higher than the previous call's starts a new run (a new
sample for rank stability).  Hooks are installed around each call only, so
the shared model carries no hooks between calls and other clones of it are
never profiled by accident.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Callable, Collection, Iterator

import torch.nn as nn

from ..errors import FragmentError, ProfilingError
from .activation_stats import ActivationStats
from .cfg_gap import CfgGapProbe
from .cross_attn_change import CrossAttnChangeProbe
from .dataset import ProfileData
from .evidence import ProfileEvidence
from .ff_profiler import DEFAULT_FF_TOKEN_SAMPLE, FFProfiler
from .hooks import HookContext
from .profiler import DEFAULT_ENTROPY_TOKENS, HeadProfiler
from .step_change import ReuseDepth, StepChangeProbe

log = logging.getLogger(__name__)


def profiling_stack(model: nn.Module, *, buckets: int = 4, shallow: int = 1, ff: bool = True, steps: bool = True,
                    ff_token_sample: int | None = DEFAULT_FF_TOKEN_SAMPLE, activations: bool = True,
                    cfg_gap: bool = True, cross_attn: bool = True, **head_kwargs: Any) -> list[HookContext]:
    """The hook contexts a profile attaches: heads, feed-forward channels, per-step change, the
    per-layer input statistics of the low-bit lever (``activations``), the cond/uncond gap the CFG
    cut-off is predicted from (``cfg_gap``; batches are ``[uncond; cond]``) and the cross-attention
    change the cross-attention cache is gated by (``cross_attn``), as used.

    ``head_kwargs`` go to ``HeadProfiler`` (``FULL_FIDELITY`` for the full statistics, with
    ``ff_token_sample=None`` for every token of the feed-forward blocks).  A model
    without feed-forward blocks or without a known block layout just gets fewer contexts.

    >>> [type(c).__name__ for c in profiling_stack(unet)]  # doctest: +SKIP
    ['HeadProfiler', 'FFProfiler', 'StepChangeProbe', 'ActivationStats', 'CfgGapProbe', 'CrossAttnChangeProbe']
    """
    stack: list[HookContext] = [HeadProfiler(model, buckets=buckets, **head_kwargs)]
    if ff:
        try:
            stack.append(FFProfiler(model, token_sample=ff_token_sample))
        except ProfilingError:
            log.debug("%s: no feed-forward blocks to profile", type(model).__name__)
    if steps:
        try:
            stack.append(StepChangeProbe(model, shallow))
        except FragmentError:
            log.debug("%s: no block layout for the step-change probe", type(model).__name__)
    if activations:
        try:
            stack.append(ActivationStats(model))
        except ProfilingError:
            log.debug("%s: no Linear or Conv2d layers for activation statistics", type(model).__name__)
    if cfg_gap:
        stack.append(CfgGapProbe(model))
    if cross_attn:
        try:
            stack.append(CrossAttnChangeProbe(model))
        except ProfilingError:
            log.debug("%s: no cross-attention to profile", type(model).__name__)
    return stack


#: Each optional probe of ``profiling_stack`` and the ``ProfileEvidence`` measurements it makes.
PROBE_EVIDENCE = {"ff": ("ff_scores",), "steps": ("step_changes", "step_timesteps", "reuse_depths"),
                  "activations": ("activation_stats",), "cfg_gap": ("cfg_gaps",),
                  "cross_attn": ("cross_attn_changes",)}


def stack_flags(needs: Collection[str] | None = None) -> dict[str, bool]:
    """``profiling_stack``'s probe switches for a profile that must measure ``needs`` (``ProfileEvidence`` field
    names, e.g. ``fragment.levers.goal_evidence(goal)``); every probe when ``needs`` is None.

    >>> stack_flags({"step_changes", "cfg_gaps"})
    {'ff': False, 'steps': True, 'activations': False, 'cfg_gap': True, 'cross_attn': False}
    """
    known = {field for fields in PROBE_EVIDENCE.values() for field in fields}
    unknown = sorted(set(needs or ()) - known - {"kv_context"})  # the K/V fold reads the conditioning, not a probe
    if unknown:
        raise FragmentError(f"profiling: expected evidence among {', '.join(sorted(known))}, found {', '.join(unknown)}")
    return {flag: needs is None or any(f in needs for f in fields) for flag, fields in PROBE_EVIDENCE.items()}


@contextlib.contextmanager
def profiled(model: nn.Module, needs: Collection[str] | None = None,
             **stack_kwargs: Any) -> Iterator[tuple[HeadProfiler, list[HookContext]]]:
    """``profiling_stack`` attached for a ``with`` block, with the probes ``needs`` asks for (``stack_flags``):
    yields the head profiler and the other probes (for ``ProfileEvidence.from_probes``).

    >>> with profiled(unet, {"step_changes"}, buckets=4) as (prof, probes):  # doctest: +SKIP
    ...     sampler(unet, seeds)
    """
    with contextlib.ExitStack() as hooks:
        prof, *probes = [hooks.enter_context(h) for h in profiling_stack(model, **stack_kwargs, **stack_flags(needs))]
        yield prof, probes


class ProfileSession:
    """Accumulates head statistics over every wrapped call of one model.

    >>> session = ProfileSession(unet, buckets=4)  # doctest: +SKIP
    >>> out = session.call(lambda: unet(x, t, ctx), sigma=14.6)  # doctest: +SKIP
    >>> session.runs, session.result().total_calls  # doctest: +SKIP
    (1, 1)
    """

    def __init__(self, model: nn.Module, *, buckets: int = 4, entropy_tokens: int = DEFAULT_ENTROPY_TOKENS, seed: int = 0,
                 info: dict[str, Any] | None = None) -> None:
        self.model = model
        self._profiler = HeadProfiler(model, buckets=buckets, entropy_tokens=entropy_tokens, seed=seed, info=info)
        try:  # feed-forward channel statistics ride along, for the FF lever; a UNet without FF blocks just has none
            self._ff: FFProfiler | None = FFProfiler(model)
        except ProfilingError:
            self._ff = None
        try:  # per-step change of the deep features, for a step-reuse schedule (issue #8)
            self._steps: StepChangeProbe | None = StepChangeProbe(model)
        except FragmentError:
            self._steps = None
        try:  # mean |x| per input channel and sampled inputs of every layer, for the low-bit lever (issue #18)
            self._acts: ActivationStats | None = ActivationStats(model)
        except ProfilingError:
            self._acts = None
        # cond/uncond gap per timestep, for the CFG cut-off (ComfyUI names each chunk in cond_or_uncond)
        self._cfg = CfgGapProbe(model)
        try:  # how fast cross-attention converges, for the cross-attention cache
            self._attn: CrossAttnChangeProbe | None = CrossAttnChangeProbe(model)
        except ProfilingError:
            self._attn = None
        self._last_sigma: float | None = None
        self._lock = threading.Lock()
        self.runs = 0
        self.calls = 0

    def _maybe_new_run(self, sigma: float | None, label: Any) -> None:
        if self._last_sigma is None or (sigma is not None and sigma > self._last_sigma * (1 + 1e-6)):
            self.runs += 1
            self._profiler.begin_sample(label if label is not None else f"run-{self.runs}")
        self._last_sigma = sigma if sigma is not None else self._last_sigma

    def call(self, fn: Callable[[], Any], *, sigma: float | None = None, label: Any = None) -> Any:
        """Run ``fn()`` (one model call) with the profiling hooks installed, and return its result.

        ``sigma`` is the call's noise level; a rise starts a new run.  ``label``
        names the new run when one starts (a seed, if the host knows it).
        """
        with self._lock:  # hooks are per model: two threads must not interleave install/remove
            self._maybe_new_run(sigma, label)
            self.calls += 1
            with contextlib.ExitStack() as stack:
                for probe in (self._profiler, self._ff, self._steps, self._acts, self._cfg, self._attn):
                    if probe is not None:
                        stack.enter_context(probe)
                return fn()

    def ff_scores(self) -> dict | None:
        """Feed-forward channel scores from the profiled calls (None when there were none)."""
        return self._ff.scores() if self._ff is not None and self._ff.calls else None

    def activation_stats(self) -> dict | None:
        """Per-layer input statistics from the profiled calls (None when there were none)."""
        return self._acts.stats() if self._acts is not None and self._acts.calls else None

    def step_changes(self) -> list[float | None] | None:
        """Mean relative change of the deep features per sampler step (None when this UNet layout has no probe)."""
        return self._steps.changes() if self._steps is not None else None

    def reuse_depths(self) -> dict[int, ReuseDepth] | None:
        """The finer reuse depths (``StepChangeProbe.depths()``), or None without a probe."""
        return self._steps.depths() if self._steps is not None else None

    def step_timesteps(self) -> list[float] | None:
        """The timestep of each of those steps (from the first profiled run), or None without a probe."""
        return self._steps.timesteps() if self._steps is not None else None

    def cfg_gaps(self) -> dict[float, float] | None:
        """The mean cond/uncond gap per timestep (``CfgGapProbe.gaps()``), or None when no call had both halves."""
        return self._cfg.gaps() if self._cfg.calls else None

    def cross_attn_changes(self) -> dict[float, float] | None:
        """The cross-attention change per timestep (``CrossAttnChangeProbe.changes()``), or None when none was seen."""
        return self._attn.changes() if self._attn is not None and self._attn.calls else None

    def result(self) -> ProfileData:
        """The statistics so far, with the run count in ``info``."""
        data = self._profiler.result()
        data.info.update({"runs": self.runs, "calls": self.calls})
        return data

    def evidence(self, kv_context: Any = None) -> ProfileEvidence:
        """Everything the session measured so far, as the one object the extraction takes.

        >>> session.evidence().profile.total_calls  # doctest: +SKIP
        20
        """
        return ProfileEvidence(self.result(), ff_scores=self.ff_scores(), step_changes=self.step_changes(),
                               step_timesteps=self.step_timesteps(), activation_stats=self.activation_stats(),
                               reuse_depths=self.reuse_depths(), cfg_gaps=self.cfg_gaps(),
                               cross_attn_changes=self.cross_attn_changes(), kv_context=kv_context)
