"""Build, save, load and apply fragments.

A fragment is a delta on its base model: a JSON manifest plus one
safetensors file holding only what cannot be recomputed from the base —
the kept head indices (``heads.<path>.kept``, int64) and low-rank factors
(``lowrank.<path>.down`` / ``.up``).  Applying it means: take the normally
loaded base model, check it is the right one, and build pruned copies of the
touched modules.  ComfyUI's checkpoint detection reads head counts from the
config, so shipping a pruned checkpoint instead would not load there.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..profiling.discovery import describe, find_attention, iter_attention
from ..version import __version__
from .errors import BaseModelMismatchError, FragmentError, IntegrityError, ManifestError, ReadError
from .hashing import sha256_file, sha256_state_dict
from .levers import apply_kv_and_ff, apply_precision, build_ff, build_kv_fold, build_precision, check_lever_tensors
from .lowrank import factorize_linear, factors_to_module
from .manifest import new_manifest, seal, validate_manifest
from .untrusted import parse_json, read_safetensors_header
from .pruning import prune_attention, replace_modules
from .selection import Selection, validate_plan

log = logging.getLogger(__name__)

MAX_MANIFEST_BYTES = 16 << 20
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def kept_key(path: str) -> str:
    return f"heads.{path}.kept"


def lowrank_keys(layer: str) -> tuple[str, str]:
    return f"lowrank.{layer}.down", f"lowrank.{layer}.up"


@dataclass
class Fragment:
    """A manifest and its tensors, in memory."""

    manifest: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def kept(self) -> dict[str, list[int]]:
        return {p: [int(i) for i in self.tensors[kept_key(p)]] for p in self.manifest["pruning"]["modules"]}


def describe_base(model: nn.Module, name: str, sha256: str | None = None, hash_kind: str = "file") -> dict[str, Any]:
    """The manifest's ``base_model`` block; hashes the weights when no file hash is given.

    >>> describe_base(nn.Linear(2, 2), "toy")["hash_kind"]
    'state_dict_fp16'
    """
    if sha256 is None:
        sha256, hash_kind = sha256_state_dict(model), "state_dict_fp16"
    first = next(iter(model.parameters()), None)
    sites = find_attention(model)
    return {
        "name": name,
        "sha256": sha256,
        "hash_kind": hash_kind,
        "dtype": str(first.dtype).replace("torch.", "") if first is not None else None,
        "framework": "pytorch",
        "model_class": type(model).__name__,
        "attention_modules": len(sites),
        "attention_heads": sum(s.heads for s in sites),
    }


def build_fragment(
    model: nn.Module,
    selection: Selection,
    *,
    base: Mapping[str, Any],
    name: str,
    profiling: Mapping[str, Any] | None = None,
    low_rank: Mapping[str, float] | None = None,
    kv_context: torch.Tensor | None = None,
    kv_keep_weights: bool = False,
    ff_selection: Selection | None = None,
    ff_info: Mapping[str, Any] | None = None,
    precision: str | None = None,
    precision_ratio: float = 1.0,
    precision_granularity: str = "per_channel",
) -> Fragment:
    """Record a selection (and optional low-rank layers, path -> energy to keep) as a fragment.

    Levers beyond heads (issue #7, see ``levers.py``), each optional:
    ``kv_context`` ``[B, T, C]`` folds every attn2's K/V for those context rows
    (weights dropped unless ``kv_keep_weights``); ``ff_selection`` keeps those
    feed-forward channels; ``precision`` (``"fp8"``/``"int8"``) stores the least
    sensitive ``precision_ratio`` of the retained Linear parameters quantized.

    >>> frag = build_fragment(unet, select_heads(score_heads(profile), ratio=0.3),  # doctest: +SKIP
    ...                       base=describe_base(unet, "toy-sd15"), name="dog-on-jet-ski")
    >>> small = apply_fragment(unet, frag)  # doctest: +SKIP
    """
    modules = dict(iter_attention(model))
    heads = {p: int(m.heads) for p, m in modules.items()}
    plan = validate_plan(selection.pruned_only(), heads, source=f"fragment {name!r}")
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, Any] = {}
    for path, kept in plan.items():
        site = describe(path, modules[path])
        tensors[kept_key(path)] = torch.tensor(kept, dtype=torch.int64)
        removed = [h for h in range(site.heads) if h not in set(kept)]
        entries[path] = {"kind": site.kind, "heads": site.heads, "dim_head": site.dim_head, "kept": kept, "removed": removed}
    replacements = {p: prune_attention(modules[p], k, p) for p, k in plan.items()}
    compression: dict[str, Any] = {}
    if kv_context is not None:  # after head pruning: only the kept heads' K/V are stored
        kv_tensors, compression["kv_fold"] = build_kv_fold(model, replacements, kv_context, keep_weights=kv_keep_weights)
        tensors.update(kv_tensors)
    if ff_selection is not None:
        ff_tensors, compression["ff_channels"] = build_ff(model, replacements, ff_selection, ff_info)
        tensors.update(ff_tensors)
    records = []
    for layer, energy in (low_rank or {}).items():
        lin = _resolve(model, replacements, layer)
        seq, record = factorize_linear(lin, energy=energy, path=layer)
        down_key, up_key = lowrank_keys(layer)
        tensors[down_key] = seq[0].weight.detach().contiguous()
        tensors[up_key] = seq[1].weight.detach().contiguous()
        records.append(record.to_dict())
    if precision is not None:  # last: it quantizes the weights the other levers left
        q_tensors, compression["quantization"] = build_precision(
            model, replacements, fmt=precision, ratio=precision_ratio, granularity=precision_granularity,
            exclude=tuple(low_rank or {}),
        )
        tensors.update(q_tensors)
    total = sum(heads.values())
    removed_total = sum(len(e["removed"]) for e in entries.values())
    pruning = {
        "method": "composite_score",
        "selection": dict(selection.params),
        "heads_total": total,
        "heads_removed": removed_total,
        "head_retention_ratio": 1.0 - removed_total / total if total else 1.0,
        "modules": entries,
    }
    manifest = new_manifest(
        name=name,
        base_model=base,
        profiling=profiling or {},
        pruning=pruning,
        compression={"low_rank": records, "quantization": {"applied": False}, **compression},
        producer_version=__version__,
    )
    return Fragment(manifest=manifest, tensors=tensors)


def _resolve(model: nn.Module, replacements: Mapping[str, nn.Module], path: str) -> nn.Module:
    """The module at ``path`` as it is after ``replacements`` (which may contain it)."""
    for root_path, module in replacements.items():
        if path == root_path:
            return module
        if path.startswith(root_path + "."):
            return module.get_submodule(path[len(root_path) + 1 :])
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise BaseModelMismatchError(f"{path}: no such module in {type(model).__name__}") from None


def fragment_replacements(
    model: nn.Module, fragment: Fragment, *, base_sha256: str | None = None
) -> dict[str, nn.Module]:
    """New modules to install at top-level paths (no path inside another), for ``replace_modules``
    or ComfyUI object patches.  Checks the base hash (when given) and every touched module's layout.

    >>> reps = fragment_replacements(unet, frag, base_sha256=sha256_state_dict(unet))  # doctest: +SKIP
    """
    manifest = fragment.manifest
    expected = manifest["base_model"].get("sha256")
    if base_sha256 is not None and base_sha256 != expected:
        raise BaseModelMismatchError(
            f"fragment {fragment.name!r}: built for base model {manifest['base_model'].get('name')!r} "
            f"sha256 {str(expected)[:16]}…, found sha256 {base_sha256[:16]}…"
        )
    modules = dict(iter_attention(model))
    replacements: dict[str, nn.Module] = {}
    for path, entry in manifest["pruning"]["modules"].items():
        module = modules.get(path)
        if module is None:
            raise BaseModelMismatchError(f"{path}: fragment {fragment.name!r} prunes an attention module the model does not have")
        site = describe(path, module)
        if (site.heads, site.dim_head) != (entry["heads"], entry["dim_head"]):
            raise BaseModelMismatchError(
                f"{path}: expected {entry['heads']} heads of size {entry['dim_head']}, found {site.heads} of size {site.dim_head}"
            )
        replacements[path] = prune_attention(module, fragment.kept[path], path)
    apply_kv_and_ff(model, manifest, fragment.tensors, replacements)
    for record in manifest["compression"].get("low_rank", []):
        layer = record["layer"]
        down_key, up_key = lowrank_keys(layer)
        lin = _resolve(model, replacements, layer)
        if not isinstance(lin, nn.Linear):
            raise BaseModelMismatchError(f"{layer}: expected an nn.Linear to take low-rank factors, found {type(lin).__name__}")
        seq = factors_to_module(lin, fragment.tensors[down_key], fragment.tensors[up_key], layer)
        owner = next((p for p in replacements if layer.startswith(p + ".")), None)
        if owner is None:
            replacements[layer] = seq
        else:  # inside a pruned attention: fold it into that copy so no patch sits inside another
            replacements[owner] = replace_modules(replacements[owner], {layer[len(owner) + 1 :]: seq})
    apply_precision(model, manifest, fragment.tensors, replacements)
    return replacements


def apply_fragment(model: nn.Module, fragment: Fragment, *, base_sha256: str | None = None) -> nn.Module:
    """The fragment model: ``model`` with pruned and factorised copies swapped in; ``model`` is unchanged.

    >>> small = apply_fragment(unet, load_fragment("fragments/dog.json"), base_sha256=sha256_state_dict(unet))  # doctest: +SKIP
    """
    return replace_modules(model, fragment_replacements(model, fragment, base_sha256=base_sha256))


def check_name(name: str) -> str:
    """A fragment name must be a plain file stem: letters, digits, ``.``, ``_``, ``-``.

    >>> check_name("dog_on_jet-ski.v2")
    'dog_on_jet-ski.v2'
    """
    # fullmatch, not match with '$': '$' also matches before a final newline, so 'evil\n' passed (issue #16).
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise ManifestError(f"fragment name {name!r}: expected 1-128 characters of letters, digits, '.', '_', '-' (no path)")
    return name


def save_fragment(fragment: Fragment, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the tensors file then ``<name>.json`` into ``directory``; return the manifest path.

    An existing fragment of the same name is kept unless ``overwrite``; the
    replacement is atomic (old or new pair, never a mix: see ``install``).

    >>> save_fragment(frag, "ComfyUI/models/fragments")  # doctest: +SKIP
    PosixPath('ComfyUI/models/fragments/dog-on-jet-ski.json')
    """
    name = check_name(fragment.name)
    directory = ensure_folder(directory)
    manifest_path = directory / f"{name}.json"
    if not overwrite and (manifest_path.exists() or (directory / f"{name}.safetensors").exists()):
        raise FragmentError(f"{manifest_path}: a fragment named {name!r} already exists (choose another name or overwrite)")

    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in fragment.tensors.items()}, str(tmp), metadata={"prompt_fragments.schema": "1"})

    manifest_path, fragment.manifest = install(directory, fragment.manifest, write)
    log.info("saved fragment %s (%d tensors, %d bytes)", manifest_path, len(fragment.tensors),
             fragment.manifest["artifacts"]["tensors"]["bytes"])
    return manifest_path


_OWN_TENSORS = re.compile(r"(?P<stem>[A-Za-z0-9][A-Za-z0-9._-]{0,127}?)(\.[0-9a-f]{16})?\.safetensors")


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


def _named_by(manifest_path: Path) -> tuple[str | None, str | None]:
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
       untouched; the temporary is swept by the next library writer (``library._sweep_temporaries``).
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
    old_file, old_sha = _named_by(manifest_path)
    # While this marker names a live pid, the library's orphan sweep leaves this name's files alone: between
    # steps 2 and 3 the new tensors file is named by no manifest yet (a dead writer's marker is swept).
    marker = directory / f".{name}.install.tmp-{os.getpid()}"
    try:
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
    tmp_json = directory / f".{name}.json.tmp-{os.getpid()}"
    try:
        with open(tmp_json, "wb") as fh:
            fh.write(json.dumps(sealed, indent=2, sort_keys=False).encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_json, manifest_path)  # the switch: old pair before, new pair after
    except OSError as exc:
        raise FragmentError(f"{manifest_path}: expected a writable manifest path, found: {exc}; the previous "
                            "fragment (if any) is unchanged") from exc
    finally:
        tmp_json.unlink(missing_ok=True)
    _fsync(directory)
    if old_file is not None and old_file != tensors_name:
        match = _OWN_TENSORS.fullmatch(old_file)
        if match is not None and match["stem"] == name:  # never a file another fragment's naming could own
            (directory / old_file).unlink(missing_ok=True)
    return manifest_path, sealed


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
    _check_tensors(manifest, tensors, tensors_path)
    return Fragment(manifest=manifest, tensors=tensors)


def check_schedule(manifest: Mapping[str, Any], source: Path | str) -> None:
    """The manifest's run-time schedule, parsed exactly as the loader node parses it, and its head sets
    inside what the fragment kept (else the node refuses it later, after ``verify`` said OK: issue #16).

    >>> check_schedule({"pruning": {"modules": {}}}, "x.json")
    """
    from .schedule import Schedule  # schedule imports the profiler; keep store's import time small

    block = manifest.get("schedule")
    where_ = f"{source}: schedule"
    try:
        schedule = Schedule.from_manifest(block, source=where_)
    except (TypeError, AttributeError, OverflowError) as exc:  # a wrong JSON type where the parser expects another
        raise ManifestError(f"{where_}: expected the schema-v1 schedule layout, found {str(block)[:200]} ({exc})") from None
    modules = manifest["pruning"]["modules"]
    for bucket, heads in schedule.bucket_heads.items():
        for path, kept in heads.items():
            # The rule of speed.with_schedule: a module the fragment does not prune may be masked to any heads
            # (its head count is the model's, checked when the masks are built); a pruned one only within kept.
            if path not in modules:
                continue
            pruned = sorted(set(kept) - set(modules[path]["kept"]))
            if pruned:
                raise ManifestError(f"{where_}: bucket {bucket}: {path}: expected heads within the kept "
                                    f"{modules[path]['kept']}, found pruned heads {pruned}")


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


def _check_tensors(manifest: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], source: Path) -> None:
    expected_keys: set[str] = set()
    modules = manifest["pruning"]["modules"]
    for path, entry in modules.items():
        key = kept_key(path)
        expected_keys.add(key)
        t = tensors.get(key)
        if t is None:
            raise IntegrityError(f"{source}: missing tensor {key!r} for module {path}")
        if t.dtype != torch.int64 or t.ndim != 1:
            raise IntegrityError(f"{source}: {key}: expected a 1-D int64 tensor, found {t.dtype} with shape {list(t.shape)}")
        validate_plan({path: t.tolist()}, {path: entry["heads"]}, source=str(source))
        if t.tolist() != entry["kept"]:
            raise IntegrityError(f"{source}: {path}: manifest keeps heads {entry['kept']}, tensors file keeps {t.tolist()}")
    for record in manifest["compression"].get("low_rank", []):
        for key in lowrank_keys(record["layer"]):
            expected_keys.add(key)
            t = tensors.get(key)
            if t is None:
                raise IntegrityError(f"{source}: missing tensor {key!r} for low-rank layer {record['layer']}")
        down, up = (tensors[k] for k in lowrank_keys(record["layer"]))
        rank = record["rank"]
        # down is [rank, in], up is [out, rank]: 'rank in shape' accepted a [0, 8] factor recorded as rank 8.
        for key, t, axis in ((lowrank_keys(record["layer"])[0], down, 0), (lowrank_keys(record["layer"])[1], up, 1)):
            if t.ndim != 2 or not t.is_floating_point() or t.shape[axis] != rank or min(t.shape) < 1:
                raise IntegrityError(
                    f"{source}: {key}: expected a 2-D float tensor with rank {rank} on axis {axis} and no empty axis, "
                    f"found {t.dtype} {list(t.shape)}"
                )
    expected_keys |= check_lever_tensors(manifest, tensors, str(source))
    check_schedule(manifest, source)
    extra = sorted(set(tensors) - expected_keys)
    if extra:
        raise IntegrityError(f"{source}: unexpected tensors not named by the manifest: {extra[:5]}")
