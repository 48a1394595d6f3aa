"""Find attention modules in any ``nn.Module`` by their structure.

ComfyUI's ``CrossAttention`` and diffusers' ``Attention`` share one shape:
Linear ``to_q``/``to_k``/``to_v``, ``to_out[0]`` a Linear, and an integer
``heads``.  Matching on that shape rather than on class names keeps the pack
working across ComfyUI versions, diffusers versions and custom UNets that copy
either design.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Iterator

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
    """Where a UNet's down, middle and up blocks are, in the order its forward runs them.

    ``down_units`` and ``up_units`` cut the same path finer, at its skip
    connections: a down unit is one producer of a skip (the stem, a resnet with
    its attention, a downsampler) and an up unit one consumer (a resnet with its
    attention, and the upsampler after the block's last).  In ComfyUI's UNet the
    units are its blocks; in diffusers' they are paths inside the blocks.  Both
    hosts of one architecture get the same units, so a reuse depth counted in
    skips (DeepCache's "branch") means the same on both.
    """

    kind: str  # "diffusers" or "comfy"
    down: tuple[str, ...]
    mid: str
    up: tuple[str, ...]
    down_units: tuple[tuple[str, ...], ...] = ()
    up_units: tuple[tuple[str, ...], ...] = ()

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

    @property
    def max_skips(self) -> int:
        """The largest reuse depth in skips (0: this layout has no units, so only block depths work)."""
        return max(0, min(len(self.down_units), len(self.up_units)) - 1)

    def replay_units(self, skips: int) -> list[tuple[str, ...]]:
        """The units a reuse step at depth ``skips`` replays, the middle block among them, in forward order.

        >>> lay = BlockLayout("comfy", ("i0", "i1", "i2"), "m", ("o0", "o1", "o2"),
        ...                   (("i0",), ("i1",), ("i2",)), (("o0",), ("o1",), ("o2",)))
        >>> lay.replay_units(1)
        [('i1',), ('i2',), ('m',), ('o0',), ('o1',)]
        """
        if not self.max_skips:
            raise FragmentError(f"step reuse: this {self.kind} UNet has no skip units to cut at (a block without "
                                f"resnets, or not one consumer per skip); found skips={skips}, expected none")
        if not 1 <= skips <= self.max_skips:
            raise FragmentError(f"step reuse: expected 1 <= skips <= {self.max_skips} for this {self.kind} UNet "
                                f"({len(self.down_units)} skip producers, {len(self.up_units)} consumers), found {skips}")
        return [*self.down_units[skips:], (self.mid,), *self.up_units[: len(self.up_units) - skips]]

    def replay_paths(self, skips: int) -> list[str]:
        """Module paths a reuse step at depth ``skips`` replays: a whole block where all its units replay.

        The ``skips`` outermost skip connections stay computed: the stem and the
        first ``skips - 1`` down units, and the ``skips`` last up units that
        consume them.  ``skips=1`` is DeepCache's branch 0: all but the stem and
        the last up layer replay.

        >>> lay = BlockLayout("diffusers", ("d0",), "m", ("u0",), (("conv_in",), ("d0.r0",), ("d0.s",)),
        ...                   (("u0.r0",), ("u0.r1",), ("u0.r2",)))
        >>> lay.replay_paths(1), lay.replay_paths(2)
        (['d0', 'm', 'u0.r0', 'u0.r1'], ['d0.s', 'm', 'u0.r0'])
        """
        deep = {path for unit in self.replay_units(skips) for path in unit}
        paths: list[str] = []
        for block in (*self.down, self.mid, *self.up):
            inner = [p for unit in (*self.down_units, *self.up_units) for p in unit if p.startswith(block + ".")]
            if block in deep or (inner and all(p in deep for p in inner)):
                paths.append(block)
            else:
                paths.extend(p for p in inner if p in deep)
        return paths

    def skips_for_shallow(self, shallow: int) -> int | None:
        """The depth in skips that replays what the block depth ``shallow`` replays (``None``: no units).

        The outputs are the same; the skips cut also leaves out the last kept
        level's downsampler, whose output only replayed blocks read.

        >>> lay = BlockLayout("diffusers", ("d0", "d1"), "m", ("u0", "u1"), (("conv_in",), ("d0.r0",),
        ...                   ("d0.downsamplers.0",), ("d1.r0",)), (("u0.r0",), ("u0.r1",), ("u1.r0",), ("u1.r1",)))
        >>> lay.skips_for_shallow(1)
        2
        """
        self.deep(shallow)  # validates shallow
        if not self.max_skips:
            return None
        if self.kind == "comfy":
            return shallow
        deep = tuple(f"{block}." for block in self.down[shallow:])
        kept = [unit for unit in self.down_units if not unit[0].startswith(deep)]
        return len(kept) - (1 if ".downsamplers." in kept[-1][0] else 0)

    def skips_cache_point(self, skips: int) -> str:
        """The module whose output enters the first computed up unit at depth ``skips`` (for the step-change probe).

        >>> lay = BlockLayout("comfy", ("i0", "i1", "i2"), "m", ("o0", "o1", "o2"),
        ...                   (("i0",), ("i1",), ("i2",)), (("o0",), ("o1",), ("o2",)))
        >>> lay.skips_cache_point(1)
        'o1'
        """
        return self.replay_units(skips)[-1][-1]


def _diffusers_units(model: nn.Module) -> tuple[tuple[tuple[str, ...], ...], tuple[tuple[str, ...], ...]]:
    """Skip producers and consumers of a diffusers UNet, or empty when a block has no ``resnets`` to cut at."""
    down: list[tuple[str, ...]] = [("conv_in",)]
    up: list[tuple[str, ...]] = []
    for side, blocks, out in (("down_blocks", model.down_blocks, down), ("up_blocks", model.up_blocks, up)):
        for i, block in enumerate(blocks):
            resnets = getattr(block, "resnets", None)
            if not isinstance(resnets, nn.ModuleList) or not len(resnets):
                return (), ()
            attentions = getattr(block, "attentions", None) or []
            for j in range(len(resnets)):
                unit = (f"{side}.{i}.resnets.{j}",) + ((f"{side}.{i}.attentions.{j}",) if j < len(attentions) else ())
                out.append(unit)
            samplers = getattr(block, "downsamplers" if side == "down_blocks" else "upsamplers", None) or []
            paths = tuple(f"{side}.{i}.{'downsamplers' if side == 'down_blocks' else 'upsamplers'}.{k}"
                          for k in range(len(samplers)))
            if paths and side == "down_blocks":
                out.append(paths)  # a downsampler's output is a skip of its own
            elif paths:
                out[-1] = out[-1] + paths  # the upsampler runs after the block's last consumer, in the same step
    if not isinstance(getattr(model, "conv_in", None), nn.Module) or len(down) != len(up):
        return (), ()  # not the SD skip pattern (one consumer per producer): no finer cut is safe to offer
    return tuple(down), tuple(up)


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
                           tuple(f"up_blocks.{i}" for i in range(len(model.up_blocks))), *_diffusers_units(model))
    if {"input_blocks", "middle_block", "output_blocks"} <= names.keys():
        down = tuple(f"input_blocks.{i}" for i in range(len(model.input_blocks)))
        up = tuple(f"output_blocks.{i}" for i in range(len(model.output_blocks)))
        return BlockLayout("comfy", down, "middle_block", up, tuple((p,) for p in down), tuple((p,) for p in up))
    raise FragmentError(f"step reuse: {type(model).__name__} has neither down_blocks/mid_block/up_blocks (diffusers) "
                        "nor input_blocks/middle_block/output_blocks (ComfyUI)")


def _key_tree(keys: Iterable[str]) -> dict:
    """Parameter names as nested dicts of their dotted parts (``a.0.w`` -> ``{"a": {"0": {"w": {}}}}``)."""
    tree: dict = {}
    for key in keys:
        node = tree
        for part in key.split("."):
            node = node.setdefault(part, {})
    return tree


def _list_len(node: dict | None) -> int:
    """A ModuleList's length as its weights show it: one past the highest index that holds a parameter."""
    return 1 + max((int(k) for k in (node or {}) if k.isdigit()), default=-1)


def block_layout_of_keys(keys: Iterable[str]) -> BlockLayout:
    """``block_layout`` of the UNet whose state-dict names are ``keys``, without building it: what a loaded
    model's layout would be, read from a checkpoint's header (names relative to the UNet).

    The units are counted the way ``block_layout`` counts them (a list's length is one past its highest index
    holding a weight; a parameter-free child leaves no key, which no SD block has), so a reuse depth refused
    here is the one the loader refuses.

    >>> block_layout_of_keys(["input_blocks.0.0.weight", "input_blocks.1.0.weight", "middle_block.0.weight",
    ...                       "output_blocks.0.0.weight", "output_blocks.1.0.weight"]).max_skips
    1
    """
    tree = _key_tree(keys)
    if {"down_blocks", "mid_block", "up_blocks"} <= tree.keys():
        n_down, n_up = _list_len(tree["down_blocks"]), _list_len(tree["up_blocks"])
        down = tuple(f"down_blocks.{i}" for i in range(n_down))
        up = tuple(f"up_blocks.{i}" for i in range(n_up))
        return BlockLayout("diffusers", down, "mid_block", up, *_diffusers_units_of_keys(tree, n_down, n_up))
    if {"input_blocks", "middle_block", "output_blocks"} <= tree.keys():
        down = tuple(f"input_blocks.{i}" for i in range(_list_len(tree["input_blocks"])))
        up = tuple(f"output_blocks.{i}" for i in range(_list_len(tree["output_blocks"])))
        return BlockLayout("comfy", down, "middle_block", up, tuple((p,) for p in down), tuple((p,) for p in up))
    raise FragmentError("step reuse: the checkpoint has neither down_blocks/mid_block/up_blocks (diffusers) "
                        "nor input_blocks/middle_block/output_blocks (ComfyUI) weights")


def _diffusers_units_of_keys(tree: dict, n_down: int,
                             n_up: int) -> tuple[tuple[tuple[str, ...], ...], tuple[tuple[str, ...], ...]]:
    """``_diffusers_units`` from weight names: the same producers and consumers, or empty where it gives none."""
    down: list[tuple[str, ...]] = [("conv_in",)]
    up: list[tuple[str, ...]] = []
    for side, count, out in (("down_blocks", n_down, down), ("up_blocks", n_up, up)):
        sampler = "downsamplers" if side == "down_blocks" else "upsamplers"
        for i in range(count):
            block = tree[side].get(str(i), {})
            resnets = _list_len(block.get("resnets"))
            if not resnets:
                return (), ()
            attentions = _list_len(block.get("attentions"))
            for j in range(resnets):
                out.append((f"{side}.{i}.resnets.{j}",) + ((f"{side}.{i}.attentions.{j}",) if j < attentions else ()))
            paths = tuple(f"{side}.{i}.{sampler}.{k}" for k in range(_list_len(block.get(sampler))))
            if paths and side == "down_blocks":
                out.append(paths)
            elif paths:
                out[-1] = out[-1] + paths
    if "conv_in" not in tree or len(down) != len(up):
        return (), ()
    return tuple(down), tuple(up)
