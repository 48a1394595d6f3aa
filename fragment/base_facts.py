"""What the loadable check needs to know of a base model, from a loaded module or from a checkpoint's header.

``build.check_loadable`` checks a fragment's schedule against its base: the reuse depth against the block
layout, every bucket's module and heads against the attention modules.  A loaded model answers directly; a
safetensors checkpoint (``verify PACK --base UNET.safetensors``) only through its weight names and shapes,
read from the header (nothing loaded).  ``BaseFacts`` is the answer either way, so the decision is one.

A checkpoint stores no head count.  An attention module's heads are read from the fragment's own pruning
entries (which the ``to_q`` rows confirm) and, for the others, from the one rule that fits every module:
the same head count everywhere (SD 1.x: 8) or the same head width (SD 2 / SDXL: 64), picked by the
fragment's pruned modules and its base's recorded head total.  Where no single rule fits, that module's
heads are left unknown and a bucket on it is bounded by its ``to_q`` rows only (said in ``notes``).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from ..errors import FragmentError
from ..profiling.discovery import BlockLayout, block_layout, block_layout_of_keys, iter_attention

CHECKPOINT_PREFIX = "model.diffusion_model."
# Cross-attention context width -> the head rule of the SD family that has it (used only when the fragment's
# own records leave two rules open).
CONVENTIONS = {768: ("heads", 8), 1024: ("dim_head", 64), 2048: ("dim_head", 64)}


@dataclass(frozen=True)
class BaseFacts:
    """The base model as the schedule checks see it.

    ``layout`` is its block layout (``None``: ``layout_error`` says why there is none); ``rows`` maps every
    attention module's path to its ``to_q`` rows (an upper bound on its heads) and ``heads`` to its head
    count, ``None`` where it cannot be known.

    >>> f = BaseFacts("x.safetensors", None, "no blocks", {"a": 64}, {"a": 8})
    >>> f.head_bound("a"), f.head_bound("b")
    (8, None)
    """

    label: str
    layout: BlockLayout | None
    layout_error: str | None
    rows: Mapping[str, int]
    heads: Mapping[str, int | None]
    notes: tuple[str, ...] = field(default=())

    def head_bound(self, path: str) -> int | None:
        """The number the module's head indices must stay below (``None``: no such attention module)."""
        if path not in self.rows:
            return None
        known = self.heads.get(path)
        return known if known is not None else self.rows[path]

    @classmethod
    def of_module(cls, model: nn.Module) -> "BaseFacts":
        """The facts of a loaded UNet (diffusers or ComfyUI).

        >>> BaseFacts.of_module(nn.Linear(2, 2)).layout_error[:40]
        'step reuse: Linear has neither down_bloc'
        """
        try:
            layout, error = block_layout(model), None
        except FragmentError as exc:
            layout, error = None, str(exc)
        attention = dict(iter_attention(model))
        return cls(type(model).__name__, layout, error, {p: int(m.to_q.out_features) for p, m in attention.items()},
                   {p: int(m.heads) for p, m in attention.items()})

    @classmethod
    def of_checkpoint(cls, shapes: Mapping[str, list[int]], label: str,
                      manifest: Mapping[str, Any] | None = None) -> "BaseFacts":
        """The facts of a checkpoint from its header's ``name -> shape`` (keys under ``model.diffusion_model.``
        when any are, else the file is taken as a bare UNet); ``manifest`` lends its pruning entries and its base
        record's head total to name the head rule.

        >>> q = {f"b.attn1.to_{n}.weight": [16, 8] for n in ("q", "k", "v")} | {"b.attn1.to_out.0.weight": [8, 16]}
        >>> f = BaseFacts.of_checkpoint(q, "u.safetensors", {"pruning": {"modules": {"b.attn1": {"heads": 2, "dim_head": 8}}}})
        >>> f.heads, f.layout_error[:10]
        ({'b.attn1': 2}, 'step reuse')
        """
        if any(k.startswith(CHECKPOINT_PREFIX) for k in shapes):
            shapes = {k[len(CHECKPOINT_PREFIX):]: s for k, s in shapes.items() if k.startswith(CHECKPOINT_PREFIX)}
        try:
            layout, error = block_layout_of_keys(shapes), None
        except FragmentError as exc:
            layout, error = None, str(exc)
        rows: dict[str, int] = {}
        contexts: set[int] = set()
        for key, shape in shapes.items():
            if not key.endswith(".to_q.weight") or len(shape) != 2:
                continue
            path = key[: -len(".to_q.weight")]
            k, v = shapes.get(f"{path}.to_k.weight"), shapes.get(f"{path}.to_v.weight")
            out = shapes.get(f"{path}.to_out.0.weight", shapes.get(f"{path}.to_out.weight"))
            if k is None or v is None or out is None or len(k) != 2 or shape[0] < 1:
                continue  # not the q/k/v/out shape ``iter_attention`` matches on
            rows[path] = int(shape[0])
            if k[1] != shape[1]:
                contexts.add(int(k[1]))
        heads, notes = _derive_heads(rows, contexts, manifest or {}, label)
        return cls(label, layout, error, rows, heads, notes)


def _int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) and x > 0 else None


def _derive_heads(rows: Mapping[str, int], contexts: set[int], manifest: Mapping[str, Any],
                  label: str) -> tuple[dict[str, int | None], tuple[str, ...]]:
    """Each module's heads: a pruned module's from its entry (its to_q rows are checked against it), the rest
    from the one rule (same heads, or same head width, everywhere) the fragment's records leave standing."""
    modules = manifest.get("pruning", {}).get("modules", {}) if isinstance(manifest.get("pruning"), Mapping) else {}
    pruned: dict[str, tuple[int, int]] = {}
    for path, entry in (modules.items() if isinstance(modules, Mapping) else ()):
        if isinstance(entry, Mapping) and _int(entry.get("heads")) and _int(entry.get("dim_head")):
            pruned[path] = (entry["heads"], entry["dim_head"])
    base = manifest.get("base_model", {}) if isinstance(manifest.get("base_model"), Mapping) else {}
    total, count = _int(base.get("attention_heads")), _int(base.get("attention_modules"))
    if count is not None and count != len(rows):
        total = None  # another set of attention modules than the fragment's base had: its total says nothing here
    rules = {("heads", h) for h, _ in pruned.values()} | {("dim_head", d) for _, d in pruned.values()}
    if total is not None and count and total % count == 0:
        rules.add(("heads", total // count))
    convention = CONVENTIONS.get(next(iter(contexts))) if len(contexts) == 1 else None
    if convention is not None:
        rules.add(convention)
    fits: dict[tuple[str, int], dict[str, int]] = {}
    for rule, n in sorted(rules):
        if any(r % n for r in rows.values()):
            continue
        guess = {p: (n if rule == "heads" else r // n) for p, r in rows.items()}
        if any(p in guess and guess[p] != h for p, (h, _) in pruned.items()):
            continue
        if total is not None and sum(guess.values()) != total:
            continue
        fits[(rule, n)] = guess
    distinct = {tuple(sorted(g.items())) for g in fits.values()}
    heads: dict[str, int | None] = {p: None for p in rows}
    notes: tuple[str, ...] = ()
    if len(distinct) == 1:
        heads.update(next(iter(fits.values())))
    elif convention in fits:  # two rules fit the records; the SD family's own rule decides
        heads.update(fits[convention])
    elif len(rows) > len(pruned):
        notes = (f"{label}: heads of the attention modules the fragment does not prune are not derivable from the "
                 f"checkpoint (rules that fit: {', '.join(f'{r}={n}' for r, n in sorted(fits)) or 'none'}); a bucket on one is bounded by its to_q rows "
                 f"only",)
    for path, (h, _) in pruned.items():
        if path in heads:
            heads[path] = h
    return heads, notes
