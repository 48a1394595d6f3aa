"""Choose which heads to remove, from scores alone.

A plan is plain data: ``{module_path: sorted list of ORIGINAL head indices kept}``.
Masking, physical pruning and the manifest all read that one structure.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from ...errors import PruningError

Plan = dict[str, list[int]]

GLOBAL = "global"
PER_LAYER = "per_layer"


@dataclass
class Selection:
    """A plan plus the parameters and counts that explain it (recorded in the manifest)."""

    kept: Plan
    heads: dict[str, int]
    params: dict = field(default_factory=dict)

    @property
    def total_heads(self) -> int:
        return sum(self.heads.values())

    @property
    def removed_heads(self) -> int:
        return self.total_heads - sum(len(k) for k in self.kept.values())

    @property
    def retention_ratio(self) -> float:
        return 1.0 - self.removed_heads / self.total_heads if self.total_heads else 1.0

    def removed(self, path: str) -> list[int]:
        kept = set(self.kept[path])
        return [h for h in range(self.heads[path]) if h not in kept]

    def pruned_only(self) -> Plan:
        """The plan restricted to modules that actually lose heads."""
        return {p: k for p, k in self.kept.items() if len(k) < self.heads[p]}


def _check_fraction(name: str, value: float | None, upper: float) -> None:
    if value is not None and not (0.0 <= value <= upper):
        raise PruningError(f"select_heads: expected {name} in [0, {upper}], found {value}")


def select_heads(
    scores: Mapping[str, torch.Tensor],
    *,
    ratio: float | None = None,
    percentile: float | None = None,
    scope: str = GLOBAL,
    min_keep: int = 1,
    safety_margin_heads: int = 0,
    protected: Mapping[str, Sequence[int]] | None = None,
) -> Selection:
    """Pick the heads to keep.

    Exactly one of ``ratio`` (fraction of heads to remove, 0..1) or
    ``percentile`` (remove heads scoring strictly below this percentile,
    0..100) is given.  ``scope`` is ``"global"`` (one ranking over all
    modules) or ``"per_layer"`` (each module on its own).  Every module keeps
    at least ``min_keep`` heads.  ``safety_margin_heads`` gives back that many
    of the highest-scoring heads chosen for removal (per module when per
    layer).  Heads in ``protected`` (e.g. rank-unstable ones) are never removed.

    >>> s = select_heads({"a": torch.tensor([3., 1., 2., 4.]), "b": torch.tensor([.5, 9.])}, ratio=0.5)
    >>> s.kept
    {'a': [0, 3], 'b': [1]}
    >>> s.removed_heads, round(s.retention_ratio, 2)
    (3, 0.5)
    """
    if (ratio is None) == (percentile is None):
        raise PruningError(
            f"select_heads: expected exactly one of ratio or percentile, found ratio={ratio}, percentile={percentile}"
        )
    _check_fraction("ratio", ratio, 1.0)
    _check_fraction("percentile", percentile, 100.0)
    if scope not in (GLOBAL, PER_LAYER):
        raise PruningError(f"select_heads: expected scope 'global' or 'per_layer', found {scope!r}")
    if min_keep < 1:
        raise PruningError(f"select_heads: expected min_keep >= 1, found {min_keep}")
    if safety_margin_heads < 0:
        raise PruningError(f"select_heads: expected safety_margin_heads >= 0, found {safety_margin_heads}")

    heads = {path: int(s.numel()) for path, s in scores.items()}
    protected_set = {(p, int(h)) for p, hs in (protected or {}).items() for h in hs}
    groups = [list(scores)] if scope == GLOBAL else [[p] for p in scores]
    removed: set[tuple[str, int]] = set()
    for group in groups:
        removed |= _select_group(group, scores, heads, ratio, percentile, min_keep, safety_margin_heads, protected_set)

    kept = {p: [h for h in range(heads[p]) if (p, h) not in removed] for p in scores}
    params = {
        "strategy": "ratio" if ratio is not None else "percentile",
        "ratio": ratio,
        "percentile": percentile,
        "scope": scope,
        "min_keep": min_keep,
        "safety_margin_heads": safety_margin_heads,
        "protected_heads": len(protected_set),
    }
    return Selection(kept=kept, heads=heads, params=params)


def _select_group(
    group: list[str],
    scores: Mapping[str, torch.Tensor],
    heads: dict[str, int],
    ratio: float | None,
    percentile: float | None,
    min_keep: int,
    margin: int,
    protected: set[tuple[str, int]],
) -> set[tuple[str, int]]:
    # Ascending by score; ties broken by module order then head index so the plan is deterministic.
    candidates = sorted(
        ((float(scores[p][h]), gi, h, p) for gi, p in enumerate(group) for h in range(heads[p])),
    )
    total = sum(heads[p] for p in group)
    if ratio is not None:
        budget = math.floor(ratio * total + 1e-9)
    else:
        all_scores = torch.tensor([c[0] for c in candidates], dtype=torch.float64)
        threshold = float(torch.quantile(all_scores, percentile / 100.0)) if len(candidates) else 0.0
        # Only heads below the threshold are candidates: a protected one is not replaced by one above it.
        candidates = [c for c in candidates if c[0] < threshold]
        budget = len(candidates)
    left = {p: heads[p] for p in group}
    chosen: list[tuple[float, int, int, str]] = []
    for cand in candidates:
        if len(chosen) >= budget:
            break
        _, _, h, p = cand
        if (p, h) in protected or left[p] <= min_keep:
            continue
        chosen.append(cand)
        left[p] -= 1
    if margin:
        chosen = chosen[: max(len(chosen) - margin, 0)]  # give back the best-scored of the removed
    return {(p, h) for _, _, h, p in chosen}


def validate_plan(plan: Mapping[str, Sequence[int]], heads: Mapping[str, int], source: str = "plan") -> Plan:
    """Check kept indices against head counts; return a clean sorted plan.

    Raises :class:`PruningError` naming the module path for unknown modules,
    out-of-range or duplicate indices, and modules left with no head.

    >>> validate_plan({"a": [2, 0]}, {"a": 4})
    {'a': [0, 2]}
    """
    clean: Plan = {}
    for path, kept in plan.items():
        if path not in heads:
            raise PruningError(f"{source}: {path}: module not found in the model (expected one of its attention paths)")
        n = heads[path]
        idx = [int(i) for i in kept]
        if not idx:
            raise PruningError(f"{source}: {path}: expected at least 1 kept head, found none")
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise PruningError(f"{source}: {path}: expected head indices in [0, {n - 1}], found {bad}")
        if len(set(idx)) != len(idx):
            dups = sorted({i for i in idx if idx.count(i) > 1})
            raise PruningError(f"{source}: {path}: duplicate head indices {dups}")
        clean[path] = sorted(idx)
    return clean
