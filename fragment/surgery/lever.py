"""The one protocol every lever follows.

A lever is *planned* (``plan``: from scores and the settings), then *built* on a
model: it adds its replacement modules to those of the levers built before it
(``tree.install``) and returns the tensors a fragment stores plus the manifest
record that describes them.  From a stored record, the lever's class *applies*
it again to a base model, *checks* the tensors it promises, and names the base
*weight keys* it removes or changes (a LoRA patch on one of those would be
dropped silently by ComfyUI).

``fragment.build`` is the only place levers are combined, in the order of
``build.LEVERS``: heads, K/V fold, feed-forward, low rank, low-bit weights,
precision (fold after pruning: only kept heads' K/V are stored; quantize last:
it stores the weights the other levers left; low bits before precision, which
leaves the low-bit layers alone: one weight, one storage format).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Protocol

import torch
import torch.nn as nn

from ...errors import IntegrityError
from .selection import validate_plan


@dataclass
class Built:
    """What building one lever adds to a fragment: tensors to store and its manifest record."""

    tensors: dict[str, torch.Tensor]
    record: Any


class Lever(Protocol):
    """A planned lever (the instance) and the reader of its stored record (the class methods).

    ``kind`` names the record: ``"heads"`` is the manifest's ``pruning`` block, every other kind a key of
    its ``compression`` block (schema v1).  ``built`` holds the records of the levers built before;
    ``source`` (e.g. ``"fragment 'dog'"``) names what is applied in error messages.

    Planning is each class's own constructor or ``plan`` classmethod, because the inputs differ: scores for
    heads and feed-forward channels, the context rows for the K/V fold, energies for low rank, a format and
    share for precision (``extract.plan_levers`` maps the settings onto them).
    """

    kind: ClassVar[str]

    def build(self, model: nn.Module, replacements: dict[str, nn.Module], built: Mapping[str, Any]) -> Built: ...

    @classmethod
    def record_in(cls, manifest: Mapping[str, Any]) -> Any | None: ...

    @classmethod
    def apply(cls, model: nn.Module, record: Any, tensors: Mapping[str, torch.Tensor],
              replacements: dict[str, nn.Module], source: str = "fragment") -> None: ...

    @classmethod
    def check(cls, record: Any, tensors: Mapping[str, torch.Tensor], source: str) -> set[str]: ...

    @classmethod
    def weight_keys(cls, record: Any, prefix: str = "") -> set[str]: ...


class InCompression:
    """Mixin for levers whose record is ``compression.<kind>`` (every lever but heads and low rank)."""

    kind: ClassVar[str]

    @classmethod
    def record_in(cls, manifest: Mapping[str, Any]) -> Any | None:
        return compression_record(manifest, cls.kind)


def compression_record(manifest: Mapping[str, Any], kind: str) -> Any | None:
    """A lever's record in the ``compression`` block, or ``None`` when the lever is off.

    >>> compression_record({"compression": {"kv_fold": {"rows": 2}}}, "kv_fold")
    {'rows': 2}
    >>> compression_record({"compression": {"quantization": {"applied": False}}}, "quantization") is None
    True
    """
    record = (manifest.get("compression") or {}).get(kind)
    if not record or (isinstance(record, Mapping) and record.get("applied") is False):
        return None
    return record


def tensor(tensors: Mapping[str, torch.Tensor], key: str, what: str, source: str) -> torch.Tensor:
    """``tensors[key]``, or an ``IntegrityError`` naming the file, the key and what needed it.

    >>> tensor({"a": torch.zeros(1)}, "a", "x", "f.safetensors").shape
    torch.Size([1])
    """
    t = tensors.get(key)
    if t is None:
        raise IntegrityError(f"{source}: missing tensor {key!r} for {what}")
    return t


def index_tensor(tensors: Mapping[str, torch.Tensor], key: str, what: str, source: str, *, path: str, size: int) -> list[int]:
    """A stored index list (kept heads or channels): 1-D int64, sorted, distinct, each below ``size``.

    >>> index_tensor({"k": torch.tensor([0, 2])}, "k", "module a", "f.safetensors", path="a", size=4)
    [0, 2]
    """
    t = tensor(tensors, key, what, source)
    if t.dtype != torch.int64 or t.ndim != 1:
        raise IntegrityError(f"{source}: {key}: expected a 1-D int64 tensor, found {t.dtype} with shape {list(t.shape)}")
    values = t.tolist()
    validate_plan({path: values}, {path: size}, source=source)
    return values
