"""Tier 2: FragmentExtractor judges its fragment inside a real ComfyUI (issue #15, part 3).

One 2-step run of a random-weight SD1.5 checkpoint at 64 px is profiled; the
extractor then calibrates against it with a small image budget.  A random
network's output moves a lot under any lever, so what passes here is not the
point: that the judge measures, records and falls back honestly is.
"""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

import comfyui_support as cs
from prompt_fragments.fragment.build import describe_base
from prompt_fragments.fragment.calibration import Candidate, profile_predictors
from prompt_fragments.fragment.extract import candidate_fragment
from prompt_fragments.fragment.format.store import load_fragment
from prompt_fragments.fragment.library.index import entries, forget
from prompt_fragments.fragment.patching import base_sha256
from prompt_fragments.fragment.schedule.cfg_lever import CfgEvidence, cutoff_tries

SEED, STEPS, CFG = 7, 4, 7.0  # 4 steps: step reuse (the speed goal's lever) has steps to choose from


@pytest.fixture(scope="module")
def env(comfyui, comfyui_pack, sd15_checkpoint):
    nodes, mapping = comfyui.nodes, comfyui_pack.NODE_CLASS_MAPPINGS
    with torch.inference_mode():
        model, clip, vae, profile = mapping["ProfilerModelLoader"]().load(sd15_checkpoint, 2, 32, "accumulate")
        positive = nodes.CLIPTextEncode().encode(clip, "A dog on a jet ski")[0]
        negative = nodes.CLIPTextEncode().encode(clip, "blurry")[0]
        latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        sampled = nodes.KSampler().sample(model, SEED, STEPS, CFG, "euler", "normal", positive, negative, latent)[0]
        # The random checkpoint's VAE loads uninitialised (its keys are missing): decoded images would be
        # whatever memory held, so give it seeded random weights, which decode a latent into a varied image.
        cs.fill_deterministic_(vae.first_stage_model, 0)
    yield SimpleNamespace(comfyui=comfyui, pack=comfyui_pack, mapping=mapping, model=model, vae=vae, profile=profile,
                          positive=positive, negative=negative, sampled=sampled)
    # The runtime's fragments folder is shared with later modules: take these fragments out of the (auto)
    # index, where their prompt (a random encoder maps every prompt alike) would win other tests' lookups.
    folder = comfyui.model_dir("fragments")
    for entry in entries(folder):
        if entry["name"].startswith("judged_"):
            forget(folder, entry["name"])


def _calibrate(env, name: str, trigger=None, **inputs):
    """The extractor in calibration mode, wired as the shipped workflows wire it; returns (handle, status, latents).

    No sampler setting is given: the extractor takes them from the profiled run.  The goal is ``speed``:
    building a precision candidate quantizes the whole UNet (tens of seconds on a CI core), and the judging
    under test is the same for every goal.  ``budget_images`` (a Python-only input) keeps the test short.
    """
    wiring = dict(positive=env.positive, negative=env.negative, calibrate="on", goal="speed", budget_images=6,
                  holdout_seeds=1, overwrite=True, confirm="judge")
    wiring.update(inputs)
    with torch.inference_mode():
        out = env.mapping["FragmentExtractor"]().extract(env.profile, env.sampled if trigger is None else trigger, name,
                                                         **wiring)
    handle, status, latents = out["result"]
    assert out["ui"]["text"] == [status]
    return handle, status, latents


def test_extractor_with_a_vae_records_judge_seeds_and_every_try(env) -> None:
    calls = env.profile.session.result().total_calls
    handle, status, _latents = _calibrate(env, "judged_vae", vae=env.vae)
    assert env.profile.session.result().total_calls == calls, "judging added to the profile"
    manifest = load_fragment(handle.manifest_path).manifest
    quality = manifest["quality"]
    refinement = quality["refinement"]
    assert quality["quality_gate"] in ("passed", "fallback_full_model") and quality["quality_gate"] == refinement["status"]
    assert "SSIM" in quality["judge"] and quality["judge"] == refinement["judge"] and quality["judge"] in status
    assert refinement["calibration_seeds"] == [SEED] and refinement["holdout_seeds"] == [SEED + 1]
    assert refinement["tries"], "no try recorded"
    for entry in refinement["tries"]:
        assert entry["seeds"] and entry["images"] >= 1 and entry["seconds"] >= 0
        assert -1.0 <= entry["metrics"]["ssim_mean"] <= 1.0 and entry["metrics"]["space"] == "image"
        assert "latent_rel_error" not in entry["metrics"]  # with a VAE the images are judged, nothing else
    cost = manifest["performance"]["calibration"]
    assert cost["images"] == refinement["cost"]["images"] <= 6 and cost["tries"] == len(refinement["tries"])
    assert f"{cost['images']} images" in status and f"{cost['tries']} tries" in status
    assert "LPIPS" in status  # measured (judge "SSIM + LPIPS") or said to be missing
    if quality["quality_gate"] == "passed":
        assert status.startswith("calibrated (speed)") and "held-out seeds" in status
        assert quality["holdout"]["ssim_mean"] >= 0.9
    else:
        assert status.startswith("FULL MODEL used") and manifest["pruning"]["heads_removed"] == 0


def test_a_gate_that_cannot_pass_stores_the_full_model_and_says_so(env, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    impossible = tmp_path / "thresholds.yaml"
    # A latent error below zero is unreachable: every candidate fails, whatever it is.
    impossible.write_text("quality_gate:\n  variants: 1\n  latent_rel_error_max: -1.0\n")
    monkeypatch.setattr(env.pack.judge.comfy, "DEFAULT_THRESHOLDS", impossible)
    handle, status, _latents = _calibrate(env, "judged_impossible", budget_images=3)
    assert status.startswith("FULL MODEL used: no lever combination passed the quality gate"), status
    assert "last failures" in status and "latent_rel_error" in status and "> -1" in status
    assert "judged in latent space" in status
    fragment = load_fragment(handle.manifest_path)
    manifest = fragment.manifest
    assert manifest["quality"]["quality_gate"] == "fallback_full_model"
    assert manifest["quality"]["refinement"]["fallback_full_model"] is True
    assert manifest["quality"]["holdout"] is None
    assert manifest["pruning"]["heads_removed"] == 0 and not fragment.kept  # no lever: the full model
    assert all(not t["passed"] for t in manifest["quality"]["refinement"]["tries"])
    assert manifest["performance"]["calibration"]["images"] <= 3
    # the fallback records what it judged with, but loaded it is the full model: another sampler is no warning
    assert manifest["quality"]["sampler"]["scheduler"] == "normal"
    with torch.inference_mode():
        model, _ = env.mapping["FragmentLoader"]().apply(env.model, "(none)", "raise", fragment=handle)
        _out, report = env.mapping["BatchGenerator"]().generate_and_report(
            model, env.positive, env.negative, {"samples": torch.zeros_like(env.sampled["samples"])}, SEED, 1, 1,
            STEPS, CFG, "euler", "karras", 1.0)
    assert not report.startswith("WARNING") and "not measured on this sampler" not in report, report


def test_the_judged_numbers_follow_the_fragment(env) -> None:
    judge_module, models = env.pack.judge.comfy, env.pack.nodes.fragment_loader.JUDGE_MODELS
    settings = judge_module.SamplerSettings(SEED, STEPS, CFG, "euler", "normal")
    data = env.profile.session.evidence()
    model = env.profile.diffusion_model
    digest = base_sha256(model, {})
    base = describe_base(model, "judge_test", sha256=digest, hash_kind="state_dict_fp16")

    def judged(candidate: Candidate, vae=None) -> dict:
        judge = judge_module.ComfyJudge(env.profile.patcher, settings, env.positive, env.negative, env.sampled,
                                        models=models, vae=vae, digest=digest)
        with torch.inference_mode():  # as ComfyUI runs a node
            fragment = candidate_fragment(data, model, candidate, base=base, name="judge_test")
            return dict(judge(fragment, [SEED]).metrics)

    full, mild, strong = (judged(c) for c in (Candidate(), Candidate({"heads": 0.1}), Candidate({"heads": 0.6, "ff": 0.6})))
    # The full model, rendered unprofiled on a clone, reproduces the profiled run: the reference is the right one.
    assert full["latent_rel_error"] < 1e-6 and not full["gate_failures"]
    assert 0 < mild["latent_rel_error"] < strong["latent_rel_error"], (mild, strong)
    # With a VAE the same latents are decoded and compared as images.  A random network barely uses its
    # attention, so its fragments move the latents by less than SSIM resolves (both read 1.0 here); that the
    # image metric follows the latents is shown on a latent moved by a known amount instead.
    image_judge = judge_module.ComfyJudge(env.profile.patcher, settings, env.positive, env.negative, env.sampled,
                                          models=models, vae=env.vae, digest=digest)
    reference = env.sampled["samples"]
    with torch.inference_mode():
        same, moved = image_judge.measure(reference, reference), image_judge.measure(reference, reference * 0.8 + 1.0)
    assert same["ssim_mean"] == 1.0 and moved["ssim_mean"] < 1.0 and moved["space"] == "image", (same, moved)


def test_the_profiler_records_the_profiled_run(env) -> None:
    run = env.profile.runs[-1]
    assert (run.seed, run.steps, run.cfg, run.sampler_name, run.scheduler) == (SEED, STEPS, CFG, "euler", "normal")
    assert run.noise_from_seed and run.empty_latent and run.denoise == 1.0
    assert len(run.sigmas) == STEPS + 1 and run.sigmas[-1] == 0.0


def test_extractor_re_renders_the_recorded_run_and_delivers_its_full_model_latents(env) -> None:
    handle, status, latents = _calibrate(env, "judged_recorded")
    refinement = load_fragment(handle.manifest_path).manifest["quality"]["refinement"]
    assert refinement["calibration_seeds"] == [SEED] and refinement["holdout_seeds"] == [SEED + 1], status
    # Every full-model render, one row per seed, each BatchGenerator's image of that seed.
    assert latents["fragment_seeds"] == [SEED, SEED + 1]
    assert latents["samples"].shape == (2, *env.sampled["samples"].shape[1:])
    full = env.pack.nodes.profiler_loader.without_profiling(env.model.clone())
    calls = env.profile.session.result().total_calls
    with torch.inference_mode():
        (batch,) = env.mapping["BatchGenerator"]().generate(full, env.positive, env.negative,
                                                            {"samples": torch.zeros_like(env.sampled["samples"])},
                                                            SEED, 2, 2, STEPS, CFG, "euler", "normal", 1.0)
    assert env.profile.session.result().total_calls == calls
    torch.testing.assert_close(latents["samples"], batch["samples"].float().cpu(), rtol=1e-4, atol=1e-4)


def test_the_judged_sampler_is_recorded_and_a_batch_on_another_one_is_a_warning(env) -> None:
    handle, status, _latents = _calibrate(env, "judged_sampler", budget_images=3)
    quality = load_fragment(handle.manifest_path).manifest["quality"]
    assert quality["sampler"] == {"sampler_name": "euler", "scheduler": "normal", "steps": STEPS, "cfg": CFG,
                                  "denoise": 1.0}
    assert quality["quality_gate"] == "passed", status  # a fragment with a lever (here a CFG cut-off) to run
    with torch.inference_mode():
        model, _ = env.mapping["FragmentLoader"]().apply(env.model, "(none)", "raise", fragment=handle)
        reports = {}
        for scheduler in ("normal", "karras"):
            _out, reports[scheduler] = env.mapping["BatchGenerator"]().generate_and_report(
                model, env.positive, env.negative, {"samples": torch.zeros_like(env.sampled["samples"])}, SEED, 1, 1,
                STEPS, CFG, "euler", scheduler, 1.0)
    assert "not measured on this sampler" not in reports["normal"] and not reports["normal"].startswith("WARNING")
    assert reports["karras"].startswith("WARNING: "), reports["karras"]
    assert ("the fragment's quality was not measured on this sampler (judged with scheduler normal; this run has "
            "karras): extract it again with these settings, or set audit_every") in reports["karras"]


def test_an_override_that_agrees_is_accepted_and_one_that_disagrees_is_refused(env) -> None:
    _calibrate(env, "judged_override", seed=SEED, steps=STEPS, cfg=CFG, sampler_name="euler", scheduler="normal",
               budget_images=3)
    calls = env.profile.session.result().total_calls
    with pytest.raises(Exception, match=r"the seed input is 8, but the profiled run was recorded with seed 7") as info:
        _calibrate(env, "judged_wrong_seed", seed=SEED + 1)
    assert type(info.value).__name__ == "FragmentError"
    with pytest.raises(Exception, match=r"the sampler_name input is 'heun', but the profiled run was recorded with "
                                        r"sampler_name 'euler'"):
        _calibrate(env, "judged_wrong_sampler", sampler_name="heun")
    with pytest.raises(Exception, match=r"the steps input is 5, but the profiled run was recorded with steps 4"):
        _calibrate(env, "judged_wrong_steps", steps=5)
    assert env.profile.session.result().total_calls == calls


def test_a_trigger_that_is_not_the_profiled_run_is_refused(env) -> None:
    # another image, not a rounding of this one: the random checkpoint's latents are large (mean |x| near 60),
    # so an offset of 1 is within the check's 2 % tolerance
    other = {"samples": -env.sampled["samples"]}
    with pytest.raises(Exception, match=r"the trigger LATENT is not the full model's output for seed 7") as info:
        _calibrate(env, "judged_wrong_trigger", trigger=other)
    assert type(info.value).__name__ == "FragmentError"


def test_a_batch_too_small_is_refused_before_rendering(env, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_render(*args, **kwargs):
        raise AssertionError("the extractor rendered before refusing the budget")

    monkeypatch.setattr(env.pack.judge.comfy, "render", no_render)
    calls, runs = env.profile.session.result().total_calls, len(env.profile.runs)
    with pytest.raises(Exception, match=r"batch_images 4 lets the calibration render 1 image.*set batch_images to 8 or more"):
        _calibrate(env, "judged_small", budget_images=None, batch_images=4)
    assert not (Path(env.comfyui.model_dir("fragments")) / "judged_small.json").exists()
    assert (env.profile.session.result().total_calls, len(env.profile.runs)) == (calls, runs)


def test_calibrate_on_names_what_is_missing(env) -> None:
    with pytest.raises(Exception, match=r"calibrate is on, but negative is not connected"):
        _calibrate(env, "judged_missing", negative=None)


def test_the_profiled_run_measures_the_cond_uncond_gap_per_timestep(env) -> None:
    """ComfyUI names each chunk of a call in ``cond_or_uncond``: the profiled KSampler run gives one gap per step,
    at the steps' own timesteps, and the speed goal's CFG cut-offs are predicted from them."""
    session = env.profile.session
    gaps = session.cfg_gaps()
    assert gaps is not None, "no profiled call carried both the cond and the uncond half"
    timesteps = session.step_timesteps()
    assert len(gaps) == STEPS == len(timesteps)
    assert_close(torch.tensor(list(gaps)), torch.tensor(sorted(timesteps, reverse=True)), atol=0.01, rtol=0)
    assert all(math.isfinite(g) and g > 0 for g in gaps.values()), gaps
    evidence = session.evidence()
    assert evidence.cfg_gaps == gaps
    planned = profile_predictors(evidence, env.profile.diffusion_model, goal="speed").cfg_cutoffs()
    assert planned == cutoff_tries(CfgEvidence(gaps)) and planned
    # random weights: cond and uncond agree from the first step, which keeps its uncond pass all the same
    assert planned[0] < max(gaps), planned
