"""Plan how a fragment goes onto a shared model: verified, conflict-checked, with its true size.

Hosts such as ComfyUI install the returned modules as object patches on a
clone, so the shared model is never changed; this module decides what to
install and how many bytes that saves, and nothing else.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn

from .build import fragment_replacements
from .compat import check_attention_replacements, check_weight_patches
from .format.hashing import sha256_state_dict
from .format.manifest import Fragment

log = logging.getLogger(__name__)

# Hashing a UNet takes seconds; its weights do not change while it is loaded, so remember per module.
_HASHES: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def module_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers.

    >>> module_bytes(torch.nn.Linear(2, 3))  # 6 weights + 3 biases, float32
    36
    """
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def base_sha256(model: nn.Module, originals: Mapping[str, torch.Tensor] | None = None) -> str:
    """The fp16-canonical weight hash of ``model`` (cached per module object).

    ``originals`` maps state-dict keys to the unpatched tensors for weights a
    host has patched in place (ComfyUI keeps them in ``ModelPatcher.backup``),
    so a LoRA currently merged into the loaded weights does not change the hash.
    """
    cached = _HASHES.get(model)
    if cached is not None and not originals:
        return cached
    state = model.state_dict()
    if originals:
        state = {**state, **{k: v for k, v in originals.items() if k in state}}
    digest = sha256_state_dict(state)
    if not originals:
        _HASHES[model] = digest
    return digest


@dataclass
class PatchPlan:
    """Modules to install by path, and what they change in the model's size."""

    replacements: dict[str, nn.Module]
    bytes_before: int
    bytes_after: int

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after


def plan_patches(
    model: nn.Module,
    fragment: Fragment,
    *,
    verify_hash: bool = True,
    base_digest: str | None = None,
    originals: Mapping[str, torch.Tensor] | None = None,
    weight_patch_keys: Iterable[str] = (),
    transformer_options: Mapping[str, Any] | None = None,
    key_prefix: str = "",
) -> PatchPlan:
    """Check the fragment against ``model`` and its host's patches, then build the replacement modules.

    Raises ``BaseModelMismatchError`` for a different base, ``FragmentError``
    for LoRA patches on pruned weights or attn2 replacement patches.

    >>> plan = plan_patches(unet, load_fragment("dog.json"))  # doctest: +SKIP
    >>> plan.bytes_saved > 0  # doctest: +SKIP
    True
    """
    check_weight_patches(weight_patch_keys, fragment.manifest, key_prefix)
    check_attention_replacements(transformer_options or {}, fragment.manifest)
    if not verify_hash:
        digest = None
    else:  # a caller that already hashed the model (auto mode) passes it: hashing SDXL takes seconds
        digest = base_digest if base_digest is not None else base_sha256(model, originals)
    replacements = fragment_replacements(model, fragment, base_sha256=digest)
    before = sum(module_bytes(model.get_submodule(p)) for p in replacements)
    after = sum(module_bytes(m) for m in replacements.values())
    return PatchPlan(replacements=replacements, bytes_before=before, bytes_after=after)
