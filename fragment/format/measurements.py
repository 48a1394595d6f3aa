"""Fill a manifest's quality, performance and reuse blocks from measurements, and re-seal it.

The blocks start empty (``manifest.new_manifest``) and only measured values
go in.  Measurements are plain JSON data; NaN and infinity are refused,
because JSON has no portable spelling for them and a "never pays back"
break-even is recorded as ``null`` with a verdict instead.  A manifest
whose measurements are partial gets ``quality.verified = false``.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from ...errors import ManifestError
from .manifest import seal, validate_manifest


def _check_json(value: Any, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ManifestError(f"{where}: expected a finite number, found {value!r}")
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ManifestError(f"{where}: expected string keys, found {k!r}")
            _check_json(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_json(v, f"{where}[{i}]")
    elif not (value is None or isinstance(value, (str, int, float, bool))):
        raise ManifestError(f"{where}: expected JSON data, found {type(value).__name__}")


def record_measurements(
    manifest: Mapping[str, Any],
    *,
    quality: Mapping[str, Any] | None = None,
    performance: Mapping[str, Any] | None = None,
    reuse: Mapping[str, Any] | None = None,
    verified: bool | None = None,
) -> dict[str, Any]:
    """A copy of ``manifest`` with the given blocks merged in and a fresh integrity hash.

    >>> from .manifest import new_manifest
    >>> m = seal(new_manifest(name="d", base_model={"sha256": "ab", "hash_kind": "file"}, profiling={},
    ...                       pruning={"modules": {}}, compression={}, producer_version="0"))
    >>> m2 = record_measurements(m, performance={"latency_fragment_ms": 12.5}, verified=False)
    >>> m2["performance"], m2["quality"]["verified"], m2["integrity"] != m["integrity"]
    ({'latency_fragment_ms': 12.5}, False, True)
    """
    out = {k: v for k, v in json.loads(json.dumps(manifest)).items() if k != "integrity"}
    for name, block in (("quality", quality), ("performance", performance), ("reuse", reuse)):
        if block is None:
            continue
        _check_json(block, name)
        merged = dict(out.get(name, {}))
        merged.update(json.loads(json.dumps(block)))
        out[name] = merged
    if verified is not None:
        out["quality"] = {**out.get("quality", {}), "verified": bool(verified)}
    return seal(out)


def update_fragment_file(
    manifest_path: str | os.PathLike,
    *,
    quality: Mapping[str, Any] | None = None,
    performance: Mapping[str, Any] | None = None,
    reuse: Mapping[str, Any] | None = None,
    verified: bool | None = None,
) -> Path:
    """Load a saved fragment (fully verified), record measurements, and save it back in place.

    >>> update_fragment_file("fragments/dog.json", performance={"batch_speedup": 1.8})  # doctest: +SKIP
    PosixPath('fragments/dog.json')
    """
    from .store import load_fragment, save_fragment

    path = Path(manifest_path)
    fragment = load_fragment(path)
    fragment.manifest = record_measurements(fragment.manifest, quality=quality, performance=performance,
                                            reuse=reuse, verified=verified)
    saved = save_fragment(fragment, path.parent, overwrite=True)
    validate_manifest(fragment.manifest, str(saved))
    return saved
