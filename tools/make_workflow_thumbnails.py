"""Make ``workflows/<name>.jpg``: the template browser's thumbnail of each shipped workflow.

    COMFYUI_PATH=/path/to/ComfyUI-0.3.64 .venv/bin/python tools/make_workflow_thumbnails.py [--out-dir workflows]

Each thumbnail is a real screenshot: ComfyUI 0.3.x's own server (started by
``tests/comfyui_server.py``, everything under a temporary folder) with this
pack loaded, its frontend in the system's headless Chromium (``chromium`` on
PATH, driven by playwright) in a 1600x1000 window, the workflow dropped on
the canvas and shown in the view it opens with (its saved ``extra.ds``).  The
left square of the canvas in the screenshot (where the workflow starts) is
scaled down to ``THUMB_SIZE`` and saved as JPEG, small enough
for the template browser's card (the frontend asks for
``/api/workflow_templates/<pack folder>/<name>.jpg``).

Re-run it after ``tools/build_ui_workflows.py`` changes a workflow.  Only
127.0.0.1 is contacted: every other request the frontend makes is aborted.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
UI_DIR = REPO_ROOT / "workflows"
#: The window the workflow is opened in (issue #28's 1600x1000) and the thumbnail it becomes.
VIEWPORT = {"width": 1600, "height": 1000}
#: The canvas in that window (frontend 1.27: right of the 64 px side bar, below the 78 px tab bar); the
#: thumbnail is its left square, where the workflow starts, since the template card is square.
CANVAS_BOX = (64, 78, 1600, 1000)
THUMB_SIZE = (480, 480)
JPEG_QUALITY = 80
MAX_BYTES = 100_000
LOAD_TIMEOUT_MS = 120_000

APP_READY = """() => !!(window.app && window.app.graph && window.app.canvas && window.app.extensionManager
    && window.LiteGraph && window.LiteGraph.registered_node_types && window.LiteGraph.registered_node_types.KSampler)"""
# Opens a workflow as the template browser does (app.loadGraphData restores its saved view), then waits two frames.
OPEN_WORKFLOW = """async ([workflow, name]) => {
    await window.app.loadGraphData(workflow, true, true, name);
    await new Promise(resolve => requestAnimationFrame(() => requestAnimationFrame(resolve)));
    return window.app.graph._nodes.length;
}"""


def thumbnail(png: bytes, size: tuple[int, int] = THUMB_SIZE, quality: int = JPEG_QUALITY) -> bytes:
    """The JPEG bytes of a screenshot's canvas (its left square) scaled to ``size``; the quality steps down until
    the file fits ``MAX_BYTES``."""
    from PIL import Image

    left, top, right, bottom = CANVAS_BOX
    side = min(right - left, bottom - top)
    with Image.open(io.BytesIO(png)) as shot:
        small = shot.convert("RGB").crop((left, top, left + side, top + side)).resize(size, Image.LANCZOS)
    for q in range(quality, 30, -10):
        out = io.BytesIO()
        small.save(out, "JPEG", quality=q, optimize=True)
        if out.tell() <= MAX_BYTES:
            return out.getvalue()
    raise SystemExit(f"a {size} thumbnail does not fit {MAX_BYTES} bytes even at JPEG quality 40")


def screenshots(root: Path, workflows: list[Path], workdir: Path) -> dict[str, bytes]:
    """PNG screenshot of each workflow as it opens in ComfyUI at ``root``, by file stem."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    import comfyui_server as harness
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("no `chromium` on PATH (apt-get install chromium)")
    shots = {}
    with harness.running_server(root, workdir) as server:
        status, _ = server.post_json("/settings/Comfy.TutorialCompleted", True)  # no template dialog at first load
        assert status == 200, server.log_tail()
        origin = server.url + "/"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, headless=True,
                                                 args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            try:
                context = browser.new_context(viewport=VIEWPORT)
                context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(origin)
                              else route.abort())
                page = context.new_page()
                page.goto(origin, wait_until="domcontentloaded", timeout=LOAD_TIMEOUT_MS)
                page.wait_for_function(APP_READY, timeout=LOAD_TIMEOUT_MS)
                for path in workflows:
                    workflow = json.loads(path.read_text(encoding="utf-8"))
                    count = page.evaluate(OPEN_WORKFLOW, [workflow, path.name])
                    assert count == len(workflow["nodes"]), f"{path}: {count} nodes opened"
                    page.mouse.move(0, VIEWPORT["height"] - 1)  # no hover highlight in the picture
                    shots[path.stem] = page.screenshot()
            finally:
                browser.close()
    return shots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflows", type=Path, default=UI_DIR, help="UI-format workflows (default: workflows)")
    parser.add_argument("--out-dir", type=Path, default=None, help="where <name>.jpg go (default: beside the workflows)")
    parser.add_argument("--screenshots", type=Path, default=None,
                        help="also save each whole 1600x1000 screenshot there as <name>.png (the README's picture)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    import comfyui_server as harness

    root = harness.find_server_comfyui()  # raises with the reason when COMFYUI_PATH is no ComfyUI 0.3.x
    workflows = sorted(args.workflows.glob("*.json"))
    if not workflows:
        raise SystemExit(f"{args.workflows}: expected UI-format workflows (*.json), found none")
    out_dir = args.out_dir or args.workflows
    with tempfile.TemporaryDirectory(prefix="pf-thumbs-") as tmp:
        shots = screenshots(root, workflows, Path(tmp))
    for name, png in sorted(shots.items()):
        target = out_dir / f"{name}.jpg"
        partial = target.with_suffix(".jpg.partial")
        partial.write_bytes(thumbnail(png))
        partial.replace(target)  # a killed run leaves the old thumbnail, not half a new one
        print(f"wrote {target} ({target.stat().st_size} bytes)")
        if args.screenshots is not None:
            args.screenshots.mkdir(parents=True, exist_ok=True)
            whole = args.screenshots / f"{name}.png"
            partial = whole.with_suffix(".png.partial")
            partial.write_bytes(png)
            partial.replace(whole)
            print(f"wrote {whole} ({whole.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
