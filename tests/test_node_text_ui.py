"""Issue #28 items 1 and 2: what a node reports shows on the node, and a fallback is never silent.

Tier 2 (in-process ComfyUI, a toy model): FragmentLoader's and BatchGenerator's
node entry points (``FUNCTION``) return ComfyUI's ``{"ui": {"text": [...]},
"result": ...}``; a fallback also sends ``ui["warning"]``.

Tier 3 (ComfyUI 0.3.x's own server and its real frontend in headless
Chromium, as ``test_web_ui.py``): graphs are loaded into the page and queued
from it (``app.queuePrompt``, the Run button's call), so the ``executed``
messages reach this page and ``web/fragments_text.js`` draws them:

- after a run, the extractor, loader and batch nodes hold their text in a
  read-only box (read from ``app.graph``'s widgets and from the DOM);
- a fragment made for another checkpoint, with ``on_mismatch = fallback``,
  turns the loader amber with the warning, and the frontend shows a toast;
- a corrupt fragment with ``raise`` stops the run with the error dialog, which
  names the file.

Each tier-3 test saves a screenshot under its ``tmp_path``.
"""
from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from prompt_fragments.fragment.format.store import save_fragment
from test_node_messages import ToyBase, corrupt, made_for
from test_web_ui import ACTION_TIMEOUT_MS, NEXT_FRAMES, UI, ui  # noqa: F401  (ui: the module-scoped browser fixture)
from test_workflow_execution import prepare

log = logging.getLogger(__name__)

#: Bound on one queued graph in the browser (a profiled 64 px run is about a minute on a loaded CPU).
RUN_TIMEOUT_MS = 900_000
TEXT_WIDGET = "fragment_status"  # web/fragments_text.js
WARNING_BGCOLOR = "#4d3800"  # web/fragments_text.js
TOAST = ".p-toast-message"
ERROR_DIALOG = ".p-dialog"
BATCH_REPORT = re.compile(r"^2 images in \d+\.\d s \(\d+\.\d\d images/s\), sub-batches \[2\]")

# Loads an API-format prompt as the frontend does for a dropped API file, then presses Run (app.queuePrompt).
LOAD_AND_QUEUE = """async ([prompt, name]) => {
    await window.app.loadApiJson(prompt, name);
    await window.app.queuePrompt(0, 1);
    return window.app.graph._nodes.map(n => String(n.id));
}"""

# The status boxes the extension added: widget values from the graph, and what the page's textareas hold.
NODE_TEXTS = """(name) => {
    const out = {};
    for (const node of window.app.graph._nodes) {
        const widget = (node.widgets || []).find(w => w.name === name);
        if (widget) {
            out[String(node.id)] = {
                value: widget.value, bgcolor: node.bgcolor || null, serialize: widget.serialize,
                prompt_serialize: widget.options ? widget.options.serialize : undefined,
                dom: widget.inputEl ? {value: widget.inputEl.value, readOnly: widget.inputEl.readOnly,
                                       warning: widget.inputEl.dataset.fragmentsWarning || null,
                                       attached: document.body.contains(widget.inputEl)} : null,
            };
        }
    }
    return out;
}"""

# True once each of ``ids`` shows a non-empty status, or once an error dialog opened (then the test says which).
SHOWN_OR_FAILED = """([name, ids, dialog]) => document.querySelector(dialog) !== null
    || ids.every(id => {
        const node = window.app.graph.getNodeById(Number(id));
        const widget = node && (node.widgets || []).find(w => w.name === name);
        return !!(widget && widget.value);
    })"""


# Centres the canvas on some nodes at the largest zoom (at most 100 %) that shows them whole.
SHOW_NODES = """(ids) => {
    const canvas = window.app.canvas, title = window.LiteGraph.NODE_TITLE_HEIGHT;
    const nodes = ids.map(id => window.app.graph.getNodeById(Number(id)));
    const left = Math.min(...nodes.map(n => n.pos[0])), top = Math.min(...nodes.map(n => n.pos[1] - title));
    const right = Math.max(...nodes.map(n => n.pos[0] + n.size[0])), bottom = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
    const width = canvas.canvas.clientWidth, height = canvas.canvas.clientHeight;
    const scale = Math.min(1, 0.9 * width / (right - left), 0.9 * height / (bottom - top));
    canvas.ds.scale = scale;
    canvas.ds.offset = [width / (2 * scale) - (left + right) / 2, height / (2 * scale) - (top + bottom) / 2];
    canvas.setDirty(true, true);
    return scale;
}"""


# --------------------------------------------------------------------------- tier 2: the nodes' return values


@pytest.fixture(scope="module")
def toy(comfyui, comfyui_pack) -> SimpleNamespace:
    """FragmentLoader and BatchGenerator of the pack, a toy MODEL, and a fragment made for another base."""
    import comfy.model_patcher

    folder = Path(comfyui.folder_paths.get_folder_paths("fragments")[0])
    save_fragment(made_for("nt_other_base"), folder, overwrite=True)
    comfyui.folder_paths.filename_list_cache.clear()
    toy_model = ToyBase()
    toy_model.memory_required = lambda input_shape, **_: 1024.0  # what BatchGenerator sizes its sub-batches by
    base = comfy.model_patcher.ModelPatcher(toy_model, torch.device("cpu"), torch.device("cpu"))
    mapping = comfyui_pack.NODE_CLASS_MAPPINGS
    return SimpleNamespace(loader_cls=mapping["FragmentLoader"], batch_cls=mapping["BatchGenerator"], base=base)


def test_loader_entry_point_sends_a_fallback_as_text_and_warning(toy) -> None:
    cls = toy.loader_cls
    out = getattr(cls(), cls.FUNCTION)(model=toy.base, fragment_name="nt_other_base.json", on_mismatch="fallback")
    model, status = out["result"]
    assert status.startswith("WARNING: FALLBACK to the full model") and model.object_patches == {}
    assert out["ui"] == {"text": [status], "warning": [status]}


def test_loader_entry_point_sends_a_quarantined_fragment_as_a_warning(toy, comfyui) -> None:
    folder = Path(comfyui.folder_paths.get_folder_paths("fragments")[0])
    manifest, tensors = corrupt(folder, "nt_corrupt")
    comfyui.folder_paths.filename_list_cache.clear()
    cls = toy.loader_cls
    out = getattr(cls(), cls.FUNCTION)(model=toy.base, fragment_name=manifest.name, on_mismatch="fallback")
    _model, status = out["result"]
    assert status.startswith("WARNING: FALLBACK to the full model: nt_corrupt.json is unusable")
    assert f"{tensors.name} to {folder / '.library' / 'quarantine'}" in status
    assert out["ui"] == {"text": [status], "warning": [status]}


def test_loader_entry_point_sends_a_miss_as_text_only(toy) -> None:
    cls = toy.loader_cls
    positive = [[torch.ones(1, 3, 4), {"pooled_output": None}]]
    out = getattr(cls(), cls.FUNCTION)(model=toy.base, fragment_name="(auto)", on_mismatch="fallback", positive=positive)
    _model, status = out["result"]
    assert status.startswith("MISS") and out["ui"] == {"text": [status]}  # the cache working is not a warning


def test_batch_entry_point_reports_images_seconds_and_rate(toy, monkeypatch: pytest.MonkeyPatch) -> None:
    import comfy.sample

    calls: list[int] = []

    def sample(model: Any, noise: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(noise.shape[0])
        return noise  # the sampler is not under test here: its report is

    monkeypatch.setattr(comfy.sample, "sample", sample)
    cls = toy.batch_cls
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    out = getattr(cls(), cls.FUNCTION)(model=toy.base, positive=[], negative=[], latent_image=latent, seed=3, count=2,
                                       batch_size=2, steps=1, cfg=7.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    (result,) = out["result"]
    assert result["samples"].shape == (2, 4, 8, 8) and calls == [2]
    assert set(out["ui"]) == {"text"} and BATCH_REPORT.match(out["ui"]["text"][0]), out["ui"]
    # the plain call the bench and other nodes make still returns the LATENT alone
    (plain,) = cls().generate(toy.base, [], [], latent, 3, 2, 2, 1, 7.0, "euler", "normal", 1.0)
    assert torch.equal(plain["samples"], result["samples"])


# --------------------------------------------------------------------------- tier 3: the browser


def _queue_in_browser(ui: UI, prompt: dict[str, Any], name: str, wait_for: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load ``prompt`` into the page and press Run; wait (bounded) until ``wait_for`` show text or an error dialog opens,
    and for the prompt's /history entry.  Returns (the status boxes by node id, the history entry)."""
    page = ui.page
    before = set(ui.server.get_json("/history"))
    for _ in range(5):  # start from the bare canvas: no dialog or toast left by an earlier test
        if page.locator(ERROR_DIALOG).count() == 0:
            break
        page.keyboard.press("Escape")
        page.wait_for_function(NEXT_FRAMES)
    page.evaluate("() => window.app.extensionManager.toast.removeAll && window.app.extensionManager.toast.removeAll()")
    ids = page.evaluate(LOAD_AND_QUEUE, [prompt, name])
    assert sorted(ids, key=int) == sorted(prompt, key=int)
    try:
        page.wait_for_function(SHOWN_OR_FAILED, arg=[TEXT_WIDGET, wait_for, ERROR_DIALOG], timeout=RUN_TIMEOUT_MS,
                               polling=500)
    except Exception as exc:  # playwright's TimeoutError: say what the server did meanwhile
        raise AssertionError(f"{name}: no status on nodes {wait_for} and no error dialog: {exc}\n"
                             f"{ui.server.log_tail()}") from exc
    deadline = time.monotonic() + RUN_TIMEOUT_MS / 1000
    while not (new := set(ui.server.get_json("/history")) - before):  # the page queued it: one new entry comes
        assert time.monotonic() < deadline, f"{name}: no /history entry\n{ui.server.log_tail()}"
        time.sleep(0.5)
    (prompt_id,) = new
    history = ui.server.wait_for_history(prompt_id, timeout=RUN_TIMEOUT_MS / 1000)
    page.wait_for_function(NEXT_FRAMES)
    return page.evaluate(NODE_TEXTS, TEXT_WIDGET), history


# For each status box on screen: [its content height, its visible height] (the node is sized so that the text fits).
BOX_FILL = """(name) => Object.fromEntries(window.app.graph._nodes
    .map(n => [String(n.id), (n.widgets || []).find(w => w.name === name)])
    .filter(([, w]) => w && w.inputEl && w.inputEl.offsetParent !== null)
    .map(([id, w]) => [id, [w.inputEl.scrollHeight, w.inputEl.clientHeight]]))"""


def _assert_text_fits(ui: UI, node_ids: list[str]) -> None:
    fill = ui.page.evaluate(BOX_FILL, TEXT_WIDGET)
    assert set(node_ids) <= set(fill), f"status boxes on screen: {fill}"
    assert all(content <= visible + 2 for content, visible in fill.values()), f"text cut off: {fill}"


def _screenshot(ui: UI, path: Path, node_ids: list[str] | None = None) -> None:
    """Screenshot the page, first centred on ``node_ids`` at a zoom where titles and text are drawn (up to 100 %)."""
    if node_ids:
        ui.page.evaluate(SHOW_NODES, node_ids)
        ui.page.wait_for_function(NEXT_FRAMES)
    ui.page.screenshot(path=str(path))
    log.info("screenshot: %s", path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_after_a_run_the_extractor_loader_and_batch_show_their_text(ui: UI, tmp_path: Path) -> None:
    server = ui.server
    (ckpt_name,) = server.checkpoints
    prompt = prepare("full_pipeline", ckpt_name, count=2, batch_size=2)
    extractor, loader, batch = "6", "9", "10"
    assert [prompt[k]["class_type"] for k in (extractor, loader, batch)] == ["FragmentExtractor", "FragmentLoader",
                                                                             "BatchGenerator"]
    prompt[extractor]["inputs"]["name"] = "nt_ui_text"
    del prompt["7"], prompt["8"]  # the profiled sample's decode and save: not needed for the text
    prompt["12"] = {"class_type": "PreviewImage", "inputs": {"images": ["11", 0]}}  # temp folder, not output

    # the workflow's FragmentStatus nodes, one per status output
    views = {k: v["inputs"]["status"][0] for k, v in prompt.items() if v["class_type"] == "FragmentStatus"}
    assert sorted(views.values()) == sorted([extractor, loader]), views
    shown, history = _queue_in_browser(ui, prompt, "node_text.json", [extractor, loader, batch, *views])
    assert ui.page.locator(ERROR_DIALOG).count() == 0, ui.page.locator(ERROR_DIALOG).first.inner_text()
    assert history["status"]["status_str"] == "success", json.dumps(history["status"])[:3000]
    assert sorted(shown) == sorted([extractor, loader, batch, *views]), shown
    for view, source in views.items():
        assert shown[view]["value"] == shown[source]["value"], (view, source)
    for node_id, box in shown.items():
        assert [box["value"]] == history["outputs"][node_id]["text"], node_id  # the text the server sent, whole
        assert box["dom"] == {"value": box["value"], "readOnly": True, "warning": None, "attached": True}, box
        assert box["serialize"] is False and box["prompt_serialize"] is False and box["bgcolor"] != WARNING_BGCOLOR
    assert shown[extractor]["value"].startswith("fixed settings, not judged (calibrate off)")
    assert shown[loader]["value"].startswith("applied fragment 'nt_ui_text': ")
    assert BATCH_REPORT.match(shown[batch]["value"]), shown[batch]["value"]
    assert ui.page.locator(TOAST).count() == 0, ui.page.locator(TOAST).first.inner_text()
    # The box is output, not input: the prompt the frontend would queue next is unchanged.
    queued = ui.page.evaluate("async () => (await window.app.graphToPrompt()).output")
    assert all(TEXT_WIDGET not in entry["inputs"] for entry in queued.values())
    saved = ui.page.evaluate("() => window.app.graph.serialize().nodes.map(n => n.widgets_values || [])")
    texts = {box["value"] for box in shown.values()}
    assert not [v for values in saved for v in values if v in texts], "the status went into the saved workflow"
    _screenshot(ui, tmp_path / "after_run_extractor.png", [extractor])
    _screenshot(ui, tmp_path / "after_run_loader_and_batch.png", [loader, batch])
    _assert_text_fits(ui, [loader, batch])


def _loader_only(ckpt_name: str, fragment_name: str, on_mismatch: str) -> dict[str, Any]:
    """CheckpointLoaderSimple -> FragmentLoader -> PreviewAny of its status (the smallest graph that runs the loader)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "FragmentLoader", "inputs": {"model": ["1", 0], "fragment_name": fragment_name,
                                                          "on_mismatch": on_mismatch}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
    }


@pytest.fixture
def in_fragments_folder(ui: UI) -> Iterator[list[Path]]:
    """Files a test puts into the session server's fragments folder; removed afterwards, so no later graph meets them."""
    paths: list[Path] = []
    yield paths
    for path in paths:
        path.unlink(missing_ok=True)


def test_a_fallback_turns_the_loader_amber_and_raises_a_toast(ui: UI, tmp_path: Path, in_fragments_folder: list[Path]) -> None:
    server = ui.server
    manifest = save_fragment(made_for("nt_browser_other_base"), server.fragments_dir, overwrite=True)
    in_fragments_folder.extend([manifest, manifest.with_suffix(".safetensors")])
    shown, history = _queue_in_browser(ui, _loader_only(server.checkpoints[0], "nt_browser_other_base.json", "fallback"),
                                       "fallback.json", ["2"])
    assert ui.page.locator(ERROR_DIALOG).count() == 0, ui.page.locator(ERROR_DIALOG).first.inner_text()
    box = shown["2"]
    assert history["outputs"]["2"] == {"text": [box["value"]], "warning": [box["value"]]}
    assert box["value"].startswith("WARNING: FALLBACK to the full model: ") and "sd15_made_from.safetensors" in box["value"]
    assert box["bgcolor"] == WARNING_BGCOLOR and box["dom"]["warning"] == "true" and box["dom"]["value"] == box["value"]
    toast = ui.page.locator(TOAST).filter(has_text="fallback to the full model")
    toast.first.wait_for(state="visible", timeout=ACTION_TIMEOUT_MS)
    text = toast.first.inner_text()
    assert "Fragment Loader" in text and "WARNING: FALLBACK" in text, text
    _screenshot(ui, tmp_path / "fallback.png", ["1", "2", "3"])
    _assert_text_fits(ui, ["2"])


def test_a_corrupt_fragment_with_raise_opens_the_error_dialog_naming_the_file(ui: UI, tmp_path: Path,
                                                                              in_fragments_folder: list[Path]) -> None:
    server = ui.server
    manifest, tensors = corrupt(server.fragments_dir, "nt_browser_corrupt")
    in_fragments_folder.extend([manifest, tensors])
    shown, history = _queue_in_browser(ui, _loader_only(server.checkpoints[0], manifest.name, "raise"), "corrupt.json",
                                       ["2"])
    assert history["status"]["status_str"] == "error" and "2" not in history["outputs"]
    dialog = ui.page.locator(ERROR_DIALOG)
    assert dialog.count() == 1, f"no error dialog; the loader showed {shown}"
    text = dialog.first.inner_text()
    assert "FragmentLoader" in text and tensors.name in text, text
    assert "2" not in shown  # it raised: no status, no fallback
    assert manifest.exists() and tensors.exists()  # raise moves nothing
    _screenshot(ui, tmp_path / "corrupt_raise.png")  # the dialog as the user sees it
    ui.page.keyboard.press("Escape")
