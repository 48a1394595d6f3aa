"""SHA-256 of files and of in-memory weights, streamed so multi-GB checkpoints never sit in RAM twice."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from ...errors import IntegrityError

CHUNK = 1 << 20  # 1 MiB: large enough for disk throughput, small enough to never matter for memory

# (path, size, mtime_ns) -> digest: re-hashing a 7 GB checkpoint on every queue costs seconds.
_FILE_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike, *, use_cache: bool = True) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks.

    >>> p = Path(__import__("tempfile").mkdtemp()) / "x"; _ = p.write_bytes(b"abc")
    >>> sha256_file(p)[:12]
    'ba7816bf8f01'
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise IntegrityError(f"{path}: cannot read file to hash it: {exc}") from exc
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if use_cache and key in _FILE_CACHE:
        return _FILE_CACHE[key]
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    result = digest.hexdigest()
    _FILE_CACHE[key] = result
    return result


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    # uint8 view first: numpy has no bfloat16, and this never copies a contiguous CPU tensor.
    flat = t.detach().contiguous().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return memoryview(flat.view(torch.uint8).numpy())


def sha256_state_dict(
    weights: nn.Module | Mapping[str, torch.Tensor], *, as_dtype: torch.dtype | None = torch.float16
) -> str:
    """Hex SHA-256 over every tensor's name, shape and bytes, in sorted name order.

    Floating tensors are hashed as ``as_dtype`` (fp16 by default): ComfyUI loads
    the same checkpoint as fp32 on a CPU and fp16 on a GPU, and a fragment made
    on one machine must still verify on the other.  Casting is exact for fp16
    checkpoints and deterministic for fp32 ones.  Pass ``as_dtype=None`` to hash
    the stored bytes and dtypes as they are.  Tensors are hashed one at a time,
    so the memory cost is one tensor, never the whole model.

    >>> sha256_state_dict({"w": torch.zeros(2)}) == sha256_state_dict({"w": torch.zeros(2, dtype=torch.float16)})
    True
    """
    sd = weights.state_dict() if isinstance(weights, nn.Module) else weights
    digest = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name]
        if as_dtype is not None and t.is_floating_point():
            t = t.to(as_dtype)
        digest.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        if t.device.type != "meta":
            digest.update(_tensor_bytes(t))
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """SHA-256 of canonical JSON (sorted keys, no spaces), for manifest self-checks.

    >>> sha256_json({"b": 1, "a": 2}) == sha256_json({"a": 2, "b": 1})
    True
    """
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
