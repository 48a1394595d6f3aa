"""GGUF Q8_0 / Q4_0 weights for the equal-bytes bench: gguf's own numpy quantizers, a torch dequantizer.

The packed blocks are exactly what ``gguf.quants.quantize`` writes (``Q8_0``:
an fp16 scale and 32 int8 values, 34 bytes per 32 weights; ``Q4_0``: an fp16
scale and 32 4-bit values, 18 bytes per 32 weights) and stay resident as one
``uint8`` tensor, so the bytes counted are the bytes a GGUF loader keeps.
``forward`` dequantizes them in torch on every call, as ComfyUI-GGUF does, so
the seconds per image include that cost rather than a pre-expanded weight's.

GGUF blocks run along a weight's last dimension.  A Linear's rows are its
``in_features``; a convolution's are its flattened ``in/groups * kh * kw``
(the layout of ``weight.reshape(out, -1)``).  Rows whose length is not a
multiple of 32 are zero-padded to one before quantizing (a zero block costs
its bytes and dequantizes to zeros, which are cut off again), where a GGUF
writer would leave such a tensor in F16 instead.

``gguf`` is an optional peer, imported inside the functions that need it.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import FragmentError, where

Q8_0 = "Q8_0"
Q4_0 = "Q4_0"
BLOCK = 32  # weights per block, both formats
BLOCK_BYTES = {Q8_0: 2 + BLOCK, Q4_0: 2 + BLOCK // 2}


def _gguf() -> Any:
    try:
        from gguf import quants
        from gguf.constants import GGMLQuantizationType
    except ImportError as exc:
        raise FragmentError("bench.gguf_weights: the GGUF rows need the 'gguf' package; install it with `pip install gguf`") from exc
    return quants, GGMLQuantizationType


def _check_format(fmt: str) -> None:
    if fmt not in BLOCK_BYTES:
        raise FragmentError(f"bench.gguf_weights: expected format 'Q8_0' or 'Q4_0', found {fmt!r}")


def bits_per_weight(fmt: str) -> float:
    """Stored bits per weight of ``fmt``, block scales included (padding not).

    >>> bits_per_weight("Q8_0"), bits_per_weight("Q4_0")
    (8.5, 4.5)
    """
    _check_format(fmt)
    return 8.0 * BLOCK_BYTES[fmt] / BLOCK


def padded_length(k: int) -> int:
    """Row length rounded up to whole 32-weight blocks.

    >>> padded_length(27), padded_length(64)
    (32, 64)
    """
    return -(-k // BLOCK) * BLOCK


def quantize_rows(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """``weight`` (any shape, rows = ``reshape(out, -1)``) as gguf-packed blocks: ``uint8 [out, blocks * bytes]``.

    >>> quantize_rows(torch.ones(3, 40), "Q4_0").shape  # 40 -> 64 weights per row: 2 blocks of 18 bytes
    torch.Size([3, 36])
    """
    _check_format(fmt)
    quants, qtype = _gguf()
    rows = weight.detach().to(device="cpu", dtype=torch.float32).reshape(weight.shape[0], -1).numpy()
    k = rows.shape[1]
    if padded_length(k) != k:
        rows = np.pad(rows, ((0, 0), (0, padded_length(k) - k)))
    packed = quants.quantize(np.ascontiguousarray(rows), getattr(qtype, fmt))
    return torch.from_numpy(np.ascontiguousarray(packed))


def dequantize_rows(packed: torch.Tensor, fmt: str, columns: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Torch inverse of :func:`quantize_rows`: ``[out, columns]`` in ``dtype`` (float32 arithmetic, as gguf's numpy).

    >>> w = torch.tensor([[0.5, -1.0] * 20])
    >>> back = dequantize_rows(quantize_rows(w, "Q8_0"), "Q8_0", 40)
    >>> back.shape, torch.allclose(back, w, atol=0.01)
    (torch.Size([1, 40]), True)
    """
    _check_format(fmt)
    out = packed.shape[0]
    blocks = packed.reshape(-1, BLOCK_BYTES[fmt])
    d = blocks[:, :2].contiguous().view(torch.float16).to(torch.float32)  # [n, 1]
    body = blocks[:, 2:]
    if fmt == Q8_0:
        q = body.contiguous().view(torch.int8).to(torch.float32)
    else:
        # byte j holds weight j in its low nibble and weight j + 16 in its high one
        q = torch.cat([body & 0x0F, body >> 4], dim=1).to(torch.float32) - 8.0
    w = (q * d).reshape(out, -1)
    return w[:, :columns].to(dtype)


class GGUFLayer(nn.Module):
    """A Linear or Conv2d whose weight is held as gguf-packed blocks and dequantized in ``forward``.

    >>> layer = GGUFLayer.from_module(nn.Linear(64, 8), "Q4_0")
    >>> layer(torch.ones(2, 64)).shape, layer.packed.dtype
    (torch.Size([2, 8]), torch.uint8)
    """

    def __init__(self, packed: torch.Tensor, fmt: str, weight_shape: tuple[int, ...], bias: torch.Tensor | None,
                 conv: dict[str, Any] | None = None) -> None:
        super().__init__()
        _check_format(fmt)
        self.fmt, self.weight_shape, self.conv = fmt, tuple(weight_shape), conv
        self.columns = int(np.prod(self.weight_shape[1:]))
        self.register_buffer("packed", packed)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_module(cls, module: nn.Module, fmt: str, path: str = "<layer>") -> "GGUFLayer":
        """Quantize a Linear's or Conv2d's weight (the module itself is untouched)."""
        if isinstance(module, nn.Linear):
            conv = None
        elif isinstance(module, nn.Conv2d) and isinstance(module.padding, tuple) and module.padding_mode == "zeros":
            conv = {"stride": module.stride, "padding": module.padding, "dilation": module.dilation, "groups": module.groups}
        else:
            raise FragmentError(where(path, f"expected an nn.Linear or zero-padded nn.Conv2d for GGUF, found {type(module).__name__}"))
        packed = quantize_rows(module.weight, fmt).to(module.weight.device)
        return cls(packed, fmt, tuple(module.weight.shape), module.bias, conv)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_rows(self.packed, self.fmt, self.columns, dtype).reshape(self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D401 - nn.Module API
        w = self.dequantized_weight(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if self.conv is None:
            return F.linear(x, w, b)
        return F.conv2d(x, w, b, **self.conv)
