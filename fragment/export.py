"""Standalone export: a pruned UNet as one ordinary safetensors state dict.

For tools that cannot apply a fragment (plain diffusers scripts, other UIs).
The head count of every pruned module is written into the file's metadata,
because nothing else in a state dict says that a 320-wide ``to_q`` now holds
5 heads of 64 rather than 8 of 40.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .build import apply_fragment
from .format.manifest import Fragment


def export_pruned_state_dict(model: nn.Module, fragment: Fragment, *, base_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The full state dict of the fragment model (pruned weights included, nothing shared with ``model`` changed).

    >>> sd = export_pruned_state_dict(unet, frag)  # doctest: +SKIP
    >>> sd["mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight"].shape  # doctest: +SKIP
    torch.Size([960, 1280])
    """
    return apply_fragment(model, fragment, base_sha256=base_sha256).state_dict()


def save_pruned_state_dict(
    path: str | os.PathLike, model: nn.Module, fragment: Fragment, *, base_sha256: str | None = None
) -> Path:
    """Write the pruned UNet state dict to ``path`` (safetensors), head counts in its metadata.

    >>> save_pruned_state_dict("dog_unet.safetensors", unet, frag)  # doctest: +SKIP
    PosixPath('dog_unet.safetensors')
    """
    path = Path(path)
    state = export_pruned_state_dict(model, fragment, base_sha256=base_sha256)
    # safetensors refuses tensors that share memory; the export is a file, so give each its own.
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    heads = {p: len(e["kept"]) for p, e in fragment.manifest["pruning"]["modules"].items()}
    metadata = {
        "prompt_fragments.fragment": fragment.name,
        "prompt_fragments.base_sha256": str(fragment.manifest["base_model"].get("sha256")),
        "prompt_fragments.heads": json.dumps(heads, sort_keys=True),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
