"""The cond/uncond gap the CFG cut-off is predicted from (issue #27, item 3): measured per timestep by a probe on
the model's output, turned into the cut-offs the calibration tries, latest first."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

from prompt_fragments.fragment.calibration import Budget, Candidate, Judgement, Predictors, calibrate
from prompt_fragments.fragment.schedule.cfg_lever import (CFG_CUTOFFS, CFG_GAP_LIMIT, CfgCutoffLever, CfgEvidence,
                                                          cutoff_tries, predicted_cutoff)
from prompt_fragments.profiling.cfg_gap import CfgGapProbe
from prompt_fragments.profiling.dataset import ProfileData
from prompt_fragments.profiling.evidence import ProfileEvidence


class AddContext(nn.Module):
    """out = x + ctx: the rows of ``ctx`` make the cond and uncond predictions, so their gap is known by hand."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, transformer_options: dict | None = None):
        return x + ctx


def _gap(cond: torch.Tensor, uncond: torch.Tensor) -> float:
    return float(((cond - uncond).flatten(1).norm(dim=1) / cond.flatten(1).norm(dim=1)).mean())


def test_the_probe_reads_each_half_in_both_layouts_and_skips_single_half_calls() -> None:
    model = AddContext()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    ctx = torch.tensor([[0.0], [0.0], [2.0], [1.0]])
    with CfgGapProbe(model) as probe:
        model(x, torch.tensor(900.0), ctx)  # the reference's layout: [uncond; cond]
        # ComfyUI names the chunks: [cond, uncond] (0 is cond), read in that order
        model(x, torch.tensor(500.0), ctx, transformer_options={"cond_or_uncond": [0, 1]})
        model(x[:2], torch.tensor(300.0), ctx[:2])  # the uncond pass already dropped: one sample per half...
        model(x[:1], torch.tensor(200.0), ctx[:1])  # ... and a lone sample: no pair, not counted
        model(x, torch.tensor(100.0), ctx, transformer_options={"cond_or_uncond": [0]})  # cond only
    out = x + ctx
    gaps = probe.gaps()
    assert list(gaps) == [900.0, 500.0, 300.0]  # highest timestep first; 200 and 100 had no pair
    assert_close(torch.tensor(gaps[900.0]), torch.tensor(_gap(out[2:], out[:2])))
    assert_close(torch.tensor(gaps[500.0]), torch.tensor(_gap(out[:2], out[2:])))
    assert_close(torch.tensor(gaps[300.0]), torch.tensor(_gap(out[1:2], out[:1])))
    assert probe.calls == 3
    assert not model._forward_hooks  # the probe leaves no hook behind


def test_gaps_average_over_runs_per_timestep() -> None:
    model = AddContext()
    x = torch.ones(2, 2)
    with CfgGapProbe(model) as probe:
        model(x, torch.tensor(700.0), torch.tensor([[0.0], [1.0]]))  # cond 2, uncond 1: gap 1/2
        model(x, torch.tensor(700.0), torch.tensor([[0.0], [3.0]]))  # cond 4, uncond 1: gap 3/4
    assert_close(torch.tensor(probe.gaps()[700.0]), torch.tensor(0.625))


def test_evidence_carries_the_gaps_and_the_lever_predicts_from_them() -> None:
    model = AddContext()
    with CfgGapProbe(model) as probe:
        model(torch.ones(2, 2), torch.tensor(999.0), torch.tensor([[0.0], [9.0]]))
        model(torch.ones(2, 2), torch.tensor(600.0), torch.tensor([[0.0], [0.05]]))
        model(torch.ones(2, 2), torch.tensor(300.0), torch.tensor([[0.0], [0.05]]))
        model(torch.ones(2, 2), torch.tensor(100.0), torch.tensor([[0.0], [0.05]]))
    evidence = ProfileEvidence.from_probes(ProfileData({}, 4), [probe])
    assert evidence.cfg_gaps == probe.gaps()
    data = CfgCutoffLever.predictor(evidence, model, None)
    assert isinstance(data, CfgEvidence)
    assert Predictors({"cfg_cutoff": data}).cfg_cutoffs() == (600.0, 500.0, 350.0)
    # no gap measured (a sampler that never ran both halves): the fixed tries, as before the prediction
    assert CfgCutoffLever.predictor(ProfileEvidence(ProfileData({}, 4)), model, None) is True
    assert Predictors({"cfg_cutoff": True}).cfg_cutoffs() == tuple(CFG_CUTOFFS)


def _converging(at: float) -> dict[float, float]:
    """25 trailing DDIM timesteps whose gap falls from 1 to well below the limit at ``at`` (and rises again at the
    end, as the reference model's does)."""
    times = [999.0 - 40.0 * i for i in range(25)]
    return {t: (0.5 if t > at else 0.05) + (0.2 if t < 60 else 0.0) for t in times}


@pytest.mark.parametrize("at", [850.0, 700.0, 500.0, 250.0])
def test_the_predicted_cutoff_moves_with_a_planted_gap(at: float) -> None:
    cutoff = predicted_cutoff(_converging(at))
    first_converged = max(t for t in _converging(at) if t <= at)
    assert cutoff is not None and cutoff % 50 == 0
    # on the grid, at most one grid step below the first converged timestep: only converged steps drop the uncond
    # pass, and at most one converged step keeps it
    assert first_converged - 50.0 < cutoff <= first_converged + 1.0
    assert [t for t in _converging(at) if t < cutoff and t > at] == []
    assert len([t for t in _converging(at) if cutoff <= t <= at]) <= 1


def test_a_gap_that_never_converges_predicts_nothing_and_falls_back() -> None:
    gaps = {999.0 - 40.0 * i: 0.5 for i in range(25)}
    assert predicted_cutoff(gaps) is None
    assert cutoff_tries(CfgEvidence(gaps)) == tuple(CFG_CUTOFFS)
    # converged only at the last timestep: no cut-off is worth a try there
    assert predicted_cutoff({999.0: 0.5, 39.0: 0.01}) is None
    assert predicted_cutoff({999.0: 0.5, 500.0: 0.5, 79.0: 0.01, 39.0: 0.01}) is None  # t = 50 cuts one step
    assert predicted_cutoff({999.0: 0.5, 500.0: 0.5, 120.0: 0.01, 79.0: 0.01, 39.0: 0.01}) == 100.0  # two
    # converged from the first step (a random-weight model): the first step still keeps its uncond pass
    assert predicted_cutoff({999.0: 0.01, 666.0: 0.01, 333.0: 0.01}) == 950.0
    # steps denser than the grid: the cut-off may fall a step or two below the first converged one
    dense = {999.0 - 20.0 * i: (0.5 if i < 16 else 0.05) for i in range(50)}
    assert predicted_cutoff(dense) == 650.0  # first converged: t = 679
    # a limit moves the prediction: stricter waits longer
    gaps = {999.0: 0.5, 800.0: 0.09, 600.0: 0.04, 300.0: 0.04, 39.0: 0.2}
    assert predicted_cutoff(gaps, limit=CFG_GAP_LIMIT) == 800.0
    assert predicted_cutoff(gaps, limit=0.05) == 600.0


def test_the_calibration_tries_the_predicted_cutoff_first() -> None:
    """Judged on a toy rule (a cut-off passes at or below 650), the prediction is confirmed in two tries, where
    the fixed tries would stop at 500."""
    predicted = Predictors({"cfg_cutoff": CfgEvidence(_converging(680.0))}).cfg_cutoffs()
    assert predicted == (650.0, 500.0, 350.0)

    def judge(candidate: Candidate, seeds) -> Judgement:
        cutoff = candidate.amount("cfg_cutoff")
        return Judgement(cutoff is not None and cutoff <= 650.0)

    cal = calibrate([], judge, calibration_seeds=[0], holdout_seeds=[1], goal="speed", budget=Budget(images=8),
                    cfg_cutoffs=predicted)
    assert cal.chosen is not None and cal.chosen.amount("cfg_cutoff") == 650.0
    assert [(t["phase"], t["candidate"]["cfg_cutoff"]) for t in cal.tries] == [("calibration", 650.0), ("holdout", 650.0)]
    blind = calibrate([], judge, calibration_seeds=[0], holdout_seeds=[1], goal="speed", budget=Budget(images=8))
    assert blind.chosen.amount("cfg_cutoff") == 500.0


def test_reference_profile_measures_a_gap_per_step_and_predicts_a_cutoff() -> None:
    """The trained reference model's profiled runs: one gap per sampler step, finite and positive, and a
    predicted cut-off inside the sampled range that a planted late gap pushes down."""
    from prompt_fragments.reference.model import load_reference
    from prompt_fragments.reference.sampling import sample

    model = load_reference()
    context, uncond = model.encode(["a red circle in the top left"]), model.encode([""])
    with CfgGapProbe(model.unet) as probe:
        sample(model.unet, context, uncond, [0, 1], steps=10)
    gaps = probe.gaps()
    assert len(gaps) == 10 and all(math.isfinite(g) and g > 0 for g in gaps.values())

    class Planted(nn.Module):
        """The reference UNet with the cond half pushed away from the uncond half above t = 400."""

        def __init__(self, unet: nn.Module) -> None:
            super().__init__()
            self.unet = unet

        def forward(self, x, t, ctx):
            out = self.unet(x, t, ctx)
            if float(t) > 400:
                n = out.sample.shape[0] // 2
                out.sample[n:] += 2.0 * out.sample[n:].abs().mean()
            return SimpleNamespace(sample=out.sample)

    planted = Planted(model.unet)
    with CfgGapProbe(planted) as planted_probe:
        sample(planted, context, uncond, [0, 1], steps=10)
    moved = planted_probe.gaps()
    # a limit under which every step below t = 400 has converged, in both runs (the plant moves the trajectory)
    limit = max(g for run in (gaps, moved) for t, g in run.items() if t < 400)
    assert min(g for t, g in moved.items() if t > 400) > limit  # the plant is a gap the limit sees
    plain = predicted_cutoff(gaps, limit=limit)
    assert plain is not None and 400.0 <= plain < 1000
    assert predicted_cutoff(moved, limit=limit) == 400.0  # just above t = 399, the first converged step
