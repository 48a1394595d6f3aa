"""Exact cross-attention K/V folding: for a fixed prompt, attn2's keys and values are constants.

attn2's ``to_k``/``to_v`` read only the text context, which does not change
across the steps and seeds of one prompt (issue #7).  Their outputs are
computed once per distinct context row (cond, uncond) and stored; the folded
attn2 is a copy whose ``to_k``/``to_v`` are :class:`FoldedProjection` modules
that look the incoming context rows up and return the stored projections.
Both ComfyUI's ``CrossAttention`` and diffusers' ``Attention`` call
``to_k(context)``/``to_v(context)``, so matching on the projection's own input
covers every way a host routes the context (batched cond/uncond in any
order, attn2 patches that pass a different ``value``, IPAdapter-style
replacements that still call ``to_k``/``to_v``).

Matching is exact and cheap: a row matches a stored row only when its token
count is a multiple of the stored one and its values are equal (ComfyUI pads
cond and uncond of different lengths to their least common multiple by
repeating tokens, and a tokenwise Linear maps repeated tokens to repeated
outputs, so that case is exact too).  The comparison runs once per incoming
context tensor, not once per module: every attn2 of one UNet call receives
the same tensor object, and a shared :class:`FoldedContexts` remembers the
last tensor (weakref + ``_version``, so an in-place change is seen).

A row that matches nothing is recomputed with the kept weights, or, when the
weights were dropped, refused with a :class:`FragmentError` naming the module.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn as nn

from ...errors import BaseModelMismatchError, FragmentError, IntegrityError, PruningError, where
from ...profiling.discovery import CROSS, describe, iter_attention
from .lever import Built, GOALS, InCompression, LeverBase, tensor
from .tree import fresh_copy, install, module_at, replace_modules

log = logging.getLogger(__name__)


def unique_rows(context: torch.Tensor) -> torch.Tensor:
    """The distinct rows of a ``[B, T, C]`` context, in first-seen order (cond and uncond, once each).

    >>> c = torch.stack([torch.ones(2, 3), torch.zeros(2, 3), torch.ones(2, 3)])
    >>> unique_rows(c).shape
    torch.Size([2, 2, 3])
    """
    if context.ndim != 3:
        raise FragmentError(f"kv_fold: expected a context of shape [batch, tokens, dim], found {list(context.shape)}")
    rows: list[torch.Tensor] = []
    for row in context:
        if not any(torch.equal(row, r) for r in rows):
            rows.append(row)
    return torch.stack(rows)


def row_fingerprints(context: torch.Tensor) -> list[str]:
    """SHA-256 of each context row's shape, dtype and bytes (recorded in the manifest for people and tools).

    >>> row_fingerprints(torch.zeros(1, 2, 2))[0][:12]
    '03b62e69cbcd'
    """
    out = []
    for row in context:
        t = row.detach().contiguous().cpu()
        digest = hashlib.sha256(f"{list(t.shape)}|{t.dtype}".encode())
        digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        out.append(digest.hexdigest())
    return out


class FoldedContexts:
    """The stored context rows plus a one-tensor match cache shared by every folded module of a model.

    Not an ``nn.Module`` on purpose: it is shared by dozens of attn2 copies and
    must not be counted (or moved) once per module; device copies are made lazily.

    >>> fc = FoldedContexts(torch.stack([torch.ones(2, 3), torch.zeros(2, 3)]))
    >>> fc.match(torch.zeros(1, 4, 3)).tolist()  # one row of 4 tokens = the stored zeros row repeated twice
    [1]
    """

    def __init__(self, rows: torch.Tensor) -> None:
        if rows.ndim != 3:
            raise FragmentError(f"kv_fold: expected context rows [rows, tokens, dim], found {list(rows.shape)}")
        self.rows = rows.detach()
        self.tokens = int(rows.shape[1])
        self.dim = int(rows.shape[2])
        self.fingerprints = row_fingerprints(rows)
        self._device_rows: dict[torch.device, torch.Tensor] = {}
        self._lock = threading.Lock()
        self._last: tuple[weakref.ref, int, torch.Tensor] | None = None  # (context, version, row index)

    def _rows_on(self, device: torch.device) -> torch.Tensor:
        rows = self._device_rows.get(device)
        if rows is None:
            # float32 holds fp16/bf16 values exactly, so comparing there never calls two different values equal.
            rows = self._device_rows[device] = self.rows.to(device=device, dtype=torch.float32)
        return rows

    def match(self, context: torch.Tensor) -> torch.Tensor | None:
        """Stored row index for each incoming row (a long tensor on the context's device), or None when any row fails."""
        version = _version_of(context)
        with self._lock:
            last = self._last
            if last is not None and last[0]() is context and last[1] == version:
                return last[2]
        idx = self._match(context)
        if idx is not None:
            with self._lock:
                self._last = (weakref.ref(context), version, idx)
        return idx

    def _match(self, context: torch.Tensor) -> torch.Tensor | None:
        if context.ndim != 3 or context.shape[-1] != self.dim or context.shape[1] % self.tokens:
            return None
        rows = self._rows_on(context.device)
        reps = context.shape[1] // self.tokens
        if reps > 1:  # ComfyUI's LCM padding repeats the token sequence
            rows = rows.repeat(1, reps, 1)
        equal = (context.detach().to(torch.float32)[:, None] == rows[None]).flatten(2).all(-1)  # [B, R]
        found = equal.any(-1)
        if not bool(found.all()):  # one host sync per UNet call, shared by every folded module
            return None
        return equal.to(torch.int8).argmax(-1)


def _version_of(t: torch.Tensor) -> int:
    """The tensor's in-place-write counter; -1 for inference tensors, which have none.

    ComfyUI samples under ``torch.inference_mode()``.  There the cache falls back
    to object identity: ComfyUI builds a new context tensor for every UNet call
    and never writes into one, so identity still means "the same values".
    """
    return -1 if t.is_inference() else t._version


class FoldedProjection(nn.Module):
    """Stands in for attn2's ``to_k`` or ``to_v``: returns the stored projection of a known context row.

    ``table`` is ``[rows, tokens, out_features]``; ``fallback`` is the original
    Linear when weights are kept, else None (then an unknown context is refused).

    >>> fc = FoldedContexts(torch.randn(1, 2, 4)); lin = nn.Linear(4, 3, bias=False)
    >>> fp = FoldedProjection(fold_table(lin, fc.rows), fc, None, "attn2.to_k")
    >>> torch.equal(fp(fc.rows), lin(fc.rows))
    True
    """

    def __init__(self, table: torch.Tensor, contexts: FoldedContexts, fallback: nn.Linear | None, path: str) -> None:
        super().__init__()
        if table.ndim != 3 or table.shape[0] != contexts.rows.shape[0] or table.shape[1] != contexts.tokens:
            raise PruningError(where(path, f"expected a folded table [{contexts.rows.shape[0]}, {contexts.tokens}, out], found {list(table.shape)}"))
        self.register_buffer("table", table.detach())
        self.contexts = contexts
        self.fallback = fallback
        self.path = path
        self.in_features = contexts.dim
        self.out_features = int(table.shape[-1])

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        idx = self.contexts.match(context)
        if idx is None:
            if self.fallback is not None:
                return self.fallback(context)
            raise FragmentError(where(self.path, (
                f"K/V were folded for {self.contexts.rows.shape[0]} context row(s) of {self.contexts.tokens} tokens x "
                f"{self.contexts.dim}, found a context of shape {list(context.shape)} with at least one row matching none "
                "(a different prompt, another token count, timestep-ranged or extra conds, or a changed negative). "
                "The to_k/to_v weights were dropped, so it cannot be recomputed: re-extract the fragment with this "
                "prompt, or extract with kv_fold_keep_weights")))
        table = self.table
        reps = context.shape[1] // self.contexts.tokens
        out = table.index_select(0, idx.to(table.device))
        if reps > 1:
            out = out.repeat(1, reps, 1)
        return out.to(device=context.device, dtype=context.dtype)

    def extra_repr(self) -> str:
        return f"rows={self.table.shape[0]}, tokens={self.table.shape[1]}, out_features={self.out_features}, weights_kept={self.fallback is not None}"


def fold_table(lin: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """``lin(rows)`` computed once, without autograd, in the Linear's own dtype and device (exact by construction).

    >>> fold_table(nn.Linear(4, 3), torch.zeros(2, 5, 4)).shape
    torch.Size([2, 5, 3])
    """
    w = lin.weight
    with torch.no_grad():
        return lin(rows.to(device=w.device, dtype=w.dtype)).detach()


def cross_attention_paths(model: nn.Module) -> list[str]:
    """Paths of every cross-attention module (ComfyUI's and diffusers' attn2), by structure.

    >>> cross_attention_paths(nn.Linear(2, 2))
    []
    """
    return [p for p, m in iter_attention(model) if describe(p, m).kind == CROSS]


def fold_attention(
    module: nn.Module, k_table: torch.Tensor, v_table: torch.Tensor, contexts: FoldedContexts, *,
    keep_weights: bool = False, path: str = "<attn2>",
) -> nn.Module:
    """A copy of attn2 ``module`` whose ``to_k``/``to_v`` return stored projections; ``module`` is untouched.

    >>> from diffusers.models.attention_processor import Attention  # doctest: +SKIP
    >>> folded = fold_attention(attn2, k, v, FoldedContexts(ctx))  # doctest: +SKIP
    """
    for name, table in (("to_k", k_table), ("to_v", v_table)):
        lin = getattr(module, name, None)
        if not isinstance(lin, nn.Linear):
            raise PruningError(where(path, f"expected {name} to be an nn.Linear to fold, found {type(lin).__name__}"))
        if lin.in_features != contexts.dim:
            raise PruningError(where(path, f"expected {name}.in_features == context dim {contexts.dim}, found {lin.in_features}"))
        if table.shape[-1] != lin.out_features:
            raise PruningError(where(path, f"expected folded {name} width {lin.out_features}, found {table.shape[-1]} (fold after head pruning)"))
    new = fresh_copy(module)
    new._modules["to_k"] = FoldedProjection(k_table, contexts, module.to_k if keep_weights else None, f"{path}.to_k")
    new._modules["to_v"] = FoldedProjection(v_table, contexts, module.to_v if keep_weights else None, f"{path}.to_v")
    return new


def build_kv_tables(
    modules: Mapping[str, nn.Module], contexts: FoldedContexts
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{path: (K, V)}`` for each attn2 (pass the head-pruned copies so only kept heads are stored).

    >>> m = nn.Module(); m.to_k, m.to_v = nn.Linear(4, 2, bias=False), nn.Linear(4, 2, bias=False)
    >>> k, v = build_kv_tables({"a": m}, FoldedContexts(torch.zeros(1, 3, 4)))["a"]
    >>> list(k.shape)
    [1, 3, 2]
    """
    return {p: (fold_table(m.to_k, contexts.rows), fold_table(m.to_v, contexts.rows)) for p, m in modules.items()}


def fold_model_kv(
    model: nn.Module, context: torch.Tensor, *, paths: Sequence[str] | None = None, keep_weights: bool = False
) -> nn.Module:
    """A copy of ``model`` with every attn2 (or ``paths``) folded for ``context`` ``[B, T, C]`` (cond and uncond rows).

    >>> folded = fold_model_kv(unet, torch.cat([cond, uncond]))  # doctest: +SKIP
    >>> torch.equal(folded(x, t, encoder_hidden_states=ctx).sample, unet(x, t, encoder_hidden_states=ctx).sample)  # doctest: +SKIP
    True
    """
    contexts = FoldedContexts(unique_rows(context))
    targets = {p: model.get_submodule(p) for p in (paths if paths is not None else cross_attention_paths(model))}
    tables = build_kv_tables(targets, contexts)
    return replace_modules(model, {
        p: fold_attention(m, *tables[p], contexts, keep_weights=keep_weights, path=p) for p, m in targets.items()
    })


KV_CONTEXT_KEY = "kv_fold.context"


def kv_keys(path: str) -> tuple[str, str]:
    """The tensors-file keys of one attn2's stored K and V.

    >>> kv_keys("m.attn2")
    ('kv_fold.m.attn2.k', 'kv_fold.m.attn2.v')
    """
    return f"kv_fold.{path}.k", f"kv_fold.{path}.v"


@dataclass(frozen=True)
class KVFoldLever(InCompression, LeverBase):
    """Fold every attn2's K/V for ``context`` (``[B, T, C]``: the cond and uncond rows the sampler passes).

    Record: ``compression.kv_fold``.  Tensors: ``kv_fold.context`` (the distinct rows) and
    ``kv_fold.<attn2>.k`` / ``.v`` ``[rows, tokens, kept width]``.  The weights are dropped unless
    ``keep_weights`` (then other contexts still work, and no bytes are saved).

    >>> KVFoldLever(torch.zeros(2, 3, 4)).name
    'kv_fold'
    """

    context: torch.Tensor
    keep_weights: bool = False
    name: ClassVar[str] = "kv_fold"
    goals: ClassVar[tuple[str, ...]] = GOALS
    ladder: ClassVar[str] = "always"  # exact for the folded prompt: on at every level where a context is given
    off: ClassVar[Any] = False

    @classmethod
    def check_amount(cls, amount: Any, settings: Any = None) -> str | None:
        return None if isinstance(amount, bool) else "True or False (a switch)"

    @classmethod
    def label(cls, amount: Any, settings: Any = None) -> str:
        return "kv-fold"

    @classmethod
    def plan(cls, evidence: Any, settings: Any, model: nn.Module, name: str) -> "KVFoldLever | None":
        """Folds the evidence's ``kv_context`` (``[B, T, C]``: the cond and uncond rows the sampler will pass)."""
        if not settings.amount(cls.name):
            return None
        if evidence.kv_context is None:
            raise FragmentError(f"fragment {name!r}: kv_fold needs the conditioning context (cond and uncond) to fold, found none")
        return cls(evidence.kv_context, keep_weights=settings.kv_fold_keep_weights)

    @classmethod
    def predictor(cls, evidence: Any, model: nn.Module, settings: Any) -> bool:
        return evidence.kv_context is not None

    def build(self, model: nn.Module, replacements: dict[str, nn.Module], built: Mapping[str, Any]) -> Built:
        contexts = FoldedContexts(unique_rows(self.context.detach()))
        rows_tokens = contexts.rows.shape[0] * contexts.tokens
        if rows_tokens >= contexts.dim:  # tables [rows*tokens, width] vs weights [context_dim, width]
            log.warning("kv_fold: %d rows x %d tokens >= context dim %d: the stored K/V are larger than the weights they "
                        "replace (folding then saves compute, not bytes)", contexts.rows.shape[0], contexts.tokens, contexts.dim)
        paths = cross_attention_paths(model)
        current = {p: module_at(model, replacements, p) for p in paths}  # after head pruning: kept heads only
        tables = build_kv_tables(current, contexts)
        tensors: dict[str, torch.Tensor] = {KV_CONTEXT_KEY: contexts.rows.contiguous()}
        modules: dict[str, Any] = {}
        folded: dict[str, nn.Module] = {}
        for path in paths:
            k, v = tables[path]
            tensors[kv_keys(path)[0]], tensors[kv_keys(path)[1]] = k.contiguous(), v.contiguous()
            folded[path] = fold_attention(current[path], k, v, contexts, keep_weights=self.keep_weights, path=path)
            modules[path] = {"width": int(k.shape[-1]), "heads": int(current[path].heads)}
        install(replacements, folded)
        record = {
            "rows": int(contexts.rows.shape[0]), "tokens": contexts.tokens, "context_dim": contexts.dim,
            "row_sha256": contexts.fingerprints, "context_dtype": str(contexts.rows.dtype).replace("torch.", ""),
            "weights_dropped": not self.keep_weights, "modules": modules,
        }
        return Built(tensors, record)

    @classmethod
    def apply(cls, model: nn.Module, record: Any, tensors: Mapping[str, torch.Tensor],
              replacements: dict[str, nn.Module], source: str = "fragment") -> None:
        contexts = FoldedContexts(tensors[KV_CONTEXT_KEY])
        for path, entry in record["modules"].items():
            attn = module_at(model, replacements, path)
            to_k = getattr(attn, "to_k", None)
            if not isinstance(to_k, nn.Linear) or to_k.out_features != entry["width"]:
                found = to_k.out_features if isinstance(to_k, nn.Linear) else type(to_k).__name__
                raise BaseModelMismatchError(f"{path}: expected an attn2 with to_k width {entry['width']} to fold, found {found}")
            w = to_k.weight
            k, v = (tensors[key].to(device=w.device, dtype=w.dtype) for key in kv_keys(path))
            install(replacements, {path: fold_attention(attn, k, v, contexts, keep_weights=not record["weights_dropped"], path=path)})

    @classmethod
    def check(cls, record: Any, tensors: Mapping[str, torch.Tensor], source: str) -> set[str]:
        keys = {KV_CONTEXT_KEY}
        ctx = tensor(tensors, KV_CONTEXT_KEY, "the folded context", source)
        expected = [record["rows"], record["tokens"], record["context_dim"]]
        if list(ctx.shape) != expected or not ctx.is_floating_point():
            raise IntegrityError(f"{source}: {KV_CONTEXT_KEY}: expected a float tensor {expected}, found {ctx.dtype} {list(ctx.shape)}")
        for path, entry in record["modules"].items():
            for key in kv_keys(path):
                keys.add(key)
                t = tensor(tensors, key, f"folded attn2 {path}", source)
                shape = [record["rows"], record["tokens"], entry["width"]]
                if list(t.shape) != shape or not t.is_floating_point():
                    raise IntegrityError(f"{source}: {key}: expected a float tensor {shape}, found {t.dtype} {list(t.shape)}")
        return keys

    @classmethod
    def weight_keys(cls, record: Any, prefix: str = "") -> set[str]:
        """``to_k``/``to_v`` of every folded attn2: they are replaced by stored projections.

        >>> sorted(KVFoldLever.weight_keys({"modules": {"m.attn2": {}}}))[0]
        'm.attn2.to_k.bias'
        """
        return {f"{prefix}{path}.{n}.{w}" for path in record.get("modules", {}) for n in ("to_k", "to_v") for w in ("weight", "bias")}
