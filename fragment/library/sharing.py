"""Move a fragment as one file: pack, verify (with or without the base model), unpack.

The pack is itself a safetensors file (never pickle), ``<name>.fragment.safetensors``:

* one ``uint8`` tensor ``fragment.tensors``: the fragment's tensors file, byte for byte,
  so its SHA-256 still matches the manifest after unpacking;
* ``__metadata__``: ``prompt_fragments.pack`` = ``"1"``, ``prompt_fragments.manifest`` =
  the sealed manifest JSON, and optionally ``prompt_fragments.library`` = the
  library row (prompt, pooled embedding, parameters) so the receiver's auto
  mode can find it.

A pack is untrusted input.  ``verify_pack`` checks the outer and inner
headers (``untrusted``), the manifest (hand checks, JSON schema, self-hash),
the tensors' hash and their agreement with the manifest, all in memory —
nothing is written.  With the base model it also checks compatibility.
``unpack`` writes only plain names inside the target folder, through
temporary files renamed under the library lock.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_bytes, save_file

from ...errors import BaseModelMismatchError, FragmentError, IntegrityError, ManifestError
from ..base_facts import BaseFacts
from ..build import check_loadable
from ..schedule.apply import apply_schedule
from ..schedule.state import ScheduleState
from ..format.hashing import sha256_file, sha256_state_dict
from ..format.manifest import Fragment, seal, validate_manifest
from ..format.store import (
    MAX_MANIFEST_BYTES, OWN_TENSORS, check_name, check_tensors, ensure_folder, install, load_fragment, named_by
)
from ..format.untrusted import (
    check_base, check_plain_name, check_safetensors_bytes, confined, parse_json, read_safetensors_header
)
from .index import LIBRARY_DIR, forget_locked, locked, register_locked

log = logging.getLogger(__name__)

PACK_SUFFIX = ".fragment.safetensors"
TENSOR = "fragment.tensors"
META_PACK, META_MANIFEST, META_LIBRARY = "prompt_fragments.pack", "prompt_fragments.manifest", "prompt_fragments.library"
MAX_EMBEDDING = 65536


@dataclass
class Unpacked:
    """A verified pack in memory: the fragment, its raw tensors file, and the optional library row."""

    fragment: Fragment
    tensors_bytes: bytes
    library: dict[str, Any] | None


def pack(manifest_path: str | os.PathLike, out: str | os.PathLike, *, library_row: Mapping[str, Any] | None = None) -> Path:
    """Write a saved fragment (verified first) as one pack file; return its path.

    ``library_row`` (``prompt``, ``embedding`` list, ``params``) is carried for the receiver's auto mode.

    >>> pack("models/fragments/dog.json", "dog.fragment.safetensors")  # doctest: +SKIP
    PosixPath('dog.fragment.safetensors')
    """
    manifest_path = Path(manifest_path)
    fragment = load_fragment(manifest_path)  # full verification: never pass on a corrupt fragment
    tensors_path = manifest_path.parent / fragment.manifest["artifacts"]["tensors"]["file"]
    out = Path(out)
    for source in (manifest_path, tensors_path):  # an output that is also an input would destroy the fragment
        if out.resolve() == source.resolve() or (out.exists() and os.path.samefile(out, source)):
            raise FragmentError(f"{out}: expected an output path other than the fragment's own files, found {source.name}")
    owner = fragment_owning(out)
    if owner is not None:  # issue #29: another fragment's tensors file was overwritten silently
        raise FragmentError(f"{out}: expected an output path that is no fragment's file, found a file of "
                            f"fragment {owner.name}; nothing was written")
    if LIBRARY_DIR in out.resolve().parts[:-1]:  # the index, lock and quarantine: a pack there loses the library
        raise FragmentError(f"{out}: expected an output path outside a library's {LIBRARY_DIR} folder, found one "
                            "inside it; nothing was written")
    if not out.parent.is_dir():
        raise FragmentError(f"{out}: expected an existing folder {out.parent} for the pack, found none")
    if out.is_dir():
        raise FragmentError(f"{out}: expected a pack file path, found a directory")
    raw = tensors_path.read_bytes()
    manifest = fragment.manifest
    canonical = f"{fragment.name}.safetensors"
    if manifest["artifacts"]["tensors"]["file"] != canonical:  # a replaced entry's content-named file
        body = {k: v for k, v in manifest.items() if k != "integrity"}
        manifest = seal({**body, "artifacts": {"tensors": {**manifest["artifacts"]["tensors"], "file": canonical}}})
    metadata = {META_PACK: "1", META_MANIFEST: json.dumps(manifest, sort_keys=True)}
    if library_row is not None:
        metadata[META_LIBRARY] = json.dumps(check_row(dict(library_row), str(manifest_path)), sort_keys=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        save_file({TENSOR: torch.frombuffer(bytearray(raw), dtype=torch.uint8)}, str(tmp), metadata=metadata)
        os.replace(tmp, out)
    except (OSError, SafetensorError) as exc:
        raise FragmentError(f"{out}: expected a writable pack path, found: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    log.info("packed %s into %s (%d bytes)", manifest_path.name, out, out.stat().st_size)
    return out


def fragment_owning(path: str | os.PathLike) -> Path | None:
    """The manifest of the fragment whose file ``path`` is (or would be), else None: a manifest itself, the
    tensors file a manifest in that folder names, or ``<stem>.safetensors`` / ``<stem>.<16 hex>.safetensors``
    beside ``<stem>.json`` (a replaced entry's next name).  Symlinks are resolved first.

    >>> import tempfile; fragment_owning(Path(tempfile.mkdtemp()) / "x.fragment.safetensors") is None
    True
    """
    path = Path(path)
    resolved = path.resolve()
    folder = resolved.parent
    for candidate in {path, resolved}:
        if candidate.name.endswith(".json") and named_by(candidate)[0] is not None:
            return candidate
    if not resolved.name.endswith(".safetensors"):  # a manifest names only *.safetensors files
        return None
    match = OWN_TENSORS.fullmatch(resolved.name)
    if match is not None:
        for stem in (match["stem"], resolved.name[: -len(".safetensors")]):
            if named_by(folder / f"{stem}.json")[0] is not None:
                return folder / f"{stem}.json"
    for manifest in folder.glob("*.json"):
        if named_by(manifest)[0] == resolved.name:
            return manifest
    return None


def _finite_number(x: Any) -> bool:
    """A real number that converts to a finite float (a 400-digit int made math.isfinite raise OverflowError)."""
    if isinstance(x, bool):
        return False
    if isinstance(x, int):
        return abs(x) <= 2 ** 128
    return isinstance(x, float) and math.isfinite(x)


def check_row(row: Any, source: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise ManifestError(f"{source}: library row: expected an object, found {type(row).__name__}")
    emb = row.get("embedding")
    if isinstance(emb, torch.Tensor):
        emb = row["embedding"] = [float(x) for x in emb.reshape(-1)]
    ok = (isinstance(row.get("prompt"), str) and len(row["prompt"]) <= 10000 and _utf8(row["prompt"])
          and isinstance(row.get("params", {}), dict)
          and isinstance(emb, list) and 0 < len(emb) <= MAX_EMBEDDING
          # the embedding is indexed as float32: 1e300 or 10**20 (an int64 overflow in torch.tensor) went through
          and all(_finite_number(x) and abs(x) <= _FLOAT32_MAX for x in emb))
    if not ok:
        raise ManifestError(f"{source}: library row: expected a UTF-8 prompt string, params object and an embedding "
                            f"list of at most {MAX_EMBEDDING} numbers within float32's ±{_FLOAT32_MAX:.4g}, "
                            f"found keys {sorted(row)[:8]}")
    return {"prompt": row["prompt"], "embedding": [float(x) for x in emb], "params": row.get("params", {})}


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _utf8(text: str) -> bool:
    """Whether ``text`` can be stored as UTF-8 (a lone surrogate such as '\\ud800' raised UnicodeEncodeError in sqlite)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_pack(pack_path: str | os.PathLike) -> Unpacked:
    """Verify a pack's format and integrity without the base model (nothing is written); return its contents.

    >>> read_pack("dog.fragment.safetensors").fragment.name  # doctest: +SKIP
    'dog'
    """
    path = Path(pack_path)
    header = read_safetensors_header(path, allowed_dtypes=frozenset({"U8"}))
    if list(header) != [TENSOR] or len(header[TENSOR][1]) != 1:
        raise IntegrityError(f"{path}: expected exactly one 1-D tensor {TENSOR!r}, found {sorted(header)[:5]}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            raw = fh.get_tensor(TENSOR).numpy().tobytes()
    except (SafetensorError, OSError, ValueError) as exc:
        raise IntegrityError(f"{path}: not a readable safetensors pack: {exc}") from exc
    if metadata.get(META_PACK) != "1":
        raise ManifestError(f"{path}: expected pack format '1' in metadata {META_PACK!r}, found {metadata.get(META_PACK)!r}")
    text = metadata.get(META_MANIFEST, "")
    if not text or len(text) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{path}: expected a manifest of 1 to {MAX_MANIFEST_BYTES} bytes in the metadata, found {len(text)}")
    source = f"{path}[manifest]"
    manifest = parse_json(text, source)
    manifest = validate_manifest(manifest, source)
    name = check_name(manifest["name"])
    if manifest["artifacts"]["tensors"]["file"] != f"{name}.safetensors":
        raise IntegrityError(f"{source}: expected artifacts.tensors.file {name + '.safetensors'!r}, "
                             f"found {manifest['artifacts']['tensors']['file']!r}")
    found = hashlib.sha256(raw).hexdigest()
    if found != manifest["artifacts"]["tensors"]["sha256"]:
        raise IntegrityError(f"{path}: packed tensors: expected sha256 {manifest['artifacts']['tensors']['sha256'][:16]}…, "
                             f"found {found[:16]}…")
    check_safetensors_bytes(raw, f"{path}[tensors]")
    try:
        tensors = load_bytes(raw)
    except (SafetensorError, ValueError) as exc:
        raise IntegrityError(f"{path}: packed tensors are not readable safetensors: {exc}") from exc
    check_tensors(manifest, tensors, Path(f"{path}[tensors]"))
    row = None
    if META_LIBRARY in metadata:
        row = check_row(parse_json(metadata[META_LIBRARY], f"{path}: library row"), str(path))
    return Unpacked(Fragment(manifest=manifest, tensors=tensors, values_checked=True), raw, row)


class _LazySafetensors(Mapping):
    """A checkpoint's UNet weights as a read-on-demand mapping (prefix stripped), for hashing one tensor at a time."""

    def __init__(self, path: Path):
        self._fh = safe_open(str(path), framework="pt")
        keys = list(self._fh.keys())
        prefix = "model.diffusion_model."
        self._prefix = prefix if any(k.startswith(prefix) for k in keys) else ""
        self._keys = [k[len(self._prefix):] for k in keys if k.startswith(self._prefix)]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._fh.get_tensor(self._prefix + key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape(self, key: str) -> list[int] | None:
        return list(self._fh.get_slice(self._prefix + key).get_shape()) if key in set(self._keys) else None


def check_against_base(fragment: Fragment, base: str | os.PathLike | nn.Module, *, label: str = "the given model",
                       probe: Callable[[nn.Module, ScheduleState], Any] | None = None) -> str:
    """Check a fragment fits a base model: a loaded UNet (``label`` names it) or a safetensors UNet/checkpoint.

    For a module (the CLI's ``--base demo`` passes the embedded reference model's
    UNet): its weight hash must equal the manifest's, and the fragment model is built
    with its schedule exactly as a loader builds it (``schedule.apply.apply_schedule``,
    which runs ``build.check_loadable`` against the module).  ``probe(model, state)``,
    when given, runs a tiny forward on that model and returns its output tensor(s):
    anything not finite is an ``IntegrityError``.

    For a file: the fp16-canonical weight hash of its UNet (keys under
    ``model.diffusion_model.`` when present) must equal the manifest's, and
    every pruned module's ``to_q.weight`` must have ``heads * dim_head`` rows.
    Returns a one-line summary; raises ``BaseModelMismatchError`` otherwise.

    >>> check_against_base(read_pack("dog.fragment.safetensors").fragment, load_reference().unet, label="demo")  # doctest: +SKIP
    'compatible with demo: base sha256 3f2a…, 12 modules checked'
    """
    manifest = fragment.manifest
    if isinstance(base, nn.Module):
        digest = sha256_state_dict(base)
        check_base(manifest, digest, label)
        small, state = apply_schedule(base, fragment)  # every pruned copy and schedule wrapper: what loaders build
        checked = ""
        if probe is not None:
            with torch.no_grad():
                outputs = probe(small, state)
            for out in outputs if isinstance(outputs, (list, tuple)) else [outputs]:
                if not bool(torch.isfinite(out).all()):
                    raise IntegrityError(f"fragment {fragment.name!r}: a forward on {label} with the fragment applied "
                                         f"gives non-finite outputs (NaN or inf): its stored values break the model")
            checked = ", forward finite"
        return (f"compatible with {label}: base sha256 {digest[:16]}…, "
                f"{len(manifest['pruning']['modules'])} modules checked{checked}")
    path = Path(base)
    header = read_safetensors_header(path, allowed_dtypes=frozenset({"F64", "F32", "F16", "BF16", "I64", "I32", "U8", "I8", "BOOL", "F8_E4M3", "F8_E5M2"}),
                            max_bytes=64 << 30)
    if manifest["base_model"].get("hash_kind") == "file":
        digest = sha256_file(path)
    else:
        weights = _LazySafetensors(path)
        digest = sha256_state_dict(weights)
    check_base(manifest, digest, str(path))
    weights = _LazySafetensors(path)
    for module, entry in manifest["pruning"]["modules"].items():
        shape = weights.shape(f"{module}.to_q.weight")
        if shape is None or shape[0] != entry["heads"] * entry["dim_head"]:
            raise BaseModelMismatchError(f"{path}: {module}.to_q.weight: expected {entry['heads'] * entry['dim_head']} rows, found {shape}")
    # The loader's schedule checks, on what the header says of the model (issue #29: skips 999 or a bucket on a
    # missing module was "compatible" here); a lever or bucket on a module the file lacks is a mismatch too.
    facts = BaseFacts.of_checkpoint({k: shape for k, (_, shape) in header.items()}, str(path), manifest)
    schedule = check_loadable(manifest, fragment.tensors, f"fragment {fragment.name!r}", base=facts,
                              values_checked=fragment.values_checked)
    check_lever_layers(manifest, set(weights), path)  # names only: nothing is read
    unknown = sorted({p for heads in schedule.bucket_heads.values() for p in heads if facts.heads.get(p) is None})
    skipped = (f"; not checked: heads of {len(unknown)} bucket module(s) (bounded by to_q rows only): "
               f"{facts.notes[0]}" if unknown and facts.notes else "")
    return (f"compatible with {path.name}: base sha256 {digest[:16]}…, {len(manifest['pruning']['modules'])} modules "
            f"checked, schedule checked against its layout{skipped}")


def check_lever_layers(manifest: Mapping[str, Any], names: set[str] | frozenset[str], source: str | os.PathLike) -> None:
    """Every layer a low-bit or fp8 record names must be a weight of the base (``<layer>.weight``): on a module
    the loader would find no such module and fall back.

    >>> check_lever_layers({"compression": {"precision": {"layers": {"a": {}}}}}, {"a.weight"}, "u")
    """
    compression = manifest.get("compression", {})
    for kind in ("low_bit", "precision"):
        record = compression.get(kind) if isinstance(compression, Mapping) else None
        layers = record.get("layers", {}) if isinstance(record, Mapping) else {}
        for layer in (layers if isinstance(layers, Mapping) else ()):
            if f"{layer}.weight" not in names:
                raise BaseModelMismatchError(f"{source}: compression.{kind}.layers: {layer}: expected a layer "
                                             f"{layer}.weight in the checkpoint, found none")


def unpack(pack_path: str | os.PathLike, folder: str | os.PathLike, *, overwrite: bool = False,
           add_to_library: bool = True) -> Path:
    """Verify a pack, then write ``<name>.json`` and ``<name>.safetensors`` into ``folder`` only; return the manifest path.

    Names come from the verified manifest and must be plain; a name that
    would leave ``folder`` is refused before anything is written.  With a
    library row and ``add_to_library`` the fragment is indexed for auto mode.

    >>> unpack("dog.fragment.safetensors", "models/fragments")  # doctest: +SKIP
    PosixPath('models/fragments/dog.json')
    """
    content = read_pack(pack_path)
    folder = ensure_folder(folder)
    name = check_name(content.fragment.name)
    manifest_name = check_plain_name(f"{name}.json", str(pack_path), ".json")
    tensors_name = check_plain_name(f"{name}.safetensors", str(pack_path), ".safetensors")
    with locked(folder):
        manifest_path = confined(folder, manifest_name, str(pack_path))
        tensors_path = confined(folder, tensors_name, str(pack_path))
        if not overwrite and (manifest_path.exists() or tensors_path.exists() or manifest_path.is_symlink()):
            raise IntegrityError(f"{manifest_path}: a fragment named {name!r} already exists (pass overwrite to replace it)")
        for target in (manifest_path, tensors_path):  # checked before anything is written: no half-replaced pair
            if (target.exists() or target.is_symlink()) and not (target.is_file() and not target.is_symlink()):
                raise IntegrityError(f"{target}: expected a regular file to replace (or none), found a directory, "
                                     "symlink or special file; nothing was written")
        if manifest_path.exists():
            # The old row describes the old fragment's prompt; left in place it would answer that prompt with
            # an exact HIT and serve the new fragment (issue #16).  Dropped before the switch, so a kill between
            # leaves at worst the new fragment unindexed, never a row serving the wrong one; a packed row is
            # registered again below.
            forget_locked(folder, name)
        # Atomic replace (store.install): the tensors go to a name the old manifest does not use, the manifest
        # is renamed last, so a kill leaves the old fragment or the new one, each complete (issue #16).
        manifest_path, sealed = install(folder, content.fragment.manifest, lambda tmp: tmp.write_bytes(content.tensors_bytes))
        if add_to_library and content.library is not None:
            # Under the same lock as the files (issue #29): registered after it, a concurrent add of the same
            # key saw the name taken, saved under another name, and then lost its row to this one.
            row = content.library
            register_locked(folder, manifest_path, sealed, embedding=torch.tensor(row["embedding"]),
                            prompt=row["prompt"], params=row["params"])
    load_fragment(manifest_path)  # what is on disk now verifies as a fragment
    log.info("unpacked %s into %s", Path(pack_path).name, manifest_path)
    return manifest_path
