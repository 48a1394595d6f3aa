"""Tier 3: the pack inside ComfyUI 0.3.x's own server (``main.py``), used over HTTP and the websocket as a client would.

The in-process tests call ComfyUI's executor directly; users reach the pack
through the server instead: ``/object_info`` builds the frontend's node list
(inputs, tooltips), ``POST /prompt`` validates and queues a graph for the
worker thread, ``/history`` reports what ran and where the files went, and
the websocket carries progress and interruption.  Each of those layers can
break the pack on its own (an input the frontend cannot draw, a progress bar
without a node id, a node that ignores Cancel), so each is exercised here
against the real server of the ``comfyui_server`` fixture.

The shipped API workflows run in the order a user runs them (the batch loads
the fragment the first graph wrote), shrunk by ``test_workflow_execution.prepare``
to 64 px, 2 steps and 4 variants.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

import comfyui_server as harness
import comfyui_support as cs
from test_workflow_execution import FIRST_FRAGMENT, FULL_FRAGMENT, ORDER, SIZE, STEPS, prepare

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
COUNT, BATCH = 4, 2  # variants per BatchGenerator, in two sub-batches
INTERRUPT_COUNT, INTERRUPT_STEPS = 4, 200  # one sub-batch of 4 and far more steps than run before the interrupt lands
PROMPT_TIMEOUT_S = 900.0  # bound per graph on a loaded CPU; they take seconds to a minute here
MESSAGE_TIMEOUT_S = 120.0
PACK_NODES = {
    # class name: (display name, output types) as README's node table describes them
    "ProfilerModelLoader": ("Profiler Model Loader", ["MODEL", "CLIP", "VAE", "FRAGMENT_PROFILE"]),
    "FragmentExtractor": ("Fragment Extractor", ["FRAGMENT", "STRING", "LATENT"]),
    "FragmentManualLevers": ("Fragment Manual Levers", ["FRAGMENT_LEVERS"]),
    "FragmentLoader": ("Fragment Loader", ["MODEL", "STRING"]),
    "BatchGenerator": ("Batch Generator (many seeds)", ["LATENT"]),
    "UsageVisualizer": ("Head Usage Heatmap", ["IMAGE"]),
}
#: SaveImage node id -> images expected in the history, per workflow (with COUNT variants).
EXPECTED_IMAGES = {
    "profile_and_extract": {"8": 1, "10": 1},  # the profiled sample and the head heatmap
    "fragment_batch_32": {"8": COUNT},
    "full_pipeline": {"8": 1, "12": COUNT},
}
#: BatchGenerator's node id per workflow.
BATCH_NODE = {"fragment_batch_32": "6", "full_pipeline": "10"}
FRAGMENTS_WRITTEN = {"profile_and_extract": FIRST_FRAGMENT, "full_pipeline": FULL_FRAGMENT}


# --------------------------------------------------------------------------- websocket client


class WsRecorder:
    """A websocket client of the server (``/ws?clientId=...``) that keeps every JSON message it receives."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.messages: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()

    async def run(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:  # binary frames are previews; the server sends none with --cpu defaults
                async with self._changed:
                    self.messages.append(json.loads(msg.data))
                    self._changed.notify_all()
            elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                break

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = MESSAGE_TIMEOUT_S) -> dict[str, Any]:
        """The first message (already received or yet to come) for which ``predicate`` holds; bounded by ``timeout``."""
        async def first() -> dict[str, Any]:
            async with self._changed:
                while True:
                    found = next((m for m in self.messages if predicate(m)), None)
                    if found is not None:
                        return found
                    await self._changed.wait()

        return await asyncio.wait_for(first(), timeout)

    def for_prompt(self, prompt_id: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if isinstance(m.get("data"), dict) and m["data"].get("prompt_id") == prompt_id]


def _is(kind: str, prompt_id: str, **fields: Any) -> Callable[[dict[str, Any]], bool]:
    """Matches a websocket message of ``kind`` about ``prompt_id`` (the server interleaves every prompt's messages)."""
    def match(m: dict[str, Any]) -> bool:
        data = m.get("data")
        return (m.get("type") == kind and isinstance(data, dict) and data.get("prompt_id") == prompt_id
                and all(data.get(k) == v for k, v in fields.items()))
    return match


def _finished(prompt_id: str) -> Callable[[dict[str, Any]], bool]:
    """Matches the message that ends a prompt's execution, however it ended."""
    return lambda m: any(_is(kind, prompt_id)(m) for kind in ("execution_success", "execution_error", "execution_interrupted"))


@dataclasses.dataclass
class Run:
    """One graph queued through ``POST /prompt``: its history entry and the websocket messages about it."""

    name: str
    prompt: dict[str, Any]
    prompt_id: str | None = None
    history: dict[str, Any] | None = None
    messages: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    bystander_messages: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    log_from: int = 0  # length of the server log when it was queued: the session's server also ran other tests' graphs


async def _run_workflows(server: harness.ComfyUIServer, ckpt_name: str) -> dict[str, Run]:
    """Queue the shipped graphs one after the other as one websocket client; a second client only watches."""
    client_id, bystander_id = f"pf-test-{uuid.uuid4().hex}", f"pf-bystander-{uuid.uuid4().hex}"
    runs: dict[str, Run] = {}
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(f"{server.ws_url}?clientId={client_id}") as ws, \
            session.ws_connect(f"{server.ws_url}?clientId={bystander_id}") as other_ws:
        me, bystander = WsRecorder(ws), WsRecorder(other_ws)
        readers = [asyncio.create_task(me.run()), asyncio.create_task(bystander.run())]
        try:
            await me.wait_for(lambda m: m.get("type") == "status")  # the server greets every client with the queue
            for name in ORDER:
                run = runs[name] = Run(name, prepare(name, ckpt_name, count=COUNT, batch_size=BATCH),
                                       log_from=len(server.log_text()))
                started = time.perf_counter()
                try:
                    run.prompt_id = await asyncio.to_thread(server.queue_prompt, run.prompt, client_id=client_id)
                    run.history = await asyncio.to_thread(server.wait_for_history, run.prompt_id, timeout=PROMPT_TIMEOUT_S)
                    await me.wait_for(_finished(run.prompt_id))
                except (harness.ServerError, asyncio.TimeoutError) as exc:
                    run.error = f"{type(exc).__name__}: {exc}"
                run.seconds = time.perf_counter() - started
                if run.prompt_id is not None:
                    run.messages = me.for_prompt(run.prompt_id)
                    run.bystander_messages = bystander.for_prompt(run.prompt_id)
                log.info("%s: %.1f s via the server (%s)", name, run.seconds, run.error or "finished")
        finally:
            for reader in readers:
                reader.cancel()
    return runs


@pytest.fixture(scope="module")
def workflow_runs(comfyui_server: harness.ComfyUIServer) -> dict[str, Run]:
    """The three shipped API graphs, run through the server in a user's order (profile, batch, full pipeline)."""
    (ckpt_name,) = comfyui_server.checkpoints
    return asyncio.run(_run_workflows(comfyui_server, ckpt_name))


def _require(run: Run, server: harness.ComfyUIServer) -> dict[str, Any]:
    """The run's history entry, after asserting it succeeded: every check of a graph's results needs that first."""
    assert run.error is None, f"{run.name}: {run.error}"
    assert run.history is not None
    status = run.history["status"]
    assert status["status_str"] == "success" and status["completed"] is True, (
        f"{run.name}: {json.dumps(status['messages'])[:4000]}\n{server.log_tail()}"
    )
    return run.history


# --------------------------------------------------------------------------- /object_info


def test_object_info_lists_the_pack_nodes_with_inputs_and_tooltips(comfyui_server: harness.ComfyUIServer) -> None:
    """The frontend draws nodes from /object_info only: every input needs a type and a tooltip, under the pack's folder."""
    info = comfyui_server.get_json("/object_info")
    missing = sorted(set(PACK_NODES) - set(info))
    assert not missing, f"pack nodes missing from /object_info: {missing}\n{comfyui_server.log_tail()}"
    api_inputs: dict[str, set[str]] = {}
    for path in sorted((REPO_ROOT / "workflows" / "api").glob("*.json")):
        for entry in json.loads(path.read_text(encoding="utf-8")).values():
            api_inputs.setdefault(entry["class_type"], set()).update(entry["inputs"])
    for name, (display, outputs) in PACK_NODES.items():
        node = info[name]
        assert node["name"] == name and node["display_name"] == display and node["category"] == "fragments"
        assert node["python_module"] == f"custom_nodes.{cs.PACK_FOLDER_NAME}", node["python_module"]
        assert node["output"] == outputs
        assert node["description"], f"{name} has no description"
        sections = node["input"]
        assert set(sections) <= {"required", "optional", "hidden"} and sections["required"]
        declared = {k for section in ("required", "optional") for k in sections.get(section, {})}
        assert node["input_order"]["required"] == list(sections["required"])
        for section in ("required", "optional"):
            for input_name, spec in sections.get(section, {}).items():
                kind = spec[0]
                assert isinstance(kind, (str, list)) and kind, f"{name}.{input_name}: no type"
                options = spec[1] if len(spec) > 1 else {}
                tooltip = options.get("tooltip")
                assert isinstance(tooltip, str) and tooltip.strip(), f"{name}.{input_name} has no tooltip"
        # The shipped API graphs only use inputs the server declares (else POST /prompt drops or rejects them).
        assert api_inputs.get(name, set()) <= declared, f"{name}: {sorted(api_inputs[name] - declared)} not declared"
        assert comfyui_server.get_json(f"/object_info/{name}") == {name: node}
    ckpt_options = info["ProfilerModelLoader"]["input"]["required"]["ckpt_name"][0]
    assert comfyui_server.checkpoints[0] in ckpt_options, "the server does not see the symlinked test checkpoint"


# --------------------------------------------------------------------------- POST /prompt, /history


@pytest.mark.parametrize("name", ORDER)
def test_api_workflow_runs_through_post_prompt(
    comfyui_server: harness.ComfyUIServer, workflow_runs: dict[str, Run], name: str
) -> None:
    """Queued over HTTP, each graph succeeds and its history lists the images, which exist in the output folder."""
    run = workflow_runs[name]
    history = _require(run, comfyui_server)
    outputs = history["outputs"]
    images = {node_id: ui.get("images", []) for node_id, ui in outputs.items() if run.prompt[node_id]["class_type"] == "SaveImage"}
    assert {k: len(v) for k, v in images.items()} == EXPECTED_IMAGES[name]
    for node_id, items in images.items():
        prefix = run.prompt[node_id]["inputs"]["filename_prefix"]
        for item in items:
            assert item["type"] == "output" and item["subfolder"] == str(Path(prefix).parent)
            path = comfyui_server.output_dir / item["subfolder"] / item["filename"]
            assert path.is_file(), f"{name}: history lists {path}, which does not exist"
            with Image.open(path) as image:
                assert image.format == "PNG" and min(image.size) > 0
                if run.prompt[run.prompt[node_id]["inputs"]["images"][0]]["class_type"] == "VAEDecode":
                    assert image.size == (SIZE, SIZE)  # decoded samples; the heatmap has a size of its own
    if name in FRAGMENTS_WRITTEN:
        fragment = FRAGMENTS_WRITTEN[name]
        for suffix in (".json", ".safetensors"):
            path = comfyui_server.fragments_dir / f"{fragment}{suffix}"
            assert path.is_file() and path.stat().st_size > 0, f"{name}: {path} not written"
        manifest = json.loads((comfyui_server.fragments_dir / f"{fragment}.json").read_text(encoding="utf-8"))
        assert manifest["name"] == fragment and manifest["base_model"]["name"] == comfyui_server.checkpoints[0]
        assert manifest["profiling"]["steps_profiled"] >= STEPS


def test_fragment_batch_applies_the_fragment_the_first_workflow_wrote(
    comfyui_server: harness.ComfyUIServer, workflow_runs: dict[str, Run]
) -> None:
    """The batch graph names ``dog_on_jet_ski.json``: the server must list it after profile_and_extract and apply it, not fall back."""
    _require(workflow_runs["fragment_batch_32"], comfyui_server)
    assert workflow_runs["fragment_batch_32"].prompt["5"]["inputs"]["fragment_name"] == f"{FIRST_FRAGMENT}.json"
    choices = comfyui_server.get_json("/object_info/FragmentLoader")["FragmentLoader"]["input"]["required"]["fragment_name"][0]
    assert f"{FIRST_FRAGMENT}.json" in choices and f"{FULL_FRAGMENT}.json" in choices
    # From the first of these graphs on: other tests' graphs on the session's server fall back on purpose.
    ours = comfyui_server.log_text()[workflow_runs[ORDER[0]].log_from:]
    lines = [line for line in ours.splitlines() if line.startswith("FragmentLoader: ")]
    assert any(line.startswith(f"FragmentLoader: applied fragment '{FIRST_FRAGMENT}'") for line in lines), (
        f"no 'applied fragment' line in the server log: {lines}\n{comfyui_server.log_tail()}"
    )
    assert not [line for line in lines if "FALLBACK" in line or "quarantin" in line.lower()], lines


def test_server_writes_nothing_into_the_comfyui_checkout(
    comfyui_server: harness.ComfyUIServer, workflow_runs: dict[str, Run]
) -> None:
    """With --base-directory and an in-memory database, outputs, fragments and settings all land in the temporary folder."""
    assert all(run.history is not None for run in workflow_runs.values()), "the graphs did not all run"
    assert comfyui_server.checkout_changes() == {"added": [], "removed": []}
    assert comfyui_server.pack_dir.is_symlink() and comfyui_server.pack_dir.resolve() == REPO_ROOT


# --------------------------------------------------------------------------- the websocket


@pytest.mark.parametrize("name", sorted(BATCH_NODE))
def test_websocket_client_sees_batch_progress_for_its_prompt(
    comfyui_server: harness.ComfyUIServer, workflow_runs: dict[str, Run], name: str
) -> None:
    """BatchGenerator's progress bar reaches the client that queued the prompt, tagged with its prompt and node."""
    run = workflow_runs[name]
    history = _require(run, comfyui_server)
    node = BATCH_NODE[name]
    kinds = [m["type"] for m in run.messages]
    assert kinds[0] == "execution_start" and "execution_success" in kinds, kinds
    progress = [m["data"] for m in run.messages if m["type"] == "progress" and m["data"].get("node") == node]
    assert progress, f"no progress messages from BatchGenerator (node {node}); got {sorted(set(kinds))}"
    assert {p["max"] for p in progress} == {COUNT * STEPS}  # image-steps: the bar moves on every sampler step
    values = [p["value"] for p in progress]
    # One value per sampler step of each sub-batch: COUNT // BATCH sub-batches of STEPS steps.
    assert values == sorted(values) and values[-1] == COUNT * STEPS and len(set(values)) >= COUNT * STEPS // BATCH, values
    executed = {m["data"]["node"]: m["data"]["output"] for m in run.messages if m["type"] == "executed"}
    assert {k: v["images"] for k, v in executed.items() if k in EXPECTED_IMAGES[name]} == {
        k: history["outputs"][k]["images"] for k in EXPECTED_IMAGES[name]
    }
    # Progress goes to the client that queued the prompt, not to every connected client.
    assert not [m for m in run.bystander_messages if m["type"] == "progress"]


async def _interrupt_a_batch(server: harness.ComfyUIServer, prompt: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """Queue ``prompt``, press Cancel (``POST /interrupt``) once BatchGenerator reports progress, wait for the end."""
    client_id = f"pf-interrupt-{uuid.uuid4().hex}"
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{server.ws_url}?clientId={client_id}") as ws:
        me = WsRecorder(ws)
        reader = asyncio.create_task(me.run())
        try:
            await me.wait_for(lambda m: m.get("type") == "status")
            prompt_id = await asyncio.to_thread(server.queue_prompt, prompt, client_id=client_id)
            await me.wait_for(_is("progress", prompt_id, node="6"), timeout=PROMPT_TIMEOUT_S)
            async with session.post(f"{server.url}/interrupt", json={"prompt_id": prompt_id}) as resp:
                assert resp.status == 200
            await me.wait_for(_finished(prompt_id), timeout=PROMPT_TIMEOUT_S)
        finally:
            reader.cancel()
        return prompt_id, me.for_prompt(prompt_id)


def test_interrupt_stops_a_larger_batch_and_the_server_keeps_working(
    comfyui_server: harness.ComfyUIServer,
) -> None:
    """Cancel in the UI is ``POST /interrupt``: a long BatchGenerator run must stop within a sampler step, and the
    server must then answer and run the next prompt (the interrupt flag must not leak into it)."""
    (ckpt_name,) = comfyui_server.checkpoints
    prompt = prepare("fragment_batch_32", ckpt_name, count=INTERRUPT_COUNT, batch_size=INTERRUPT_COUNT)
    del prompt["5"]  # the full model: this test must not depend on a fragment written by another test
    for node_id in [k for k, v in prompt.items() if v["class_type"] == "FragmentStatus" and v["inputs"]["status"][0] == "5"]:
        del prompt[node_id]  # and the loader's status view goes with the loader
    prompt["6"]["inputs"].update(model=["1", 0], steps=INTERRUPT_STEPS)
    prompt_id, messages = asyncio.run(_interrupt_a_batch(comfyui_server, prompt))

    kinds = [m["type"] for m in messages]
    assert "execution_interrupted" in kinds and "execution_success" not in kinds, kinds
    interrupted = next(m["data"] for m in messages if m["type"] == "execution_interrupted")
    assert interrupted["node_id"] == "6" and interrupted["node_type"] == "BatchGenerator", interrupted
    values = [m["data"]["value"] for m in messages if m["type"] == "progress" and m["data"]["node"] == "6"]
    # Cancel lands inside the only sub-batch: the sampler's per-step callback stops it, not the next sub-batch.
    assert values and max(values) < INTERRUPT_COUNT * INTERRUPT_STEPS // 2, values
    history = comfyui_server.wait_for_history(prompt_id, timeout=MESSAGE_TIMEOUT_S)
    assert history["status"]["status_str"] == "error" and history["status"]["completed"] is False
    assert "execution_interrupted" in [event for event, _ in history["status"]["messages"]]
    assert "8" not in history["outputs"], "images were saved from an interrupted batch"

    # Still serving: the queue is empty, and a small prompt runs to success.
    queue = comfyui_server.get_json("/queue")
    assert queue["queue_running"] == [] and queue["queue_pending"] == []
    prompt["6"]["inputs"].update(count=1, steps=1)
    after = comfyui_server.wait_for_history(comfyui_server.queue_prompt(prompt), timeout=PROMPT_TIMEOUT_S)
    assert after["status"]["status_str"] == "success", json.dumps(after["status"])[:3000]
    assert len(after["outputs"]["8"]["images"]) == 1


# --------------------------------------------------------------------------- stopping


@pytest.fixture
def second_server(comfyui_server: harness.ComfyUIServer, tmp_path: Path) -> Iterator[harness.ComfyUIServer]:
    """Another server of the same ComfyUI (no checkpoint), for the test that stops one; the session's stays up."""
    server = harness.start_server(comfyui_server.root, tmp_path)
    try:
        yield server
    finally:
        server.stop()


def test_the_server_stops_by_its_own_pid_and_is_gone(
    comfyui_server: harness.ComfyUIServer, second_server: harness.ComfyUIServer
) -> None:
    """The harness must end exactly the process it started, and leave neither it nor its port behind."""
    assert second_server.pid != comfyui_server.pid and second_server.port != comfyui_server.port
    stats = second_server.get_json("/system_stats")
    assert stats["system"]["comfyui_version"] == second_server.version
    assert stats["devices"][0]["type"] == "cpu"
    code = second_server.stop()
    assert code is not None and not second_server.alive()
    assert not harness.pid_exists(second_server.pid)
    assert not harness.port_open(second_server.port)
    assert comfyui_server.alive() and comfyui_server.get_json("/queue") is not None  # the other one is untouched
