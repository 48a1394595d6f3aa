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
import re
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



FALLBACK = "FALLBACK to the full model"
ON_ERROR = ("fallback", "raise")
_QUARANTINED = re.compile(r"\d{8}-\d{6}-\d+-(?P<name>.+)\.quarantined")


def quarantine_report(folder: str | os.PathLike, moved: list[Path]) -> str:
    """Where ``quarantine`` put an entry's files and how to get them back, for a status line.

    A user who finds a fragment gone from the dropdown must learn from the run that moved it
    where it went and how to undo that, not from the next run's validation error.

    >>> quarantine_report("frags", [Path("frags/.library/quarantine/20260101-120000-7-dog.json.quarantined")])
    'quarantined: moved dog.json to frags/.library/quarantine (as 20260101-120000-7-dog.json.quarantined); to restore, fix or replace the files and move them back to frags under their old names (dog.json), or delete them'
    """
    if not moved:
        return ""
    names = [m["name"] if (m := _QUARANTINED.fullmatch(p.name)) else p.name for p in moved]
    return (f"quarantined: moved {' and '.join(names)} to {moved[0].parent} (as {', '.join(p.name for p in moved)}); "
            f"to restore, fix or replace the files and move them back to {Path(folder)} under their old names "
            f"({', '.join(names)}), or delete them")


def unusable_error(manifest_path: str | os.PathLike, exc: FragmentError) -> FragmentError:
    """``exc`` (same class) with what the user can do about an entry that cannot be loaded; nothing was moved.

    >>> print(unusable_error("frags/dog.json", FragmentError("frags/dog.safetensors: expected sha256 ab…, found cd…")))
    frags/dog.json is unusable (frags/dog.safetensors: expected sha256 ab…, found cd…); nothing was moved. To fix, replace the fragment's files (download them again, or rebuild the fragment with FragmentExtractor) or delete them, or set on_mismatch to fallback to run the full model and quarantine them
    """
    if isinstance(exc, BaseModelMismatchError):
        return exc  # its message already names the checkpoint and the two ways out
    if isinstance(exc, ReadError):
        return ReadError(f"{manifest_path} could not be read right now ({exc}); nothing was moved. To fix, check the "
                         "disk and the file permissions, then run again")
    return type(exc)(f"{manifest_path} is unusable ({exc}); nothing was moved. To fix, replace the fragment's files "
                     "(download them again, or rebuild the fragment with FragmentExtractor) or delete them, or set "
                     "on_mismatch to fallback to run the full model and quarantine them")


def load_or_fallback(
    folder: str | os.PathLike, manifest_path: str | os.PathLike, base_sha256: str | None = None, *,
    on_error: str = "fallback",
) -> LoadOutcome:
    """Load an entry for use; a corrupt one is quarantined and the caller is told to use the full model.

    Only the ``FragmentError`` family is caught: that is what every check of
    untrusted input raises.  Anything else is a bug in the pack and
    propagates.  A base-model mismatch is not corruption, and a ``ReadError``
    (an ``OSError`` while reading) says nothing about the contents: both fall
    back without quarantine.  A quarantine that itself fails (a read-only
    folder) is reported in the status; the caller still gets the full model.

    ``on_error="raise"`` (FragmentLoader's ``on_mismatch = raise``) raises
    instead, for every cause, and moves nothing: the user asked to stop, so the
    files stay where the user put them and the error says what to do.

    >>> import tempfile; d = tempfile.mkdtemp(); load_or_fallback(d, Path(d) / "gone.json").fragment is None
    True
    """
    if on_error not in ON_ERROR:
        raise FragmentError(f"on_mismatch: expected one of {', '.join(ON_ERROR)}, found {on_error!r}; choose one of them")
    try:
        fragment = load_entry(folder, manifest_path, base_sha256)
    except FragmentError as exc:
        if on_error == "raise":
            raise unusable_error(manifest_path, exc) from exc
        if isinstance(exc, (BaseModelMismatchError, ReadError)):
            return LoadOutcome(None, f"{FALLBACK}: {exc}")
        try:
            moved = quarantine(folder, manifest_path, str(exc))
            note = f"; {quarantine_report(folder, moved)}" if moved else ""
        except (FragmentError, OSError) as q_exc:  # the fallback must still happen; say why it stays in place
            moved, note = [], f"; could not quarantine it: {q_exc}"
        status = f"{FALLBACK}: {Path(manifest_path).name} is unusable ({exc}){note}"
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
    on_error: str = "fallback",
) -> LoadOutcome:
    """FragmentLoader's auto mode: the best cached fragment for this base and prompt, or the full model.

    ``fragment`` is None on a miss or when the chosen entry is corrupt (then
    quarantined); ``status`` is one line for the node's STRING output.
    ``on_error="raise"``: a corrupt chosen entry raises (see ``load_or_fallback``).

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
    outcome = load_or_fallback(folder, result.manifest_path, base_sha256, on_error=on_error)
    outcome.lookup = result
    if outcome.fragment is not None:
        outcome.status = f"HIT {outcome.fragment.name!r} ({result.reason})"
    return outcome
