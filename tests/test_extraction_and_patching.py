"""Profile sessions across runs, extraction to disk, patch planning with true sizes, and graph conflicts."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import comfyui_support as cs
from prompt_fragments.fragment.batching import chunk, parse_seed_list, plan_sub_batches, variant_seeds
from prompt_fragments.fragment.compat import conflicting_patch_keys
from prompt_fragments.errors import BaseModelMismatchError, FragmentError
from prompt_fragments.fragment.extract import extract_fragment
from prompt_fragments.fragment.settings import ExtractionSettings
from prompt_fragments.fragment.patching import base_sha256, module_bytes, plan_patches
from prompt_fragments.fragment.surgery.tree import replace_modules
from prompt_fragments.fragment.build import describe_base
from prompt_fragments.fragment.format.store import load_fragment
from prompt_fragments.profiling.session import ProfileSession


def _session_profile(unet, make_inputs, runs: int = 3, steps: int = 3) -> ProfileSession:
    session = ProfileSession(unet, buckets=2)
    for run in range(runs):
        for step, sigma in enumerate([14.0, 5.0, 0.5][:steps]):
            inputs = make_inputs(batch=1, seed=100 * run + step)
            inputs["timestep"] = torch.tensor([999.0 * (steps - step) / steps])
            with torch.no_grad():
                session.call(lambda: unet(**inputs), sigma=sigma)
    return session


def test_session_counts_runs_from_rising_sigma_and_leaves_no_hooks() -> None:
    unet, make_inputs = cs.make_small_diffusers_unet("sd15")
    session = _session_profile(unet, make_inputs, runs=3, steps=3)
    data = session.result()
    assert session.runs == 3 and data.samples == ["run-1", "run-2", "run-3"]
    assert data.total_calls == 9 and data.info["calls"] == 9
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules()) == 0


def test_extract_fragment_writes_a_verifiable_fragment(tmp_path: Path) -> None:
    unet, make_inputs = cs.make_small_diffusers_unet("sd15")
    evidence = _session_profile(unet, make_inputs).evidence()
    settings = ExtractionSettings(levers={"heads": 0.25}, scope="per_layer", keep_unstable_heads=False)
    frag, path = extract_fragment(evidence, unet, base=describe_base(unet, "tiny"), name="tiny", settings=settings, directory=tmp_path)
    loaded = load_fragment(path)
    manifest = loaded.manifest
    assert manifest["pruning"]["selection"]["scope"] == "per_layer"
    assert manifest["profiling"]["samples"] == ["run-1", "run-2", "run-3"]
    assert manifest["profiling"]["steps_profiled"] == 9
    assert all(len(e["removed"]) == 1 for e in manifest["pruning"]["modules"].values())  # 25% of 4 heads


def test_empty_profile_is_refused(tmp_path: Path) -> None:
    unet, _ = cs.make_small_diffusers_unet("sd15")
    empty = ProfileSession(unet).evidence()
    with pytest.raises(FragmentError, match="the profile is empty"):
        extract_fragment(empty, unet, base=describe_base(unet, "tiny"), name="tiny", directory=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_plan_patches_sizes_and_hash_check(tmp_path: Path) -> None:
    unet, make_inputs = cs.make_small_diffusers_unet("sd15")
    evidence = _session_profile(unet, make_inputs).evidence()
    frag, _ = extract_fragment(evidence, unet, base=describe_base(unet, "tiny", sha256=base_sha256(unet)), name="tiny")
    plan = plan_patches(unet, frag)
    patched = replace_modules(unet, plan.replacements)
    assert plan.bytes_saved == module_bytes(unet) - module_bytes(patched) > 0
    other, _ = cs.make_small_diffusers_unet("sd15", seed=3)
    with pytest.raises(BaseModelMismatchError, match="built for base model 'tiny'"):
        plan_patches(other, frag)
    plan_patches(other, frag, verify_hash=False)  # same architecture: only the hash differs


def test_base_hash_ignores_weights_patched_in_place() -> None:
    import copy

    unet, _ = cs.make_small_diffusers_unet("sd15")
    clean = base_sha256(unet)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    merged = copy.deepcopy(unet)  # our own copy: a host merging a LoRA writes into its loaded weights
    original = merged.get_parameter(key).detach().clone()
    with torch.no_grad():
        merged.get_parameter(key).add_(0.5)
    assert base_sha256(merged) != clean
    assert base_sha256(merged, {key: original}) == clean


def test_lora_keys_on_pruned_weights_are_found() -> None:
    manifest = {"pruning": {"modules": {"in.1.attn2": {"kind": "cross"}}}, "compression": {"low_rank": [{"layer": "mid.proj"}]}}
    keys = ["diffusion_model.in.1.attn2.to_v.weight", "diffusion_model.in.1.attn1.to_v.weight", "diffusion_model.mid.proj.weight"]
    assert conflicting_patch_keys(keys, manifest, "diffusion_model.") == [
        "diffusion_model.in.1.attn2.to_v.weight",
        "diffusion_model.mid.proj.weight",
    ]


def test_seed_lists_and_sub_batches() -> None:
    assert parse_seed_list("3, 7-9 12") == [3, 7, 8, 9, 12]
    for bad in ("x", "9-7", "-1"):
        with pytest.raises(FragmentError, match="seed_list: expected non-negative integers"):
            parse_seed_list(bad)
    assert variant_seeds(5, 3) == [5, 6, 7] and variant_seeds(5, 3, " 1,2 ") == [1, 2]
    with pytest.raises(FragmentError, match="count: expected at least 1"):
        variant_seeds(0, 0)
    assert plan_sub_batches(32, 4, per_item_bytes=10, free_bytes=1e9) == [4] * 8
    assert plan_sub_batches(7, 8, per_item_bytes=40, free_bytes=100) == [2, 2, 2, 1]
    assert plan_sub_batches(3, 8, per_item_bytes=1e12, free_bytes=1.0) == [1, 1, 1]
    assert chunk(list(range(7)), [2, 2, 2, 1]) == [[0, 1], [2, 3], [4, 5], [6]]


def test_copying_a_module_whose_forward_another_tool_patched() -> None:
    from prompt_fragments.errors import PruningError
    from prompt_fragments.fragment.surgery.tree import fresh_copy

    lin = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    lin.forward = lin.forward  # what DeepCacheSDHelper.disable() leaves behind: the module's own method, on the instance
    copy = fresh_copy(lin)
    copy._parameters["weight"] = torch.nn.Parameter(torch.zeros(2, 3))
    torch.testing.assert_close(copy(x), lin.bias.expand(4, 2))  # the copy runs its own weights, not the original's
    wrapped = lin.forward
    lin.forward = lambda *a, **k: wrapped(*a, **k)  # a live wrapper closes over the original: no copy can be right
    with pytest.raises(PruningError, match="patched on the instance by another tool"):
        fresh_copy(lin)


def test_a_calibration_scores_the_profile_once_however_many_candidates_it_builds(monkeypatch) -> None:
    from prompt_fragments.fragment.calibration import Budget, Judgement
    from prompt_fragments.fragment.extract import calibrated_fragment
    from prompt_fragments.profiling import evidence as evidence_module

    unet, make_inputs = cs.make_small_diffusers_unet("sd15")
    evidence = _session_profile(unet, make_inputs).evidence()
    calls = []
    real = evidence_module.rank_stability
    monkeypatch.setattr(evidence_module, "rank_stability", lambda profile: calls.append(1) or real(profile))
    built = []

    def judge(fragment, seeds):  # passes the weaker half of the ladder: several candidates are built
        built.append(fragment.manifest["pruning"]["heads_removed"])
        ok = fragment.manifest["pruning"]["heads_removed"] <= 2
        return Judgement(ok, slack=0.1 if ok else -0.1)

    _, cal = calibrated_fragment(evidence, unet, judge, base=describe_base(unet, "tiny"), name="once",
                                 calibration_seeds=[0], holdout_seeds=[1], goal="memory", budget=Budget(images=40))
    assert len(built) >= 3 and len(cal.tries) == len(built)
    assert len(calls) == 1  # one scoring for the predictors and every candidate
