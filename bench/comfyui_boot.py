"""Boot a real ComfyUI in this process, headless on CPU, and load this pack into it as a custom node.

Shared by the tier-2 tests (``tests/comfyui_support.py``) and the in-ComfyUI peer
bench (``bench/comfy_peers.py``).  Nothing here imports ComfyUI at import time:
``boot_comfyui`` puts the checkout on ``sys.path`` and imports it, once per
process (one process can import only one ``comfy`` package).

Public API::

    looks_like_comfyui(root) -> bool
    boot_comfyui(root, base_dir, *, pytorch_attention=True) -> ComfyUIRuntime
    booted_runtime() -> ComfyUIRuntime | None
    booted_module(name) -> ModuleType
    load_pack_as_custom_node(repo_root, custom_nodes_dir, folder_name=...) -> ModuleType
    call_node(comfy, class_type, **inputs) -> tuple
    resolve(value) -> value, awaited when it is a coroutine
    free_comfy_memory() -> None
    release_heap() -> None
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import importlib
import inspect
import logging
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

#: Default folder name of the pack inside ``custom_nodes``: differs on purpose from
#: the repository's name and from ``prompt_fragments`` (the pack uses relative imports).
PACK_FOLDER_NAME = "ComfyUI-PromptFragments-under-test"

FRAGMENT_EXTENSIONS = {".safetensors", ".json"}


class ComfyUIUnavailable(RuntimeError):
    """ComfyUI cannot be found or booted in this environment."""


def looks_like_comfyui(root: Path) -> bool:
    """True when ``root`` is a ComfyUI checkout (``nodes.py``, ``execution.py`` and ``comfy/``).

    >>> looks_like_comfyui(Path("/nonexistent"))
    False
    """
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

#: Model folders the runtime reads and writes, with their extensions (None: ComfyUI's own set).
_MODEL_FOLDERS: dict[str, set[str] | None] = {
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

    >>> runtime = boot_comfyui(Path("/opt/ComfyUI"), Path("/tmp/comfy-base"))  # doctest: +SKIP
    >>> "KSampler" in runtime.nodes.NODE_CLASS_MAPPINGS  # doctest: +SKIP
    True
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
    if not looks_like_comfyui(root):
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
    for name, exts in _MODEL_FOLDERS.items():
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

    >>> pack = load_pack_as_custom_node(repo, runtime.custom_nodes_dir)  # doctest: +SKIP
    >>> "FragmentLoader" in pack.NODE_CLASS_MAPPINGS  # doctest: +SKIP
    True
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


def booted_runtime() -> ComfyUIRuntime | None:
    """The runtime ``boot_comfyui`` made in this process, or None before it ran.

    >>> booted_runtime() is None or isinstance(booted_runtime(), ComfyUIRuntime)
    True
    """
    return _RUNTIME


def booted_module(name: str) -> ModuleType:
    """Import ``name`` (``"comfy"``, ``"nodes"``, ...) from the booted ComfyUI; ComfyUIUnavailable before boot.

    >>> booted_module("nodes")  # doctest: +SKIP
    <module 'nodes' from '.../ComfyUI/nodes.py'>
    """
    return _booted_module(name)


def resolve(value: Any) -> Any:
    """``value``, awaited first when a newer ComfyUI returned a coroutine (its node loading and V3 nodes are async).

    >>> resolve(3)
    3
    """
    return _resolve(value)


def call_node(comfy: ComfyUIRuntime, class_type: str, **inputs: Any) -> tuple:
    """Run one node of this ComfyUI by name, as its executor would, and return its outputs as a tuple.

    V1 nodes are instantiated and their ``FUNCTION`` called; V3 nodes (0.3.x
    ``comfy_api`` ``ComfyNode``, e.g. TomePatchModel and EasyCache there) are
    called through their class-level entry point and their ``NodeOutput``
    unwrapped; async entry points are awaited.

    >>> (model,) = call_node(runtime, "TomePatchModel", model=model, ratio=0.3)  # doctest: +SKIP
    """
    cls = comfy.nodes.NODE_CLASS_MAPPINGS[class_type]
    owner = cls if hasattr(cls, "define_schema") else cls()
    out = _resolve(getattr(owner, cls.FUNCTION)(**inputs))
    if isinstance(out, dict):  # V1 {"ui": ..., "result": ...}
        out = out.get("result", ())
    if hasattr(out, "result") and not isinstance(out, tuple):
        out = out.result
    return tuple(out)


def free_comfy_memory() -> None:
    """Unload every model ComfyUI holds and collect garbage (RAM is tight on CI machines); nothing before boot.

    >>> free_comfy_memory()  # doctest: +SKIP
    """
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
    with no tensor left alive), and the suite shares one process and 24 GB.

    >>> release_heap()
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # musl or no glibc: nothing to trim
            pass

