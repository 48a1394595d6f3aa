"""What identifies a cached fragment: base model, prompt embedding and extraction parameters.

The library (``index.py``) keys every entry by a *fingerprint*::

    key = sha256(json([base_sha256, embedding_sha256, params_sha256]))[:32]

and, for paraphrase reuse (hypothesis H3), compares prompt embeddings by
cosine similarity.  The embedding is taken from the model's own text encoder;
in ComfyUI that is the positive ``CONDITIONING``: a list of
``[cond, extras]`` pairs where ``cond`` is ``[batch, tokens, channels]``
(``[1, 77, 768]`` for SD1.5, ``[1, 77, 2048]`` for SDXL; longer prompts are
multiples of 77 tokens).

Pooling (``pool_conditioning``): the mean over every token of every
conditioning entry and batch row, in float32, then L2-normalised.  Every
token is used, padding included: CLIP's causal attention makes the padding
tokens' states depend on the whole prompt, and skipping them would need the
token mask, which CONDITIONING does not carry.  SDXL's ``pooled_output`` is
ignored on purpose so that SD1.5 and SDXL are pooled the same way.

The embedding hash rounds the normalised vector to float16 first, so tiny
CPU/GPU differences usually still give the same exact key; when they do not,
the cosine stage of the lookup finds the entry anyway (similarity ~1.0).
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Mapping, Sequence

import torch

from ...errors import FragmentError

KEY_CHARS = 32  # 128 bits: collisions are not a concern for a per-user cache


def pool_conditioning(conditioning: Any) -> torch.Tensor:
    """Mean-pool a text-encoder output (or a ComfyUI CONDITIONING list) to one unit-length float32 vector.

    Accepts a tensor ``[tokens, C]`` or ``[B, tokens, C]``, or ComfyUI's
    ``[[cond, {...}], ...]``; the result has shape ``[C]`` and norm 1.

    >>> v = pool_conditioning(torch.ones(1, 77, 4))
    >>> v.tolist()
    [0.5, 0.5, 0.5, 0.5]
    >>> pool_conditioning([[torch.ones(1, 3, 2), {"pooled_output": None}]]).shape
    torch.Size([2])
    """
    tensors: list[torch.Tensor] = []
    if isinstance(conditioning, torch.Tensor):
        tensors = [conditioning]
    elif isinstance(conditioning, (list, tuple)):
        for item in conditioning:
            cond = item[0] if isinstance(item, (list, tuple)) and item else item
            if not isinstance(cond, torch.Tensor):
                raise FragmentError(f"conditioning: expected [tensor, dict] pairs, found {type(cond).__name__}")
            tensors.append(cond)
    if not tensors:
        raise FragmentError(f"conditioning: expected a tensor or a CONDITIONING list, found {type(conditioning).__name__}")
    rows = []
    for t in tensors:
        if t.ndim not in (2, 3) or t.shape[-1] != tensors[0].shape[-1] or t.numel() == 0:
            raise FragmentError(
                f"conditioning: expected [tokens, C] or [batch, tokens, C] with one C, found shape {list(t.shape)}"
            )
        rows.append(t.detach().float().reshape(-1, t.shape[-1]).cpu())
    pooled = torch.cat(rows).mean(dim=0)
    return normalise(pooled)


def conditioning_identity(conditioning: Any) -> str:
    """A text identity for a prompt known only as CONDITIONING (what the prior keys a prompt's tries by, digested
    again there): a sha256 of each cond tensor's shape and bytes, as float32 on the CPU, in order.

    ComfyUI hands a node the encoder's output, not the text; the same text through the same encoder gives the
    same bytes, another text other bytes.  The pooled output and the other dict entries are left out.

    >>> a = conditioning_identity([[torch.ones(1, 3, 2), {"pooled_output": None}]])
    >>> a == conditioning_identity([[torch.ones(1, 3, 2), {}]]), a == conditioning_identity([[torch.zeros(1, 3, 2), {}]])
    (True, False)
    >>> a[:14]
    'conditioning:s'
    """
    items = conditioning if isinstance(conditioning, (list, tuple)) else [conditioning]
    h = hashlib.sha256()
    for item in items:
        cond = item[0] if isinstance(item, (list, tuple)) and item else item
        if not isinstance(cond, torch.Tensor):
            raise FragmentError(f"conditioning: expected [tensor, dict] pairs, found {type(cond).__name__}")
        t = cond.detach().float().cpu().contiguous()
        h.update(repr(tuple(t.shape)).encode("ascii"))
        h.update(t.numpy().tobytes())
    return f"conditioning:sha256:{h.hexdigest()}"


def normalise(vector: torch.Tensor) -> torch.Tensor:
    """A flat float32 copy of ``vector`` with unit L2 norm (zero vectors stay zero; NaNs are refused).

    >>> normalise(torch.tensor([3.0, 4.0])).tolist()
    [0.6000000238418579, 0.800000011920929]
    """
    v = vector.detach().float().reshape(-1).cpu()
    if not torch.isfinite(v).all():
        raise FragmentError("embedding: expected finite values, found NaN or infinity")
    norm = v.norm()
    return v / norm if norm > 0 else v.clone()


def embedding_sha256(embedding: torch.Tensor) -> str:
    """SHA-256 of the normalised embedding rounded to float16 (see the module note).

    >>> embedding_sha256(torch.tensor([1.0, 0.0])) == embedding_sha256(torch.tensor([2.0, 0.0]))
    True
    """
    v = normalise(embedding).to(torch.float16)
    digest = hashlib.sha256(json.dumps([list(v.shape)]).encode())
    digest.update(v.numpy().tobytes())
    return digest.hexdigest()


def params_sha256(params: Mapping[str, Any] | None) -> str:
    """SHA-256 of extraction parameters as canonical JSON (sorted keys; non-JSON values by ``str``).

    >>> params_sha256({"ratio": 0.3, "scope": "global"}) == params_sha256({"scope": "global", "ratio": 0.3})
    True
    """
    text = json.dumps(dict(params or {}), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def fingerprint(base_sha256: str, embedding: torch.Tensor, params: Mapping[str, Any] | None) -> str:
    """The library key: base hash + prompt-embedding hash + parameters hash, 32 hex characters.

    >>> k = fingerprint("ab" * 32, torch.ones(4), {"ratio": 0.3})
    >>> len(k), k == fingerprint("ab" * 32, 2 * torch.ones(4), {"ratio": 0.3})
    (32, True)
    """
    parts = [str(base_sha256), embedding_sha256(embedding), params_sha256(params)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:KEY_CHARS]


def cosine(a: torch.Tensor | Sequence[float], b: torch.Tensor | Sequence[float]) -> float:
    """Cosine similarity of two vectors; ``-1.0`` when their lengths differ or one is zero (never a match).

    >>> round(cosine([1.0, 0.0], [1.0, 1.0]), 4)
    0.7071
    >>> cosine([1.0, 0.0], [1.0, 0.0, 0.0])
    -1.0
    """
    x = torch.as_tensor(a, dtype=torch.float32).reshape(-1)
    y = torch.as_tensor(b, dtype=torch.float32).reshape(-1)
    if x.shape != y.shape:
        return -1.0
    denom = float(x.norm() * y.norm())
    if denom == 0.0 or not math.isfinite(denom):
        return -1.0
    return float(torch.dot(x, y)) / denom


def embedding_to_bytes(embedding: torch.Tensor) -> bytes:
    """The normalised embedding as little-endian float32 bytes, for the index.

    >>> len(embedding_to_bytes(torch.ones(3)))
    12
    """
    return normalise(embedding).numpy().astype("<f4").tobytes()


def embedding_from_bytes(blob: bytes) -> torch.Tensor:
    """Inverse of ``embedding_to_bytes``; refuses a blob that is not whole float32 values.

    >>> embedding_from_bytes(embedding_to_bytes(torch.tensor([0.0, 2.0]))).tolist()
    [0.0, 1.0]
    """
    if not isinstance(blob, (bytes, bytearray, memoryview)) or len(blob) % 4:
        raise FragmentError(f"embedding: expected float32 bytes, found {len(blob) if hasattr(blob, '__len__') else blob!r}")
    import numpy as np

    return torch.from_numpy(np.frombuffer(bytes(blob), dtype="<f4").copy())
