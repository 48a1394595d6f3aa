"""Find attention modules in any ``nn.Module`` by their structure.

ComfyUI's ``CrossAttention`` and diffusers' ``Attention`` share one shape:
Linear ``to_q``/``to_k``/``to_v``, ``to_out[0]`` a Linear, and an integer
``heads``.  Matching on that shape rather than on class names keeps the pack
working across ComfyUI versions, diffusers versions and custom UNets that copy
either design.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

import torch.nn as nn

from ..errors import FragmentError, ProfilingError, where

SELF = "self"
CROSS = "cross"


@dataclass(frozen=True)
class AttentionSite:
    """One attention module: where it is and how its heads are laid out."""

    path: str  # dotted path from the model root, as in ``model.get_submodule(path)``
    kind: str  # "self" or "cross"
    heads: int
    dim_head: int
    query_dim: int
    context_dim: int
    out_dim: int

    @property
    def inner_dim(self) -> int:
        return self.heads * self.dim_head

    def to_dict(self) -> dict:
        return asdict(self)


def _out_linear(module: nn.Module) -> nn.Linear | None:
    to_out = getattr(module, "to_out", None)
    if isinstance(to_out, nn.Linear):
        return to_out
    if isinstance(to_out, (nn.Sequential, nn.ModuleList)) and len(to_out) > 0 and isinstance(to_out[0], nn.Linear):
        return to_out[0]
    return None


def is_attention(module: nn.Module) -> bool:
    """True when ``module`` has the q/k/v/out Linear layout and an int ``heads``.

    >>> import torch.nn as nn
    >>> m = nn.Module(); m.heads = 2
    >>> m.to_q, m.to_k, m.to_v = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(4, 8)
    >>> m.to_out = nn.Sequential(nn.Linear(8, 4))
    >>> is_attention(m)
    True
    """
    heads = getattr(module, "heads", None)
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
        return False
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in ("to_q", "to_k", "to_v")) and (
        _out_linear(module) is not None
    )


def out_linear(module: nn.Module, path: str = "<module>") -> nn.Linear:
    """The output projection (``to_out[0]``) of an attention module."""
    lin = _out_linear(module)
    if lin is None:
        raise ProfilingError(where(path, "expected to_out[0] to be an nn.Linear"))
    return lin


def _kind(name: str, module: nn.Module) -> str:
    flag = getattr(module, "is_cross_attention", None)
    if isinstance(flag, bool):  # diffusers says so itself
        return CROSS if flag else SELF
    if module.to_k.in_features != module.to_q.in_features:
        return CROSS
    # ComfyUI's attn2 can have context_dim == query_dim in custom UNets; its name is the only hint left.
    return CROSS if name.rsplit(".", 1)[-1] == "attn2" else SELF


def describe(path: str, module: nn.Module) -> AttentionSite:
    """Describe one attention module, checking its projections agree with ``heads``."""
    heads = int(module.heads)
    q, k, v = module.to_q, module.to_k, module.to_v
    out = out_linear(module, path)
    if q.out_features % heads:
        raise ProfilingError(
            where(path, f"expected to_q.out_features divisible by heads={heads}, found {q.out_features}")
        )
    dim_head = q.out_features // heads
    # ComfyUI keeps dim_head beside heads: a heads value left stale after slicing still divides
    # to_q evenly, and only this cross-check catches it.
    declared = getattr(module, "dim_head", None)
    if isinstance(declared, int) and declared * heads != q.out_features:
        raise ProfilingError(
            where(path, f"expected to_q.out_features == heads * dim_head == {heads} * {declared}, found {q.out_features}")
        )
    for name, lin in (("to_k", k), ("to_v", v)):
        if lin.out_features != q.out_features:
            raise ProfilingError(
                where(
                    path,
                    f"expected {name}.out_features == to_q.out_features == {q.out_features}, found {lin.out_features}"
                    " (grouped key/value heads are not supported)",
                )
            )
    if out.in_features != q.out_features:
        raise ProfilingError(
            where(path, f"expected to_out[0].in_features == {q.out_features}, found {out.in_features}")
        )
    return AttentionSite(
        path=path,
        kind=_kind(path, module),
        heads=heads,
        dim_head=dim_head,
        query_dim=q.in_features,
        context_dim=k.in_features,
        out_dim=out.out_features,
    )


def iter_attention(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(path, module)`` for every attention module, in ``named_modules`` order."""
    for name, module in model.named_modules():
        if name and is_attention(module):
            yield name, module


def find_attention(model: nn.Module) -> list[AttentionSite]:
    """List every attention module of ``model`` with its head layout.

    Paths are the stable dotted names of ``named_modules()``, so they can be
    stored in a manifest and resolved again with ``model.get_submodule``.

    >>> from diffusers.models.attention_processor import Attention  # doctest: +SKIP
    >>> find_attention(nn.ModuleDict({"a": Attention(32, heads=4, dim_head=8)}))  # doctest: +SKIP
    [AttentionSite(path='a', kind='self', heads=4, dim_head=8, query_dim=32, context_dim=32, out_dim=32)]
    """
    return [describe(name, module) for name, module in iter_attention(model)]


@dataclass(frozen=True)
class BlockLayout:
    """Where a UNet's down, middle and up blocks are, in the order its forward runs them."""

    kind: str  # "diffusers" or "comfy"
    down: tuple[str, ...]
    mid: str
    up: tuple[str, ...]

    def deep(self, shallow: int) -> list[str]:
        """Paths of the blocks a reuse step replays: all but ``shallow`` down and up blocks at the outside.

        >>> BlockLayout("diffusers", ("d0", "d1"), "m", ("u0", "u1")).deep(1)
        ['d1', 'm', 'u0']
        """
        if not 1 <= shallow <= min(len(self.down), len(self.up)) - 1:
            raise FragmentError(f"step reuse: expected 1 <= shallow <= {min(len(self.down), len(self.up)) - 1} "
                                f"for this {self.kind} UNet, found {shallow}")
        return [*self.down[shallow:], self.mid, *self.up[: len(self.up) - shallow]]

    def cache_point(self, shallow: int) -> str:
        """The deep block whose output enters the shallow up path: what profiling watches change per step.

        >>> BlockLayout("comfy", ("i0", "i1", "i2"), "m", ("o0", "o1", "o2")).cache_point(1)
        'o1'
        """
        self.deep(shallow)  # validates shallow
        return self.up[len(self.up) - shallow - 1]


def block_layout(model: nn.Module) -> BlockLayout:
    """The block layout of a diffusers or ComfyUI UNet.

    >>> import torch.nn as nn
    >>> toy = nn.Module(); toy.down_blocks = nn.ModuleList([nn.Identity()] * 2)
    >>> toy.mid_block = nn.Identity(); toy.up_blocks = nn.ModuleList([nn.Identity()] * 2)
    >>> block_layout(toy).up
    ('up_blocks.0', 'up_blocks.1')
    """
    names = dict(model.named_children())
    if {"down_blocks", "mid_block", "up_blocks"} <= names.keys():
        return BlockLayout("diffusers", tuple(f"down_blocks.{i}" for i in range(len(model.down_blocks))), "mid_block",
                           tuple(f"up_blocks.{i}" for i in range(len(model.up_blocks))))
    if {"input_blocks", "middle_block", "output_blocks"} <= names.keys():
        return BlockLayout("comfy", tuple(f"input_blocks.{i}" for i in range(len(model.input_blocks))), "middle_block",
                           tuple(f"output_blocks.{i}" for i in range(len(model.output_blocks))))
    raise FragmentError(f"step reuse: {type(model).__name__} has neither down_blocks/mid_block/up_blocks (diffusers) "
                        "nor input_blocks/middle_block/output_blocks (ComfyUI)")
