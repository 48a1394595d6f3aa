"""Module-tree edits every lever shares: copies that leave the original untouched, and swapping copies in.

Nothing here writes into an existing tensor.  Weights may be read-only mmaps
(safetensors) or shared with a ComfyUI ``ModelPatcher``; a changed module is a
fresh copy of the same class, a changed weight a new tensor.
"""
from __future__ import annotations

import types
from collections import OrderedDict
from typing import Mapping

import torch
import torch.nn as nn

from ...errors import BaseModelMismatchError, PruningError, where

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

    A ``forward`` set on the instance (tools such as DeepCache patch and later "restore" forwards that way)
    would still be bound to the original, so the copy would silently run the original module: a forward
    bound to the module itself is rebound to the copy; any other instance-level forward is refused.

    >>> lin = nn.Linear(2, 2); c = fresh_copy(lin)
    >>> c.weight is lin.weight, c is lin
    (True, False)
    >>> lin.forward = lin.forward; fresh_copy(lin).forward.__self__ is lin
    False
    """
    new = object.__new__(type(module))
    new.__dict__ = module.__dict__.copy()
    for name in ("_parameters", "_buffers", "_modules"):
        new.__dict__[name] = OrderedDict(module.__dict__[name])
    for name in _RUNTIME_HOOK_DICTS:
        if name in new.__dict__:
            new.__dict__[name] = OrderedDict()
    patched = module.__dict__.get("forward")
    if patched is not None:
        if isinstance(patched, types.MethodType) and patched.__self__ is module:
            new.__dict__["forward"] = types.MethodType(patched.__func__, new)
        else:
            raise PruningError(
                f"{type(module).__name__}: its forward is patched on the instance by another tool "
                f"({getattr(patched, '__qualname__', type(patched).__name__)}); a copy would still run the original "
                "module: remove that patch (e.g. DeepCacheSDHelper.disable()) before building or applying a fragment")
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


def module_at(model: nn.Module, replacements: Mapping[str, nn.Module], path: str) -> nn.Module:
    """The module at ``path`` as it is after ``replacements`` (which may hold it or one of its parents).

    >>> seq = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    >>> module_at(seq, {"1": nn.Tanh()}, "1")
    Tanh()
    """
    for root, module in replacements.items():
        if path == root:
            return module
        if path.startswith(root + "."):
            try:
                return module.get_submodule(path[len(root) + 1 :])
            except AttributeError:  # a path under a pruned copy that lacks that child (issue #29)
                raise BaseModelMismatchError(f"{path}: no such module in {type(module).__name__} at {root}") from None
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise BaseModelMismatchError(f"{path}: no such module in {type(model).__name__}") from None


def install(replacements: dict[str, nn.Module], modules: Mapping[str, nn.Module]) -> None:
    """Put each module at its path in ``replacements``, inside an existing replacement when one owns the path.

    No patch may sit inside another (ComfyUI restores object patches in an order that would undo the inner
    one), so a module under a replaced parent goes into that parent's copy; one copy per owner, however
    many modules land in it.

    >>> reps = {"0": nn.Sequential(nn.Linear(2, 2), nn.ReLU())}
    >>> install(reps, {"0.1": nn.Tanh(), "1": nn.Identity()})
    >>> sorted(reps), type(reps["0"][1]).__name__
    (['0', '1'], 'Tanh')
    """
    grouped: dict[str, dict[str, nn.Module]] = {}
    for path, module in modules.items():
        owner = next((p for p in replacements if path.startswith(p + ".")), "")
        grouped.setdefault(owner, {})[path[len(owner) + 1 :] if owner else path] = module
    for owner, subs in grouped.items():
        if owner:
            replacements[owner] = replace_modules(replacements[owner], subs)
        else:
            replacements.update(subs)
