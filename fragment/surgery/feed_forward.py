"""Feed-forward channel pruning: choose hidden channels, simulate the cut with a mask, then cut for real.

Hidden channel ``c`` of a feed-forward block lives in rows ``c`` (and
``hidden + c`` for the gate of a GEGLU) of the input projection and column
``c`` of the output Linear.  GEGLU multiplies value and gate channel by
channel, so a channel whose activation is zeroed before the output Linear
contributes nothing, and removing its rows and column gives the same output
(``masking`` below is the reference; tests check equality in float32).

A plan is plain data, ``{ff_path: sorted ORIGINAL channel indices kept}``,
like the head plan.  New Linears are built with ``slice_linear`` (same class,
new tensors); the input model is never changed.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from ...errors import BaseModelMismatchError, IntegrityError, PruningError, where
from ...profiling.ff_profiler import FFSite, ff_site, iter_feed_forward
from .lever import Built, InCompression, LeverBase, index_tensor, removed_share
from .masking import input_mask_hook
from .selection import Selection, select_heads, validate_plan
from .tree import install, replace_modules, slice_linear


def select_ff_channels(
    scores: Mapping[str, torch.Tensor], *, ratio: float, scope: str = "per_layer", min_keep: int = 1
) -> Selection:
    """Channels to keep: the lowest-scoring ``ratio`` go (per block by default: scales differ between blocks).

    Channels are selected exactly like heads (``select_heads``): the unit differs, the rule does not.

    >>> select_ff_channels({"ff": torch.tensor([3., 1., 2., 4.])}, ratio=0.5).kept
    {'ff': [0, 3]}
    """
    selection = select_heads(scores, ratio=ratio, scope=scope, min_keep=min_keep)
    selection.params = {"strategy": "ratio", "ratio": ratio, "scope": scope, "min_keep": min_keep}
    return selection


def _sites(model: nn.Module) -> dict[str, tuple[nn.Module, FFSite]]:
    return {p: (m, s) for p, m, s in iter_feed_forward(model)}


def _clean(model: nn.Module, plan: Mapping[str, Sequence[int]], source: str) -> tuple[dict, dict[str, list[int]]]:
    sites = _sites(model)
    unknown = sorted(set(plan) - set(sites))
    if unknown:
        raise PruningError(f"{source}: {unknown[0]}: not a feed-forward block of {type(model).__name__} (expected one of its net[0]/net[2] blocks)")
    return sites, validate_plan(plan, {p: s.hidden for p, (_, s) in sites.items()}, source=source)


@contextmanager
def mask_ff_channels(model: nn.Module, plan: Mapping[str, Sequence[int]]) -> Iterator[nn.Module]:
    """Within the block, hidden channels not in ``plan[path]`` are zeroed; hooks are removed on exit.

    >>> with mask_ff_channels(unet, {"mid_block.attentions.0.transformer_blocks.0.ff": [0, 5]}):  # doctest: +SKIP
    ...     masked = unet(**inputs).sample
    """
    sites, clean = _clean(model, plan, f"{type(model).__name__} ff mask plan")
    handles = []
    try:
        for path, kept in clean.items():
            module, site = sites[path]
            if len(kept) == site.hidden:
                continue
            mask = torch.zeros(site.hidden)
            mask[kept] = 1.0
            handles.append(module.get_submodule(site.out_proj).register_forward_pre_hook(input_mask_hook(mask)))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def input_rows(kept: Sequence[int], site: FFSite) -> torch.Tensor:
    """Rows of the input projection that belong to the kept channels (both GEGLU halves).

    >>> input_rows([0, 2], FFSite("ff", "net.0.proj", "net.2", hidden=4, gated=True)).tolist()
    [0, 2, 4, 6]
    """
    k = torch.as_tensor(list(kept), dtype=torch.long)
    return torch.cat([k, k + site.hidden]) if site.gated else k


def prune_feed_forward(module: nn.Module, site: FFSite, kept: Sequence[int]) -> nn.Module:
    """A copy of feed-forward ``module`` keeping hidden channels ``kept`` (original indices).

    >>> ff = nn.Module(); ff.net = nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.GELU()), nn.Dropout(), nn.Linear(8, 4))
    >>> from prompt_fragments.profiling.ff_profiler import ff_site
    >>> small = prune_feed_forward(ff, ff_site("ff", ff), [1, 2, 7])
    >>> small.net[0][0].out_features, small.net[2].in_features, ff.net[2].in_features
    (3, 3, 8)
    """
    kept = validate_plan({site.path: kept}, {site.path: site.hidden}, source="prune_feed_forward")[site.path]
    cols = torch.as_tensor(kept, dtype=torch.long)
    in_lin = module.get_submodule(site.in_proj)
    out_lin = module.get_submodule(site.out_proj)
    new_in = slice_linear(in_lin, rows=input_rows(kept, site))
    new_out = slice_linear(out_lin, cols=cols)
    new = replace_modules(module, {site.in_proj: new_in, site.out_proj: new_out})
    # GEGLU-like wrappers of custom UNets may remember their width; keep it consistent.
    parent = new.get_submodule(site.in_proj.rsplit(".", 1)[0])
    for attr in ("dim_out", "inner_dim"):
        if isinstance(getattr(parent, attr, None), int) and getattr(parent, attr) == site.hidden:
            setattr(parent, attr, len(kept))
    if new_out.in_features * (2 if site.gated else 1) != new_in.out_features:
        raise PruningError(where(site.path, f"after cutting: input projection width {new_in.out_features} does not match output Linear width {new_out.in_features}"))
    return new


def build_ff_replacements(model: nn.Module, plan: Mapping[str, Sequence[int]]) -> dict[str, nn.Module]:
    """Cut copies of every feed-forward block the plan shrinks, keyed by path.

    >>> reps = build_ff_replacements(unet, select_ff_channels(weight_norm_scores(unet), ratio=0.3).kept)  # doctest: +SKIP
    """
    sites, clean = _clean(model, plan, f"{type(model).__name__} ff plan")
    return {p: prune_feed_forward(sites[p][0], sites[p][1], k) for p, k in clean.items() if len(k) < sites[p][1].hidden}


def prune_ff_channels(model: nn.Module, plan: Mapping[str, Sequence[int]]) -> nn.Module:
    """A copy of ``model`` with feed-forward hidden channels cut; ``model`` is untouched.

    >>> small = prune_ff_channels(unet, plan)  # doctest: +SKIP
    """
    return replace_modules(model, build_ff_replacements(model, plan))


def ff_key(path: str) -> str:
    """The tensors-file key of one feed-forward block's kept hidden channels.

    >>> ff_key("m.ff")
    'ff.m.ff.kept'
    """
    return f"ff.{path}.kept"


FF_GRID = tuple(round(0.05 * i, 2) for i in range(0, 13))  # 0 .. 60 % of feed-forward channels


@dataclass(frozen=True)
class FeedForwardLever(InCompression, LeverBase):
    """Cut feed-forward hidden channels: ``selection`` keeps these original channel indices per block.

    Record: ``compression.ff`` (``ff_channels`` in schema v1); ``info`` says how the channels were scored.
    Tensors: ``ff.<block>.kept`` (int64).

    >>> lever = FeedForwardLever.select({"ff": torch.tensor([3., 1., 2., 4.])}, ratio=0.5, info={"method": "weight_norm"})
    >>> lever.selection.kept, lever.name
    ({'ff': [0, 3]}, 'ff')
    """

    selection: Selection
    info: Mapping[str, Any] | None = None
    name: ClassVar[str] = "ff"
    grid: ClassVar[tuple[Any, ...]] = FF_GRID
    goals: ClassVar[tuple[str, ...]] = ("memory", "both")
    evidence: ClassVar[tuple[str, ...]] = ("ff_scores",)

    @classmethod
    def select(cls, scores: Mapping[str, torch.Tensor], *, ratio: float, info: Mapping[str, Any] | None = None) -> "FeedForwardLever":
        return cls(select_ff_channels(scores, ratio=ratio), info)

    @classmethod
    def plan(cls, evidence: Any, settings: Any, model: nn.Module, name: str) -> "FeedForwardLever | None":
        """Without profiled ``ff_scores`` the channels are ranked by weight norms, and the manifest says so."""
        from ...profiling.ff_profiler import weight_norm_scores

        if not settings.amount(cls.name) > 0:
            return None
        scores = evidence.ff_scores
        info = {"method": "activation_energy" if scores is not None else "weight_norm"}
        return cls.select(scores if scores is not None else weight_norm_scores(model), ratio=settings.amount(cls.name),
                          info=info)

    @classmethod
    def predictor(cls, evidence: Any, model: nn.Module, settings: Any) -> Mapping[str, torch.Tensor] | None:
        return evidence.ff_scores

    @classmethod
    def predict(cls, data: Mapping[str, torch.Tensor], amount: float) -> float:
        """The lever cuts the same share from every block: the root of the blocks' mean removed share.

        >>> FeedForwardLever.predict({"a": torch.tensor([1.0, 3.0])}, 0.5)
        0.5
        """
        if amount <= 0:
            return 0.0
        shares = [removed_share(s.flatten().float(), amount) for s in data.values()]
        return math.sqrt(sum(shares) / len(shares))

    def build(self, model: nn.Module, replacements: dict[str, nn.Module], built: Mapping[str, Any]) -> Built:
        tensors: dict[str, torch.Tensor] = {}
        modules: dict[str, Any] = {}
        cut: dict[str, nn.Module] = {}
        for path, kept in self.selection.pruned_only().items():
            module = model.get_submodule(path)
            site = ff_site(path, module)
            if site is None:
                raise BaseModelMismatchError(f"{path}: expected a feed-forward block (net[0] projection, net[-1] Linear), "
                                             f"found {type(module).__name__}")
            cut[path] = prune_feed_forward(module, site, kept)
            tensors[ff_key(path)] = torch.tensor(kept, dtype=torch.int64)
            modules[path] = {"hidden": site.hidden, "gated": site.gated, "in_proj": site.in_proj, "out_proj": site.out_proj,
                             "kept": list(kept)}
        install(replacements, cut)
        record = {
            "selection": dict(self.selection.params), "score": dict(self.info or {}),
            "channels_total": sum(self.selection.heads.values()), "channels_removed": self.selection.removed_heads,
            "modules": modules,
        }
        return Built(tensors, record)

    @classmethod
    def apply(cls, model: nn.Module, record: Any, tensors: Mapping[str, torch.Tensor],
              replacements: dict[str, nn.Module], source: str = "fragment") -> None:
        for path, entry in record["modules"].items():
            try:
                module = model.get_submodule(path)
            except AttributeError:
                raise BaseModelMismatchError(f"{path}: fragment cuts a feed-forward block the model does not have") from None
            site = ff_site(path, module)
            if site is None or (site.hidden, site.gated) != (entry["hidden"], entry["gated"]):
                found = "no feed-forward layout" if site is None else f"hidden {site.hidden}, gated {site.gated}"
                raise BaseModelMismatchError(f"{path}: expected a feed-forward block with hidden {entry['hidden']}, "
                                             f"gated {entry['gated']}, found {found}")
            install(replacements, {path: prune_feed_forward(module, site, [int(i) for i in tensors[ff_key(path)]])})

    @classmethod
    def check(cls, record: Any, tensors: Mapping[str, torch.Tensor], source: str) -> set[str]:
        keys: set[str] = set()
        for path, entry in record["modules"].items():
            key = ff_key(path)
            keys.add(key)
            kept = index_tensor(tensors, key, f"feed-forward block {path}", source, path=path, size=entry["hidden"])
            if kept != entry["kept"]:
                raise IntegrityError(f"{source}: {path}: manifest keeps {len(entry['kept'])} feed-forward channels, "
                                     f"tensors file keeps {len(kept)} different ones")
        return keys

    @classmethod
    def weight_keys(cls, record: Any, prefix: str = "") -> set[str]:
        """The input and output projections of every cut block.

        >>> sorted(FeedForwardLever.weight_keys({"modules": {"b.ff": {"in_proj": "net.0.proj", "out_proj": "net.2"}}}))[:2]
        ['b.ff.net.0.proj.bias', 'b.ff.net.0.proj.weight']
        """
        return {f"{prefix}{path}.{entry[r]}.{w}" for path, entry in record.get("modules", {}).items()
                for r in ("in_proj", "out_proj") for w in ("weight", "bias")}
