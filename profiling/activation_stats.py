"""Per-input-channel activation statistics of every Linear and Conv2d, for the low-bit lever.

The low-bit lever (``fragment/surgery/low_bit.py``) protects the input channels
the prompt actually drives (AWQ's idea): it needs each layer's mean ``|x|`` per
input channel, and a few input rows to measure the output error of a
quantized weight on.  A forward pre-hook per layer sees its input; each call
measures about ``token_sample`` evenly spaced tokens (spatial positions for a
conv) from a seeded offset, and offers ``rows_per_call`` input rows to a
fixed-size reservoir (im2col patches for a conv: a small crop of the input
map unfolded with the conv's own kernel, stride and dilation), so the
profile's cost stays small and its memory bounded whatever the step count.
"""
from __future__ import annotations

import math
import random
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ProfilingError
from .hooks import HookContext
from .profiler import sample_stride

DEFAULT_ACT_TOKEN_SAMPLE = 512  # tokens per call for the mean |x|
DEFAULT_ROWS_PER_CALL = 16  # input rows (or conv patches) offered to the reservoir per call
DEFAULT_SAMPLE_ROWS = 128  # reservoir size per layer (fewer for very wide rows, see ELEMENTS_PER_LAYER)
ELEMENTS_PER_LAYER = 1 << 20  # a reservoir holds at most this many float16 values (2 MiB)
# Every third call per layer: one hook per Linear and conv is the profile's largest per-call cost on small UNets
# (measured on the reference model: +52 % profiling time hooking every call, against +14 % without these hooks),
# and a mean |x| over a third of the steps of every seed still sees the whole noise range.
DEFAULT_CALL_STRIDE = 3


def activation_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers whose inputs are profiled: every Linear and every Conv2d without groups.

    >>> sorted(activation_layers(nn.Sequential(nn.Linear(2, 2), nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 1, groups=2))))
    ['0', '1']
    """
    return {p: m for p, m in model.named_modules()
            if p and (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1))}


class _Layer:
    """Running sums and the input reservoir of one layer (tensors stay on the activations' device)."""

    def __init__(self, width: int, capacity: int) -> None:
        self.width, self.capacity = width, capacity
        self.abs_sum: torch.Tensor | None = None
        self.count = 0
        self.rows: torch.Tensor | None = None
        self.filled = 0
        self.seen = 0

    def offer(self, rows: torch.Tensor, gen: torch.Generator) -> None:
        """Reservoir sampling: after ``seen`` rows, each one is in the sample with the same chance."""
        rows = rows.to(torch.float16)
        if self.rows is None:
            self.rows = torch.zeros(self.capacity, rows.shape[1], dtype=torch.float16, device=rows.device)
        m = rows.shape[0]
        seen = torch.arange(self.seen, self.seen + m, dtype=torch.float64)
        slot = (torch.rand(m, generator=gen, dtype=torch.float64) * (seen + 1)).long()
        slot = torch.where(seen < self.capacity, seen.long(), slot)
        keep = slot < self.capacity
        if bool(keep.any()):
            self.rows[slot[keep].to(self.rows.device)] = rows[keep.to(rows.device)]
        self.seen += m
        self.filled = min(self.capacity, self.seen)


class ActivationStats(HookContext):
    """Context manager collecting mean ``|x|`` per input channel and a reservoir of input rows per layer.

    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Conv2d(3, 2, 1))
    >>> with ActivationStats(model) as acts:
    ...     _ = model[0](torch.randn(5, 4)); _ = model[2](torch.randn(1, 3, 4, 4))
    >>> s = acts.stats(); s["0"]["abs_mean"].shape, s["0"]["inputs"].shape, s["2"]["inputs"].shape
    (torch.Size([4]), torch.Size([5, 4]), torch.Size([16, 3]))
    """

    def __init__(self, model: nn.Module, token_sample: int | None = DEFAULT_ACT_TOKEN_SAMPLE,
                 rows_per_call: int = DEFAULT_ROWS_PER_CALL, sample_rows: int = DEFAULT_SAMPLE_ROWS, seed: int = 0,
                 call_stride: int = DEFAULT_CALL_STRIDE) -> None:
        if token_sample is not None and token_sample < 1:
            raise ProfilingError(f"ActivationStats: expected token_sample >= 1 or None (all tokens), found {token_sample}")
        if rows_per_call < 1 or sample_rows < 1:
            raise ProfilingError(f"ActivationStats: expected rows_per_call and sample_rows >= 1, found {rows_per_call} and {sample_rows}")
        if call_stride < 1:
            raise ProfilingError(f"ActivationStats: expected call_stride >= 1, found {call_stride}")
        self.call_stride = call_stride
        self._calls_seen: dict[str, int] = {}
        self.model = model
        self.token_sample, self.rows_per_call, self.sample_rows = token_sample, rows_per_call, sample_rows
        self._rng = random.Random(seed)
        self._gen = torch.Generator().manual_seed(seed)
        self._layers = activation_layers(model)
        if not self._layers:
            raise ProfilingError(f"{type(model).__name__}: no Linear or Conv2d layers to profile")
        self._state: dict[str, _Layer] = {}
        super().__init__()
        self.calls = 0
        self._first = next(iter(self._layers))

    def _state_for(self, path: str, width: int) -> _Layer:
        state = self._state.get(path)
        if state is None:
            capacity = min(self.sample_rows, max(16, ELEMENTS_PER_LAYER // max(width, 1)))
            state = self._state[path] = _Layer(width, capacity)
        return state

    def _linear_hook(self, path: str) -> Callable:
        def hook(_m: nn.Module, args: tuple) -> None:
            if self._skip(path):
                return
            x = args[0].detach()
            with torch.no_grad():
                flat = x.reshape(-1, x.shape[-1])
                stride = sample_stride(flat.shape[0], self.token_sample)
                sampled = flat[self._rng.randrange(stride)::stride] if stride > 1 else flat
                state = self._state_for(path, flat.shape[1])
                self._add_abs(state, sampled.to(torch.float32).abs().sum(0), sampled.shape[0])
                step = sample_stride(flat.shape[0], self.rows_per_call)
                state.offer(flat[self._rng.randrange(step)::step][: self.rows_per_call], self._gen)
            self._count_call(path)

        return hook

    def _conv_hook(self, path: str, conv: nn.Conv2d) -> Callable:
        def hook(_m: nn.Module, args: tuple) -> None:
            if self._skip(path):
                return
            x = args[0].detach()
            if x.ndim != 4:
                return
            with torch.no_grad():
                b, c, h, w = x.shape
                stride = sample_stride(h * w, self.token_sample)
                step = max(1, int(math.isqrt(stride)))  # every step-th row and column: about token_sample positions
                off = self._rng.randrange(step)
                sampled = x[:, :, off::step, off::step]
                state = self._state_for(path, c * conv.kernel_size[0] * conv.kernel_size[1])
                self._add_abs(state, sampled.to(torch.float32).abs().sum((0, 2, 3)), sampled.shape[0] * sampled.shape[2] * sampled.shape[3])
                patches = self._patches(x, conv)
                if patches is not None:
                    state.offer(patches, self._gen)
            self._count_call(path)

        return hook

    def _patches(self, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor | None:
        """About ``rows_per_call`` im2col rows from one crop of one batch element (inside the map: no padding)."""
        (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
        side = max(1, int(math.isqrt(self.rows_per_call)))
        h, w = x.shape[2], x.shape[3]
        span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
        rh, rw = min(side, (h - span_h) // sh + 1), min(side, (w - span_w) // sw + 1)
        if rh < 1 or rw < 1:
            return None
        ch, cw = (rh - 1) * sh + span_h, (rw - 1) * sw + span_w
        i, j, n = self._rng.randrange(h - ch + 1), self._rng.randrange(w - cw + 1), self._rng.randrange(x.shape[0])
        crop = x[n : n + 1, :, i : i + ch, j : j + cw]
        cols = F.unfold(crop.to(torch.float32), (kh, kw), dilation=(dh, dw), stride=(sh, sw))  # [1, C*kh*kw, rh*rw]
        return cols[0].T

    @staticmethod
    def _add_abs(state: _Layer, abs_sum: torch.Tensor, count: int) -> None:
        if state.abs_sum is None or state.abs_sum.device != abs_sum.device:
            state.abs_sum = abs_sum if state.abs_sum is None else state.abs_sum.to(abs_sum.device) + abs_sum
        else:
            state.abs_sum.add_(abs_sum)
        state.count += count

    def _skip(self, path: str) -> bool:
        seen = self._calls_seen[path] = self._calls_seen.get(path, 0) + 1
        return (seen - 1) % self.call_stride != 0  # the first call always counts

    def _count_call(self, path: str) -> None:
        if path == self._first:
            self.calls += 1

    def _install(self) -> None:
        for path, module in self._layers.items():
            hook = self._conv_hook(path, module) if isinstance(module, nn.Conv2d) else self._linear_hook(path)
            self._handles.append(module.register_forward_pre_hook(hook))

    def stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{path: {"abs_mean": float32 [in], "inputs": float32 [N, in * kh * kw]}}`` on the CPU, for the layers seen.

        ``inputs`` is absent for a conv whose maps were smaller than its kernel.
        """
        out: dict[str, dict[str, torch.Tensor]] = {}
        for path, state in self._state.items():
            if state.abs_sum is None or not state.count:
                continue
            entry = {"abs_mean": (state.abs_sum / state.count).cpu()}
            if state.rows is not None and state.filled:
                entry["inputs"] = state.rows[: state.filled].to(torch.float32).cpu()
            out[path] = entry
        if not out:
            raise ProfilingError(f"{type(self.model).__name__}: ActivationStats saw no forward pass; run the model inside the block")
        return out

    def info(self) -> dict[str, Any]:
        return {"method": "mean_abs_input", "calls": self.calls, "layers": len(self._state),
                "token_sample": self.token_sample, "rows_per_call": self.rows_per_call, "sample_rows": self.sample_rows,
                "call_stride": self.call_stride}
