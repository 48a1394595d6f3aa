"""Cluster fragments: one fragment whose kept heads are the union of several fragments of the same base.

A family of paraphrases may each have its own fragment.  Keeping the union of
their kept heads gives one fragment that contains every head any of them
needed, so it serves the whole cluster at the price of fewer removed heads.
A module pruned in one fragment but absent (fully kept) in another is fully
kept in the union, so it is dropped from the union's pruning block.

Only head pruning is combined.  Fragments with other levers (low-rank, K/V
folding, feed-forward channels, quantisation) are refused: their stored
tensors belong to one specific selection and cannot be merged.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from ...errors import BaseModelMismatchError, FragmentError
from ...version import __version__
from ..format.manifest import Fragment, new_manifest
from ..format.store import check_name
from ..surgery.heads import kept_key

log = logging.getLogger(__name__)


def _heads_only(fragment: Fragment) -> None:
    comp = fragment.manifest["compression"]
    extra = [k for k in ("low_rank", "kv_fold", "ff") if comp.get(k)]
    if (comp.get("precision") or {}).get("applied"):
        extra.append("precision")
    if extra:
        raise FragmentError(f"fragment {fragment.name!r}: expected head pruning only for a union, found {extra}")


def union_kept(kept_sets: Sequence[dict[str, list[int]]], heads: dict[str, int]) -> dict[str, list[int]]:
    """Union of kept heads per module; a module missing from any input is fully kept and so left out.

    >>> union_kept([{"a": [0, 1], "b": [2]}, {"a": [1, 3]}], {"a": 4, "b": 4})
    {'a': [0, 1, 3]}
    """
    if not kept_sets:
        return {}
    common = set(kept_sets[0]).intersection(*kept_sets[1:])
    out: dict[str, list[int]] = {}
    for path in sorted(common):
        kept = sorted(set().union(*(set(k[path]) for k in kept_sets)))
        if len(kept) < heads[path]:
            out[path] = kept
    return out


def union_fragment(fragments: Sequence[Fragment], name: str) -> Fragment:
    """A new head-pruning fragment keeping every head any of ``fragments`` keeps (all of one base model).

    No model is needed: the manifests carry head counts and sizes.

    >>> u = union_fragment([frag_dog, frag_puppy], "dog-cluster")  # doctest: +SKIP
    >>> sorted(u.kept) == sorted(set(frag_dog.kept) & set(frag_puppy.kept))  # doctest: +SKIP
    True
    """
    if not fragments:
        raise FragmentError("union: expected at least one fragment, found none")
    check_name(name)
    first = fragments[0].manifest
    base = first["base_model"]
    for frag in fragments:
        _heads_only(frag)
        if frag.manifest["base_model"].get("sha256") != base.get("sha256"):
            raise BaseModelMismatchError(
                f"union {name!r}: fragment {frag.name!r} is built on base sha256 "
                f"{str(frag.manifest['base_model'].get('sha256'))[:16]}…, expected {str(base.get('sha256'))[:16]}…"
            )
    entries: dict[str, dict[str, Any]] = {}
    heads: dict[str, int] = {}
    for frag in fragments:
        for path, entry in frag.manifest["pruning"]["modules"].items():
            prev = entries.setdefault(path, entry)
            if (prev["heads"], prev["dim_head"]) != (entry["heads"], entry["dim_head"]):
                raise BaseModelMismatchError(
                    f"union {name!r}: {path}: expected {prev['heads']} heads of {prev['dim_head']}, "
                    f"found {entry['heads']} of {entry['dim_head']} in {frag.name!r}"
                )
            heads[path] = int(entry["heads"])
    kept = union_kept([f.kept for f in fragments], heads)
    modules = {
        path: {**{k: v for k, v in entries[path].items() if k not in ("kept", "removed")},
               "kept": ks, "removed": [h for h in range(heads[path]) if h not in set(ks)]}
        for path, ks in kept.items()
    }
    total = int(first["pruning"].get("heads_total") or sum(heads.values()))
    removed = sum(len(m["removed"]) for m in modules.values())
    pruning = {
        "method": "union",
        "selection": {"union_of": [f.name for f in fragments]},
        "heads_total": total,
        "heads_removed": removed,
        "head_retention_ratio": 1.0 - removed / total if total else 1.0,
        "modules": modules,
    }
    manifest = new_manifest(
        name=name, base_model=base, profiling={"union_of": [f.name for f in fragments]}, pruning=pruning,
        compression={"low_rank": [], "precision": {"applied": False}}, producer_version=__version__,
    )
    tensors = {kept_key(p): torch.tensor(ks, dtype=torch.int64) for p, ks in kept.items()}
    log.info("union %s of %d fragments: %d of %d heads removed", name, len(fragments), removed, total)
    return Fragment(manifest=manifest, tensors=tensors)
