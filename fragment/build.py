"""Building a fragment from levers, and applying one to its base model: the only place levers are combined.

A fragment is a delta on its base model: a manifest plus the tensors that
cannot be recomputed from the base (kept head indices, low-rank factors, folded
K/V, feed-forward channel indices, low-bit codes, quantized weights).  Applying it means: take
the normally loaded base model, check it is the right one, and build pruned
copies of the touched modules.  ComfyUI's checkpoint detection reads head
counts from the config, so shipping a pruned checkpoint instead would not load
there.

Levers are built and applied in the order of ``LEVERS`` (see
``surgery.lever``): each one sees the replacements of those before it.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from ..errors import BaseModelMismatchError, FragmentError, IntegrityError
from ..profiling.discovery import find_attention, iter_attention
from ..version import __version__
from .format.hashing import sha256_state_dict
from .format.manifest import Fragment, new_manifest
from .surgery.feed_forward import FeedForwardLever
from .surgery.heads import HeadLever
from .surgery.kv_fold import KVFoldLever
from .surgery.lever import Lever
from .surgery.low_bit import LowBitLever
from .surgery.lowrank import LowRankLever
from .surgery.precision import PrecisionLever
from .surgery.selection import Selection
from .surgery.tree import replace_modules

LEVERS: tuple[type[Lever], ...] = (HeadLever, KVFoldLever, FeedForwardLever, LowRankLever, LowBitLever, PrecisionLever)
_ORDER = {cls.kind: i for i, cls in enumerate(LEVERS)}


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


def keep_all_heads(model: nn.Module) -> Selection:
    """The head selection that removes nothing (what a fragment without a head lever records).

    >>> keep_all_heads(nn.Linear(2, 2)).kept
    {}
    """
    heads = {p: int(m.heads) for p, m in iter_attention(model)}
    return Selection(kept={p: list(range(h)) for p, h in heads.items()}, heads=heads, params={"strategy": "none"})


def build_fragment(
    model: nn.Module,
    levers: Sequence[Lever],
    *,
    base: Mapping[str, Any],
    name: str,
    profiling: Mapping[str, Any] | None = None,
) -> Fragment:
    """Build ``levers`` on ``model`` (which is not changed) and record them as a fragment.

    At most one lever of each kind; they are built in ``LEVERS`` order whatever order they come in.
    Without a ``HeadLever`` every head is kept.

    >>> frag = build_fragment(unet, [HeadLever.plan(score_heads(profile), ratio=0.3),  # doctest: +SKIP
    ...                              FeedForwardLever.plan(weight_norm_scores(unet), ratio=0.3)],
    ...                       base=describe_base(unet, "toy-sd15"), name="dog-on-jet-ski")
    >>> small = apply_fragment(unet, frag)  # doctest: +SKIP
    """
    kinds = [lever.kind for lever in levers]
    if len(set(kinds)) != len(kinds) or not set(kinds) <= set(_ORDER):
        raise FragmentError(f"fragment {name!r}: expected at most one lever of each kind {sorted(_ORDER, key=_ORDER.get)}, "
                            f"found {kinds}")
    if "heads" not in kinds:
        levers = [HeadLever(keep_all_heads(model)), *levers]
    replacements: dict[str, nn.Module] = {}
    tensors: dict[str, torch.Tensor] = {}
    records: dict[str, Any] = {}
    for lever in sorted(levers, key=lambda lv: _ORDER[lv.kind]):
        built = lever.build(model, replacements, records)
        overlap = set(built.tensors) & set(tensors)
        if overlap:  # cannot happen with distinct key prefixes; a new lever that breaks the rule is caught here
            raise FragmentError(f"fragment {name!r}: lever {lever.kind} reuses tensor keys {sorted(overlap)[:3]}")
        tensors.update(built.tensors)
        records[lever.kind] = built.record
    compression = {"low_rank": records.get("low_rank", []), "quantization": {"applied": False}}
    compression.update({kind: record for kind, record in records.items() if kind not in ("heads", "low_rank")})
    manifest = new_manifest(
        name=name,
        base_model=base,
        profiling=profiling or {},
        pruning=records["heads"],
        compression=compression,
        producer_version=__version__,
    )
    return Fragment(manifest=manifest, tensors=tensors)


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
    replacements: dict[str, nn.Module] = {}
    for cls in LEVERS:
        record = cls.record_in(manifest)
        if record is not None:
            cls.apply(model, record, fragment.tensors, replacements, source=f"fragment {fragment.name!r}")
    return replacements


def apply_fragment(model: nn.Module, fragment: Fragment, *, base_sha256: str | None = None) -> nn.Module:
    """The fragment model: ``model`` with pruned and factorised copies swapped in; ``model`` is unchanged.

    >>> small = apply_fragment(unet, load_fragment("fragments/dog.json"), base_sha256=sha256_state_dict(unet))  # doctest: +SKIP
    """
    return replace_modules(model, fragment_replacements(model, fragment, base_sha256=base_sha256))


def check_lever_tensors(manifest: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Every tensor each lever's record promises (dtype, shape, agreement with the manifest), and no other.

    >>> check_lever_tensors({"pruning": {"modules": {}}, "compression": {}}, {}, "x.safetensors")
    """
    expected: set[str] = set()
    for cls in LEVERS:
        record = cls.record_in(manifest)
        if record is not None:
            expected |= cls.check(record, tensors, source)
    extra = sorted(set(tensors) - expected)
    if extra:
        raise IntegrityError(f"{source}: unexpected tensors not named by the manifest: {extra[:5]}")


def lever_weight_keys(manifest: Mapping[str, Any], prefix: str = "") -> set[str]:
    """Base weight keys the fragment's levers slice, drop, cut or quantize (a LoRA must not patch them).

    >>> sorted(lever_weight_keys({"pruning": {"modules": {}}, "compression": {"low_rank": [{"layer": "mid.ff"}]}}))
    ['mid.ff.bias', 'mid.ff.weight']
    """
    keys: set[str] = set()
    for cls in LEVERS:
        record = cls.record_in(manifest)
        if record is not None:
            keys |= cls.weight_keys(record, prefix)
    return keys
