"""Tier 2: the nodes inside a real ComfyUI runtime, on a random-weight full-size SD1.5 checkpoint."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import comfyui_support as cs
from prompt_fragments.fragment.format.store import load_fragment
from prompt_fragments.profiling.heatmap import labelled_heatmap
from prompt_fragments.profiling.scoring import score_heads

NODE_NAMES = ["ProfilerModelLoader", "FragmentExtractor", "FragmentManualLevers", "FragmentLoader", "BatchGenerator",
              "UsageVisualizer"]


def _attention_heads(diffusion_model: torch.nn.Module) -> dict[str, int]:
    from prompt_fragments.profiling.discovery import iter_attention

    return {p: int(m.heads) for p, m in iter_attention(diffusion_model)}


@pytest.fixture(scope="module")
def graph(comfyui, comfyui_pack, sd15_checkpoint):
    """Profile two sampler runs and extract a fragment by calling the nodes as ComfyUI would."""
    nodes = comfyui.nodes
    mapping = comfyui_pack.NODE_CLASS_MAPPINGS
    with torch.inference_mode():
        model, clip, vae, profile = mapping["ProfilerModelLoader"]().load(sd15_checkpoint, 2, 32, "accumulate")
        positive = nodes.CLIPTextEncode().encode(clip, "A dog on a jet ski")[0]
        negative = nodes.CLIPTextEncode().encode(clip, "blurry")[0]
        latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        for seed in (1, 2):
            sampled = nodes.KSampler().sample(model, seed, 2, 7.0, "euler", "normal", positive, negative, latent)[0]
        fragment, _status, _latents = mapping["FragmentExtractor"]().extract(
            profile, sampled, "node_test", overwrite=True)["result"]
        base = nodes.CheckpointLoaderSimple().load_checkpoint(sd15_checkpoint)[0]
    return SimpleNamespace(nodes=nodes, mapping=mapping, model=model, clip=clip, profile=profile, fragment=fragment,
                           positive=positive, negative=negative, latent=latent, base=base, ckpt=sd15_checkpoint)


def test_nodes_registered_with_category_tooltips_and_names(comfyui, comfyui_pack) -> None:
    for name in NODE_NAMES:
        cls = comfyui.nodes.NODE_CLASS_MAPPINGS[name]
        assert cls is comfyui_pack.NODE_CLASS_MAPPINGS[name]
        assert cls.CATEGORY == "fragments" and name in comfyui.nodes.NODE_DISPLAY_NAME_MAPPINGS
        for group in cls.INPUT_TYPES().values():
            for input_name, spec in group.items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"


def test_profile_accumulates_runs_and_steps(graph) -> None:
    data = graph.profile.session.result()
    assert graph.profile.session.runs == 2
    assert data.samples == ["run-1", "run-2"]
    assert data.total_calls == 4  # 2 runs x 2 steps, cond and uncond batched in one call
    assert all(stats.tokens.sum() > 0 for stats in data.modules.values())


def test_extractor_writes_a_verified_fragment_in_the_fragments_folder(comfyui, graph) -> None:
    folder = Path(comfyui.folder_paths.get_folder_paths("fragments")[0])
    manifest_path = folder / "node_test.json"
    assert graph.fragment.manifest_path == manifest_path
    assert (folder / "node_test.safetensors").is_file()
    frag = load_fragment(manifest_path)
    assert frag.manifest["base_model"]["name"] == graph.ckpt
    assert frag.manifest["pruning"]["heads_removed"] == int(0.3 * frag.manifest["pruning"]["heads_total"])
    comfyui.folder_paths.filename_list_cache.clear()
    assert "node_test.json" in comfyui.folder_paths.get_filename_list("fragments")


def test_loader_patches_a_clone_and_corrects_its_size(graph) -> None:
    base = graph.base
    dm = base.model.diffusion_model
    heads_before = _attention_heads(dm)
    weights_before = {k: v.clone() for k, v in list(dm.state_dict().items())[:50]}
    with torch.inference_mode():
        patched, status = graph.mapping["FragmentLoader"]().apply(base, "node_test.json", "raise")
        assert status.startswith("applied fragment 'node_test'")
        assert patched is not base and patched.model is base.model
        assert patched.model_size() < base.model_size()
        assert set(patched.object_patches) == {"diffusion_model." + p for p in graph.fragment.fragment.kept}
        samples = graph.nodes.KSampler().sample(patched, 3, 2, 7.0, "euler", "normal", graph.positive, graph.negative, graph.latent)[0]
    assert samples["samples"].shape == graph.latent["samples"].shape and torch.isfinite(samples["samples"]).all()
    # After sampling ComfyUI may keep the clone loaded; unpatching must restore the shared model exactly.
    patched.unpatch_model()
    assert _attention_heads(dm) == heads_before
    after = dm.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights_before.items())


def test_loader_takes_profiling_off_the_fragment_model(comfyui_pack, graph) -> None:
    is_profiling = comfyui_pack.nodes.profiler_loader.is_profiling
    with torch.inference_mode():
        patched, _ = graph.mapping["FragmentLoader"]().apply(graph.model, "(none)", "raise", graph.fragment)
        assert is_profiling(graph.model) and not is_profiling(patched)
        calls = graph.profile.session.result().total_calls
        graph.nodes.KSampler().sample(patched, 3, 2, 7.0, "euler", "normal", graph.positive, graph.negative, graph.latent)
        assert graph.profile.session.result().total_calls == calls  # the fragment's runs were not profiled
        graph.nodes.KSampler().sample(graph.model, 3, 2, 7.0, "euler", "normal", graph.positive, graph.negative, graph.latent)
    assert graph.profile.session.result().total_calls == calls + 2  # the profiled MODEL still is


def test_lora_on_pruned_weights_is_refused(comfyui, graph) -> None:
    path = next(iter(graph.fragment.fragment.kept))  # e.g. input_blocks.1.1.transformer_blocks.0.attn1
    stem = "lora_unet_" + path.replace(".", "_") + "_to_q"
    weight = graph.base.model.diffusion_model.get_submodule(path).to_q.weight
    lora = {
        f"{stem}.lora_up.weight": torch.randn(weight.shape[0], 2) * 0.01,
        f"{stem}.lora_down.weight": torch.randn(2, weight.shape[1]) * 0.01,
        f"{stem}.alpha": torch.tensor(2.0),
    }
    lora_dir = comfyui.model_dir("loras")
    save_file(lora, str(lora_dir / "hits_pruned_heads.safetensors"))
    comfyui.folder_paths.filename_list_cache.clear()
    with torch.inference_mode():
        lora_model = graph.nodes.LoraLoader().load_lora(graph.base, graph.clip, "hits_pruned_heads.safetensors", 1.0, 1.0)[0]
        assert f"diffusion_model.{path}.to_q.weight" in lora_model.patches
        with pytest.raises(Exception, match=r"LoRA/weight patches target weights the fragment prunes .*Merge the LoRA") as info:
            graph.mapping["FragmentLoader"]().apply(lora_model, "node_test.json", "raise")
    assert type(info.value).__name__ == "FragmentError"


def test_ipadapter_style_attn2_replacement_is_refused(graph) -> None:
    if not any(p.endswith("attn2") for p in graph.fragment.fragment.kept):
        pytest.skip("this fragment pruned no cross-attention module")
    model = graph.base.clone()
    model.set_model_attn2_replace(lambda q, k, v, extra: q, "input", 1)
    with pytest.raises(Exception, match="attn2 replacement patch"):
        graph.mapping["FragmentLoader"]().apply(model, "node_test.json", "raise")


def test_fragment_for_another_base_falls_back_or_raises(comfyui, graph, tmp_path: Path) -> None:
    import json

    from prompt_fragments.fragment.format.manifest import seal

    folder = Path(comfyui.folder_paths.get_folder_paths("fragments")[0])
    manifest = json.loads((folder / "node_test.json").read_text())
    manifest["name"] = "other_base"
    manifest["base_model"]["sha256"] = "0" * 64  # what a fragment made from a different checkpoint carries
    manifest["artifacts"]["tensors"]["file"] = "other_base.safetensors"
    (folder / "other_base.safetensors").write_bytes((folder / "node_test.safetensors").read_bytes())
    (folder / "other_base.json").write_text(json.dumps(seal({k: v for k, v in manifest.items() if k != "integrity"})))
    comfyui.folder_paths.filename_list_cache.clear()
    loader = graph.mapping["FragmentLoader"]()
    with torch.inference_mode():
        model, status = loader.apply(graph.base, "other_base.json", "fallback")
        assert status.startswith("WARNING: FALLBACK to the full model") and "built for base model" in status
        assert model.object_patches == {} and model.model_size() == graph.base.model_size()
        with pytest.raises(Exception, match="built for base model") as info:
            loader.apply(graph.base, "other_base.json", "raise")
    assert type(info.value).__name__ == "BaseModelMismatchError"


def test_batch_generator_matches_ksampler_per_seed(graph) -> None:
    with torch.inference_mode():
        (batch,) = graph.mapping["BatchGenerator"]().generate(
            graph.base, graph.positive, graph.negative, graph.latent, 10, 3, 2, 2, 7.0, "euler", "normal", 1.0
        )
        single = graph.nodes.KSampler().sample(graph.base, 11, 2, 7.0, "euler", "normal", graph.positive, graph.negative, graph.latent)[0]
    assert batch["samples"].shape[0] == 3
    torch.testing.assert_close(batch["samples"][1:2], single["samples"], rtol=1e-4, atol=1e-4)


def test_usage_visualizer_draws_the_heatmap(graph) -> None:
    (image,) = graph.mapping["UsageVisualizer"]().draw(graph.profile, graph.fragment)
    modules = len(graph.profile.session.result().modules)
    # the labelled figure: a 22 px row per module under the column numbers, with names and legend beside the grid
    assert image.shape[0] == 1 and image.shape[-1] == 3 and image.shape[1] >= modules * 22
    assert image.shape[2] >= 8 * 22 + 200  # the widest module name and the legend need room
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    # what the node draws is the profile's scores with the fragment's kept heads, labelled
    expected = labelled_heatmap(score_heads(graph.profile.session.result()), graph.fragment.fragment.kept)
    assert torch.equal(image, expected)


@pytest.mark.parametrize(("on_requeue", "loads_over_two_queues"), [("accumulate", 1), ("reset", 2)])
def test_requeue_modes(comfyui, comfyui_pack, monkeypatch: pytest.MonkeyPatch, on_requeue: str,
                       loads_over_two_queues: int) -> None:
    # The same graph queued twice on one executor, as when a user presses Queue twice: ComfyUI's
    # own cache compares the two queues' IS_CHANGED results (2024: `!=` on the result lists;
    # 0.3.x: as part of a hashed cache key) and decides whether the loader runs again.
    # Comparing IS_CHANGED values here instead would miss how ComfyUI compares them: two
    # separate NaNs differ, but one shared NaN object is "unchanged" to both runtimes.
    loader = comfyui_pack.NODE_CLASS_MAPPINGS["ProfilerModelLoader"]
    loads: list[str] = []

    def counting_load(self, ckpt_name: str, timestep_buckets: int, entropy_tokens: int, on_requeue: str) -> tuple:
        # What is under test is whether ComfyUI calls load, not the checkpoint it would read.
        loads.append(on_requeue)
        return (object(), object(), object(), object())

    monkeypatch.setattr(loader, "load", counting_load)
    prompt = {"1": {"class_type": "ProfilerModelLoader", "inputs": {
        "ckpt_name": "any.safetensors", "timestep_buckets": 4, "entropy_tokens": 256, "on_requeue": on_requeue}}}
    first, second = cs.queue_prompts(comfyui, [prompt, prompt], execute_outputs=["1"])
    assert "1" not in cs.cached_nodes(first)
    assert len(loads) == loads_over_two_queues, f"{on_requeue}: load ran {len(loads)} time(s) over two queues"
    # accumulate: the second queue is served the cached MODEL/profile; reset: a new profile each queue.
    assert ("1" in cs.cached_nodes(second)) == (on_requeue == "accumulate")


def test_extra_fragments_folders_are_listed(comfyui, graph, tmp_path: Path) -> None:
    # What extra_model_paths.yaml does for a "fragments:" entry.
    comfyui.folder_paths.add_model_folder_path("fragments", str(tmp_path))
    try:
        source = Path(comfyui.folder_paths.get_folder_paths("fragments")[0])
        (tmp_path / "shared").mkdir()
        for suffix in (".json", ".safetensors"):
            (tmp_path / "shared" / f"node_test{suffix}").write_bytes((source / f"node_test{suffix}").read_bytes())
        comfyui.folder_paths.filename_list_cache.clear()
        names = comfyui.folder_paths.get_filename_list("fragments")
        assert "shared/node_test.json" in names and "shared/node_test.safetensors" not in names
        with torch.inference_mode():
            _, status = graph.mapping["FragmentLoader"]().apply(graph.base, "shared/node_test.json", "raise")
        assert status.startswith("applied fragment 'node_test'")
    finally:
        comfyui.folder_paths.folder_names_and_paths["fragments"][0].remove(str(tmp_path))
        comfyui.folder_paths.filename_list_cache.clear()


def _extract(graph, name: str, positive=None, negative=None, calibrate: str = "off", **levers):
    """The extractor at fixed settings: ``levers`` go to FragmentManualLevers (ratio 0.3 unless given)."""
    (settings,) = graph.mapping["FragmentManualLevers"]().levers(**{"keep_unstable_heads": False, **levers})
    with torch.inference_mode():
        handle, _status, _latents = graph.mapping["FragmentExtractor"]().extract(
            graph.profile, graph.latent, name, calibrate=calibrate, overwrite=True,
            positive=positive, negative=negative, levers=settings)["result"]
    return handle


def test_levers_beyond_heads_run_in_a_real_sampler(graph) -> None:
    handle = _extract(graph, "levers_test", positive=graph.positive, negative=graph.negative, kv_fold=True,
                      ff_ratio=0.3, precision="fp8", precision_ratio=0.5)
    compression = handle.fragment.manifest["compression"]
    assert compression["kv_fold"]["modules"] and compression["ff"]["modules"]
    assert compression["ff"].get("method", "activation_energy") == "activation_energy" or compression["ff"]
    with torch.inference_mode():
        patched, status = graph.mapping["FragmentLoader"]().apply(graph.base, "(none)", "raise", handle)
        assert status.startswith("applied fragment 'levers_test'")
        assert patched.model_size() < graph.base.model_size() * 0.95
        # The folded K/V must match ComfyUI's own cond/uncond batching exactly, or this raises.
        out = graph.nodes.KSampler().sample(patched, 5, 2, 7.0, "euler", "normal", graph.positive, graph.negative, graph.latent)[0]
    assert torch.isfinite(out["samples"]).all()
    patched.unpatch_model()


def test_auto_mode_hits_the_profiled_prompt_and_misses_others(graph) -> None:
    _extract(graph, "auto_test", positive=graph.positive)
    # A random-weight text encoder maps every prompt to nearly the same pooled embedding, so a
    # different prompt cannot show a miss here; a conditioning pointing the opposite way (cosine -1) can.
    opposite = [[-graph.positive[0][0], graph.positive[0][1]]]
    loader = graph.mapping["FragmentLoader"]()
    with torch.inference_mode():
        hit_model, hit = loader.apply(graph.base, "(auto)", "raise", positive=graph.positive)
        miss_model, miss = loader.apply(graph.base, "(auto)", "raise", positive=opposite)
    assert hit.startswith("HIT") and "applied fragment" in hit and hit_model.object_patches
    assert miss.startswith("MISS (full model)") and miss_model.object_patches == {}


def test_corrupt_fragment_is_quarantined_and_the_full_model_used(comfyui, graph) -> None:
    _extract(graph, "corrupt_test")
    folder = Path(comfyui.folder_paths.get_folder_paths("fragments")[0])
    tensors = folder / "corrupt_test.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-7] + b"garbage")
    comfyui.folder_paths.filename_list_cache.clear()
    with torch.inference_mode():
        # fallback (issue #28: with raise it now raises and moves nothing; see test_node_messages.py)
        model, status = graph.mapping["FragmentLoader"]().apply(graph.base, "corrupt_test.json", "fallback")
    assert status.startswith("WARNING: FALLBACK to the full model") and "unusable" in status
    assert model.object_patches == {}
    assert not (folder / "corrupt_test.json").exists() and not tensors.exists()
    assert list((folder / ".library" / "quarantine").glob("*corrupt_test*"))
