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

from collections import OrderedDict
from typing import Mapping, Sequence

import torch
import torch.nn as nn

from ..profiling.discovery import describe, iter_attention
from .errors import PruningError, where
from .selection import validate_plan

# Per-instance runtime hooks (e.g. a profiler's) belong to the original, not to a copy.
_RUNTIME_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def fresh_copy(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` of the same class that can be changed without touching the original.

    Parameters and children are shared until replaced; the containers that
    hold them are new, and runtime hooks are not carried over.

    >>> lin = nn.Linear(2, 2); c = fresh_copy(lin)
    >>> c.weight is lin.weight, c is lin
    (True, False)
    """
    new = object.__new__(type(module))
    new.__dict__ = module.__dict__.copy()
    for name in ("_parameters", "_buffers", "_modules"):
        new.__dict__[name] = OrderedDict(module.__dict__[name])
    for name in _RUNTIME_HOOK_DICTS:
        if name in new.__dict__:
            new.__dict__[name] = OrderedDict()
    return new


def linear_like(template: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A Linear of ``template``'s exact class (e.g. a ``comfy.ops`` Linear) holding new ``weight``/``bias``.

    >>> lin = linear_like(nn.Linear(4, 3), torch.zeros(2, 4), None)
    >>> (lin.in_features, lin.out_features, lin.bias)
    (4, 2, None)
    """
    new = fresh_copy(template)
    grad = template.weight.requires_grad
    new._parameters["weight"] = nn.Parameter(weight, requires_grad=grad)
    new._parameters["bias"] = None if bias is None else nn.Parameter(bias, requires_grad=grad)
    new.out_features, new.in_features = int(weight.shape[0]), int(weight.shape[1])
    return new


def slice_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """Copy of ``lin`` keeping output ``rows`` and input ``cols`` (index tensors), bias sliced by rows.

    >>> lin = nn.Linear(3, 4)
    >>> slice_linear(lin, rows=torch.tensor([0, 2])).weight.shape
    torch.Size([2, 3])
    """
    weight, bias = lin.weight, lin.bias
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
        bias = None if bias is None else bias.index_select(0, rows.to(bias.device))
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    # An unsliced bias stays shared with the original: it is read, never written.
    return linear_like(lin, weight.detach(), None if bias is None else bias.detach())


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


def replace_modules(model: nn.Module, replacements: Mapping[str, nn.Module]) -> nn.Module:
    """A new model in which each path is replaced; the input model is left exactly as it was.

    Only the modules on the way from the root to a replaced path are copied
    (shallowly); everything else, weights included, is shared with ``model``.
    Parents are replaced before children, so a replacement inside another
    replacement (a low-rank ``to_out.0`` inside a pruned attention) works.

    >>> seq = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    >>> new = replace_modules(seq, {"1": nn.Identity()})
    >>> type(new[1]).__name__, type(seq[1]).__name__, new[0] is seq[0]
    ('Identity', 'ReLU', True)
    """
    root = fresh_copy(model)
    for path in sorted(replacements, key=lambda p: p.count(".")):
        parent = root
        parts = path.split(".")
        for name in parts[:-1]:
            child = parent._modules.get(name)
            if child is None:
                raise PruningError(where(path, f"no submodule {name!r} in {type(parent).__name__}"))
            child = fresh_copy(child)
            parent._modules[name] = child
            parent = child
        if parts[-1] not in parent._modules:
            raise PruningError(where(path, f"no submodule {parts[-1]!r} in {type(parent).__name__}"))
        parent._modules[parts[-1]] = replacements[path]
    return root


def prune_heads(model: nn.Module, plan: Mapping[str, Sequence[int]]) -> nn.Module:
    """A head-pruned model built from ``model`` and a plan of kept head indices.

    >>> small = prune_heads(unet, selection.kept)  # doctest: +SKIP
    >>> sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in unet.parameters())  # doctest: +SKIP
    True
    """
    return replace_modules(model, build_head_replacements(model, plan))
