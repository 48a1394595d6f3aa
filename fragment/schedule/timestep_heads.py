"""Timestep-aware head sets: a head set per noise-level bucket, switched at run time by the timestep.

Profiling already keeps statistics per timestep bucket (``HeadProfiler``).
Here each bucket gets its own selection; the fragment's weights are pruned to
the *union* of the bucket sets, and at run time ``bucket_masked`` zeroes, per
bucket, the kept heads that bucket does not need.  Switching is a different
row of a small mask tensor, never a weight upload.

Masking does not save compute the way physical pruning does (the masked head
still runs); what it buys is quality: high-noise steps keep the heads that
lay out the image, low-noise steps the ones that refine it, at the size of
their union.  ``bench.batch`` measures whether that pays.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn as nn

from ...errors import FragmentError
from ...profiling.dataset import ProfileData
from ...profiling.discovery import describe, iter_attention
from ...profiling.scoring import score_heads
from ..surgery.masking import head_mask
from ..surgery.selection import Selection, select_heads
from ..surgery.tree import fresh_copy
from .state import ScheduleState

Plan = dict[str, list[int]]


def select_bucket_heads(data: ProfileData, ratios: Sequence[float], **select_kwargs) -> tuple[Selection, dict[int, Plan]]:
    """One selection per timestep bucket (``ratios[b]`` of heads removed in bucket ``b``) and their union.

    Bucket 0 holds the least noisy steps.  Returns the union as a ``Selection``
    (what ``build_fragment`` prunes to) and the per-bucket kept sets.

    >>> union, per_bucket = select_bucket_heads(profile, [0.5, 0.3])  # doctest: +SKIP
    >>> all(set(per_bucket[0][p]) <= set(union.kept[p]) for p in union.kept)  # doctest: +SKIP
    True
    """
    if len(ratios) != data.buckets:
        raise FragmentError(f"select_bucket_heads: expected {data.buckets} ratios (one per profiled bucket), found {len(ratios)}")
    per_bucket: dict[int, Plan] = {}
    for bucket, ratio in enumerate(ratios):
        per_bucket[bucket] = select_heads(score_heads(data, bucket=bucket), ratio=ratio, **select_kwargs).kept
    heads = {path: stats.site.heads for path, stats in data.modules.items()}
    union = {p: sorted(set().union(*(set(k[p]) for k in per_bucket.values()))) for p in heads}
    params = {"strategy": "timestep_buckets", "bucket_ratios": list(ratios), **{k: v for k, v in select_kwargs.items()}}
    return Selection(kept=union, heads=heads, params=params), per_bucket


class _BucketMasked:
    """Put in front of an output projection's own class: its input is masked by the current bucket's head set."""

    bucket_masks: torch.Tensor
    bucket_state: ScheduleState

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.bucket_state.heads_enabled:
            x = x * self.bucket_masks[self.bucket_state.bucket].to(device=x.device, dtype=x.dtype)
        return super().forward(x, *args, **kwargs)  # type: ignore[misc]


_MASKED_CLASSES: dict[type, type] = {}


def bucket_masked(inner: nn.Module, masks: torch.Tensor, state: ScheduleState) -> nn.Module:
    """``inner`` (an output projection) with its input masked per bucket: same class, same Parameters.

    ``masks`` is ``[buckets, in_features]`` with 0/1 entries over the (already
    pruned) head channels; ``state.bucket`` picks the row.  The result is a
    ``fresh_copy`` of ``inner`` whose class also derives from ``inner``'s, so
    its state-dict keys stay ``...to_out.0.weight``: a LoRA or any other weight
    patch on that key still finds it (a wrapper module would rename it to
    ``...to_out.0.inner.weight``, and ComfyUI would drop the patch silently).

    >>> state = ScheduleState(buckets=2)
    >>> lin = nn.Linear(4, 1, bias=False); _ = nn.init.ones_(lin.weight)
    >>> wrapped = bucket_masked(lin, torch.tensor([[1., 1., 0., 0.], [1., 1., 1., 1.]]), state)
    >>> state.begin_call(100.0); float(wrapped(torch.ones(1, 4)))
    2.0
    >>> state.begin_call(900.0); float(wrapped(torch.ones(1, 4)))
    4.0
    >>> isinstance(wrapped, nn.Linear), list(wrapped.state_dict()), wrapped.weight is lin.weight
    (True, ['weight'], True)
    """
    cls = type(inner)
    if cls not in _MASKED_CLASSES:
        _MASKED_CLASSES[cls] = type(f"BucketMasked{cls.__name__}", (_BucketMasked, cls), {"__module__": __name__})
    new = fresh_copy(inner)
    new.__class__ = _MASKED_CLASSES[cls]
    new.register_buffer("bucket_masks", masks.to(torch.float32), persistent=False)
    new.bucket_state = state
    return new


def is_bucket_masked(module: nn.Module) -> bool:
    return isinstance(module, _BucketMasked)


def bucket_masks(union_kept: Sequence[int], bucket_kept: Mapping[int, Sequence[int]], buckets: int, dim_head: int,
                 where: str = "<module>") -> torch.Tensor:
    """``[buckets, len(union_kept) * dim_head]`` masks over the union's channels (union order, as pruned).

    >>> bucket_masks([0, 2], {0: [2], 1: [0, 2]}, 2, 1).tolist()
    [[0.0, 1.0], [1.0, 1.0]]
    """
    position = {h: i for i, h in enumerate(union_kept)}
    rows = []
    for bucket in range(buckets):
        kept = bucket_kept.get(bucket, union_kept)
        stray = [h for h in kept if h not in position]
        if stray:
            raise FragmentError(f"{where}: bucket {bucket} keeps heads {stray} that the fragment pruned "
                                f"(kept: {list(union_kept)})")
        rows.append(head_mask(len(union_kept), dim_head, [position[h] for h in kept]))
    return torch.stack(rows)


def bucket_mask_replacements(fragment_model: nn.Module, fragment_kept: Mapping[str, Sequence[int]],
                             per_bucket: Mapping[int, Mapping[str, Sequence[int]]], buckets: int,
                             state: ScheduleState) -> dict[str, nn.Module]:
    """Path (``<attention>.to_out.0``) -> a ``bucket_masked`` copy for every module some bucket masks further.

    ``fragment_model`` is the model the masks go on: its ``to_out.0`` is
    wrapped as the fragment made it (pruned, factorised or quantized).
    ``fragment_kept`` is the fragment's kept heads for the modules it pruned
    (``Fragment.kept``); other modules still have all their heads.

    >>> # reps = bucket_mask_replacements(small, fragment.kept, schedule.bucket_heads, schedule.buckets, state)
    """
    out: dict[str, nn.Module] = {}
    for path, module in iter_attention(fragment_model):
        sets = {b: list(heads[path]) for b, heads in per_bucket.items() if path in heads}
        if not sets:
            continue
        site = describe(path, module)
        kept_now = list(fragment_kept.get(path, range(site.heads)))
        if len(kept_now) != site.heads:
            raise FragmentError(f"{path}: the model has {site.heads} heads but the fragment keeps {len(kept_now)}; "
                                "the schedule was made for another fragment")
        if len(sets) == buckets and all(sorted(k) == kept_now for k in sets.values()):
            continue  # every bucket keeps everything the fragment kept: nothing to switch
        masks = bucket_masks(kept_now, sets, buckets, site.dim_head, where=path)
        out[f"{path}.to_out.0"] = bucket_masked(module.to_out[0], masks, state)
    return out
