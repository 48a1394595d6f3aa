"""FragmentStatus: shows a status STRING (the extractor's, the loader's) in its own box, so a workflow wires every status.

The extractor and the loader already show their status on their own bodies
(``node_text.with_text``); this node is where a workflow sends the ``status``
output, so the text stays readable beside the stage that produced it, and a
fallback's warning colours this node too.
"""
from __future__ import annotations

from typing import Any

from .folders import CATEGORY, tip
from .node_text import with_text


class FragmentStatus:
    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"status": ("STRING", tip("A status output: FragmentExtractor's or FragmentLoader's.",
                                                      forceInput=True))}}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("status",)
    FUNCTION = "show"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = "Shows a Prompt Fragments status text on the node (and passes it on); a fallback turns it amber."

    def show(self, status: str) -> dict[str, Any]:
        return with_text((status,), status)
