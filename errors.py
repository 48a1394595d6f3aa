"""The one exception family of the pack.

Every error names where it happened (a module path such as
``down_blocks.0.attentions.0.transformer_blocks.0.attn1`` or a file) and
what was expected versus what was found, so a ComfyUI user can act on the
message without reading a traceback.
"""
from __future__ import annotations

from typing import Any, Mapping


class FragmentError(Exception):
    """Base class: catch this to catch everything the pack raises on purpose."""


class ManifestError(FragmentError):
    """A manifest is missing a field, has the wrong type, or the wrong schema version."""


class IntegrityError(FragmentError):
    """A file's hash or contents do not match what its manifest records."""


class ReadError(FragmentError):
    """A file could not be read right now (an ``OSError`` such as EIO or EACCES), which says nothing about its contents.

    ``auto_mode.load_or_fallback`` falls back without quarantining on it: a
    transient read error must not move a good fragment away.
    """


class BaseModelMismatchError(FragmentError):
    """A fragment was applied to a model it was not built from."""


class PruningError(FragmentError):
    """A pruning plan is impossible: bad indices, no heads left, wrong shapes."""


class ProfilingError(FragmentError):
    """Profiling was asked for something the model or the recorded data cannot give."""


def where(path: str, message: str) -> str:
    """Prefix ``message`` with the location it concerns.

    >>> where("mid_block.attentions.0", "expected 8 heads, found 5")
    'mid_block.attentions.0: expected 8 heads, found 5'
    """
    return f"{path}: {message}"


def base_mismatch_remedy(base_model: Any) -> str:
    """The "what to do" clause of a base-model mismatch, naming the checkpoint as the manifest stores it.

    >>> base_mismatch_remedy({"name": "sd15.safetensors", "sha256": "ab"})
    "to fix, load the checkpoint 'sd15.safetensors' the fragment was made from, or rebuild the fragment from this checkpoint with FragmentExtractor"
    """
    name = base_model.get("name") if isinstance(base_model, Mapping) else None
    # The manifest may be hostile: a name is only shown as a short quoted string, never as a path to act on.
    if isinstance(name, str) and name:
        checkpoint = f"the checkpoint {name[:120]!r} the fragment was made from"
    else:
        checkpoint = "the checkpoint the fragment was made from (its manifest names none)"
    return f"to fix, load {checkpoint}, or rebuild the fragment from this checkpoint with FragmentExtractor"
