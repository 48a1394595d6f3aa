"""Physical head pruning: new module copies with fewer heads, the input model untouched.

Cutting head ``h`` of an attention module removes rows ``h*d:(h+1)*d`` of
``to_q``/``to_k``/``to_v`` and the same columns of ``to_out[0]``; heads are
independent inside the attention, so the result equals the full module with
that head's output zeroed before ``to_out[0]`` (see ``masking.py``).  ``heads``
must be updated too: both ComfyUI and diffusers derive the head size as
``q.shape[-1] // heads``, and a stale value runs without error and gives
wrong output.

Nothing here writes into an existing tensor.  Weights may be read-only mmaps
(safetensors) or shared with a ComfyUI ``ModelPatcher``; every changed
weight is a new tensor made by ``index_select`` on the weight's own device,
and every changed module is a fresh copy of the same class.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn as nn

from ...errors import BaseModelMismatchError, IntegrityError, PruningError, where
from ...profiling.discovery import describe, iter_attention
from .lever import Built, LeverBase, finite, index_tensor, removed_share
from .selection import Selection, select_heads, validate_plan
from .tree import fresh_copy, install, replace_modules, slice_linear


def head_channels(kept: Sequence[int], dim_head: int) -> torch.Tensor:
    """Channel indices of the kept heads in the concatenated ``heads * dim_head`` layout.

    >>> head_channels([0, 2], 2).tolist()
    [0, 1, 4, 5]
    """
    k = torch.as_tensor(list(kept), dtype=torch.long)
    return (k[:, None] * dim_head + torch.arange(dim_head)[None, :]).flatten()


def prune_attention(module: nn.Module, kept: Sequence[int], path: str = "<module>") -> nn.Module:
    """A copy of attention ``module`` keeping only heads ``kept`` (original indices).

    >>> from diffusers.models.attention_processor import Attention  # doctest: +SKIP
    >>> small = prune_attention(Attention(32, heads=4, dim_head=8), [0, 3])  # doctest: +SKIP
    >>> small.heads, small.to_q.out_features, small.to_out[0].in_features  # doctest: +SKIP
    (2, 16, 16)
    """
    site = describe(path, module)
    kept = validate_plan({path: kept}, {path: site.heads}, source="prune_attention")[path]
    if module.to_q.out_features != site.heads * site.dim_head:
        raise PruningError(where(path, f"expected to_q.out_features == heads * dim_head == {site.heads * site.dim_head}, found {module.to_q.out_features}"))
    channels = head_channels(kept, site.dim_head)
    new = fresh_copy(module)
    for name in ("to_q", "to_k", "to_v"):
        new._modules[name] = slice_linear(getattr(module, name), rows=channels)
    to_out = module.to_out
    if isinstance(to_out, nn.Linear):
        new._modules["to_out"] = slice_linear(to_out, cols=channels)
    else:
        out_copy = fresh_copy(to_out)
        out_copy._modules["0"] = slice_linear(to_out[0], cols=channels)
        new._modules["to_out"] = out_copy
    new.heads = len(kept)
    inner = len(kept) * site.dim_head
    for attr in ("inner_dim", "inner_kv_dim"):  # diffusers keeps these beside heads
        if isinstance(getattr(module, attr, None), int):
            setattr(new, attr, inner)
    if new.to_q.out_features != new.heads * site.dim_head:
        raise PruningError(where(path, f"after pruning: to_q.out_features {new.to_q.out_features} != heads {new.heads} * dim_head {site.dim_head}"))
    return new


def build_head_replacements(model: nn.Module, plan: Mapping[str, Sequence[int]]) -> dict[str, nn.Module]:
    """Pruned copies of every attention module the plan touches, keyed by module path.

    Modules whose plan keeps all heads are left out: there is nothing to replace.

    >>> reps = build_head_replacements(unet, {"mid_block.attentions.0.transformer_blocks.0.attn1": [0, 1]})  # doctest: +SKIP
    """
    modules = dict(iter_attention(model))
    heads = {p: int(m.heads) for p, m in modules.items()}
    clean = validate_plan(plan, heads, source=f"{type(model).__name__} plan")
    return {p: prune_attention(modules[p], k, p) for p, k in clean.items() if len(k) < heads[p]}


def prune_heads(model: nn.Module, plan: Mapping[str, Sequence[int]]) -> nn.Module:
    """A head-pruned model built from ``model`` and a plan of kept head indices.

    >>> small = prune_heads(unet, selection.kept)  # doctest: +SKIP
    >>> sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in unet.parameters())  # doctest: +SKIP
    True
    """
    return replace_modules(model, build_head_replacements(model, plan))


def kept_key(path: str) -> str:
    """The tensors-file key of one module's kept head indices.

    >>> kept_key("mid.attn1")
    'heads.mid.attn1.kept'
    """
    return f"heads.{path}.kept"


_SLICED = ("to_q", "to_k", "to_v", "to_out.0")


HEAD_GRID = tuple(round(0.05 * i, 2) for i in range(0, 13))  # 0 .. 60 % of heads


@dataclass(frozen=True)
class HeadLever(LeverBase):
    """Remove attention heads: ``selection`` keeps these head indices per module.

    Its record is the manifest's ``pruning`` block; its tensors are ``heads.<path>.kept`` (int64).

    >>> lever = HeadLever(Selection(kept={"a": [0]}, heads={"a": 2}))
    >>> lever.name, lever.selection.removed_heads
    ('heads', 1)
    """

    selection: Selection
    name: ClassVar[str] = "heads"
    grid: ClassVar[tuple[Any, ...]] = HEAD_GRID
    goals: ClassVar[tuple[str, ...]] = ("memory", "both")

    @classmethod
    def select(cls, scores: Mapping[str, torch.Tensor], **select: Any) -> "HeadLever":
        """Heads chosen from per-head ``scores`` by ``select_heads(scores, **select)``.

        >>> HeadLever.select({"a": torch.tensor([0.1, 0.9])}, ratio=0.5).selection.kept
        {'a': [1]}
        """
        return cls(select_heads(scores, **select))

    @classmethod
    def check_amount(cls, amount: Any, settings: Any = None) -> str | None:
        percentile = getattr(settings, "strategy", "ratio") == "percentile"
        ok = finite(amount) and 0.0 <= amount <= (100.0 if percentile else 1.0)
        return None if ok else "a fraction in [0, 1] (a percentile in [0, 100] with strategy 'percentile')"

    @classmethod
    def label(cls, amount: Any, settings: Any = None) -> str:
        if getattr(settings, "strategy", "ratio") == "percentile":
            return f"heads below percentile {amount:g}"
        return f"heads {amount:.0%}"

    @classmethod
    def plan(cls, evidence: Any, settings: Any, model: nn.Module, name: str) -> "HeadLever":
        """Always planned (a fragment records its heads even when none is removed); protected heads stay."""
        scores = evidence.scores(settings.weights, max_rank_std=settings.max_rank_std,
                                 keep_unstable_heads=settings.keep_unstable_heads)
        amount = settings.amount("heads")
        budget = {"ratio": amount} if settings.strategy == "ratio" else {"percentile": amount}
        return cls.select(scores.heads, scope=settings.scope, min_keep=settings.min_keep,
                          safety_margin_heads=settings.safety_margin_heads, protected=scores.protected, **budget)

    @classmethod
    def predictor(cls, evidence: Any, model: nn.Module, settings: Any) -> dict[str, torch.Tensor]:
        """The head scores; protected (rank-unstable) heads score as the most important, since the lever
        never removes them."""
        scores = evidence.scores(settings.weights, max_rank_std=settings.max_rank_std,
                                 keep_unstable_heads=settings.keep_unstable_heads)
        top = max((float(v.max()) for v in scores.heads.values() if v.numel()), default=1.0)
        heads = {}
        for path, values in scores.heads.items():
            values = values.clone().float()
            values[list(scores.protected.get(path, ()))] = top  # never removed, so ranked with the most important
            heads[path] = values
        return heads

    @classmethod
    def predict(cls, data: Mapping[str, torch.Tensor], amount: float) -> float:
        """A removed share m of the score mass is an output error of norm sqrt(m).

        >>> HeadLever.predict({"a": torch.tensor([1.0, 1.0, 2.0, 4.0])}, 0.5)
        0.5
        """
        if amount <= 0:
            return 0.0
        return math.sqrt(removed_share(torch.cat([s.flatten().float() for s in data.values()]), amount))

    def build(self, model: nn.Module, replacements: dict[str, nn.Module], built: Mapping[str, Any]) -> Built:
        modules = dict(iter_attention(model))
        heads = {p: int(m.heads) for p, m in modules.items()}
        plan = validate_plan(self.selection.pruned_only(), heads, source=f"{type(model).__name__} head plan")
        tensors: dict[str, torch.Tensor] = {}
        entries: dict[str, Any] = {}
        for path, kept in plan.items():
            site = describe(path, modules[path])
            tensors[kept_key(path)] = torch.tensor(kept, dtype=torch.int64)
            removed = [h for h in range(site.heads) if h not in set(kept)]
            entries[path] = {"kind": site.kind, "heads": site.heads, "dim_head": site.dim_head, "kept": kept, "removed": removed}
        install(replacements, {p: prune_attention(modules[p], k, p) for p, k in plan.items()})
        total = sum(heads.values())
        removed_total = sum(len(e["removed"]) for e in entries.values())
        record = {
            "method": "composite_score",
            "selection": dict(self.selection.params),
            "heads_total": total,
            "heads_removed": removed_total,
            "head_retention_ratio": 1.0 - removed_total / total if total else 1.0,
            "modules": entries,
        }
        return Built(tensors, record)

    @classmethod
    def record_in(cls, manifest: Mapping[str, Any]) -> Any | None:
        return manifest.get("pruning")

    @classmethod
    def apply(cls, model: nn.Module, record: Any, tensors: Mapping[str, torch.Tensor],
              replacements: dict[str, nn.Module], source: str = "fragment") -> None:
        modules = dict(iter_attention(model))
        for path, entry in record["modules"].items():
            module = modules.get(path)
            if module is None:
                raise BaseModelMismatchError(f"{path}: {source} prunes an attention module the model does not have")
            site = describe(path, module)
            if (site.heads, site.dim_head) != (entry["heads"], entry["dim_head"]):
                raise BaseModelMismatchError(
                    f"{path}: expected {entry['heads']} heads of size {entry['dim_head']}, found {site.heads} of size {site.dim_head}"
                )
            install(replacements, {path: prune_attention(module, [int(i) for i in tensors[kept_key(path)]], path)})

    @classmethod
    def check(cls, record: Any, tensors: Mapping[str, torch.Tensor], source: str) -> set[str]:
        keys: set[str] = set()
        for path, entry in record["modules"].items():
            key = kept_key(path)
            keys.add(key)
            kept = index_tensor(tensors, key, f"module {path}", source, path=path, size=entry["heads"])
            if kept != entry["kept"]:
                raise IntegrityError(f"{source}: {path}: manifest keeps heads {entry['kept']}, tensors file keeps {kept}")
        return keys

    @classmethod
    def weight_keys(cls, record: Any, prefix: str = "") -> set[str]:
        """Every q/k/v/out weight and bias of a pruned module: each is replaced by a smaller tensor.

        >>> sorted(HeadLever.weight_keys({"modules": {"m.attn1": {}}}))[:2]
        ['m.attn1.to_k.bias', 'm.attn1.to_k.weight']
        """
        return {f"{prefix}{path}.{layer}.{w}" for path in record["modules"] for layer in _SLICED for w in ("weight", "bias")}
