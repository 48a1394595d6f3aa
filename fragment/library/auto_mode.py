"""FragmentLoader's auto mode: pick the best cached fragment for a prompt, or fall back to the full model.

The node computes the base hash and the pooled prompt embedding and calls
``auto_select``; it gets a fragment to apply, or ``None`` and a one-line
status saying why the full model is used (miss, wrong base, corrupt entry).
A corrupt entry is moved to the library's quarantine, so the next queue
does not hit it again; a base mismatch is not corruption and is left alone.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ...errors import BaseModelMismatchError, FragmentError, ReadError
from ..format.manifest import Fragment
from .index import DEFAULT_THRESHOLD, LookupResult, load_entry, lookup, quarantine

log = logging.getLogger(__name__)


@dataclass
class LoadOutcome:
    """A fragment ready to apply, or ``fragment=None`` meaning: use the full model (``status`` says why)."""

    fragment: Fragment | None
    status: str
    lookup: LookupResult | None = None
    quarantined: list[Path] = field(default_factory=list)



def load_or_fallback(
    folder: str | os.PathLike, manifest_path: str | os.PathLike, base_sha256: str | None = None
) -> LoadOutcome:
    """Load an entry for use; a corrupt one is quarantined and the caller is told to use the full model.

    Only the ``FragmentError`` family is caught: that is what every check of
    untrusted input raises.  Anything else is a bug in the pack and
    propagates.  A base-model mismatch is not corruption, and a ``ReadError``
    (an ``OSError`` while reading) says nothing about the contents: both fall
    back without quarantine.  A quarantine that itself fails (a read-only
    folder) is reported in the status; the caller still gets the full model.

    >>> import tempfile; d = tempfile.mkdtemp(); load_or_fallback(d, Path(d) / "gone.json").fragment is None
    True
    """
    try:
        fragment = load_entry(folder, manifest_path, base_sha256)
    except (BaseModelMismatchError, ReadError) as exc:
        return LoadOutcome(None, f"FALLBACK to the full model: {exc}")
    except FragmentError as exc:
        try:
            moved = quarantine(folder, manifest_path, str(exc))
            note = f"; moved to {moved[0].parent}" if moved else ""
        except (FragmentError, OSError) as q_exc:  # the fallback must still happen; say why it stays in place
            moved, note = [], f"; could not quarantine it: {q_exc}"
        status = f"FALLBACK to the full model: {Path(manifest_path).name} is unusable ({exc}){note}"
        log.warning("library: %s", status)
        return LoadOutcome(None, status, quarantined=moved)
    return LoadOutcome(fragment, f"loaded fragment {fragment.name!r}")


def auto_select(
    folder: str | os.PathLike,
    base_sha256: str,
    embedding: torch.Tensor,
    params: Mapping[str, Any] | None = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
) -> LoadOutcome:
    """FragmentLoader's auto mode: the best cached fragment for this base and prompt, or the full model.

    ``fragment`` is None on a miss or when the chosen entry is corrupt (then
    quarantined); ``status`` is one line for the node's STRING output.

    >>> import tempfile; auto_select(tempfile.mkdtemp(), "ab", torch.ones(4)).status
    'MISS (full model): library is empty'
    """
    try:
        result = lookup(folder, base_sha256, embedding, params, threshold=threshold)
    except FragmentError as exc:  # an unusable index (.library a file, sqlite corrupt) must not stop the queue
        log.warning("library: %s", exc)
        return LoadOutcome(None, f"MISS (full model): library unusable: {exc}")
    if not result.hit or result.manifest_path is None:
        return LoadOutcome(None, f"MISS (full model): {result.reason}", lookup=result)
    outcome = load_or_fallback(folder, result.manifest_path, base_sha256)
    outcome.lookup = result
    if outcome.fragment is not None:
        outcome.status = f"HIT {outcome.fragment.name!r} ({result.reason})"
    return outcome
