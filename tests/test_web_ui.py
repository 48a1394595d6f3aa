"""Tier 3: the shipped UI workflows in ComfyUI's real web frontend, in headless Chromium.

``test_workflows.py`` checks the UI-format files against the node classes
in Python; only the frontend itself (comfyui-frontend-package, as ComfyUI
0.3.x serves it) decides whether a dropped file opens cleanly: whether it
finds every node type in ``/object_info``, maps each ``widgets_values`` entry
onto the widget it belongs to, and turns the graph back into the API prompt it
would queue.  The template browser is the other way users meet the workflows:
it lists ``workflows/*.json`` of each custom node folder from
``/api/workflow_templates``.

The browser talks to 127.0.0.1 only: every other request (the frontend asks
api.comfy.org for release notes) is aborted.  One screenshot per workflow is
saved under the test's ``tmp_path`` for CI to keep.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import comfyui_server as harness
import comfyui_support as cs
from conftest import skip_or_fail

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
UI_DIR = REPO_ROOT / "workflows"
API_DIR = UI_DIR / "api"
UI_NAMES = sorted(p.stem for p in UI_DIR.glob("*.json"))
VIEWPORT = {"width": 1600, "height": 1000}
#: Bounds for the browser, in milliseconds: the frontend is ready in ~4 s here.
LOAD_TIMEOUT_MS = 120_000
ACTION_TIMEOUT_MS = 30_000
#: Combos whose options are the files on this server: a shipped workflow names a file the user supplies
#: (``v1-5-pruned-emaonly.safetensors``, a fragment written by another graph), which the frontend keeps as is.
FILE_COMBOS = {"ckpt_name", "fragment_name"}
MISSING_NODES_DIALOG = '.p-dialog[aria-labelledby="global-load-workflow-warning"]'
TEMPLATES_DIALOG = '.p-dialog[aria-labelledby="global-template-workflows"]'
MIN_SCREENSHOT_BYTES = 20_000
MIN_SCREENSHOT_COLOURS = 64

APP_READY = """() => !!(window.app && window.app.graph && window.app.canvas && window.app.extensionManager
    && window.LiteGraph && window.LiteGraph.registered_node_types && window.LiteGraph.registered_node_types.KSampler)"""

# Drops a file on the canvas exactly as the browser does for a user's drag and drop:
# the frontend's document-level drop handler reads event.dataTransfer.files[0] and calls app.handleFile.
DROP_FILE = """([text, name]) => {
    const file = new File([text], name, {type: 'application/json'});
    const dataTransfer = new DataTransfer();
    dataTransfer.items.add(file);
    const target = document.querySelector('#graph-canvas') || document.body;
    for (const type of ['dragenter', 'dragover', 'drop']) {
        target.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer}));
    }
}"""

GRAPH_IS = """(expected) => {
    const nodes = window.app.graph._nodes;
    return nodes.length === Object.keys(expected).length && nodes.every(n => expected[String(n.id)] === n.type);
}"""

NEXT_FRAMES = "() => new Promise(resolve => requestAnimationFrame(() => requestAnimationFrame(() => resolve(true))))"

GRAPH_STATE = """() => window.app.graph._nodes.map(n => ({
    id: String(n.id),
    type: n.type,
    registered: !!window.LiteGraph.registered_node_types[n.type],
    has_errors: !!n.has_errors,
    widgets: (n.widgets || []).map(w => ({
        name: w.name,
        type: w.type,
        value: w.value,
        values: Array.isArray(w.options && w.options.values) ? w.options.values : null,
        min: w.options ? w.options.min : undefined,
        max: w.options ? w.options.max : undefined,
    })),
}))"""

GRAPH_TO_PROMPT = "async () => (await window.app.graphToPrompt()).output"


@dataclasses.dataclass
class UI:
    """The open frontend page and what it did so far."""

    page: Any  # playwright.sync_api.Page
    server: harness.ComfyUIServer
    object_info: dict[str, Any]
    blocked: list[str]
    page_errors: list[str]


def _chromium() -> str:
    """The system's Chromium (playwright's own browser downloads are not allowed here or in CI)."""
    path = shutil.which("chromium")
    if path is None:
        skip_or_fail("no `chromium` on PATH: the web UI tests drive the system's Chromium through playwright")
    return str(path)


@pytest.fixture(scope="module")
def ui(comfyui_server: harness.ComfyUIServer) -> Iterator[UI]:
    """ComfyUI's frontend opened in headless Chromium, once per module; every request off 127.0.0.1 is aborted."""
    executable = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        skip_or_fail(f"playwright is not installed: {exc}")
        raise  # unreachable
    # A fresh user would get the template browser on top of the canvas at first load; the tests open it themselves.
    status, _ = comfyui_server.post_json("/settings/Comfy.TutorialCompleted", True)
    assert status == 200, comfyui_server.log_tail()
    object_info = comfyui_server.get_json("/object_info")
    origin = comfyui_server.url + "/"
    blocked: list[str] = []
    page_errors: list[str] = []

    def only_this_server(route: Any) -> None:
        url = route.request.url
        if url.startswith(origin):
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-proxy-server"],
        )
        try:
            context = browser.new_context(viewport=VIEWPORT)
            context.set_default_timeout(ACTION_TIMEOUT_MS)
            context.route("**/*", only_this_server)
            page = context.new_page()
            page.on("pageerror", lambda exc: page_errors.append(str(exc)))
            page.goto(origin, wait_until="domcontentloaded", timeout=LOAD_TIMEOUT_MS)
            page.wait_for_function(APP_READY, timeout=LOAD_TIMEOUT_MS)
            if page_errors:  # frontend 1.27.10 throws one TypeError from a setting's onChange at start, pack or not
                log.info("page errors while the frontend started: %s", page_errors)
            yield UI(page, comfyui_server, object_info, blocked, page_errors)
        finally:
            browser.close()
    if blocked:
        log.info("requests the browser was kept from making: %s", sorted(set(blocked)))


# Resolves once no dialog is open, or after ``ms`` (dialogs animate out over a few frames).
DIALOGS_GONE = """(ms) => new Promise(resolve => {
    const start = performance.now();
    const check = () => (document.querySelectorAll('.p-dialog').length === 0 || performance.now() - start > ms)
        ? resolve(document.querySelectorAll('.p-dialog').length) : requestAnimationFrame(check);
    check();
})"""


def _close_dialogs(page: Any) -> None:
    """Escape until no dialog is open (bounded), so the next action starts from the bare canvas; a dialog that
    keeps open (on CI the template dialog once did, its focus in a list) is closed by its own close button."""
    for attempt in range(6):
        if page.locator(".p-dialog").count() == 0:
            return
        if attempt < 3:
            page.keyboard.press("Escape")
        else:  # clicked in the page, not through playwright: a dialog animating out must not hold the click
            page.evaluate("() => [...document.querySelectorAll('.p-dialog .p-dialog-close-button')].pop()?.click()")
        left = page.evaluate(DIALOGS_GONE, 2000)
        log.info("closing dialogs: %d open after %s", left, "Escape" if attempt < 3 else "the close button")
    assert page.locator(".p-dialog").count() == 0, page.locator(".p-dialog").first.inner_text()


def _drop(ui: UI, text: str, file_name: str, expected_types: dict[str, str]) -> None:
    """Drop ``text`` as a file named ``file_name`` and wait (bounded) until the graph holds ``expected_types``."""
    _close_dialogs(ui.page)
    ui.page.evaluate(DROP_FILE, [text, file_name])
    ui.page.wait_for_function(GRAPH_IS, arg=expected_types, timeout=ACTION_TIMEOUT_MS)
    ui.page.wait_for_function(NEXT_FRAMES)  # dialogs opened by the load are rendered by now


def _default(spec: list[Any]) -> Any:
    """The value the frontend gives a widget the workflow does not set: its default, or a combo's first option."""
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if "default" in options:
        return options["default"]
    return kind[0] if isinstance(kind, list) and kind else None


def _input_spec(object_info: dict[str, Any], class_type: str, name: str) -> tuple[str, list[Any]]:
    """(section, spec) of an input as the server declares it, which is what the frontend built the widget from."""
    inputs = object_info[class_type]["input"]
    for section in ("required", "optional"):
        if name in inputs.get(section, {}):
            return section, inputs[section][name]
    raise AssertionError(f"{class_type} has no input {name!r} in /object_info")


# --------------------------------------------------------------------------- the workflows, dropped in


@pytest.mark.parametrize("name", UI_NAMES)
def test_ui_workflow_opens_cleanly_when_dropped(ui: UI, name: str, tmp_path: Path) -> None:
    """Dropped on the canvas, the workflow opens with every node known, every widget value in place and
    accepted, and the prompt the frontend would queue equals the shipped API twin."""
    text = (UI_DIR / f"{name}.json").read_text(encoding="utf-8")
    workflow = json.loads(text)
    api = json.loads((API_DIR / f"{name}.json").read_text(encoding="utf-8"))
    expected_types = {str(n["id"]): n["type"] for n in workflow["nodes"]}
    errors_before = len(ui.page_errors)
    _drop(ui, text, f"{name}.json", expected_types)

    assert ui.page.locator(MISSING_NODES_DIALOG).count() == 0, ui.page.locator(MISSING_NODES_DIALOG).first.inner_text()
    state = {n["id"]: n for n in ui.page.evaluate(GRAPH_STATE)}
    assert {k: n["type"] for k, n in state.items()} == expected_types
    assert [k for k, n in state.items() if not n["registered"] or n["has_errors"]] == []

    for node in workflow["nodes"]:
        loaded = state[str(node["id"])]
        where = f"{name}: node {node['id']} ({node['type']})"
        assert [w["value"] for w in loaded["widgets"]] == node["widgets_values"], where
        for widget in loaded["widgets"]:
            if widget["type"] == "combo" and widget["name"] not in FILE_COMBOS:
                assert widget["values"] and widget["value"] in widget["values"], f"{where}: {widget}"
            if widget["type"] == "number":
                low = widget["min"] if widget["min"] is not None else float("-inf")
                high = widget["max"] if widget["max"] is not None else float("inf")
                assert low <= widget["value"] <= high, f"{where}: {widget}"

    prompt = ui.page.evaluate(GRAPH_TO_PROMPT)
    assert set(prompt) == set(api), f"{name}: the frontend would queue nodes {sorted(prompt)}, the API twin has {sorted(api)}"
    for node_id, entry in api.items():
        queued = prompt[node_id]
        assert queued["class_type"] == entry["class_type"]
        for input_name, value in entry["inputs"].items():
            assert queued["inputs"].get(input_name) == value, f"{name}: node {node_id} input {input_name}"
        for input_name in set(queued["inputs"]) - set(entry["inputs"]):  # only optional widgets the API twin leaves out
            section, spec = _input_spec(ui.object_info, entry["class_type"], input_name)
            assert section == "optional" and queued["inputs"][input_name] == _default(spec), (
                f"{name}: node {node_id} queues {input_name}={queued['inputs'][input_name]!r}, not in the API twin"
            )
    assert ui.page_errors[errors_before:] == [], f"{name}: the page threw while loading"

    ui.page.evaluate("async () => await window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    ui.page.wait_for_function(NEXT_FRAMES)
    shot = tmp_path / f"{name}.png"
    ui.page.screenshot(path=str(shot))
    log.info("screenshot of %s: %s", name, shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > MIN_SCREENSHOT_BYTES
    with Image.open(shot) as image:
        assert image.size == (VIEWPORT["width"], VIEWPORT["height"])
        colours = image.convert("RGB").getcolors(maxcolors=1 << 24)
        assert colours is not None and len(colours) >= MIN_SCREENSHOT_COLOURS, "the screenshot is nearly blank"


def test_a_workflow_with_an_unknown_node_is_reported_missing(ui: UI) -> None:
    """Control for the test above: with this frontend, an unknown node type does open the missing-nodes dialog
    and flags the node, so finding neither for the shipped workflows means something."""
    workflow = json.loads((UI_DIR / "fragment_batch_32.json").read_text(encoding="utf-8"))
    broken = next(n for n in workflow["nodes"] if n["type"] == "BatchGenerator")
    broken["type"] = "BatchGeneratorThatDoesNotExist"
    expected_types = {str(n["id"]): n["type"] for n in workflow["nodes"]}
    _drop(ui, json.dumps(workflow), "broken.json", expected_types)
    ui.page.wait_for_selector(MISSING_NODES_DIALOG, timeout=ACTION_TIMEOUT_MS)
    assert "BatchGeneratorThatDoesNotExist" in ui.page.locator(MISSING_NODES_DIALOG).inner_text()
    state = {n["id"]: n for n in ui.page.evaluate(GRAPH_STATE)}
    assert not state[str(broken["id"])]["registered"] and state[str(broken["id"])]["has_errors"]
    _close_dialogs(ui.page)


# --------------------------------------------------------------------------- the template browser


def test_template_browser_lists_the_pack_workflows(ui: UI) -> None:
    """``/api/workflow_templates`` maps the pack's folder to its workflows, serves each file, and the template
    dialog shows them under Custom Nodes; picking one opens it."""
    page = ui.page
    answer = page.evaluate("""async () => {
        const response = await fetch('/api/workflow_templates');
        return {status: response.status, body: await response.json()};
    }""")
    assert answer["status"] == 200
    assert {k: sorted(v) for k, v in answer["body"].items()} == {cs.PACK_FOLDER_NAME: UI_NAMES}
    for name in UI_NAMES:
        served = page.evaluate(
            "async (url) => { const r = await fetch(url); return {status: r.status, body: await r.json()}; }",
            f"/api/workflow_templates/{cs.PACK_FOLDER_NAME}/{name}.json",
        )
        assert served["status"] == 200
        assert served["body"] == json.loads((UI_DIR / f"{name}.json").read_text(encoding="utf-8"))

    _close_dialogs(page)
    page.evaluate("async () => await window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    dialog = page.locator(TEMPLATES_DIALOG)
    dialog.wait_for(state="visible")
    dialog.get_by_text(cs.PACK_FOLDER_NAME, exact=True).click()
    cards = dialog.locator('[data-testid^="template-workflow-"]')
    for name in UI_NAMES:
        dialog.locator(f'[data-testid="template-workflow-{name}"]').wait_for(state="visible")
    assert sorted(cards.evaluate_all("cards => cards.map(c => c.dataset.testid)")) == [f"template-workflow-{n}" for n in UI_NAMES]

    chosen = "profile_and_extract"
    workflow = json.loads((UI_DIR / f"{chosen}.json").read_text(encoding="utf-8"))
    expected_types = {str(n["id"]): n["type"] for n in workflow["nodes"]}
    dialog.locator(f'[data-testid="template-workflow-{chosen}"]').click()
    page.wait_for_function(GRAPH_IS, arg=expected_types, timeout=ACTION_TIMEOUT_MS)
    page.wait_for_function(NEXT_FRAMES)
    assert page.locator(MISSING_NODES_DIALOG).count() == 0
    _close_dialogs(page)
