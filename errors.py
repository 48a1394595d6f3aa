"""The one exception family of the pack.

Every error names where it happened (a module path such as
``down_blocks.0.attentions.0.transformer_blocks.0.attn1`` or a file) and
what was expected versus what was found, so a ComfyUI user can act on the
message without reading a traceback.
"""
from __future__ import annotations


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
