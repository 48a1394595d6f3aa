"""Issue #28 item 5 in the real frontend: the shipped workflows open readable, and the template browser
shows a thumbnail for each.

Tier 3 (ComfyUI 0.3.x's own server and its frontend in headless Chromium, a
1600x1000 window, as ``test_web_ui.py``):

- each workflow, dropped on the canvas, opens at its saved view (``extra.ds``)
  at 75 % zoom or more, above the zoom where the frontend stops drawing
  titles and widgets, with its stage groups titled and the first stage's
  nodes whole on screen;
- ``/api/workflow_templates/<pack>/<name>.jpg`` answers 200 with a JPEG for
  each workflow, and in the template dialog each card's image has loaded;
- each workflow, opened as shipped, shrunk for a CPU through the page's own
  graph and run from the page, ends with every status box filled, each
  FragmentStatus node repeating its source's text, and no error dialog.

Screenshots (the workflows as opened and after their run, the template dialog) go under each test's
``tmp_path``, and are also copied into ``$PF_SCREENSHOT_DIR`` when that is set.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

import comfyui_support as cs
from test_web_ui import NEXT_FRAMES, TEMPLATES_DIALOG, UI, UI_DIR, UI_NAMES, ui  # noqa: F401  (ui: the browser fixture)
from test_web_ui import DROP_FILE, GRAPH_IS, GRAPH_TO_PROMPT, _close_dialogs, _drop
from test_node_text_ui import (ERROR_DIALOG, NODE_TEXTS, RUN_TIMEOUT_MS, SHOW_NODES, SHOWN_OR_FAILED, TEXT_WIDGET,
                               WARNING_BGCOLOR)
from test_workflow_execution import SIZE, STEPS

log = logging.getLogger(__name__)

MIN_SCALE = 0.75  # issue #28: 75 % or more on a 1600x1000 window
MAX_THUMBNAIL_BYTES = 100_000
ACTION_TIMEOUT_MS = 30_000

# The canvas as the user sees it: zoom, whether the frontend draws details (titles, widgets) at this zoom,
# the groups' titles, and each node's title bar on screen (CSS pixels of the canvas element).
VIEW = """() => {
    const canvas = window.app.canvas, ds = canvas.ds, title = window.LiteGraph.NODE_TITLE_HEIGHT;
    const rect = canvas.canvas.getBoundingClientRect();
    const toScreen = (x, y) => [(x + ds.offset[0]) * ds.scale + rect.left, (y + ds.offset[1]) * ds.scale + rect.top];
    const lowQuality = typeof canvas.low_quality === 'boolean' ? canvas.low_quality
        : ds.scale < (canvas.low_quality_zoom_threshold ?? 0.6);
    return {
        scale: ds.scale, lowQuality, canvas: [rect.left, rect.top, rect.right, rect.bottom],
        groups: window.app.graph._groups.map(g => ({title: g.title, box: [...toScreen(g.pos[0], g.pos[1]),
                                                    ...toScreen(g.pos[0] + g.size[0], g.pos[1] + g.size[1])]})),
        nodes: Object.fromEntries(window.app.graph._nodes.map(n => [String(n.id), {
            title: n.getTitle(), box: [...toScreen(n.pos[0], n.pos[1] - title), ...toScreen(n.pos[0] + n.size[0], n.pos[1])],
        }])),
    };
}"""


def _on_screen(box: list[float], canvas: list[float]) -> bool:
    return box[0] >= canvas[0] and box[1] >= canvas[1] and box[2] <= canvas[2] and box[3] <= canvas[3]


@pytest.mark.parametrize("name", UI_NAMES)
def test_workflow_opens_at_a_readable_zoom(ui: UI, name: str, tmp_path: Path) -> None:
    workflow = json.loads((UI_DIR / f"{name}.json").read_text(encoding="utf-8"))
    expected_types = {str(n["id"]): n["type"] for n in workflow["nodes"]}
    page = ui.page
    _close_dialogs(page)
    page.evaluate("() => { window.app.canvas.ds.scale = 0.3; window.app.canvas.ds.offset = [0, 0]; }")  # not the saved view
    page.evaluate(DROP_FILE, [json.dumps(workflow), f"{name}.json"])
    page.wait_for_function(GRAPH_IS, arg=expected_types, timeout=ACTION_TIMEOUT_MS)
    page.wait_for_function(NEXT_FRAMES)
    view = page.evaluate(VIEW)
    shot = tmp_path / f"{name}_as_opened.png"
    page.screenshot(path=str(shot))
    log.info("screenshot of %s as opened: %s", name, shot)

    assert view["scale"] >= MIN_SCALE, f"{name} opens at {view['scale']:.0%}"
    assert view["scale"] == pytest.approx(workflow["extra"]["ds"]["scale"]), "the saved view was not restored"
    assert not view["lowQuality"], f"{name}: at {view['scale']:.0%} the frontend draws grey boxes without titles"
    titles = [g["title"] for g in view["groups"]]
    assert titles == [g["title"] for g in workflow["groups"]] and titles[0].startswith("1. "), titles
    first = next(g for g in workflow["groups"] if g["title"] == titles[0])["bounding"]
    in_first = [str(n["id"]) for n in workflow["nodes"]
                if first[0] <= n["pos"][0] < first[0] + first[2] and first[1] <= n["pos"][1] < first[1] + first[3]]
    assert in_first, f"{name}: no node in group {titles[0]!r}"
    for node_id in in_first:  # the first stage is there to read: each title bar whole on screen
        node = view["nodes"][node_id]
        assert _on_screen(node["box"], view["canvas"]), f"{name}: node {node_id} ({node['title']}) is off screen: {node}"
        assert node["box"][2] - node["box"][0] >= 200, f"{name}: node {node_id} is {node['box']} px wide on screen"
    assert _on_screen(view["groups"][0]["box"][:2] * 2, view["canvas"]), "the first group's title is off screen"


def test_template_browser_shows_a_thumbnail_for_each_workflow(ui: UI, tmp_path: Path) -> None:
    page = ui.page
    for name in UI_NAMES:
        answer = page.evaluate("""async (url) => {
            const r = await fetch(url);
            const bytes = new Uint8Array(await r.arrayBuffer());
            return {status: r.status, type: r.headers.get('content-type'), size: bytes.length, head: Array.from(bytes.slice(0, 3))};
        }""", f"/api/workflow_templates/{cs.PACK_FOLDER_NAME}/{name}.jpg")
        assert answer["status"] == 200 and answer["type"] == "image/jpeg", (name, answer)
        assert answer["head"] == [0xFF, 0xD8, 0xFF] and 1000 < answer["size"] <= MAX_THUMBNAIL_BYTES, (name, answer)

    _close_dialogs(page)
    page.evaluate("async () => await window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    dialog = page.locator(TEMPLATES_DIALOG)
    try:
        dialog.wait_for(state="visible")
        dialog.get_by_text(cs.PACK_FOLDER_NAME, exact=True).click()
        loaded = {name: _card_image(page, dialog.locator(f'[data-testid="template-workflow-{name}"]'), name)
                  for name in UI_NAMES}
        page.screenshot(path=str(tmp_path / "template_browser.png"))
        log.info("screenshot of the template browser: %s", tmp_path / "template_browser.png")
    finally:  # the browser is shared by the module's tests: the next one starts from the bare canvas
        _close_dialogs(page)
    for name, (width, height, src, size, head) in loaded.items():
        # the card shows the image through a blob: URL of what it fetched: its bytes are the shipped file's
        shipped = (UI_DIR / f"{name}.jpg").read_bytes()
        assert (size, bytes(head)) == (len(shipped), shipped[:64]), f"{name}: the card shows {src}, not {name}.jpg"
        assert width > 100 and height > 100, f"{name}: the card's thumbnail did not load ({width}x{height})"


# What a card's image shows: its natural size, its src, and the bytes behind that src (blob: or http:).
CARD_IMAGE = """async img => {
    if (!img.complete) return [0, 0, img.src, 0, []];
    const bytes = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
    return [img.naturalWidth, img.naturalHeight, img.src, bytes.length, Array.from(bytes.slice(0, 64))];
}"""


def _card_image(page: Any, card: Any, name: str) -> list[Any]:
    """``CARD_IMAGE`` of ``card`` once it shows ``name``.jpg, or what it shows after ``ACTION_TIMEOUT_MS``.

    Seen once on CI: a pack card's image was a blob: of an HTML page (this server's answer for a core template's
    thumbnail, which is not installed), and the check failed; not reproduced here in 4 runs.  The likely cause: a
    card element reused from the previous category still shows that category's image until its own fetch lands.
    Polling waits that out and still fails on a card that never shows the shipped file.
    """
    shipped = (UI_DIR / f"{name}.jpg").read_bytes()
    card.wait_for(state="visible")
    deadline = time.monotonic() + ACTION_TIMEOUT_MS / 1000
    while True:
        image = card.locator("img").first
        image.wait_for(state="attached")
        seen = image.evaluate(CARD_IMAGE)
        if ((seen[3], bytes(seen[4])) == (len(shipped), shipped[:64]) and seen[0] > 0) or time.monotonic() > deadline:
            return seen
        page.wait_for_timeout(250)


# --------------------------------------------------------------------------- the workflows, run from the page

#: Where the lead (or CI) wants copies of the screenshots; nothing is copied when unset.
SCREENSHOT_DIR_ENV = "PF_SCREENSHOT_DIR"
#: full_pipeline writes the fragment fragment_batch_32 then loads.  profile_and_extract runs right after
#: full_pipeline on purpose: ComfyUI reuses the cached profiled run, so only the extractor runs, while
#: full_pipeline's fragment MODEL is still loaded with its pruned modules set on the shared UNet; the extractor
#: must read the base, not them (it once failed with "expected head indices in [0, 4], found [5, 6]").
RUN_ORDER = ("full_pipeline", "profile_and_extract", "fragment_batch_32")
STATUS_CLASSES = ("FragmentExtractor", "FragmentLoader", "BatchGenerator", "FragmentStatus")
AFTER_RUN_FRAGMENTS = {"full_pipeline": "ui_after_run_full", "profile_and_extract": "ui_after_run_extract"}
BATCH_COUNT = 2  # of the shipped 32 variants, in one sub-batch: the text is under test, not the batch

# Sets widgets of the loaded graph as a user would type them: [[node id, widget name, value], ...];
# returns the ones the node does not have.
SET_WIDGETS = """(changes) => {
    const missing = [];
    for (const [id, name, value] of changes) {
        const node = window.app.graph.getNodeById(Number(id));
        const widget = node && (node.widgets || []).find(w => w.name === name);
        if (widget) { widget.value = value; } else { missing.push([id, name]); }
    }
    window.app.graph.setDirtyCanvas(true, true);
    return missing;
}"""

# The frontend's refresh of combo options (the R key), then one combo's options.
REFRESH_COMBO = """async ([id, name]) => {
    await window.app.refreshComboInNodes();
    const widget = window.app.graph.getNodeById(Number(id)).widgets.find(w => w.name === name);
    return widget.options.values;
}"""

RESTORE_VIEW = """(ds) => {
    const canvas = window.app.canvas;
    canvas.ds.scale = ds.scale;
    canvas.ds.offset = [...ds.offset];
    canvas.setDirty(true, true);
}"""


def _shoot(page: Any, path: Path) -> None:
    """A full-page screenshot at ``path``, copied into ``$PF_SCREENSHOT_DIR`` when that is set."""
    page.wait_for_function(NEXT_FRAMES)
    page.screenshot(path=str(path), full_page=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log.info("screenshot: %s", path)
    folder = os.environ.get(SCREENSHOT_DIR_ENV, "").strip()
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, Path(folder) / path.name)


def _shrink(workflow: dict[str, Any], name: str, ckpt_name: str) -> list[list[Any]]:
    """The widget changes that make the shipped workflow run on a CPU, as in ``test_workflow_execution.prepare``:
    the test checkpoint, SIZE px, STEPS steps, BATCH_COUNT images, no calibration, this test's fragment names."""
    changes: list[list[Any]] = []
    for node in workflow["nodes"]:
        node_id, kind = str(node["id"]), node["type"]
        if kind in ("CheckpointLoaderSimple", "ProfilerModelLoader"):
            changes.append([node_id, "ckpt_name", ckpt_name])
        if kind == "EmptyLatentImage":
            changes += [[node_id, "width", SIZE], [node_id, "height", SIZE]]
        if kind in ("KSampler", "BatchGenerator"):
            changes.append([node_id, "steps", STEPS])  # the extractor has none: it takes the profiled run's
        if kind == "BatchGenerator":
            changes += [[node_id, "count", BATCH_COUNT], [node_id, "batch_size", BATCH_COUNT]]
        if kind == "FragmentExtractor":
            changes += [[node_id, "calibrate", "off"], [node_id, "name", AFTER_RUN_FRAGMENTS[name]]]
        if kind == "FragmentLoader" and not any(i["name"] == "fragment" and i.get("link") for i in node["inputs"]):
            changes.append([node_id, "fragment_name", AFTER_RUN_FRAGMENTS["full_pipeline"] + ".json"])
    return changes


def _run_from_page(ui: UI, name: str, wait_for: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Press Run for the loaded graph; wait (bounded) until ``wait_for`` show text or an error dialog opens (then fail
    with its text), and for the /history entry.  Returns (the status boxes by node id, the history entry)."""
    page = ui.page
    before = set(ui.server.get_json("/history"))
    page.evaluate("async () => await window.app.queuePrompt(0, 1)")
    try:
        page.wait_for_function(SHOWN_OR_FAILED, arg=[TEXT_WIDGET, wait_for, ERROR_DIALOG], timeout=RUN_TIMEOUT_MS,
                               polling=500)
    except Exception as exc:  # playwright's TimeoutError: say what the server did meanwhile
        raise AssertionError(f"{name}: no status on nodes {wait_for} and no error dialog: {exc}\n"
                             f"{ui.server.log_tail()}") from exc
    dialog = page.locator(ERROR_DIALOG)
    assert dialog.count() == 0, f"{name}: the run opened a dialog: {dialog.first.inner_text()}"
    deadline = time.monotonic() + RUN_TIMEOUT_MS / 1000
    while not (new := set(ui.server.get_json("/history")) - before):  # the page queued it: one new entry comes
        assert time.monotonic() < deadline, f"{name}: no /history entry\n{ui.server.log_tail()}"
        time.sleep(0.5)
    (prompt_id,) = new
    history = ui.server.wait_for_history(prompt_id, timeout=RUN_TIMEOUT_MS / 1000)
    page.wait_for_function(NEXT_FRAMES)  # the boxes' nodes are resized on the next frame
    return page.evaluate(NODE_TEXTS, TEXT_WIDGET), history


def test_each_workflow_runs_from_the_page_and_shows_its_status_text(ui: UI, tmp_path: Path) -> None:
    """The shipped UI files themselves, run from the page as a user presses Run: the other browser tests queue the
    API twins, so only this one shows that the UI graphs' links deliver every status to its box, and that each
    FragmentStatus node repeats the text of the node it is wired to.  The screenshots show what a user sees as
    opened and after the run at each workflow's saved view, and the status nodes after the run."""
    page = ui.page
    (ckpt_name,) = ui.server.checkpoints
    made = [ui.server.fragments_dir / f"{f}{ext}" for f in AFTER_RUN_FRAGMENTS.values() for ext in (".json", ".safetensors")]
    errors_before = len(ui.page_errors)
    try:
        for name in RUN_ORDER:
            workflow = json.loads((UI_DIR / f"{name}.json").read_text(encoding="utf-8"))
            links = {link[0]: str(link[1]) for link in workflow["links"]}
            with_status = [str(n["id"]) for n in workflow["nodes"] if n["type"] in STATUS_CLASSES]
            sources = {str(n["id"]): links[n["inputs"][0]["link"]] for n in workflow["nodes"] if n["type"] == "FragmentStatus"}
            assert sources and set(sources.values()) <= set(with_status), f"{name}: FragmentStatus wired to {sources}"

            _drop(ui, json.dumps(workflow), f"{name}.json", {str(n["id"]): n["type"] for n in workflow["nodes"]})
            _close_dialogs(page)
            page.evaluate(RESTORE_VIEW, workflow["extra"]["ds"])
            _shoot(page, tmp_path / f"{name}_opened.png")

            changes = _shrink(workflow, name, ckpt_name)
            for node_id, widget, value in changes:
                if widget == "fragment_name":  # written by full_pipeline's run: in the combo once refreshed
                    assert value in page.evaluate(REFRESH_COMBO, [node_id, widget]), f"{name}: {value} not offered"
            assert page.evaluate(SET_WIDGETS, changes) == [], f"{name}: widgets missing"
            queued = page.evaluate(GRAPH_TO_PROMPT)
            for node_id, widget, value in changes:
                assert queued[node_id]["inputs"][widget] == value, f"{name}: node {node_id} would queue {queued[node_id]}"

            shown, history = _run_from_page(ui, name, with_status)
            assert history["status"]["status_str"] == "success", f"{name}: {json.dumps(history['status'])[:3000]}"
            assert sorted(shown, key=int) == sorted(with_status, key=int), f"{name}: status boxes on {sorted(shown)}"
            for node_id, box in shown.items():
                assert box["value"] and box["dom"] and box["dom"]["value"] == box["value"], f"{name}: node {node_id}: {box}"
                assert box["bgcolor"] != WARNING_BGCOLOR, f"{name}: node {node_id} fell back: {box['value']}"
            for node_id, source in sources.items():
                assert shown[node_id]["value"] == shown[source]["value"], f"{name}: FragmentStatus {node_id} != node {source}"
            log.info("%s after the run: %s", name, {k: v["value"][:80] for k, v in shown.items()})

            _close_dialogs(page)
            page.evaluate(RESTORE_VIEW, workflow["extra"]["ds"])
            _shoot(page, tmp_path / f"{name}_after_run.png")
            page.evaluate(SHOW_NODES, with_status)  # the saved view may leave later stages off screen: show the boxes
            _shoot(page, tmp_path / f"{name}_after_run_status.png")
    finally:
        for path in made:  # later graphs on this session's server must not meet this test's fragments
            path.unlink(missing_ok=True)
    assert ui.page_errors[errors_before:] == [], "the page threw while the workflows ran"
