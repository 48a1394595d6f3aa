"""Low-bit weights: group-wise int4 (or int3) codes, scaled per input channel from the prompt's activations.

Format.  A weight is flattened to ``[out, in * kh * kw]`` (a Linear is already
2-D; a Conv2d's ``[out, in, kh, kw]`` flattens in the same order as its
im2col patches) and cut into groups of ``group`` consecutive input columns
(the last group padded with zeros).  Each group has an fp16 ``scale`` and an
fp16 ``zero`` (the group minimum), and a weight is stored as an unsigned code
``q`` in ``0 .. 2**bits - 1`` with ``w ~= q * scale + zero`` (asymmetric
round to nearest).  Codes are packed along the last dim: two 4-bit codes per
byte (low nibble first), or eight 3-bit codes per three bytes.

Bits per weight (what an equal-bytes comparison counts): ``bits + 32 / group``
(one fp16 scale and one fp16 zero per group), so int4 at group 64 is 4.5
bits, the same as GGUF Q4_0 (18 bytes per 32 weights); int4 at group 128 is
4.25, int3 at group 64 is 3.5.  A per-input-channel scale adds 32 bits per
input column (negligible: 0.03 bits per weight for a 1280-wide Linear).

Activation awareness (AWQ's idea, in this project's own code): a column
multiplied by ``s_c > 1`` before rounding is stored with relatively finer
steps; the layer divides it by ``s_c`` again after dequantization, which is
exact in real arithmetic, so only the rounding moves.  ``s = a ** alpha``,
``a`` the prompt's mean ``|x|`` per input channel, and ``alpha`` searched on a
grid to minimise the output error on sampled inputs; ``alpha = 0`` is plain
round to nearest, so the search is never worse than RTN on its sample.

Modules.  A low-bit layer is a subclass of its template's own class (e.g.
``comfy.ops.manual_cast.Conv2d``), like ``precision.py``'s quantized Linear:
``weight`` holds the packed ``uint8`` codes (a buffer: see ``low_bit_module``), ``weight_scale`` / ``weight_zero``
the fp16 group parameters, ``weight_channel_scale`` (float32, optional) the
per-input-channel scale.  ``forward`` and ComfyUI's ``forward_comfy_cast_weights``
both dequantize to the input's dtype on the input's device.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import BaseModelMismatchError, IntegrityError, PruningError, where
from .lever import Built, InCompression, LeverBase, least_error_damage, tensor
from .precision import MAX_WEIGHT
from .tree import fresh_copy, install, module_at, replace_modules

log = logging.getLogger(__name__)

BITS = (3, 4)
GROUPS = (16, 32, 64, 128, 256)
LOW_BIT_GRID = tuple(round(0.1 * i, 1) for i in range(0, 11))  # 0 .. 100 % of Linear and Conv2d parameters
DEFAULT_GRID = 10  # alpha steps of 0.1: AWQ searches 20; the error curve is flat enough near its minimum


# ---- packing ---------------------------------------------------------------------------------------------------

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes ``0 .. 15`` (any integer dtype), two per ``uint8`` along the last dim, low nibble first.

    An odd last dim is padded with one zero code; :func:`unpack_int4` takes the true length back.
    Signed codes ``-8 .. 7`` are the caller's to offset by 8 first.

    >>> pack_int4(torch.tensor([1, 2, 15])).tolist()
    [33, 15]
    """
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise PruningError(f"pack_int4: expected codes in 0..15, found {int(q.min())}..{int(q.max())}")
    q = q.to(torch.uint8)
    if q.shape[-1] % 2:
        q = F.pad(q, (0, 1))
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` codes (``uint8``, ``0 .. 15``) along the last dim of :func:`pack_int4`'s bytes.

    >>> unpack_int4(torch.tensor([33, 15], dtype=torch.uint8), 3).tolist()
    [1, 2, 15]
    """
    if packed.dtype != torch.uint8 or not 0 <= n <= 2 * packed.shape[-1]:
        raise PruningError(f"unpack_int4: expected uint8 bytes holding {n} codes, found {packed.dtype} {list(packed.shape)}")
    out = torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)
    return out[..., :n]


def pack_int3(q: torch.Tensor) -> torch.Tensor:
    """Codes ``0 .. 7``, eight per three ``uint8`` along the last dim (code ``i`` at bits ``3i .. 3i+2``).

    >>> pack_int3(torch.tensor([7, 0, 0, 0, 0, 0, 0, 1])).tolist()
    [7, 0, 32]
    """
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 7):
        raise PruningError(f"pack_int3: expected codes in 0..7, found {int(q.min())}..{int(q.max())}")
    q = q.to(torch.int32)
    pad = -q.shape[-1] % 8
    if pad:
        q = F.pad(q, (0, pad))
    q = q.reshape(*q.shape[:-1], -1, 8)
    word = (q << (3 * torch.arange(8, dtype=torch.int32))).sum(-1)  # 24 bits per chunk
    out = torch.stack([(word >> (8 * i)) & 255 for i in range(3)], dim=-1)
    return out.flatten(-2).to(torch.uint8)


def unpack_int3(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` codes (``uint8``, ``0 .. 7``) of :func:`pack_int3`'s bytes.

    >>> unpack_int3(torch.tensor([7, 0, 32], dtype=torch.uint8), 8).tolist()
    [7, 0, 0, 0, 0, 0, 0, 1]
    """
    if packed.dtype != torch.uint8 or packed.shape[-1] % 3 or not 0 <= n <= 8 * (packed.shape[-1] // 3):
        raise PruningError(f"unpack_int3: expected uint8 bytes (a multiple of 3) holding {n} codes, "
                           f"found {packed.dtype} {list(packed.shape)}")
    b = packed.to(torch.int32).reshape(*packed.shape[:-1], -1, 3)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    out = torch.stack([(word >> (3 * i)) & 7 for i in range(8)], dim=-1).flatten(-2)
    return out[..., :n].to(torch.uint8)


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pack_int4` or :func:`pack_int3` by ``bits``.

    >>> pack_codes(torch.tensor([1, 2]), 4).tolist()
    [33]
    """
    return {4: pack_int4, 3: pack_int3}[_bits(bits)](q)


def unpack_codes(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """:func:`unpack_int4` or :func:`unpack_int3` by ``bits``.

    >>> unpack_codes(torch.tensor([33], dtype=torch.uint8), 2, 4).tolist()
    [1, 2]
    """
    return {4: unpack_int4, 3: unpack_int3}[_bits(bits)](packed, n)


def packed_width(n: int, bits: int) -> int:
    """Bytes per row holding ``n`` codes of ``bits`` bits.

    >>> packed_width(64, 4), packed_width(64, 3), packed_width(5, 4)
    (32, 24, 3)
    """
    return (n + 1) // 2 if _bits(bits) == 4 else 3 * ((n + 7) // 8)


def _bits(bits: int) -> int:
    if bits not in BITS:
        raise PruningError(f"low-bit weights: expected bits in {BITS}, found {bits!r}")
    return bits


# ---- group quantization ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GroupQuantized:
    """A weight in group-wise low-bit form: packed codes ``[out, bytes]`` (uint8), fp16 ``scale`` and ``zero``
    ``[out, groups]``, the original ``shape``, ``bits``, ``group`` and the optional per-input-channel
    ``channel_scale`` (float32 ``[shape[1]]``) that was folded in before rounding.

    Bits per weight: ``bits + 32 / group`` (+ 32 per input column with a channel scale).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    shape: tuple[int, ...]
    bits: int = 4
    group: int = 64
    channel_scale: torch.Tensor | None = None

    @property
    def columns(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def nbytes(self) -> int:
        """Stored bytes: codes, scales, zeros and the channel scale."""
        extra = 0 if self.channel_scale is None else self.channel_scale.numel() * self.channel_scale.element_size()
        return self.codes.numel() + 2 * self.scale.numel() + 2 * self.zero.numel() + extra


def bits_per_weight(bits: int = 4, group: int = 64) -> float:
    """Stored bits per weight of :func:`quantize_groups` (fp16 scale and zero per group; no channel scale).

    >>> bits_per_weight(4, 64), bits_per_weight(4, 128), bits_per_weight(3, 64)
    (4.5, 4.25, 3.5)
    """
    return bits + 32 / group


def _flat(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().to(torch.float32).reshape(weight.shape[0], -1)


def _column_scale(channel_scale: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A per-input-channel scale expanded to the flattened columns (``kh * kw`` per channel of a conv)."""
    if channel_scale.ndim != 1 or channel_scale.numel() != shape[1]:
        raise PruningError(f"low-bit weights: expected a channel scale of {shape[1]} input channels, "
                           f"found {list(channel_scale.shape)}")
    return channel_scale.to(torch.float32).repeat_interleave(math.prod(shape[2:]))


def _check_group(group: int) -> int:
    if not isinstance(group, int) or isinstance(group, bool) or group not in GROUPS:
        raise PruningError(f"low-bit weights: expected group in {GROUPS}, found {group!r}")
    return group


def _grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    """``[out, cols]`` as ``[out, groups, group]``; the last group padded with its own first value, because zero
    padding would widen its range."""
    cols = w.shape[1]
    groups = -(-cols // group)
    grouped = F.pad(w, (0, groups * group - cols)).reshape(w.shape[0], groups, group)
    if cols % group:
        grouped[:, -1, cols - (groups - 1) * group:] = grouped[:, -1, :1]
    return grouped


def _round_groups(grouped: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, scale, zero)``: asymmetric round to nearest with the fp16 scale and zero the dequantizer uses."""
    levels = 2 ** bits - 1
    lo, hi = grouped.amin(-1), grouped.amax(-1)
    scale, zero = ((hi - lo) / levels).to(torch.float16), lo.to(torch.float16)
    s32 = scale.to(torch.float32).clamp_min(1e-30)[..., None]  # a constant group has scale 0: every code 0
    q = ((grouped - zero.to(torch.float32)[..., None]) / s32).round_().clamp_(0, levels)
    return q, scale, zero


def quantize_groups(weight: torch.Tensor, *, bits: int = 4, group: int = 64,
                    channel_scale: torch.Tensor | None = None) -> GroupQuantized:
    """Asymmetric round-to-nearest of ``weight`` (a Linear ``[out, in]`` or Conv2d ``[out, in, kh, kw]``) per
    ``group`` input columns; with ``channel_scale`` ``s`` the codes are those of ``W * s`` (per input channel).

    >>> w = torch.arange(32.0).reshape(1, 32)  # two groups of 16 values 15 apart: steps of exactly 1
    >>> gq = quantize_groups(w, bits=4, group=16)
    >>> gq.codes.shape, gq.scale.tolist(), gq.zero.tolist(), bool((dequantize_groups(gq) == w).all())
    (torch.Size([1, 16]), [[1.0, 1.0]], [[0.0, 16.0]], True)
    """
    _bits(bits), _check_group(group)
    if weight.ndim not in (2, 4) or weight.numel() == 0:
        raise PruningError(f"quantize_groups: expected a 2-D or 4-D weight, found shape {list(weight.shape)}")
    shape = tuple(int(d) for d in weight.shape)
    w = weight.detach().to(torch.float32).reshape(shape[0], -1)
    if channel_scale is not None:
        channel_scale = channel_scale.detach().to(torch.float32).cpu()
        w = w * _column_scale(channel_scale, shape).to(w.device)
    q, scale, zero = _round_groups(_grouped(w, group), bits)
    codes = pack_codes(q.to(torch.uint8).reshape(shape[0], -1), bits)
    return GroupQuantized(codes=codes, scale=scale, zero=zero, shape=shape, bits=bits, group=group,
                          channel_scale=channel_scale)


def fake_quantized(weight: torch.Tensor, *, bits: int = 4, group: int = 64,
                   channel_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``dequantize_groups(quantize_groups(...))`` flattened to ``[out, cols]`` float32, without packing
    (the same arithmetic: what the alpha search and the layer ranking evaluate many times).

    >>> w = torch.randn(4, 80)
    >>> bool((fake_quantized(w) == dequantize_groups(quantize_groups(w)).reshape(4, -1)).all())
    True
    """
    shape = tuple(weight.shape)
    w = _flat(weight)
    col = None
    if channel_scale is not None:
        col = _column_scale(channel_scale.detach().cpu(), shape).to(w.device)
        w = w * col
    q, scale, zero = _round_groups(_grouped(w, group), bits)
    out = (q * scale.to(torch.float32)[..., None] + zero.to(torch.float32)[..., None]).reshape(shape[0], -1)[:, : w.shape[1]]
    return out / col if col is not None else out


def dequantize_groups(q: GroupQuantized, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> torch.Tensor:
    """The weight in its original shape and ``dtype`` (float32 arithmetic first): ``(code * scale + zero) / s``.

    >>> w = torch.randn(8, 100)
    >>> err = (dequantize_groups(quantize_groups(w), torch.float32) - w).abs().max()
    >>> bool(err < (w.amax() - w.amin()) / 15)
    True
    """
    device = device if device is not None else q.codes.device
    out, groups = q.scale.shape
    codes = unpack_codes(q.codes.to(device), groups * q.group, q.bits).reshape(out, groups, q.group)
    w = codes.to(torch.float32) * q.scale.to(device=device, dtype=torch.float32)[..., None] \
        + q.zero.to(device=device, dtype=torch.float32)[..., None]
    w = w.reshape(out, groups * q.group)[:, : q.columns]
    if q.channel_scale is not None:
        w = w / _column_scale(q.channel_scale, q.shape).to(device)
    return w.reshape(q.shape).to(dtype)


def dequantized_bound(scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int, shape: Sequence[int],
                      channel_scale: torch.Tensor | None = None) -> float:
    """An upper bound on ``|w|`` over the dequantized weight, from the group parameters alone (no unpacking).

    A code lies in ``0 .. 2**bits - 1``, so a group's weights lie between ``zero`` and ``zero + levels * scale``;
    a channel scale divides each column, so the group's smallest one bounds it.  ``inf`` or ``nan``
    (a channel scale of 1e-45 divides a weight to infinity) is returned as ``inf``.

    >>> dequantized_bound(torch.tensor([[1.0]]), torch.tensor([[-2.0]]), 4, 16, (1, 16))
    13.0
    >>> dequantized_bound(torch.tensor([[1.0]]), torch.tensor([[0.0]]), 4, 16, (1, 16), torch.full((16,), 1e-45))
    inf
    """
    lo = zero.to(torch.float32)
    hi = lo + (2 ** bits - 1) * scale.to(torch.float32)
    per_group = torch.maximum(lo.abs(), hi.abs())  # [out, groups]
    if channel_scale is not None and per_group.numel():
        cols = _column_scale(channel_scale, shape)
        groups = per_group.shape[1]
        padded = F.pad(cols, (0, groups * group - cols.numel()), value=float("inf"))
        smallest = padded.reshape(groups, group).amin(dim=1)  # [groups]
        per_group = per_group / smallest
    if not per_group.numel():
        return 0.0
    largest = float(per_group.max())
    return largest if math.isfinite(largest) else math.inf


# ---- activation-aware scaling ----------------------------------------------------------------------------------

def quantization_error(weight: torch.Tensor, *, bits: int = 4, group: int = 64, channel_scale: torch.Tensor | None = None,
                       act_abs_mean: torch.Tensor | None = None, inputs: torch.Tensor | None = None) -> float:
    """Relative error of the low-bit round trip: on the output ``x W^T`` for ``inputs`` (rows of the flattened
    input, im2col patches for a conv), else on ``W`` with columns weighted by ``act_abs_mean``, else on ``W``.

    >>> quantization_error(torch.ones(4, 64))
    0.0
    """
    w = _flat(weight)
    d = w - fake_quantized(weight, bits=bits, group=group, channel_scale=channel_scale)
    if inputs is not None and inputs.numel():
        x = inputs.to(device=w.device, dtype=torch.float32)
        ref = x @ w.T
        return float((x @ d.T).norm() / ref.norm().clamp_min(1e-30))
    if act_abs_mean is not None:
        a = _column_scale(act_abs_mean, weight.shape).to(w.device)
        w, d = w * a, d * a
    return float(d.norm() / w.norm().clamp_min(1e-30))


def awq_channel_scale(weight: torch.Tensor, act_abs_mean: torch.Tensor, inputs: torch.Tensor | None = None, *,
                      bits: int = 4, group: int = 64, grid: int = DEFAULT_GRID) -> torch.Tensor:
    """The per-input-channel scale ``s = a ** alpha`` (normalised) that minimises the low-bit output error.

    ``alpha`` runs over ``0, 1/grid, ..., 1``; ``alpha = 0`` gives ``s = 1`` exactly (plain round to nearest),
    so the result is never worse than RTN on the sample.  ``inputs`` are rows of the flattened input
    (``[N, in]``; im2col patches ``[N, in * kh * kw]`` for a conv); without them the error is the
    activation-weighted weight error.

    >>> w = torch.randn(16, 64); a = torch.rand(64) + 0.1; a[:4] = 20.0
    >>> s = awq_channel_scale(w, a)
    >>> s.shape, quantization_error(w, channel_scale=s, act_abs_mean=a) <= quantization_error(w, act_abs_mean=a)
    (torch.Size([64]), True)
    """
    if act_abs_mean.ndim != 1 or act_abs_mean.numel() != weight.shape[1]:
        raise PruningError(f"awq_channel_scale: expected activation statistics for {weight.shape[1]} input channels, "
                           f"found {list(act_abs_mean.shape)}")
    if not isinstance(grid, int) or grid < 1:
        raise PruningError(f"awq_channel_scale: expected grid >= 1, found {grid!r}")
    a = act_abs_mean.detach().to(torch.float32).cpu().clamp_min(1e-8)
    a = torch.where(torch.isfinite(a), a, torch.ones_like(a))
    best, best_err = torch.ones_like(a), math.inf
    for i in range(grid + 1):
        alpha = i / grid
        if alpha == 0:
            s = torch.ones_like(a)
        else:
            s = a.pow(alpha)
            s = s / (s.max() * s.min()).sqrt()  # centred on 1: the codes' range stays where fp16 is precise
        err = quantization_error(weight, bits=bits, group=group, channel_scale=None if alpha == 0 else s,
                                 act_abs_mean=a if inputs is None else None, inputs=inputs)
        if err < best_err:
            best, best_err = s, err
    return best


# ---- modules ---------------------------------------------------------------------------------------------------

class LowBitMixin:
    """Forward methods of a low-bit Linear or Conv2d; combined with the template's class by :func:`low_bit_class`."""

    low_bit_bits: int
    low_bit_group: int
    low_bit_shape: tuple[int, ...]

    def group_quantized(self) -> GroupQuantized:
        return GroupQuantized(codes=self.weight, scale=self.weight_scale, zero=self.weight_zero, shape=self.low_bit_shape,
                              bits=self.low_bit_bits, group=self.low_bit_group,
                              channel_scale=getattr(self, "weight_channel_scale", None))

    def _dequantized(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = dequantize_groups(self.group_quantized(), x.dtype, device=x.device)
        b = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        return w, b

    def _low_bit_forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self._dequantized(x)
        if isinstance(self, nn.Conv2d):
            return self._conv_forward(x, w, b)
        return F.linear(x, w, b)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # noqa: D401 - nn.Module API
        return self._low_bit_forward(x)

    def forward_comfy_cast_weights(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # ComfyUI's low-VRAM path would cast the packed bytes as if they were weights: dequantize instead.
        return self._low_bit_forward(x)


_CLASSES: dict[type, type] = {}


def low_bit_class(cls: type) -> type:
    """The low-bit subclass of a Linear or Conv2d class (cached), so ``isinstance(m, cls)`` stays true.

    >>> low_bit_class(nn.Conv2d).__name__, issubclass(low_bit_class(nn.Conv2d), nn.Conv2d)
    ('LowBitConv2d', True)
    """
    if issubclass(cls, LowBitMixin):
        return cls
    new = _CLASSES.get(cls)
    if new is None:
        new = _CLASSES[cls] = type(f"LowBit{cls.__name__}", (LowBitMixin, cls), {"__module__": __name__})
    return new


def quantizable(module: nn.Module) -> bool:
    """A plain Linear, or a Conv2d without groups (1x1, 3x3, ...), not yet low-bit.

    >>> quantizable(nn.Linear(2, 2)), quantizable(nn.Conv2d(4, 4, 3, groups=2)), quantizable(nn.Conv1d(2, 2, 1))
    (True, False, False)
    """
    if isinstance(module, LowBitMixin):
        return False
    if isinstance(module, nn.Linear):
        return module.weight.ndim == 2
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.weight.ndim == 4


def low_bit_module(module: nn.Module, q: GroupQuantized, path: str = "<layer>") -> nn.Module:
    """A copy of ``module`` (Linear or Conv2d) holding ``q`` (bias kept as it is); ``module`` is untouched.

    >>> conv = nn.Conv2d(4, 2, 3, padding=1); lb = low_bit_module(conv, quantize_groups(conv.weight, group=16))
    >>> lb.weight.dtype, lb(torch.ones(1, 4, 5, 5)).shape
    (torch.uint8, torch.Size([1, 2, 5, 5]))
    """
    if not quantizable(module):
        raise PruningError(where(path, f"expected an nn.Linear or nn.Conv2d (groups=1) to store in low bits, "
                                       f"found {type(module).__name__}"))
    shape = tuple(int(d) for d in module.weight.shape)
    groups = -(-math.prod(shape[1:]) // q.group)
    expected = {"codes": (shape[0], packed_width(groups * q.group, q.bits)), "scale": (shape[0], groups),
                "zero": (shape[0], groups)}
    found = {"codes": tuple(q.codes.shape), "scale": tuple(q.scale.shape), "zero": tuple(q.zero.shape)}
    if tuple(q.shape) != shape or found != expected:
        raise PruningError(where(path, f"expected low-bit tensors of weight {list(shape)}: {expected}, "
                                       f"found weight {list(q.shape)}: {found}"))
    device = module.weight.device
    new = fresh_copy(module)
    new.__class__ = low_bit_class(type(module))
    # a buffer, not a Parameter: code that reads a model's dtype from ``next(model.parameters())`` (the
    # reference sampler, diffusers) must never find the uint8 codes of a first conv
    del new._parameters["weight"]
    new._buffers["weight"] = q.codes.to(device)
    new._buffers["weight_scale"] = q.scale.to(device)  # persistent: in the state dict
    new._buffers["weight_zero"] = q.zero.to(device)
    if q.channel_scale is not None:
        new._buffers["weight_channel_scale"] = q.channel_scale.to(device=device, dtype=torch.float32)
    new.low_bit_bits, new.low_bit_group, new.low_bit_shape = q.bits, q.group, shape
    return new


def low_bit_errors(model: nn.Module, stats: Mapping[str, Mapping[str, torch.Tensor]] | None = None, *,
                   bits: int = 4, group: int = 64) -> list[tuple[int, float]]:
    """``(parameters, relative low-bit error)`` per Linear and Conv2d: the low-bit lever's damage data.

    The error is the one the lever ranks by: the output error on the layer's sampled inputs when
    ``stats`` (``ActivationStats.stats()``) have them, else the round-trip weight error.

    >>> low_bit_errors(nn.Sequential(nn.Linear(64, 4)))[0][0]
    256
    """
    rows = []
    for path, layer in quantizable_layers(model).items():
        entry = (stats or {}).get(path) or {}
        a, x = entry.get("abs_mean"), entry.get("inputs")
        usable = a is not None and a.numel() == layer.weight.shape[1]
        rows.append((layer.weight.numel(), quantization_error(layer.weight, bits=bits, group=group,
                                                              act_abs_mean=a if usable else None,
                                                              inputs=x if usable else None)))
    return rows


def quantizable_layers(model: nn.Module, exclude: Sequence[str] = ()) -> dict[str, nn.Module]:
    """Every quantizable layer (:func:`quantizable`) by path, except those at or under an ``exclude`` path and
    K/V fold fallbacks (kept for other contexts, not resident work).

    >>> sorted(quantizable_layers(nn.Sequential(nn.Linear(2, 2), nn.Conv2d(2, 2, 1), nn.Linear(2, 1)), exclude=["2"]))
    ['0', '1']
    """
    return {p: m for p, m in model.named_modules()
            if p and quantizable(m) and ".fallback" not in f".{p}." and not any(p == e or p.startswith(e + ".") for e in exclude)}


# ---- selection -------------------------------------------------------------------------------------------------

def select_low_bit_layers(params: Mapping[str, int], errors: Mapping[str, float], ratio: float) -> list[str]:
    """Lowest ``errors`` first until ``ratio`` of the parameters (a smaller later layer may still fit).

    >>> select_low_bit_layers({"a": 10, "b": 10}, {"a": 0.2, "b": 0.1}, 0.5)
    ['b']
    """
    if not 0.0 <= ratio <= 1.0:
        raise PruningError(f"select_low_bit_layers: expected ratio in [0, 1], found {ratio}")
    budget = ratio * sum(params.values()) + 1e-9
    chosen, used = [], 0
    for path in sorted(params, key=lambda p: (errors[p], p)):
        if used + params[path] <= budget:
            chosen.append(path)
            used += params[path]
    return sorted(chosen)


def low_bit_keys(layer: str) -> tuple[str, str, str, str]:
    """The tensors-file keys of one low-bit layer: packed codes, scale, zero, channel scale.

    >>> low_bit_keys("conv_in")
    ('lowbit.conv_in.codes', 'lowbit.conv_in.scale', 'lowbit.conv_in.zero', 'lowbit.conv_in.channel_scale')
    """
    return tuple(f"lowbit.{layer}.{part}" for part in ("codes", "scale", "zero", "channel_scale"))  # type: ignore[return-value]


def _kept_input_channels(path: str, built: Mapping[str, Any]) -> list[int] | None:
    """Original input channels a layer kept after the levers before (heads: ``to_out.0``; FF: the out Linear)."""
    for attn, entry in ((built.get("heads") or {}).get("modules") or {}).items():
        if path == f"{attn}.to_out.0" and len(entry["kept"]) < entry["heads"]:
            d = entry["dim_head"]
            return [h * d + i for h in entry["kept"] for i in range(d)]
    for ff, entry in ((built.get("ff") or {}).get("modules") or {}).items():
        if path == f"{ff}.{entry['out_proj']}":
            return list(entry["kept"])
    return None


@dataclass(frozen=True)
class LowBitLever(InCompression, LeverBase):
    """Store the least sensitive ``ratio`` of the quantizable parameters (Linears and Conv2d) in ``bits`` bits.

    Built after the levers that cut (it stores what they left) and before precision, which skips these
    layers: a weight is stored in one format, and a low-bit layer has nothing left for fp8 to save.
    ``stats`` (``ActivationStats.stats()``: ``{path: {"abs_mean": [in], "inputs": [N, in*kh*kw]}}``)
    make it activation-aware: layers are ranked by their output error on the sampled inputs and each
    gets the AWQ channel scale; without them it is plain round to nearest ranked by weight error,
    and the manifest says so.  Record: ``compression.low_bit``.  Tensors: ``lowbit.<layer>.codes``
    (uint8), ``.scale`` and ``.zero`` (float16 ``[out, groups]``), ``.channel_scale`` (float32 ``[in]``).

    >>> LowBitLever(ratio=0.5).name
    'low_bit'
    """

    ratio: float = 1.0
    bits: int = 4
    group: int = 64
    stats: Mapping[str, Mapping[str, torch.Tensor]] | None = None
    alpha_grid: int = DEFAULT_GRID  # AWQ alpha steps (``grid`` is the calibration ladder's amounts)
    name: ClassVar[str] = "low_bit"
    grid: ClassVar[tuple[Any, ...]] = LOW_BIT_GRID
    goals: ClassVar[tuple[str, ...]] = ("memory", "both")
    evidence: ClassVar[tuple[str, ...]] = ("activation_stats",)
    whole: ClassVar[bool] = True  # every layer (amount 1) is a valid cut

    @classmethod
    def label(cls, amount: Any, settings: Any = None) -> str:
        """``int<bits>[/g<group>] <share>``: the format is part of the name (int4 and int3 are different cuts).

        >>> LowBitLever.label(0.5), LowBitLever.label(1.0, LowBitLever(bits=3, group=128))
        ('int4 50%', 'int3/g128 100%')
        """
        bits, group = getattr(settings, "low_bit_bits", 4), getattr(settings, "low_bit_group", 64)
        bits, group = getattr(settings, "bits", bits), getattr(settings, "group", group)
        return f"int{bits}{'' if group == 64 else f'/g{group}'} {amount:.0%}"

    @classmethod
    def plan(cls, evidence: Any, settings: Any, model: nn.Module, name: str) -> "LowBitLever | None":
        """Activation-aware with the evidence's ``activation_stats``, else round to nearest (the manifest says so)."""
        if not settings.amount(cls.name) > 0:
            return None
        return cls(ratio=settings.amount(cls.name), bits=settings.low_bit_bits, group=settings.low_bit_group,
                   stats=evidence.activation_stats)

    @classmethod
    def predictor(cls, evidence: Any, model: nn.Module, settings: Any) -> list[tuple[int, float]]:
        """Quantizes every layer once: computed only when the calibration's goal moves the lever."""
        return low_bit_errors(model, evidence.activation_stats, bits=settings.low_bit_bits, group=settings.low_bit_group)

    @classmethod
    def predict(cls, data: Sequence[tuple[int, float]], amount: float) -> float:
        """The least-error layers first, as the lever picks them; int4 errors compound in energy.

        >>> LowBitLever.predict([(1, 0.3), (1, 0.4)], 1.0)
        0.5
        """
        return least_error_damage(data, amount, compound=True) if amount > 0 else 0.0

    def layer_stats(self, path: str, module: nn.Module, built: Mapping[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(abs_mean, inputs)`` of ``path`` matched to its current input channels (``None``s: no usable stats)."""
        entry = (self.stats or {}).get(path)
        if not entry:
            return None, None
        a, x = entry.get("abs_mean"), entry.get("inputs")
        channels = int(module.weight.shape[1])
        if a is not None and a.numel() != channels:
            kept = _kept_input_channels(path, built)
            if kept is None or len(kept) != channels or max(kept) >= a.numel():
                return None, None
            per = math.prod(module.weight.shape[2:])
            a = a[kept]
            if x is not None:
                cols = torch.tensor([c * per + k for c in kept for k in range(per)], dtype=torch.long)
                x = x[:, cols]
        return a, x

    def build(self, model: nn.Module, replacements: dict[str, nn.Module], built: Mapping[str, Any]) -> Built:
        _bits(self.bits), _check_group(self.group)
        exclude = [r["layer"] for r in built.get("low_rank") or []]
        current = replace_modules(model, replacements) if replacements else model
        layers = quantizable_layers(current, exclude)
        stats = {p: self.layer_stats(p, m, built) for p, m in layers.items()}
        errors = {p: quantization_error(m.weight, bits=self.bits, group=self.group, act_abs_mean=stats[p][0],
                                        inputs=stats[p][1]) for p, m in layers.items()}
        params = {p: m.weight.numel() for p, m in layers.items()}
        chosen = select_low_bit_layers(params, errors, self.ratio)
        tensors: dict[str, torch.Tensor] = {}
        entries: dict[str, Any] = {}
        quantized: dict[str, nn.Module] = {}
        aware = 0
        for path in chosen:
            module = layers[path]
            a, x = stats[path]
            s = awq_channel_scale(module.weight, a, x, bits=self.bits, group=self.group, grid=self.alpha_grid) if a is not None else None
            if s is not None and bool((s == 1).all()):
                s = None  # alpha = 0 won: RTN, no scale to store
            q = quantize_groups(module.weight, bits=self.bits, group=self.group, channel_scale=s)
            ck, sk, zk, xk = low_bit_keys(path)
            tensors[ck], tensors[sk], tensors[zk] = q.codes, q.scale, q.zero
            if s is not None:
                tensors[xk] = s
            aware += a is not None
            quantized[path] = low_bit_module(module, q, path)
            err = quantization_error(module.weight, bits=self.bits, group=self.group, channel_scale=s, act_abs_mean=a, inputs=x)
            entries[path] = {"kind": "conv2d" if isinstance(module, nn.Conv2d) else "linear",
                             "shape": list(q.shape), "channel_scale": s is not None,
                             "method": ("activation_aware" if s is not None else "rtn") if a is not None else "rtn_no_stats",
                             "rtn_error": round(errors[path], 6), "error": round(err, 6)}
        install(replacements, quantized)
        method = "activation_aware" if self.stats else "round_to_nearest"
        if not self.stats:
            log.info("low-bit weights: no activation statistics, plain round to nearest ranked by weight error")
        record = {
            "applied": bool(chosen), "bits": self.bits, "group": self.group, "ratio": self.ratio,
            "format": f"int{self.bits} asymmetric, group {self.group}, fp16 scale and zero",
            "bits_per_weight": bits_per_weight(self.bits, self.group), "method": method,
            "score": "sampled output error" if self.stats else "weight round-trip error (no activation statistics)",
            "layers_activation_aware": aware,
            "params_quantized": sum(params[p] for p in chosen), "params_quantizable": sum(params.values()),
            "layers": entries,
        }
        return Built(tensors, record)

    @classmethod
    def apply(cls, model: nn.Module, record: Any, tensors: Mapping[str, torch.Tensor],
              replacements: dict[str, nn.Module], source: str = "fragment") -> None:
        quantized: dict[str, nn.Module] = {}
        for layer, entry in record["layers"].items():
            module = module_at(model, replacements, layer)
            if not quantizable(module) or list(module.weight.shape) != list(entry["shape"]):
                found = f"{type(module).__name__} {list(getattr(getattr(module, 'weight', None), 'shape', []))}"
                raise BaseModelMismatchError(f"{layer}: {source} stores low-bit weights {entry['shape']}, "
                                             f"expected a Linear or Conv2d of that shape, found {found}")
            ck, sk, zk, xk = low_bit_keys(layer)
            q = GroupQuantized(codes=tensors[ck], scale=tensors[sk], zero=tensors[zk], shape=tuple(entry["shape"]),
                               bits=record["bits"], group=record["group"],
                               channel_scale=tensors[xk] if entry.get("channel_scale") else None)
            quantized[layer] = low_bit_module(module, q, layer)
        install(replacements, quantized)

    @classmethod
    def check(cls, record: Any, tensors: Mapping[str, torch.Tensor], source: str) -> set[str]:
        if not isinstance(record, Mapping):
            raise IntegrityError(f"{source}: compression.low_bit: expected an object, found {type(record).__name__}")
        bits, group, layers = record.get("bits"), record.get("group"), record.get("layers")
        if (bits not in BITS or group not in GROUPS or isinstance(bits, bool) or isinstance(group, bool)
                or not isinstance(bits, int) or not isinstance(group, int)):
            raise IntegrityError(f"{source}: compression.low_bit: expected bits in {BITS} and group in {GROUPS}, "
                                 f"found {bits!r} and {group!r}")
        if not isinstance(layers, Mapping):
            raise IntegrityError(f"{source}: compression.low_bit.layers: expected an object layer -> record, "
                                 f"found {str(layers)[:100]}")
        keys: set[str] = set()
        for layer, entry in layers.items():
            shape = entry.get("shape") if isinstance(entry, Mapping) else None
            if (not isinstance(shape, list) or len(shape) not in (2, 4)
                    or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 1 << 20 for d in shape)):
                raise IntegrityError(f"{source}: compression.low_bit.layers.{layer}.shape: expected 2 or 4 positive "
                                     f"dimensions, found {shape!r}")
            groups = -(-math.prod(shape[1:]) // group)
            ck, sk, zk, xk = low_bit_keys(layer)
            what = f"low-bit layer {layer}"
            expected = {ck: (torch.uint8, [shape[0], packed_width(groups * group, bits)]),
                        sk: (torch.float16, [shape[0], groups]), zk: (torch.float16, [shape[0], groups])}
            if entry.get("channel_scale"):
                expected[xk] = (torch.float32, [shape[1]])
            for key, (dtype, dims) in expected.items():
                t = tensor(tensors, key, what, source)
                if t.dtype != dtype or list(t.shape) != dims:
                    raise IntegrityError(f"{source}: {key}: expected {str(dtype).replace('torch.', '')} {dims}, "
                                         f"found {str(t.dtype).replace('torch.', '')} {list(t.shape)}")
                if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
                    raise IntegrityError(f"{source}: {key}: expected finite values, found inf or nan")
            keys.update(expected)
            if any(tensors[k].is_meta for k in expected):  # built on the meta device (bench memory): no values
                continue
            if entry.get("channel_scale") and not bool((tensors[xk] > 0).all()):
                raise IntegrityError(f"{source}: {xk}: expected a positive channel scale, found values <= 0")
            if bool((tensors[sk] < 0).any()):
                raise IntegrityError(f"{source}: {sk}: expected group scales >= 0, found negative values")
            largest = dequantized_bound(tensors[sk], tensors[zk], bits, group, shape,
                                        tensors[xk] if entry.get("channel_scale") else None)
            if largest > MAX_WEIGHT:
                key = xk if entry.get("channel_scale") else sk
                raise IntegrityError(f"{source}: {key}: expected weights within ±{MAX_WEIGHT:g} (float16) after "
                                     f"dequantization, found up to {largest:g}")
            # every byte is a valid code (nibbles 0..15, 3-bit fields 0..7): dtype and shape bound the codes
            keys.update(expected)
        return keys

    @classmethod
    def weight_keys(cls, record: Any, prefix: str = "") -> set[str]:
        """The weight of every low-bit layer (its bias stays as it was).

        >>> LowBitLever.weight_keys({"layers": {"conv_in": {}}})
        {'conv_in.weight'}
        """
        return {f"{prefix}{layer}.weight" for layer in record.get("layers", {})}
