"""Saving and loading fragments: disk I/O, atomic replacement, and full verification on read.

A fragment on disk is ``<name>.json`` (the manifest) beside one safetensors
file of the tensors its levers store (``fragment.build`` makes them).  Every
read checks the manifest's schema and self-hash, the tensors file's hash and
header, every lever's tensors and the run-time schedule before anything is used (``build.check_loadable``).
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ...errors import FragmentError, IntegrityError, ManifestError, ReadError
from ..build import check_loadable
from .hashing import sha256_file, sha256_json
from .manifest import Fragment, seal, validate_manifest
from .untrusted import MAX_MANIFEST_BYTES, parse_json, read_safetensors_header

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(name: str) -> str:
    """A fragment name must be a plain file stem: letters, digits, ``.``, ``_``, ``-``.

    >>> check_name("dog_on_jet-ski.v2")
    'dog_on_jet-ski.v2'
    """
    # fullmatch, not match with '$': '$' also matches before a final newline, so 'evil\n' passed (issue #16).
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise ManifestError(f"fragment name {name!r}: expected 1-128 characters of letters, digits, '.', '_', '-' (no path); "
                            "choose a name like 'dog_on_jet_ski'")
    return name


def check_free(directory: str | os.PathLike, name: str, *, overwrite: bool = False) -> Path:
    """The manifest path ``name`` would be saved at in ``directory``; refused for a bad name, or a taken one
    unless ``overwrite`` (a caller about to spend minutes building asks before, not after).

    >>> check_free("/nonexistent", "dog").name
    'dog.json'
    """
    name = check_name(name)
    manifest_path = Path(directory) / f"{name}.json"
    if not overwrite and (manifest_path.exists() or (Path(directory) / f"{name}.safetensors").exists()):
        raise FragmentError(f"{manifest_path}: a fragment named {name!r} already exists; choose another name, or overwrite it")
    return manifest_path


def save_fragment(fragment: Fragment, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the tensors file then ``<name>.json`` into ``directory``; return the manifest path.

    An existing fragment of the same name is kept unless ``overwrite``; the
    replacement is atomic (old or new pair, never a mix: see ``install``).

    >>> save_fragment(frag, "ComfyUI/models/fragments")  # doctest: +SKIP
    PosixPath('ComfyUI/models/fragments/dog-on-jet-ski.json')
    """
    directory = ensure_folder(directory)
    name = check_free(directory, fragment.name, overwrite=overwrite).stem

    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in fragment.tensors.items()}, str(tmp), metadata={"prompt_fragments.schema": "1"})

    manifest_path, fragment.manifest = install(directory, fragment.manifest, write)
    log.info("saved fragment %s (%d tensors, %d bytes)", manifest_path, len(fragment.tensors),
             fragment.manifest["artifacts"]["tensors"]["bytes"])
    return manifest_path


OWN_TENSORS = re.compile(r"(?P<stem>[A-Za-z0-9][A-Za-z0-9._-]{0,127}?)(\.[0-9a-f]{16})?\.safetensors")


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries, after a rename) to disk: a rename is only durable once both are."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open folders; NTFS orders renames itself
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (and all folders on Windows) refuse fsync: best effort
        pass
    finally:
        os.close(fd)


def named_by(manifest_path: Path) -> tuple[str | None, str | None]:
    """The tensors file name and sha256 the manifest at ``manifest_path`` records, read leniently;
    ``(None, None)`` when there is no readable manifest (nothing then depends on any tensors file)."""
    try:
        if not manifest_path.is_file() or manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
            return None, None
        tensors = parse_json(manifest_path.read_bytes(), str(manifest_path))["artifacts"]["tensors"]
        name, digest = tensors["file"], tensors["sha256"]
    except (FragmentError, OSError, KeyError, TypeError, IndexError):
        return None, None
    if not isinstance(name, str) or Path(name).name != name or not isinstance(digest, str):
        return None, None
    return name, digest


def install(directory: Path, manifest: Mapping[str, Any], write_tensors: Any) -> tuple[Path, dict[str, Any]]:
    """Write a fragment's pair under ``directory`` so that every instant shows the old pair or the new one.

    Steps, and what a kill after each leaves (``<name>.json`` is the one pointer that switches):

    1. ``write_tensors(tmp)`` writes ``.<name>.safetensors.tmp-<pid>``, then fsync: the old pair is
       untouched; the temporary is swept by the next library writer (``library.index._sweep_temporaries``).
    2. rename to a tensors name that no current manifest uses (``<name>.safetensors`` when free or
       identical, else ``<name>.<sha256[:16]>.safetensors``), fsync the folder: still the old pair
       (the old manifest names the old tensors file, which is never written); the new file is an orphan
       the next library writer deletes.
    3. the manifest is written to ``.<name>.json.tmp-<pid>``, fsynced, and renamed over ``<name>.json``
       (atomic), folder fsynced: from here the new pair is the entry.
    4. the old tensors file is deleted (only a file of this entry's own naming): a kill before that leaves
       an orphan, swept likewise.

    Returns the manifest path and the sealed manifest as written.
    """
    name = check_name(str(manifest["name"]))
    manifest_path = directory / f"{name}.json"
    if manifest_path.exists() and (manifest_path.is_symlink() or not manifest_path.is_file()):
        raise FragmentError(f"{manifest_path}: expected a regular file to replace (or none), found a directory, "
                            "symlink or special file; nothing was written")
    old_file, old_sha = named_by(manifest_path)
    # While this marker names a live pid, the library's orphan sweep leaves this name's files alone: between
    # steps 2 and 3 the new tensors file is named by no manifest yet (a dead writer's marker is swept).
    marker = directory / f".{name}.install.tmp-{os.getpid()}"
    try:
        # Our own pid's names: whatever is there is a dead namesake's leftover or a planted symlink, which
        # touch, save_file and open would follow out of the folder (issue #29).  Unlinking removes the link only.
        for own in (marker, directory / f".{name}.safetensors.tmp-{os.getpid()}", directory / f".{name}.json.tmp-{os.getpid()}"):
            if own.is_symlink() or own.exists():
                own.unlink()
        marker.touch()
        return _install_steps(directory, name, manifest_path, manifest, write_tensors, old_file, old_sha)
    except OSError as exc:
        raise FragmentError(f"{directory}: expected a writable fragments folder, found: {exc}") from exc
    finally:
        marker.unlink(missing_ok=True)


def _install_steps(directory: Path, name: str, manifest_path: Path, manifest: Mapping[str, Any], write_tensors: Any,
                   old_file: str | None, old_sha: str | None) -> tuple[Path, dict[str, Any]]:
    tmp = directory / f".{name}.safetensors.tmp-{os.getpid()}"
    try:
        write_tensors(tmp)
        _fsync(tmp)
        digest = sha256_file(tmp, use_cache=False)
        size = tmp.stat().st_size
        tensors_name = _fresh_tensors_name(directory, name, digest, old_file, old_sha)
        os.replace(tmp, directory / tensors_name)
    except OSError as exc:
        raise FragmentError(f"{directory}: expected a writable fragments folder, found: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(directory)
    body = {k: v for k, v in manifest.items() if k != "integrity"}
    sealed = seal({**body, "artifacts": {"tensors": {"file": tensors_name, "sha256": digest, "bytes": size}}})
    _replace_manifest(manifest_path, sealed)  # the switch: old pair before, new pair after
    if old_file is not None and old_file != tensors_name:
        match = OWN_TENSORS.fullmatch(old_file)
        if match is not None and match["stem"] == name:  # never a file another fragment's naming could own
            (directory / old_file).unlink(missing_ok=True)
    return manifest_path, sealed


def _replace_manifest(manifest_path: Path, sealed: Mapping[str, Any]) -> None:
    """Write ``sealed`` to a temporary beside ``manifest_path``, fsync it, rename it over the manifest (atomic) and
    fsync the folder: a kill at any point leaves the old manifest or the new one, never a torn file."""
    tmp_json = manifest_path.parent / f".{manifest_path.stem}.json.tmp-{os.getpid()}"
    try:
        if tmp_json.is_symlink() or tmp_json.exists():  # a dead namesake's leftover or a planted link: never written through
            tmp_json.unlink()
        with open(tmp_json, "xb") as fh:
            fh.write(json.dumps(sealed, indent=2, sort_keys=False).encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_json, manifest_path)
    except OSError as exc:
        raise FragmentError(f"{manifest_path}: expected a writable manifest path, found: {exc}; the previous "
                            "fragment (if any) is unchanged") from exc
    finally:
        tmp_json.unlink(missing_ok=True)
    _fsync(manifest_path.parent)


#: Batch audits a manifest keeps (the latest): enough to show a trend, bounded so a shared file never grows without end.
KEPT_AUDITS = 16


def manifest_identity(manifest: Mapping[str, Any]) -> str:
    """What makes a manifest the same fragment whatever batches audited it: the sha256 of everything but its seal and
    its ``quality.audits`` (``record_batch_audit`` changes only those).

    >>> a = {"name": "dog", "quality": {"gate": "passed"}, "integrity": {"manifest_sha256": "1"}}
    >>> b = {**a, "quality": {"gate": "passed", "audits": [{"n": 1}]}, "integrity": {"manifest_sha256": "2"}}
    >>> manifest_identity(a) == manifest_identity(b), manifest_identity(a) == manifest_identity({**a, "name": "cat"})
    (True, False)
    """
    body = {k: v for k, v in manifest.items() if k != "integrity"}
    quality = body.get("quality")
    if isinstance(quality, Mapping):
        body["quality"] = {k: v for k, v in quality.items() if k != "audits"}
    return sha256_json(body)


def record_batch_audit(manifest_path: str | os.PathLike, identity: str, audit: Mapping[str, Any]) -> dict[str, Any]:
    """Add a batch's running-audit record (``fragment.library.audit_outcome.audit_summary``) to the manifest's
    ``quality.audits`` (the latest ``KEPT_AUDITS``), sealed again and replaced atomically; the tensors file is not
    touched, so the pair stays valid.  Returns the manifest as written.

    ``identity`` is the ``manifest_identity`` of the manifest the batch ran: when the file on disk is another
    fragment (one saved under the name since), nothing is written and a ``FragmentError`` says so.  Earlier
    audits' records do not change the identity, so every batch of a loaded fragment records.

    >>> written = record_batch_audit("models/fragments/dog.json", identity, {"audited": 3, "passed": 3})  # doctest: +SKIP
    >>> written["quality"]["audits"][-1]["passed"]  # doctest: +SKIP
    3
    """
    path = Path(manifest_path)
    if path.is_symlink():  # as ``install``: never replace a link with a file, nor write through one
        raise FragmentError(f"{path}: expected a regular manifest file to record the audit in, found a symlink; the "
                            "audit was not recorded in it")
    manifest = read_manifest(path)
    found = manifest_identity(manifest)
    if found != identity:
        raise FragmentError(f"{path}: expected the fragment the batch ran (identity {str(identity)[:16]}...), found "
                            f"another ({found[:16]}...): a fragment was saved under this name since it was loaded; "
                            "the audit was not recorded in it, load the fragment again to record the next one")
    quality = dict(manifest.get("quality") or {})
    kept = quality.get("audits")
    kept = [a for a in kept if isinstance(a, Mapping)] if isinstance(kept, list) else []
    audits = [*kept, dict(audit)][-KEPT_AUDITS:]
    body = {k: v for k, v in manifest.items() if k != "integrity"}
    while True:
        sealed = seal({**body, "quality": {**quality, "audits": audits}})
        # a manifest past the reader's cap could never be loaded again: the oldest audits go first
        if len(json.dumps(sealed, indent=2).encode("utf-8")) <= MAX_MANIFEST_BYTES:
            break
        if len(audits) <= 1:
            raise FragmentError(f"{path}: expected room for an audit record under the {MAX_MANIFEST_BYTES}-byte "
                                "manifest limit, found none; the manifest was left as it was")
        audits = audits[1:]
    _replace_manifest(path, sealed)
    return sealed


def _fresh_tensors_name(directory: Path, name: str, digest: str, old_file: str | None, old_sha: str | None) -> str:
    """A tensors file name for new contents ``digest`` that the current manifest does not depend on."""
    for candidate in (f"{name}.safetensors", f"{name}.{digest[:16]}.safetensors"):
        path = directory / candidate
        if candidate == old_file:
            if old_sha == digest:  # same bytes: replacing them keeps the old manifest valid throughout
                return candidate
            continue
        if not path.exists() and not path.is_symlink():
            return candidate
        if path.is_file() and not path.is_symlink() and candidate != f"{name}.safetensors":
            return candidate  # our own content-named file, named by no manifest: an orphan, safe to replace
        if path.is_file() and not path.is_symlink() and sha256_file(path, use_cache=False) == digest:
            return candidate
    return f"{name}.{digest[:32]}.safetensors"  # the 16-digit name is the old file with other bytes: never reached in practice


def read_manifest(manifest_path: str | os.PathLike) -> dict[str, Any]:
    """Parse and validate a manifest file (size-capped; no tensors are read)."""
    path = Path(manifest_path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ManifestError(f"{path}: expected a manifest file, found a directory or special file")
        if size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{path}: expected a manifest under {MAX_MANIFEST_BYTES} bytes, found {size}")
        raw = path.read_bytes()
    except FileNotFoundError as exc:  # gone is a broken entry, not a transient failure
        raise ManifestError(f"{path}: cannot read manifest: expected a manifest file, found none ({exc.strerror})") from None
    except OSError as exc:
        raise ReadError(f"{path}: cannot read manifest (right now): {exc}") from exc
    # Depth, huge numbers and NaN are refused here, before hashing or the schema walk recurse over it.
    return validate_manifest(parse_json(raw, str(path), what="manifest"), str(path))


def _tensors_path(manifest: Mapping[str, Any], manifest_path: Path) -> Path:
    file_name = manifest["artifacts"]["tensors"]["file"]
    # The tensors file must sit beside its manifest: no directories, no '..', no absolute paths.
    if Path(file_name).name != file_name or file_name in ("", ".", "..") or not file_name.endswith(".safetensors"):
        raise ManifestError(f"{manifest_path}: artifacts.tensors.file must be a plain '*.safetensors' name, found {file_name!r}")
    path = manifest_path.parent / file_name
    if path.is_symlink() and path.resolve().parent != manifest_path.parent.resolve():
        raise IntegrityError(f"{path}: symlink points outside the fragment folder")
    return path


def load_fragment(manifest_path: str | os.PathLike) -> Fragment:
    """Read and fully verify a fragment: manifest structure and self-hash, tensors file hash,
    and agreement between the manifest's kept heads and the stored index tensors.

    >>> frag = load_fragment("ComfyUI/models/fragments/dog-on-jet-ski.json")  # doctest: +SKIP
    """
    manifest_path = Path(manifest_path)
    manifest = read_manifest(manifest_path)
    tensors_path = _tensors_path(manifest, manifest_path)
    if not tensors_path.is_file():
        raise IntegrityError(f"{tensors_path}: tensors file named by {manifest_path.name} is missing")
    expected = manifest["artifacts"]["tensors"]["sha256"]
    try:
        found = sha256_file(tensors_path)
    except FileNotFoundError:  # gone since is_file(): missing, like above (a reader racing a replace retries)
        raise IntegrityError(f"{tensors_path}: tensors file named by {manifest_path.name} is missing") from None
    except OSError as exc:
        raise ReadError(f"{tensors_path}: cannot read the tensors file right now: {exc}") from exc
    if found != expected:
        raise IntegrityError(f"{tensors_path}: expected sha256 {expected[:16]}…, found {found[:16]}… (file changed or corrupt)")
    read_safetensors_header(tensors_path)  # dtypes, shapes, offsets and size caps before any data is read
    try:
        tensors = load_file(str(tensors_path))
    except FileNotFoundError:
        raise IntegrityError(f"{tensors_path}: tensors file named by {manifest_path.name} is missing") from None
    except OSError as exc:  # the hash matched: the bytes are the recorded ones, the read itself failed
        raise ReadError(f"{tensors_path}: cannot read the tensors file right now: {exc}") from exc
    except (SafetensorError, ValueError, RuntimeError) as exc:  # safetensors reports a vanished file as RuntimeError
        if not tensors_path.exists():
            raise IntegrityError(f"{tensors_path}: tensors file named by {manifest_path.name} is missing") from None
        raise IntegrityError(f"{tensors_path}: not a readable safetensors file: {exc}") from exc
    check_tensors(manifest, tensors, tensors_path)
    return Fragment(manifest=manifest, tensors=tensors, values_checked=True)


def ensure_folder(folder: str | os.PathLike) -> Path:
    """``folder``, created if missing; a ``FragmentError`` naming it when it is a file or cannot be made.

    >>> import tempfile; ensure_folder(Path(tempfile.mkdtemp()) / "new").is_dir()
    True
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise FragmentError(f"{folder}: expected a folder, found a file (or a file in its path)") from None
    except OSError as exc:
        raise FragmentError(f"{folder}: expected a folder that can be created, found: {exc.strerror or exc}") from None
    return folder


def check_tensors(manifest: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], source: Path | str) -> None:
    """Everything a read checks once the bytes are in: each lever's tensors, no stray tensor, the schedule.

    >>> check_tensors({"pruning": {"modules": {}}, "compression": {}}, {}, "x.safetensors")
    """
    check_loadable(manifest, tensors, str(source))  # the one definition of loadable: verify calls it too
