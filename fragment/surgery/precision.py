"""Precision tiers: the least sensitive retained Linears stored and run in fp8 (e4m3fn) or int8.

A quantized Linear keeps its weight as a ``float8_e4m3fn`` or ``int8``
Parameter named ``weight`` plus a float32 ``weight_scale`` (per output
channel, ``[out, 1]``, or per tensor, ``[1, 1]``), and dequantizes to the
input's dtype in ``forward``.  It is a subclass of the original Linear's own
class (e.g. ``comfy.ops.manual_cast.Linear``) that overrides both ``forward``
and ComfyUI's ``forward_comfy_cast_weights``: in low-VRAM mode ComfyUI sets
``comfy_cast_weights`` and calls the latter, and a plain cast of an fp8
weight without its scale would be silently wrong.

Which layers: those whose weight loses the least under quantization
(relative Frobenius error of the round trip), up to a share of the retained
Linear parameters.  Callers with better importance data pass ``scores``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import BaseModelMismatchError, IntegrityError, PruningError, where
from .lever import Built, InCompression, LeverBase, least_error_damage, tensor
from .tree import fresh_copy, install, module_at, replace_modules

log = logging.getLogger(__name__)

FP8 = "fp8"
INT8 = "int8"
STORAGE_DTYPES: dict[str, torch.dtype] = {FP8: torch.float8_e4m3fn, INT8: torch.int8}
_QMAX = {FP8: 448.0, INT8: 127.0}
# The quantizer clamps scales to at least MIN_SCALE; a dequantized weight must fit float16, the dtype hosts run.
MIN_SCALE = 1e-12
MAX_WEIGHT = 65504.0
PER_CHANNEL = "per_channel"
PER_TENSOR = "per_tensor"


def quantize_weight(weight: torch.Tensor, fmt: str, granularity: str = PER_CHANNEL) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` with ``q * scale ~= weight``; ``scale`` is float32 ``[out, 1]`` or ``[1, 1]``.

    >>> q, s = quantize_weight(torch.tensor([[1.0, -0.5], [254.0, 0.0]]), "int8")
    >>> q.tolist(), s.flatten().tolist()
    ([[127, -64], [127, 0]], [0.007874015718698502, 2.0])
    """
    if fmt not in STORAGE_DTYPES:
        raise PruningError(f"quantize_weight: expected format 'fp8' or 'int8', found {fmt!r}")
    if granularity not in (PER_CHANNEL, PER_TENSOR):
        raise PruningError(f"quantize_weight: expected granularity 'per_channel' or 'per_tensor', found {granularity!r}")
    w = weight.detach().to(torch.float32)
    amax = w.abs().amax(dim=1, keepdim=True) if granularity == PER_CHANNEL else w.abs().amax().reshape(1, 1)
    scale = (amax / _QMAX[fmt]).clamp_min(MIN_SCALE)
    x = w / scale
    q = x.round().clamp(-127, 127).to(torch.int8) if fmt == INT8 else x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q, scale


def check_quantized_values(q: torch.Tensor, scale: torch.Tensor, weight_key: str, scale_key: str, source: str) -> None:
    """Stored values that dequantize to finite weights in every dtype a host runs (float16 included).

    Refused: an fp8 e4m3fn byte that decodes to NaN (``0x7F``/``0xFF``; the format has no infinity), a
    scale that is not finite or below ``MIN_SCALE`` (the quantizer never writes less), and a scale whose
    largest code (448 in fp8, 128 in int8) would give a weight beyond ``MAX_WEIGHT`` (the float16 range:
    beyond it a float16 model computes inf, then NaN).

    >>> check_quantized_values(torch.tensor([[2, -3]], dtype=torch.int8), torch.tensor([[float("inf")]]), "w", "s", "f")
    Traceback (most recent call last):
    ...
    prompt_fragments.errors.IntegrityError: f: s: expected finite scales >= 1e-12, found inf
    """
    if q.is_meta or scale.is_meta:  # a fragment built on the meta device (bench memory) has shapes, no values
        return
    if q.dtype == torch.float8_e4m3fn:
        nan = (q.view(torch.uint8) & 0x7F) == 0x7F
        if bool(nan.any()):
            raise IntegrityError(f"{source}: {weight_key}: expected float8_e4m3fn numbers, found {int(nan.sum())} NaN "
                                 f"bytes (0x7F/0xFF)")
    bad = ~torch.isfinite(scale) | (scale < MIN_SCALE)
    if bool(bad.any()):
        raise IntegrityError(f"{source}: {scale_key}: expected finite scales >= {MIN_SCALE:g}, "
                             f"found {float(scale[bad][0]):g}")
    # bounded by the format's largest code, not the stored ones: no float copy of a large weight is made
    largest = float(scale.max()) * (448.0 if q.dtype == torch.float8_e4m3fn else 128.0) if scale.numel() else 0.0
    if largest > MAX_WEIGHT:
        raise IntegrityError(f"{source}: {scale_key}: expected weights within ±{MAX_WEIGHT:g} (float16) after "
                             f"scaling, found scales up to {float(scale.max()):g} (weights up to {largest:g})")


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` in ``dtype`` (float32 arithmetic first, so fp16 inputs do not lose the scale's precision).

    >>> dequantize(torch.tensor([[2]], dtype=torch.int8), torch.tensor([[0.5]]), torch.float16).tolist()
    [[1.0]]
    """
    return (q.to(torch.float32) * scale.to(device=q.device, dtype=torch.float32)).to(dtype)


def relative_error(weight: torch.Tensor, fmt: str, granularity: str = PER_CHANNEL) -> float:
    """``||W - deq(q(W))|| / ||W||``: how much a layer loses in ``fmt`` (lower = safer to quantize).

    >>> relative_error(torch.eye(4), "int8")
    0.0
    """
    q, s = quantize_weight(weight, fmt, granularity)
    w = weight.detach().to(torch.float32)
    return float((w - dequantize(q, s, torch.float32)).norm() / w.norm().clamp_min(1e-30))


class QuantizedLinearMixin:
    """Forward methods of a quantized Linear; combined with the template's class by :func:`quantized_class`."""

    def _dequantized(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = dequantize(self.weight.to(x.device), self.weight_scale.to(x.device), x.dtype)
        b = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        return w, b

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # noqa: D401 - nn.Module API
        w, b = self._dequantized(x)
        return F.linear(x, w, b)

    def forward_comfy_cast_weights(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # ComfyUI's low-VRAM path: same dequantization, on the input's device.
        w, b = self._dequantized(x)
        return F.linear(x, w, b)


_CLASSES: dict[type, type] = {}


def quantized_class(cls: type) -> type:
    """The quantized subclass of a Linear class (cached), so ``isinstance(m, cls)`` stays true.

    >>> quantized_class(nn.Linear).__name__, issubclass(quantized_class(nn.Linear), nn.Linear)
    ('QuantizedLinear', True)
    """
    if issubclass(cls, QuantizedLinearMixin):
        return cls
    new = _CLASSES.get(cls)
    if new is None:
        new = _CLASSES[cls] = type(f"Quantized{cls.__name__}", (QuantizedLinearMixin, cls), {"__module__": __name__})
    return new


def quantized_linear(lin: nn.Linear, q: torch.Tensor, scale: torch.Tensor, path: str = "<linear>") -> nn.Linear:
    """A copy of ``lin`` holding quantized ``q`` and ``scale`` (bias kept as it is); ``lin`` is untouched.

    >>> lin = nn.Linear(4, 3); q, s = quantize_weight(lin.weight, "fp8")
    >>> ql = quantized_linear(lin, q, s)
    >>> ql.weight.dtype, ql(torch.ones(1, 4)).dtype
    (torch.float8_e4m3fn, torch.float32)
    """
    if not isinstance(lin, nn.Linear):
        raise PruningError(where(path, f"expected an nn.Linear to quantize, found {type(lin).__name__}"))
    if tuple(q.shape) != (lin.out_features, lin.in_features) or scale.ndim != 2 or scale.shape[1] != 1 or scale.shape[0] not in (1, lin.out_features):
        raise PruningError(where(path, f"expected quantized weight [{lin.out_features}, {lin.in_features}] and scale [{lin.out_features} or 1, 1], found {list(q.shape)} and {list(scale.shape)}"))
    device = lin.weight.device
    new = fresh_copy(lin)
    new.__class__ = quantized_class(type(lin))
    new._parameters["weight"] = nn.Parameter(q.to(device), requires_grad=False)
    new._buffers["weight_scale"] = scale.to(device=device, dtype=torch.float32)  # persistent: in the state dict
    return new


def precision_errors(linears: Mapping[str, nn.Linear], fmt: str) -> list[tuple[int, float]]:
    """``(parameters, relative round-trip error in fmt)`` per Linear: the precision lever's damage data.

    >>> precision_errors({"a": nn.Linear(4, 4)}, "int8")[0][0]
    16
    """
    return [(lin.weight.numel(), relative_error(lin.weight, fmt)) for lin in linears.values()]


def retained_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every plain (not yet quantized) Linear of ``model`` with a 2-D weight, by path.

    >>> sorted(retained_linears(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))))
    ['0', '2']
    """
    return {p: m for p, m in model.named_modules() if p and isinstance(m, nn.Linear) and not isinstance(m, QuantizedLinearMixin)}


def select_precision_layers(
    linears: Mapping[str, nn.Linear], *, fmt: str, ratio: float, granularity: str = PER_CHANNEL,
    scores: Mapping[str, float] | None = None,
) -> list[str]:
    """The layers to quantize: lowest ``scores`` first (default: quantization error) until ``ratio`` of the parameters.

    >>> lins = {"a": nn.Linear(8, 8), "b": nn.Linear(8, 8)}
    >>> len(select_precision_layers(lins, fmt="fp8", ratio=0.5, scores={"a": 1.0, "b": 0.1}))
    1
    """
    if not 0.0 <= ratio <= 1.0:
        raise PruningError(f"select_precision_layers: expected ratio in [0, 1], found {ratio}")
    if scores is None:
        scores = {p: relative_error(lin.weight, fmt, granularity) for p, lin in linears.items()}
    total = sum(lin.weight.numel() for lin in linears.values())
    budget = ratio * total + 1e-9
    chosen, used = [], 0
    for path in sorted(linears, key=lambda p: (scores[p], p)):
        n = linears[path].weight.numel()
        if used + n > budget:
            continue  # a smaller, later layer may still fit
        chosen.append(path)
        used += n
    return sorted(chosen)


def quant_keys(layer: str) -> tuple[str, str]:
    """The tensors-file keys of one quantized Linear's weight and scale.

    >>> quant_keys("m.ff.net.2")
    ('quant.m.ff.net.2.weight', 'quant.m.ff.net.2.scale')
    """
    return f"quant.{layer}.weight", f"quant.{layer}.scale"


PRECISION_GRID = tuple(round(0.1 * i, 1) for i in range(0, 11))  # 0 .. 100 % of retained Linear parameters


@dataclass(frozen=True)
class PrecisionLever(InCompression, LeverBase):
    """Store the least sensitive ``ratio`` of the retained Linear parameters as ``fmt`` (``"fp8"``/``"int8"``).

    Built last: it quantizes the weights the other levers left.  Linears factorised by the low-rank lever,
    Linears the low-bit lever stored, and Linears kept only as a K/V fold fallback are left alone (the latter are not resident work).
    Record: ``compression.precision`` (``quantization`` in schema v1).  Tensors: ``quant.<linear>.weight`` (fp8/int8) and ``.scale``
    (float32 ``[out or 1, 1]``).

    >>> PrecisionLever("int8", ratio=0.5).name
    'precision'
    """

    fmt: str
    ratio: float = 1.0
    granularity: str = PER_CHANNEL
    scores: Mapping[str, float] | None = None
    name: ClassVar[str] = "precision"
    grid: ClassVar[tuple[Any, ...]] = PRECISION_GRID
    goals: ClassVar[tuple[str, ...]] = ("memory", "both")
    whole: ClassVar[bool] = True  # every retained Linear (amount 1) is a valid cut

    @classmethod
    def label(cls, amount: Any, settings: Any = None) -> str:
        """``<format> <share>``.

        >>> PrecisionLever.label(0.5), PrecisionLever.label(1.0, PrecisionLever("int8"))
        ('fp8 50%', 'int8 100%')
        """
        fmt = getattr(settings, "fmt", None) or getattr(settings, "precision_format", "fp8")
        return f"{fmt} {amount:.0%}"

    @classmethod
    def plan(cls, evidence: Any, settings: Any, model: nn.Module, name: str) -> "PrecisionLever | None":
        if not settings.amount(cls.name) > 0:
            return None
        return cls(settings.precision_format, ratio=settings.amount(cls.name))

    @classmethod
    def predictor(cls, evidence: Any, model: nn.Module, settings: Any) -> list[tuple[int, float]]:
        """Quantizes every layer once: computed only when the calibration's goal moves the lever."""
        return precision_errors(retained_linears(model), settings.precision_format)

    @classmethod
    def predict(cls, data: Sequence[tuple[int, float]], amount: float) -> float:
        """The least-error layers first, as the lever picks them: their parameter-weighted mean error.

        >>> PrecisionLever.predict([(1, 0.1), (1, 0.3)], 0.5)
        0.05
        """
        return least_error_damage(data, amount, compound=False) if amount > 0 else 0.0

    def build(self, model: nn.Module, replacements: dict[str, nn.Module], built: Mapping[str, Any]) -> Built:
        # low-rank factors and low-bit layers already have their storage format
        exclude = tuple(r["layer"] for r in built.get("low_rank") or []) + tuple((built.get("low_bit") or {}).get("layers") or ())
        current = replace_modules(model, replacements) if replacements else model
        linears = {
            p: m for p, m in retained_linears(current).items()
            if not p.endswith(".fallback") and not any(p == e or p.startswith(e + ".") for e in exclude)
        }
        errors = {p: relative_error(m.weight, self.fmt, self.granularity) for p, m in linears.items()}
        chosen = select_precision_layers(linears, fmt=self.fmt, ratio=self.ratio, granularity=self.granularity,
                                         scores=self.scores or errors)
        tensors: dict[str, torch.Tensor] = {}
        layers: dict[str, Any] = {}
        quantized: dict[str, nn.Module] = {}
        dtype = str(STORAGE_DTYPES[self.fmt]).replace("torch.", "")
        for path in chosen:
            lin = linears[path]
            q, scale = quantize_weight(lin.weight, self.fmt, self.granularity)
            wk, sk = quant_keys(path)
            tensors[wk], tensors[sk] = q, scale
            quantized[path] = quantized_linear(lin, q, scale, path)
            layers[path] = {"dtype": dtype, "rel_error": round(errors[path], 6)}
        install(replacements, quantized)  # one copy per owning replacement, not one per Linear inside it
        record = {
            "applied": bool(chosen), "format": self.fmt, "storage_dtype": dtype,
            "granularity": self.granularity, "ratio": self.ratio,
            "params_quantized": sum(linears[p].weight.numel() for p in chosen),
            "params_linear": sum(m.weight.numel() for m in linears.values()),
            "score": "given" if self.scores else "quantization_error", "layers": layers,
        }
        return Built(tensors, record)

    @classmethod
    def apply(cls, model: nn.Module, record: Any, tensors: Mapping[str, torch.Tensor],
              replacements: dict[str, nn.Module], source: str = "fragment") -> None:
        quantized: dict[str, nn.Module] = {}
        for layer in record["layers"]:
            lin = module_at(model, replacements, layer)
            if not isinstance(lin, nn.Linear):
                raise BaseModelMismatchError(f"{layer}: expected an nn.Linear to take quantized weights, found {type(lin).__name__}")
            if isinstance(lin, QuantizedLinearMixin) or not isinstance(lin._parameters.get("weight"), nn.Parameter):
                # a layer another lever already stores (low-bit codes are a buffer named weight): one weight, one
                # format, else a module with an fp8 Parameter and a uint8 buffer both named weight (issue #29)
                raise IntegrityError(f"{layer}: {source} stores this Linear in two formats (quantization and "
                                     f"another lever), expected one")
            wk, sk = quant_keys(layer)
            q = tensors[wk]
            if tuple(q.shape) != (lin.out_features, lin.in_features) or tensors[sk].shape[0] not in (1, lin.out_features):
                # the tensors agree with each other (``check``): a Linear of another shape is another base model
                raise BaseModelMismatchError(f"{layer}: {source} stores a quantized weight {list(q.shape)}, expected the "
                                             f"model's [{lin.out_features}, {lin.in_features}]")
            quantized[layer] = quantized_linear(lin, q, tensors[sk], layer)
        install(replacements, quantized)

    @classmethod
    def check(cls, record: Any, tensors: Mapping[str, torch.Tensor], source: str) -> set[str]:
        keys: set[str] = set()
        for layer, entry in record["layers"].items():
            wk, sk = quant_keys(layer)
            keys.update((wk, sk))
            w, s = tensor(tensors, wk, f"quantized layer {layer}", source), tensor(tensors, sk, f"quantized layer {layer}", source)
            if str(w.dtype).replace("torch.", "") != entry["dtype"] or w.ndim != 2:
                raise IntegrityError(f"{source}: {wk}: expected a 2-D {entry['dtype']} tensor, found {w.dtype} {list(w.shape)}")
            if s.dtype != torch.float32 or s.ndim != 2 or s.shape[1] != 1 or s.shape[0] not in (1, w.shape[0]):
                raise IntegrityError(f"{source}: {sk}: expected float32 [{w.shape[0]} or 1, 1], found {s.dtype} {list(s.shape)}")
            check_quantized_values(w, s, wk, sk, source)
        return keys

    @classmethod
    def weight_keys(cls, record: Any, prefix: str = "") -> set[str]:
        """The weight of every quantized Linear (its bias stays as it was).

        >>> PrecisionLever.weight_keys({"layers": {"m.proj": {}}})
        {'m.proj.weight'}
        """
        return {f"{prefix}{layer}.weight" for layer in record.get("layers", {})}
