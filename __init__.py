"""Prompt Fragments: a ComfyUI custom node pack and a ComfyUI-free core library.

ComfyUI imports this file from ``custom_nodes/<any folder name>/``; Python
imports it as ``prompt_fragments`` after ``pip install -e .``.  The nodes are
only imported when ComfyUI itself is importable, so the core library and the
command line work anywhere.
"""
from __future__ import annotations

import logging

from .version import __version__

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
#: The frontend extension ComfyUI serves and loads (web/*.js): it shows each node's status text on the node.
WEB_DIRECTORY = "./web"

try:  # ComfyUI present: register the nodes.
    import comfy.model_patcher  # noqa: F401
except ImportError:  # pragma: no cover - exercised by importing outside ComfyUI
    pass
else:
    try:
        from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811
    except ImportError as exc:  # nodes not written yet or broken install: say so, keep the core usable
        logging.getLogger(__name__).warning("prompt_fragments: nodes not loaded: %s", exc)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY", "__version__"]
