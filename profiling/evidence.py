"""Everything one profile measured, as one object: the evidence the levers plan and predict from.

A profiling run yields the head statistics (``ProfileData``) plus what the
other probes measured: feed-forward channel scores, the per-step change of
the deep features (and its timesteps and finer depths) and the per-layer
input statistics.  The K/V fold needs the conditioning rows the sampler will
pass, which the host knows and the probes do not.  They travel together in
:class:`ProfileEvidence`, one parameter through the pipeline, and the head
scores are computed once per set of scoring options, however many candidates
a calibration builds from them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch

from .dataset import ProfileData
from .scoring import ScoreWeights, rank_stability, score_heads, unstable_heads
from .step_change import ReuseDepth


@dataclass(frozen=True)
class Scores:
    """The score step's output: per-head scores, the rank stability behind them, and the heads it protects."""

    heads: dict[str, torch.Tensor]
    stability: dict[str, dict[str, Any]]
    protected: dict[str, list[int]]


@dataclass(frozen=True, eq=False)
class ProfileEvidence:
    """One profile's measurements; the optional ones are ``None`` when their probe did not run.

    ``ff_scores``: ``FFProfiler.scores()``; ``step_changes``, ``step_timesteps`` and ``reuse_depths``:
    ``StepChangeProbe.changes()``, ``.timesteps()`` and ``.depths()``; ``activation_stats``:
    ``ActivationStats.stats()``; ``cfg_gaps``: ``CfgGapProbe.gaps()``; ``cross_attn_changes``:
    ``CrossAttnChangeProbe.changes()``; ``kv_context``: ``[B, T, C]``, the cond and uncond rows to fold.

    >>> from prompt_fragments.profiling.dataset import ProfileData
    >>> evidence = ProfileEvidence(ProfileData({}, 4), step_changes=[None, 0.2, 0.1])
    >>> evidence.step_changes, evidence.ff_scores is None
    ([None, 0.2, 0.1], True)
    """

    profile: ProfileData
    ff_scores: Mapping[str, torch.Tensor] | None = None
    step_changes: Sequence[float | None] | None = None
    step_timesteps: Sequence[float] | None = None
    activation_stats: Mapping[str, Mapping[str, torch.Tensor]] | None = None
    reuse_depths: Mapping[int, ReuseDepth] | None = None
    cfg_gaps: Mapping[float, float] | None = None
    cross_attn_changes: Mapping[float, float] | None = None
    kv_context: torch.Tensor | None = None
    # "profile": measured on this prompt; "prior": a model configuration's means (``Prior.evidence``), which a
    # calibration must not record back into that prior as if they were a new profile
    source: str = "profile"
    fixed_scores: Scores | None = None  # scores given, not computed (``from_scores``)
    _scored: dict[tuple, Scores] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_probes(cls, profile: ProfileData, probes: Iterable[Any], *, kv_context: torch.Tensor | None = None
                    ) -> "ProfileEvidence":
        """The evidence of a profile and the probes that ran beside it (``FFProfiler``, ``StepChangeProbe``,
        ``ActivationStats``, ``CfgGapProbe``, ``CrossAttnChangeProbe``; any other object is ignored).

        >>> ProfileEvidence.from_probes(ProfileData({}, 4), []).reuse_depths is None
        True
        """
        from .activation_stats import ActivationStats
        from .cfg_gap import CfgGapProbe
        from .cross_attn_change import CrossAttnChangeProbe
        from .ff_profiler import FFProfiler
        from .step_change import StepChangeProbe

        found: dict[str, Any] = {}
        for probe in probes:
            if isinstance(probe, FFProfiler) and probe.calls:
                found["ff_scores"] = probe.scores()
            elif isinstance(probe, StepChangeProbe):
                found.update(step_changes=probe.changes(), step_timesteps=probe.timesteps(),
                             reuse_depths=probe.depths())
            elif isinstance(probe, ActivationStats) and probe.calls:
                found["activation_stats"] = probe.stats()
            elif isinstance(probe, CfgGapProbe) and probe.calls:
                found["cfg_gaps"] = probe.gaps()
            elif isinstance(probe, CrossAttnChangeProbe) and probe.calls:
                found["cross_attn_changes"] = probe.changes()
        return cls(profile, kv_context=kv_context, **found)

    @classmethod
    def from_scores(cls, heads: Mapping[str, torch.Tensor], protected: Mapping[str, Sequence[int]] | None = None,
                    **measurements: Any) -> "ProfileEvidence":
        """Evidence whose head scores are given (e.g. weight-norm scores of a model never profiled), with
        whatever else was measured (``ff_scores=``, ``kv_context=``, ...); ``scores()`` returns them as given.

        >>> e = ProfileEvidence.from_scores({"a": torch.tensor([1.0, 2.0])}, {"a": [1]})
        >>> e.scores().protected, e.profile.total_calls
        ({'a': [1]}, 0)
        """
        scores = Scores(dict(heads), {}, {k: list(v) for k, v in (protected or {}).items()})
        return cls(ProfileData({}, 1), fixed_scores=scores, **measurements)

    def with_context(self, kv_context: torch.Tensor | None) -> "ProfileEvidence":
        """The same evidence with the conditioning rows to fold; it shares the score cache (the rows do not
        change the head scores).

        >>> e = ProfileEvidence(ProfileData({}, 4)); e.with_context(torch.zeros(2, 3, 4)).kv_context.shape
        torch.Size([2, 3, 4])
        """
        return dataclasses.replace(self, kv_context=kv_context)  # replace passes the same _scored dict on

    def scores(self, weights: ScoreWeights = ScoreWeights(), *, max_rank_std: float = 0.25,
               keep_unstable_heads: bool = True) -> Scores:
        """The head scores; heads whose rank moves across seeds are protected when ``keep_unstable_heads``.
        Computed once per set of options.

        >>> e = ProfileEvidence(ProfileData({}, 4)); e.scores() is e.scores()
        True
        """
        if self.fixed_scores is not None:
            return self.fixed_scores
        key = (weights, float(max_rank_std), bool(keep_unstable_heads))
        if key not in self._scored:
            stability = rank_stability(self.profile)
            protected = unstable_heads(stability, max_rank_std) if keep_unstable_heads else {}
            self._scored[key] = Scores(score_heads(self.profile, weights), stability, protected)
        return self._scored[key]
