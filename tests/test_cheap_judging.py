"""Cheap candidate renders (issue #26 item 2): branching from the full model's trajectory, a sequential stop,
and the latent judge's agreement with the decoded gate."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from prompt_fragments.fragment.calibration import Candidate, Judgement


@pytest.fixture(scope="module")
def reference_setup():
    pytest.importorskip("diffusers")
    from prompt_fragments.defaults import DEFAULT_PROMPT
    from prompt_fragments.fragment.build import describe_base
    from prompt_fragments.judge.reference_target import ReferenceTarget
    from prompt_fragments.profiling.evidence import ProfileEvidence
    from prompt_fragments.profiling.ff_profiler import FFProfiler
    from prompt_fragments.profiling.profiler import HeadProfiler
    from prompt_fragments.profiling.step_change import StepChangeProbe

    target = ReferenceTarget(DEFAULT_PROMPT, limits={"ssim_min": 0.9}, steps=6)
    unet, seeds = target.unet, [0, 1]
    target.watch(seeds)
    with HeadProfiler(unet) as prof, FFProfiler(unet) as ff, StepChangeProbe(unet) as probe, torch.no_grad():
        full = target.run(unet, seeds)
    evidence = ProfileEvidence(prof.result(), ff_scores=ff.scores(), step_changes=probe.changes(),
                               step_timesteps=probe.timesteps())
    return target, evidence, describe_base(unet, "reference"), seeds, full


def test_a_branched_render_equals_the_full_render_and_a_weight_lever_branches_at_0(reference_setup) -> None:
    from prompt_fragments.fragment.extract import candidate_fragment
    from prompt_fragments.judge.fragment_judge import fragment_branch, render

    target, evidence, base, seeds, full = reference_setup
    assert target.trajectory.seeds == seeds  # the watched seeds' states were recorded by the profiled run
    raw = lambda *a, **kw: target.run(*a, raw=True, **kw)  # noqa: E731
    branched_any = False
    for candidate in (Candidate({"cfg_cutoff": 500.0}), Candidate({"step_reuse": 0.4, "cfg_cutoff": 300.0})):
        fragment = candidate_fragment(evidence, target.unet, candidate, base=base, name="b")
        step = fragment_branch(target.unet, fragment, target.timesteps)
        branched_any = branched_any or step > 0
        whole, reused = render(target.unet, fragment, seeds, raw)
        branched, reused_branched = render(target.unet, fragment, seeds, raw, branch=(step, target.trajectory))
        torch.testing.assert_close(branched, whole, rtol=0, atol=0)  # bit for bit
        assert reused_branched == [s - step for s in reused]  # the state counts steps from the branch
    assert branched_any
    weights = candidate_fragment(evidence, target.unet, Candidate({"heads": 0.2}), base=base, name="w")
    assert fragment_branch(target.unet, weights, target.timesteps) == 0


def test_the_judge_branches_a_schedule_only_candidate_and_keeps_its_verdict(reference_setup) -> None:
    from prompt_fragments.fragment.extract import candidate_fragment
    from prompt_fragments.judge.fragment_judge import fragment_judge

    target, evidence, base, seeds, full = reference_setup
    calls: list[int] = []

    def run(unet, seed_list, **kw):
        calls.append(kw.get("branch", (0, None))[0])
        return target.run(unet, seed_list, **kw)

    fragment = candidate_fragment(evidence, target.unet, Candidate({"cfg_cutoff": 500.0}), base=base, name="c")
    plain = fragment_judge(target.unet, run, target.judge, seeds, full)(fragment, seeds)
    fast = fragment_judge(target.unet, run, target.judge, seeds, full, trajectory=target.trajectory,
                          timesteps=target.timesteps)(fragment, seeds)
    assert calls[0] == 0 and calls[-1] > 0
    assert fast.metrics["ssim_mean"] == plain.metrics["ssim_mean"] and fast.passed == plain.passed
    assert fast.metrics["branch_step"] == calls[-1] and fast.images == len(seeds)


def test_a_sequential_stop_fires_on_a_clear_failure_and_not_on_a_pass(monkeypatch) -> None:
    import prompt_fragments.judge.fragment_judge as fj
    from prompt_fragments.fragment.format.manifest import Fragment

    unet = torch.nn.Sequential(torch.nn.Linear(2, 2))
    rendered: list[int] = []

    def run(model, seed_list, **kw):
        rendered.extend(seed_list)
        return np.zeros((len(seed_list), 2, 2, 3), np.uint8)

    quality = {"ssim": 0.5}

    def compare(full, images):
        s = quality["ssim"]
        return s >= 0.9, {"ssim_mean": s, "gate_failures": [] if s >= 0.9 else [f"ssim_mean {s} < 0.9"],
                          "gate_slack": s / 0.9 - 1}

    seeds = list(range(8))
    fragment = Fragment(manifest={"name": "toy", "schedule": {}}, tensors={})
    judge = fj.fragment_judge(unet, run, compare, seeds, np.zeros((8, 2, 2, 3), np.uint8),
                              sequential=fj.SequentialStop({"ssim_min": 0.9}, group=2))
    monkeypatch.setattr(fj, "apply_schedule", lambda model, frag: (model, _State()))  # no UNet: a toy run
    failed = judge(fragment, seeds)
    assert not failed.passed and failed.images == 2 < len(seeds) and rendered == [0, 1]
    assert any("sequential stop after 2 of 8" in r for r in failed.reasons)
    rendered.clear()
    quality["ssim"] = 0.95
    passed = judge(fragment, seeds)
    assert passed.passed and passed.images == 8 and rendered == seeds and "sequential_stop" not in passed.metrics
    assert isinstance(passed, Judgement) and passed.seconds is not None and passed.seconds >= 0


class _State:
    def reused_steps(self) -> list[int]:
        return []


def test_the_printed_agreement_is_computed_from_the_renders_not_constant() -> None:
    from prompt_fragments.judge.agreement import format_agreement, latent_agreement
    from prompt_fragments.reference.sampling import to_uint8

    g = torch.Generator().manual_seed(0)
    full = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(4, 3, 8, 8, generator=g)

    def gate(a, b):
        err = float(np.abs(a.astype(float) - b.astype(float)).mean())
        return err < 6.0, {"ssim_mean": None, "lpips_mean": None}

    def line(scales):
        cands = {f"s{s}": full + s * noise for s in scales}
        return latent_agreement(full, cands, gate=gate, to_images=to_uint8), cands

    d1, cands = line([0.01, 0.03, 0.1, 0.3])
    d2, _ = line([0.3, 0.2, 0.01, 0.02, 0.5])
    assert format_agreement(d1) != format_agreement(d2)
    assert d1["candidates"] == 4 and d1["images"] == 16 and d2["images"] == 20
    # the fitted limit separates what the gate passed from what it failed on these renders
    passed = [r["latent_rel_error"] for r in d1["per_candidate"] if r["gate_passed"]]
    assert d1["screen_limit"] == max(passed) and 0 < d1["gate_passes"] < 4
    assert d1["spearman_latent_vs_1_minus_ssim"] > 0.5  # more noise: both larger latent error and lower SSIM
