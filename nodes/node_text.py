"""The text a node shows on its own body after a run (issue #28): ComfyUI's ``ui`` return, read by web/fragments_text.js.

ComfyUI sends a node's ``{"ui": {...}}`` to the browser that queued the
prompt (the ``executed`` websocket message) and keeps it in ``/history``.
The pack's web extension shows ``ui["text"]`` in a read-only box on the node;
``ui["warning"]`` (the same text, sent only for a fallback) also colours the
node and raises a toast, so a fallback is never silent.
"""
from __future__ import annotations

from typing import Any

#: What a status starts with when the full model ran in place of the fragment that was asked for.
WARNING = "WARNING: "


def with_text(result: tuple, text: str) -> dict[str, Any]:
    """ComfyUI's node output: ``result`` for the graph and ``text`` for the node's body; a warning when it is one.

    >>> with_text(("model", "ok"), "ok")
    {'ui': {'text': ['ok']}, 'result': ('model', 'ok')}
    >>> with_text(("model",), "WARNING: FALLBACK to the full model: x")["ui"]["warning"]
    ['WARNING: FALLBACK to the full model: x']
    """
    ui: dict[str, list[str]] = {"text": [text]}
    if text.startswith(WARNING):
        ui["warning"] = [text]
    return {"ui": ui, "result": result}
