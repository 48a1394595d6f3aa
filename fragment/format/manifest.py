"""The fragment manifest, schema v2: what a fragment is, how it was made, and how to check it.

Layers follow the design seeds (002 "Fragment Manifest Schema (v0)", 003
"Fragment Manifest & Packaging"): base model, profiling context, pruning
decisions with ORIGINAL head indices per module path, compression, quality,
performance, reuse, artifacts.  Quality, performance and reuse start empty
and are filled by measurements; nothing in them is guessed.

The manifest carries a SHA-256 of its own canonical JSON (``integrity``), so
an edited manifest is caught even when its tensors file is intact.

Schema v2 stores each lever under its one name (``fragment.levers``): the
feed-forward cut as ``compression.ff`` (v1: ``ff_channels``) and precision as
``compression.precision`` (v1: ``quantization``), the CFG cut-off as
``schedule.cfg_cutoff`` (v1: ``cfg_truncation``).  A v1 manifest still loads:
its integrity is checked as written, then its names are mapped through
:data:`V1_NAMES`, the one table of old spellings (``upgrade_manifest``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, TypedDict, cast

import torch

from ...errors import IntegrityError, ManifestError
from ..surgery.heads import kept_key
from .hashing import sha256_json
from .untrusted import check_schema

SCHEMA_VERSION = 2
# The v1 spelling of each renamed key, per manifest block: read through this one table (``upgrade_manifest``).
V1_NAMES: dict[str, dict[str, str]] = {"compression": {"ff_channels": "ff", "quantization": "precision"},
                                      "schedule": {"cfg_truncation": "cfg_cutoff"}}
KIND = "prompt-fragment"

_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "schema_version": int,
    "kind": str,
    "name": str,
    "base_model": dict,
    "profiling": dict,
    "pruning": dict,
    "compression": dict,
    "quality": dict,
    "performance": dict,
    "reuse": dict,
    "artifacts": dict,
}



class BaseModelBlock(TypedDict, total=False):
    """``base_model``: which weights the fragment was cut from (``sha256`` and ``hash_kind`` required)."""

    name: str
    sha256: str
    hash_kind: str  # "file", "state_dict_fp16" or "none"
    dtype: str | None
    framework: str
    model_class: str
    attention_modules: int
    attention_heads: int


class PrunedModule(TypedDict):
    """``pruning.modules[path]``: one attention module's heads, with ORIGINAL indices."""

    kind: str
    heads: int
    dim_head: int
    kept: list[int]
    removed: list[int]


class PruningBlock(TypedDict, total=False):
    """``pruning``: the head lever's record (``modules`` required)."""

    method: str
    selection: dict[str, Any]
    heads_total: int
    heads_removed: int
    head_retention_ratio: float
    modules: dict[str, PrunedModule]


class CompressionBlock(TypedDict, total=False):
    """``compression``: one record per lever beyond heads (``surgery.*.record_in`` reads them)."""

    low_rank: list[dict[str, Any]]
    kv_fold: dict[str, Any]
    ff: dict[str, Any]
    precision: dict[str, Any]


class TensorsArtifact(TypedDict):
    file: str
    sha256: str
    bytes: int


class ArtifactsBlock(TypedDict, total=False):
    tensors: TensorsArtifact


class Manifest(TypedDict, total=False):
    """A schema-v2 manifest as ``validate_manifest`` returns it: every field below it has checked.

    Readers index it directly (``manifest["pruning"]["modules"]``) and a type checker follows the keys;
    ``schedule`` is the one optional block (``schedule.state.Schedule.from_manifest`` parses it).
    """

    schema_version: int
    kind: str
    name: str
    created: str
    producer: dict[str, str]
    base_model: BaseModelBlock
    profiling: dict[str, Any]
    pruning: PruningBlock
    compression: CompressionBlock
    quality: dict[str, Any]
    performance: dict[str, Any]
    reuse: dict[str, Any]
    artifacts: ArtifactsBlock
    integrity: dict[str, str]
    schedule: dict[str, Any]


@dataclass
class Fragment:
    """A manifest and its tensors, in memory.

    >>> Fragment(manifest={"name": "dog", "pruning": {"modules": {"a": {}}}}, tensors={"heads.a.kept": torch.tensor([1])}).kept
    {'a': [1]}
    """

    manifest: Manifest
    tensors: dict[str, torch.Tensor]
    # Set by the readers (``store.load_fragment``, ``sharing.read_pack``) once ``build.check_loadable`` has
    # scanned the tensors' values: applying the fragment then checks only what depends on the base, instead
    # of scanning every stored value a second time (seconds for an fp8 SD1.5 fragment).
    values_checked: bool = field(default=False, compare=False, repr=False)

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def kept(self) -> dict[str, list[int]]:
        return {p: [int(i) for i in self.tensors[kept_key(p)]] for p in self.manifest["pruning"]["modules"]}


def new_manifest(
    *,
    name: str,
    base_model: Mapping[str, Any],
    profiling: Mapping[str, Any],
    pruning: Mapping[str, Any],
    compression: Mapping[str, Any],
    producer_version: str,
) -> Manifest:
    """A schema-v1 manifest with empty quality/performance/reuse blocks and no artifacts yet.

    >>> m = new_manifest(name="dog", base_model={"name": "sd15", "sha256": "ab", "hash_kind": "file", "dtype": "fp16"},
    ...                  profiling={}, pruning={"modules": {}}, compression={"low_rank": []}, producer_version="0.1.0")
    >>> m["schema_version"], m["quality"], m["artifacts"]
    (2, {}, {})
    """
    return cast(Manifest, {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "producer": {"package": "prompt-fragments", "version": producer_version},
        "base_model": dict(base_model),
        "profiling": dict(profiling),
        "pruning": dict(pruning),
        "compression": dict(compression),
        "quality": {},
        "performance": {},
        "reuse": {},
        "artifacts": {},
    })


def seal(manifest: dict[str, Any]) -> dict[str, Any]:
    """Return a copy with ``integrity.manifest_sha256`` computed over everything else."""
    body = {k: v for k, v in manifest.items() if k != "integrity"}
    return {**body, "integrity": {"manifest_sha256": sha256_json(body)}}


def _expect(cond: bool, source: str, message: str) -> None:
    if not cond:
        raise ManifestError(f"{source}: {message}")


def validate_manifest(manifest: Any, source: str = "manifest") -> Manifest:
    """Check a parsed manifest's structure and self-hash; return it unchanged, typed as ``Manifest``.

    ``source`` (usually the file path) starts every error message.

    A v1 manifest is returned upgraded (``upgrade_manifest``): the lever names of v2, sealed again.

    >>> validate_manifest({"schema_version": 3}, "x.json")
    Traceback (most recent call last):
    ...
    prompt_fragments.errors.ManifestError: x.json: expected schema_version 2 (or 1), found 3
    """
    _expect(isinstance(manifest, dict), source, f"expected a JSON object, found {type(manifest).__name__}")
    version = manifest.get("schema_version")
    _expect(type(version) is int and version in (1, SCHEMA_VERSION), source,
            f"expected schema_version {SCHEMA_VERSION} (or 1), found {version!r}")
    for key, typ in _REQUIRED.items():
        _expect(key in manifest, source, f"missing required field {key!r}")
        _expect(isinstance(manifest[key], typ), source, f"field {key!r}: expected {typ.__name__}, found {type(manifest[key]).__name__}")
    if version == 1:
        _check_integrity(manifest, source)  # as written, before any name is mapped
        manifest = upgrade_manifest(manifest, source)
    _expect(manifest["kind"] == KIND, source, f"expected kind {KIND!r}, found {manifest['kind']!r}")
    base = manifest["base_model"]
    for key in ("sha256", "hash_kind"):
        _expect(isinstance(base.get(key), str), source, f"base_model.{key}: expected a string, found {base.get(key)!r}")
    # Required, not defaulted: every reader (store, compat, export, sharing) indexes it directly.
    _expect("modules" in manifest["pruning"], source, "missing required field 'pruning.modules'")
    modules = manifest["pruning"]["modules"]
    _expect(isinstance(modules, dict), source, f"pruning.modules: expected an object, found {type(modules).__name__}")
    for path, entry in modules.items():
        where = f"pruning.modules[{path!r}]"
        _expect(isinstance(entry, dict), source, f"{where}: expected an object, found {type(entry).__name__}")
        for key in ("heads", "dim_head"):
            _expect(isinstance(entry.get(key), int) and entry[key] > 0, source, f"{where}.{key}: expected a positive integer, found {entry.get(key)!r}")
        kept = entry.get("kept")
        _expect(isinstance(kept, list) and all(isinstance(i, int) for i in kept), source, f"{where}.kept: expected a list of integers, found {kept!r}")
    low_rank = manifest["compression"].get("low_rank", [])
    _expect(isinstance(low_rank, list), source, f"compression.low_rank: expected a list, found {type(low_rank).__name__}")
    for i, rec in enumerate(low_rank):
        _expect(isinstance(rec, dict) and isinstance(rec.get("layer"), str) and isinstance(rec.get("rank"), int), source,
                f"compression.low_rank[{i}]: expected an object with string 'layer' and integer 'rank', found {rec!r}")
    _validate_levers(manifest["compression"], source)
    tensors = manifest["artifacts"].get("tensors")
    _expect(isinstance(tensors, dict) and isinstance(tensors.get("file"), str) and isinstance(tensors.get("sha256"), str),
            source, f"artifacts.tensors: expected an object with 'file' and 'sha256' strings, found {tensors!r}")
    if version != 1:  # a v1 manifest was checked as written, and upgrade_manifest sealed its new names
        _check_integrity(manifest, source)
    # Last, so the hand-written checks above keep their messages; the schema bounds what they do not (issue #6).
    check_schema(manifest, source)
    return cast(Manifest, manifest)


def _check_integrity(manifest: Mapping[str, Any], source: str) -> None:
    integrity = manifest.get("integrity")
    _expect(isinstance(integrity, dict) and isinstance(integrity.get("manifest_sha256"), str), source,
            "missing integrity.manifest_sha256 (was the manifest written by prompt-fragments?)")
    body = {k: v for k, v in manifest.items() if k != "integrity"}
    found = sha256_json(body)
    if found != integrity["manifest_sha256"]:
        raise IntegrityError(
            f"{source}: manifest was modified after it was written: expected sha256 {integrity['manifest_sha256'][:16]}…, found {found[:16]}…"
        )


def upgrade_manifest(manifest: Mapping[str, Any], source: str = "manifest") -> dict[str, Any]:
    """A v1 manifest with the v2 names (:data:`V1_NAMES`) and schema version, sealed again; a v2 one unchanged.

    >>> m = upgrade_manifest({"schema_version": 1, "compression": {"ff_channels": {"modules": {}}}})
    >>> m["schema_version"], sorted(m["compression"])
    (2, ['ff'])
    """
    if manifest.get("schema_version") != 1:
        return dict(manifest)
    out = dict(manifest)
    for block, names in V1_NAMES.items():
        old = out.get(block)
        if not isinstance(old, dict):
            continue
        both = sorted(k for k in old if k in names and names[k] in old)
        _expect(not both, source, f"{block}: expected the v1 name or the v2 name of a lever, found both for {both}")
        out[block] = {names.get(k, k): v for k, v in old.items()}
    out["schema_version"] = SCHEMA_VERSION
    return seal(out)


def _is_int(value: Any, minimum: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _validate_levers(compression: Mapping[str, Any], source: str) -> None:
    """Structure of the lever blocks: ``kv_fold``, ``ff``, an applied ``low_bit`` and ``precision``."""
    kv = compression.get("kv_fold")
    if kv is not None:
        _expect(isinstance(kv, dict) and all(_is_int(kv.get(k)) for k in ("rows", "tokens", "context_dim"))
                and isinstance(kv.get("weights_dropped"), bool) and isinstance(kv.get("modules"), dict), source,
                f"compression.kv_fold: expected integer rows/tokens/context_dim, boolean weights_dropped and a modules object, found {str(kv)[:200]}")
        for path, entry in kv["modules"].items():
            _expect(isinstance(entry, dict) and _is_int(entry.get("width")), source,
                    f"compression.kv_fold.modules[{path!r}]: expected an object with a positive integer width, found {entry!r}")
    ff = compression.get("ff")
    if ff is not None:
        _expect(isinstance(ff, dict) and isinstance(ff.get("modules"), dict), source,
                f"compression.ff: expected an object with a modules object, found {str(ff)[:200]}")
        for path, entry in ff["modules"].items():
            where = f"compression.ff.modules[{path!r}]"
            _expect(isinstance(entry, dict) and _is_int(entry.get("hidden")) and isinstance(entry.get("gated"), bool)
                    and all(isinstance(entry.get(k), str) for k in ("in_proj", "out_proj")), source,
                    f"{where}: expected integer hidden, boolean gated and string in_proj/out_proj, found {str(entry)[:200]}")
            kept = entry.get("kept")
            _expect(isinstance(kept, list) and bool(kept) and all(_is_int(i, 0) and i < entry["hidden"] for i in kept), source,
                    f"{where}.kept: expected a non-empty list of channel indices below {entry['hidden']}, found {str(kept)[:200]}")
    low_bit = compression.get("low_bit")
    if low_bit is not None:
        _expect(isinstance(low_bit, dict) and isinstance(low_bit.get("applied", True), bool), source,
                f"compression.low_bit: expected an object with boolean 'applied', found {str(low_bit)[:200]}")
        if low_bit and low_bit.get("applied", True):  # what compression_record treats as on
            _expect(_is_int(low_bit.get("bits")) and _is_int(low_bit.get("group")) and isinstance(low_bit.get("layers"), dict),
                    source, f"compression.low_bit: expected integer bits and group and a layers object, found keys "
                            f"{sorted(low_bit)[:10]}")
            for layer, entry in low_bit["layers"].items():
                _expect(isinstance(entry, dict) and isinstance(entry.get("shape"), list)
                        and isinstance(entry.get("channel_scale", False), bool), source,
                        f"compression.low_bit.layers[{layer!r}]: expected an object with a shape list and boolean "
                        f"channel_scale, found {str(entry)[:200]}")
    quant = compression.get("precision")
    if quant is not None:
        _expect(isinstance(quant, dict) and isinstance(quant.get("applied"), bool), source,
                f"compression.precision: expected an object with boolean 'applied', found {quant!r}")
        if quant["applied"]:
            _expect(quant.get("format") in ("fp8", "int8") and isinstance(quant.get("layers"), dict), source,
                    f"compression.precision: expected format 'fp8' or 'int8' and a layers object, found format {quant.get('format')!r}")
            for layer, entry in quant["layers"].items():
                _expect(isinstance(entry, dict) and entry.get("dtype") in ("float8_e4m3fn", "int8"), source,
                        f"compression.precision.layers[{layer!r}]: expected dtype float8_e4m3fn or int8, found {entry!r}")
