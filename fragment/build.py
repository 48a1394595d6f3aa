"""Building a fragment from levers, and applying one to its base model: the only place levers are combined.

A fragment is a delta on its base model: a manifest plus the tensors that
cannot be recomputed from the base (kept head indices, low-rank factors, folded
K/V, feed-forward channel indices, low-bit codes, quantized weights).  Applying it means: take
the normally loaded base model, check it is the right one, and build pruned
copies of the touched modules.  ComfyUI's checkpoint detection reads head
counts from the config, so shipping a pruned checkpoint instead would not load
there.

Weight levers are built and applied in registry order (``levers.LEVERS``, see
``surgery.lever``): each one sees the replacements of those before it.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
import torch.nn as nn

from ..errors import BaseModelMismatchError, FragmentError, IntegrityError, ManifestError, base_mismatch_remedy
from ..profiling.discovery import find_attention, iter_attention
from ..version import __version__
from .base_facts import BaseFacts
from .format.hashing import sha256_state_dict
from .format.manifest import Fragment, new_manifest
from .levers import stage
from .surgery.heads import HeadLever
from .surgery.lever import Lever, compression_record
from .surgery.selection import Selection
from .surgery.tree import replace_modules

if TYPE_CHECKING:
    from .schedule.state import Schedule

MAX_FLOAT16 = 65504.0


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

    At most one lever of each name; they are built in registry order whatever order they come in.
    Without a ``HeadLever`` every head is kept.

    >>> frag = build_fragment(unet, [HeadLever.select(score_heads(profile), ratio=0.3),  # doctest: +SKIP
    ...                              FeedForwardLever.select(weight_norm_scores(unet), ratio=0.3)],
    ...                       base=describe_base(unet, "toy-sd15"), name="dog-on-jet-ski")
    >>> small = apply_fragment(unet, frag)  # doctest: +SKIP
    """
    order = {cls.name: i for i, cls in enumerate(stage("weights"))}
    kinds = [lever.name for lever in levers]
    if len(set(kinds)) != len(kinds) or not set(kinds) <= set(order):
        raise FragmentError(f"fragment {name!r}: expected at most one lever of each kind {list(order)}, "
                            f"found {kinds}")
    if "heads" not in kinds:
        levers = [HeadLever(keep_all_heads(model)), *levers]
    replacements: dict[str, nn.Module] = {}
    tensors: dict[str, torch.Tensor] = {}
    records: dict[str, Any] = {}
    for lever in sorted(levers, key=lambda lv: order[lv.name]):
        built = lever.build(model, replacements, records)
        overlap = set(built.tensors) & set(tensors)
        if overlap:  # cannot happen with distinct key prefixes; a new lever that breaks the rule is caught here
            raise FragmentError(f"fragment {name!r}: lever {lever.name} reuses tensor keys {sorted(overlap)[:3]}")
        tensors.update(built.tensors)
        records[lever.name] = built.record
    compression = {"low_rank": records.get("low_rank", []), "precision": {"applied": False}}
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
            f"sha256 {str(expected)[:16]}…, found sha256 {base_sha256[:16]}…; {base_mismatch_remedy(manifest['base_model'])}"
        )
    check_loadable(manifest, fragment.tensors, f"fragment {fragment.name!r}", base=model,
                   values_checked=fragment.values_checked)
    replacements: dict[str, nn.Module] = {}
    for cls in stage("weights"):
        record = cls.record_in(manifest)
        if record is not None:
            cls.apply(model, record, fragment.tensors, replacements, source=f"fragment {fragment.name!r}")
    return replacements


def apply_fragment(model: nn.Module, fragment: Fragment, *, base_sha256: str | None = None) -> nn.Module:
    """The fragment model: ``model`` with pruned and factorised copies swapped in; ``model`` is unchanged.

    >>> small = apply_fragment(unet, load_fragment("fragments/dog.json"), base_sha256=sha256_state_dict(unet))  # doctest: +SKIP
    """
    return replace_modules(model, fragment_replacements(model, fragment, base_sha256=base_sha256))


# Levers whose check bounds the weights it builds itself (dequantized low-bit and fp8/int8 weights).
_BOUNDED = ("low_bit", "precision")


def check_float_values(tensor: torch.Tensor, where_: str) -> None:
    """A stored float tensor's values are finite and inside the float16 range (hosts run UNets in float16).

    A NaN in a low-rank factor or a folded K/V table loaded and gave NaN images; 1e30 in float32 passed a
    float32 probe and overflows in float16 (issue #29).  ``aminmax`` makes no copy of the tensor.

    >>> check_float_values(torch.tensor([1.0, float("nan")]), "x: lowrank.a.up")
    Traceback (most recent call last):
    ...
    prompt_fragments.errors.IntegrityError: x: lowrank.a.up: expected finite values within ±65504 (float16), found nan
    """
    if (not tensor.is_floating_point() or tensor.numel() == 0 or tensor.is_meta  # meta: built to count bytes, no values
            or tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)):
        return
    lo, hi = (float(v) for v in torch.aminmax(tensor))
    worst = max(-lo, hi) if not (math.isnan(lo) or math.isnan(hi)) else math.nan
    if not worst <= MAX_FLOAT16:  # NaN fails this too
        raise IntegrityError(f"{where_}: expected finite values within ±{MAX_FLOAT16:g} (float16), found {worst:g}")


def check_lever_tensors(manifest: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Every tensor each lever's record promises (dtype, shape, agreement with the manifest), and no other.

    >>> check_lever_tensors({"pruning": {"modules": {}}, "compression": {}}, {}, "x.safetensors")
    """
    expected: set[str] = set()
    for cls in stage("weights"):
        record = cls.record_in(manifest)
        if record is not None:
            keys = cls.check(record, tensors, source)
            expected |= keys
            if cls.name not in _BOUNDED:
                for key in sorted(keys):
                    check_float_values(tensors[key], f"{source}: {key}")
    extra = sorted(set(tensors) - expected)
    if extra:
        raise IntegrityError(f"{source}: unexpected tensors not named by the manifest: {extra[:5]}")


def lever_weight_keys(manifest: Mapping[str, Any], prefix: str = "") -> set[str]:
    """Base weight keys the fragment's levers slice, drop, cut or quantize (a LoRA must not patch them).

    >>> sorted(lever_weight_keys({"pruning": {"modules": {}}, "compression": {"low_rank": [{"layer": "mid.ff"}]}}))
    ['mid.ff.bias', 'mid.ff.weight']
    """
    keys: set[str] = set()
    for cls in stage("weights"):
        record = cls.record_in(manifest)
        if record is not None:
            keys |= cls.weight_keys(record, prefix)
    return keys


# Levers that give a weight its storage format: a layer stored by two of them would be built twice over
# (a low-bit layer then quantized to fp8 held an fp8 Parameter and a uint8 buffer, both named weight).
_FORMATS = ("low_rank", "low_bit", "precision")


def _format_layers(manifest: Mapping[str, Any], kind: str) -> list[str]:
    if kind == "low_rank":
        return [r["layer"] for r in (manifest.get("compression") or {}).get("low_rank") or []]
    record = compression_record(manifest, kind)
    return list(record.get("layers") or {}) if isinstance(record, Mapping) else []


def check_one_format(manifest: Mapping[str, Any], source: str) -> None:
    """No layer (nor a module inside it) is stored by two of low rank, low-bit and precision.

    >>> check_one_format({"compression": {"low_rank": [{"layer": "a.b"}],
    ...                   "precision": {"applied": True, "layers": {"a.b": {}}}}}, "x.json")
    Traceback (most recent call last):
    ...
    prompt_fragments.errors.ManifestError: x.json: layer 'a.b' is stored as low_rank and as precision; expected one format per layer
    """
    owner: dict[str, str] = {}
    for kind in _FORMATS:
        for layer in _format_layers(manifest, kind):
            if layer in owner and owner[layer] != kind:
                raise ManifestError(f"{source}: layer {layer!r} is stored as {owner[layer]} and as {kind}; "
                                    "expected one format per layer")
            owner.setdefault(layer, kind)
    for layer, kind in owner.items():
        parts = layer.split(".")
        for i in range(1, len(parts)):
            outer = ".".join(parts[:i])
            if owner.get(outer, kind) != kind:
                raise ManifestError(f"{source}: layer {layer!r} ({kind}) lies inside {outer!r} ({owner[outer]}); "
                                    "expected one format per layer")


def check_loadable(manifest: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], source: str, *,
                   base: nn.Module | BaseFacts | None = None, values_checked: bool = False) -> "Schedule":
    """Whether a fragment loads: the one check that reading (``store.load_fragment``, ``sharing.read_pack``),
    ``verify`` and applying (``fragment_replacements``) all call; returns its parsed schedule.

    Always: every lever's tensors (dtypes, shapes, values each format can hold: finite scales, no NaN fp8
    bytes, dequantized weights inside the float16 range), one storage format per layer, and the schedule
    by type and range (bucket counts, steps and depths capped; bucket head sets inside what the fragment
    kept).  With ``base`` (the model it goes on), the schedule against that model's layout too: the reuse
    depth (``shallow`` / ``skips``) must exist in it and every bucket's module and heads must be among its
    attention modules and heads; a misfit is a ``BaseModelMismatchError`` (a fallback, not corruption).

    >>> check_loadable({"pruning": {"modules": {}}, "compression": {}}, {}, "x.safetensors")
    Schedule(buckets=0, bucket_heads={}, total_steps=0, reuse_steps=(), shallow=1, skips=None, step_timesteps=(), cfg_cutoff=None, cross_attn_cache=None, calibration={})
    """
    from .schedule.state import Schedule  # schedule imports the profiler: loaded when a fragment is, not with build

    if not values_checked:  # a reader's Fragment (``Fragment.values_checked``) passed this scan when it was read
        check_lever_tensors(manifest, tensors, source)
    check_one_format(manifest, source)
    where_ = f"{source}: schedule"
    try:
        schedule = Schedule.from_manifest(manifest.get("schedule"), source=where_)
    except ManifestError:
        raise
    except FragmentError as exc:  # the parser's own family member: here it is a manifest's bad field
        raise ManifestError(str(exc)) from None
    modules = manifest["pruning"]["modules"]
    for bucket, heads in schedule.bucket_heads.items():
        for path, kept in heads.items():
            # A module the fragment does not prune may be masked to any of the model's heads (checked against
            # the base below); a pruned one only within what it kept, else the masks could never be built.
            if path in modules:
                pruned = sorted(set(kept) - set(modules[path]["kept"]))
                if pruned:
                    raise ManifestError(f"{where_}: bucket {bucket}: {path}: expected heads within the kept "
                                        f"{modules[path]['kept']}, found pruned heads {pruned[:20]}")
    if base is not None and (schedule.reuse_steps or schedule.bucket_heads):  # a fragment without: no model walk
        _check_schedule_on(base if isinstance(base, BaseFacts) else BaseFacts.of_module(base), schedule, where_)
    return schedule


def _check_schedule_on(base: BaseFacts, schedule: "Schedule", where_: str) -> None:
    if schedule.reuse_steps and schedule.skips != 0:  # skips=0 replays the whole call: it fits every model
        field = "skips" if schedule.skips is not None else "shallow"
        try:
            if base.layout is None:
                raise FragmentError(str(base.layout_error))
            if schedule.skips is not None:
                base.layout.replay_paths(schedule.skips)
            else:
                base.layout.deep(schedule.shallow)
        except FragmentError as exc:
            raise BaseModelMismatchError(f"{where_}.step_reuse.{field}: {exc} (base {base.label})") from None
    for bucket, heads in schedule.bucket_heads.items():
        for path, kept in heads.items():
            bound = base.head_bound(path)
            if bound is None:
                raise BaseModelMismatchError(f"{where_}: bucket {bucket}: {path}: expected an attention module "
                                             f"of {base.label}, found none")
            stray = sorted(h for h in set(kept) if h >= bound)
            if stray:
                what = "heads" if base.heads.get(path) is not None else "to_q rows (its head count is unknown)"
                raise BaseModelMismatchError(f"{where_}: bucket {bucket}: {path}: expected heads below the "
                                             f"model's {bound} {what} in {base.label}, found {stray[:20]}")
