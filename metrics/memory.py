"""GPU memory, measured two ways, the peak of live tensor bytes on any device, and the resident size of weights.

- torch's allocator (``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``)
  sees only this process's tensors, precisely; it is what a fragment changes.
- NVML (``nvidia-ml-py``, module ``pynvml``) sees the whole device and each
  process, including the CUDA context and other programs; it is what the
  user's ``nvidia-smi`` shows.

- ``metrics.tensor_memory`` counts live tensor storages (weights and
  activations) exactly, on any device: ``peak_tensor_bytes``.  It is not
  VRAM and never named so; :func:`peak_memory` reports it next to
  ``peak_vram_bytes`` when the call ran on CUDA.

Every function here works on a machine with no GPU, no driver or no
``pynvml``: it returns ``None`` (or leaves the key out), never raises, so a
CPU run still writes a report, where the missing VRAM is then visible.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from .tensor_memory import TensorMemoryTracker

log = logging.getLogger(__name__)

_MB = 1024 * 1024


def resident_weight_mb(model: nn.Module) -> float:
    """Megabytes held by a model's parameters and buffers (numel × element size).

    >>> round(resident_weight_mb(nn.Linear(1024, 256, bias=False)), 3)
    1.0
    """
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:  # tied weights count once
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total / _MB


def cuda_available() -> bool:
    """Whether torch can use a CUDA device (``False`` rather than an error when it cannot).

    >>> isinstance(cuda_available(), bool)
    True
    """
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # a broken driver install must not take the report down
        return False


def reset_peak(device: torch.device | str | None = None) -> None:
    """Start a new peak window for torch's allocator; a no-op without CUDA.

    >>> reset_peak()
    """
    if cuda_available():
        torch.cuda.reset_peak_memory_stats(device)


def torch_peak_mb(device: torch.device | str | None = None) -> dict[str, float] | None:
    """Peak allocated and reserved megabytes since the last :func:`reset_peak`; ``None`` without CUDA.

    >>> torch_peak_mb() is None or "peak_allocated_mb" in torch_peak_mb()
    True
    """
    if not cuda_available():
        return None
    try:
        return {
            "peak_allocated_mb": torch.cuda.max_memory_allocated(device) / _MB,
            "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / _MB,
        }
    except Exception as exc:  # pragma: no cover - depends on the driver
        log.warning("torch.cuda memory statistics unavailable: %s", exc)
        return None


def _nvml():
    try:
        import pynvml  # provided by nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    return pynvml


def nvml_memory(index: int = 0, pid: int | None = None) -> dict[str, Any] | None:
    """Device used/total megabytes and this process's (or ``pid``'s) usage from NVML; ``None`` without it.

    >>> m = nvml_memory()
    >>> m is None or {"device_used_mb", "device_total_mb"} <= set(m)
    True
    """
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
        out: dict[str, Any] = {"device_used_mb": info.used / _MB, "device_total_mb": info.total / _MB}
        pid = os.getpid() if pid is None else pid
        try:
            procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except Exception:  # some drivers or containers hide the process list
            procs = []
        for p in procs:
            used = getattr(p, "usedGpuMemory", None)
            if p.pid == pid and used is not None:
                out["process_used_mb"] = used / _MB
        return out
    except Exception as exc:
        log.debug("NVML query failed: %s", exc)
        return None
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


def memory_snapshot(device: torch.device | str | None = None) -> dict[str, Any]:
    """Everything measurable now: torch peaks and NVML figures, each key present only if measured.

    >>> snap = memory_snapshot()
    >>> isinstance(snap, dict) and snap.get("cuda") in (True, False)
    True
    """
    snap: dict[str, Any] = {"cuda": cuda_available()}
    peaks = torch_peak_mb(device)
    if peaks:
        snap.update(peaks)
    index = 0
    if device is not None and torch.device(device).index is not None:
        index = int(torch.device(device).index)
    nvml = nvml_memory(index) if snap["cuda"] else None
    if nvml:
        snap.update(nvml)
    return snap


def reduction(full: float | None, fragment: float | None) -> float | None:
    """Fractional reduction from ``full`` to ``fragment`` (0.25 = 25 % less); ``None`` if either is missing.

    >>> reduction(100.0, 75.0), reduction(None, 1.0)
    (0.25, None)
    """
    if full is None or fragment is None or full <= 0:
        return None
    return 1.0 - fragment / full


def peak_memory(fn: Callable[[], Any], resident: Any = (), device: torch.device | str | None = None,
                step_module: nn.Module | None = None) -> dict[str, Any]:
    """Run ``fn()`` once and measure it: ``peak_tensor_bytes`` (and its parts) always, ``peak_vram_bytes``
    (``torch.cuda.max_memory_allocated`` over the call, NVML's process figure when readable) when ``device`` is CUDA.

    ``resident`` is what counts as live before the call (the model, its inputs); see
    ``tensor_memory.measure_peak_tensor_bytes``.  With ``step_module`` (the UNet a sampler calls once per step),
    ``"step"`` holds the same figures for the largest single call of it: everything live while one step's
    forward runs (the sampler's latents and caches included), so a whole batch and one step come from one run.

    >>> lin = nn.Linear(64, 64, bias=False)
    >>> m = peak_memory(lambda: lin(torch.ones(2, 64)), resident=[lin], step_module=lin)  # input, output: in the call
    >>> m["peak_tensor_bytes"], m["peak_tensor_bytes_resident"], m["peak_vram_bytes"], m["step"]["peak_tensor_bytes"]
    (17408, 16384, None, 17408)
    """
    cuda = device is not None and torch.device(device).type == "cuda" and cuda_available()
    tracker = TensorMemoryTracker(resident)
    step = {"tensor": 0, "vram": 0, "calls": 0}
    batch_vram = 0

    def before(module: nn.Module, args: Any) -> None:
        nonlocal batch_vram
        if cuda:  # the peak since the last step ended belongs to the batch; then a fresh window for this step
            batch_vram = max(batch_vram, int(torch.cuda.max_memory_allocated(device)))
            reset_peak(device)
        tracker.begin_window()

    def after(module: nn.Module, args: Any, output: Any) -> None:
        nonlocal batch_vram
        step["tensor"] = max(step["tensor"], tracker.window_peak)
        step["calls"] += 1
        if cuda:
            torch.cuda.synchronize(device)
            v = int(torch.cuda.max_memory_allocated(device))
            step["vram"], batch_vram = max(step["vram"], v), max(batch_vram, v)

    handles = [step_module.register_forward_pre_hook(before), step_module.register_forward_hook(after)] if step_module else []
    if cuda:
        torch.cuda.synchronize(device)
        reset_peak(device)
    try:
        with tracker:
            fn()
    finally:
        for h in handles:
            h.remove()
    peak = tracker.result()
    out: dict[str, Any] = {**peak.to_dict(), "peak_vram_bytes": None}
    if cuda:
        torch.cuda.synchronize(device)
        out["peak_vram_bytes"] = max(batch_vram, int(torch.cuda.max_memory_allocated(device)))
        nvml = nvml_memory(torch.device(device).index or 0)
        if nvml and "process_used_mb" in nvml:
            out["nvml_process_used_mb"] = nvml["process_used_mb"]
    if step_module is not None:
        out["step"] = {"peak_tensor_bytes": peak.resident_bytes + step["tensor"],
                       "peak_tensor_bytes_resident": peak.resident_bytes,
                       "peak_tensor_bytes_activations": step["tensor"], "calls": step["calls"],
                       "peak_vram_bytes": step["vram"] if cuda and step["calls"] else None}
    return out


def peak_memory_metrics(measured: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """Flat metrics from ``{"full" | "fragment": {"step" | "batch": peak_memory(...)}}``.

    ``peak_tensor_bytes_<step|batch>_<full|fragment>`` and the activation part of each;
    ``peak_tensor_reduction`` (one batch: what H2 reads without CUDA) and ``peak_tensor_reduction_step``;
    ``peak_vram_bytes_*`` and ``vram_reduction`` only from CUDA figures (``None`` otherwise).

    >>> m = {"full": {"batch": {"peak_tensor_bytes": 100, "peak_tensor_bytes_activations": 60, "peak_vram_bytes": None}},
    ...      "fragment": {"batch": {"peak_tensor_bytes": 70, "peak_tensor_bytes_activations": 40, "peak_vram_bytes": None}}}
    >>> r = peak_memory_metrics(m)
    >>> round(r["peak_tensor_reduction"], 3), r["vram_reduction"], r["peak_tensor_bytes_batch_fragment"]
    (0.3, None, 70)
    """
    out: dict[str, Any] = {}
    for window in ("step", "batch"):
        for model in ("full", "fragment"):
            m = measured.get(model, {}).get(window) or {}
            out[f"peak_tensor_bytes_{window}_{model}"] = m.get("peak_tensor_bytes")
            out[f"peak_tensor_bytes_activations_{window}_{model}"] = m.get("peak_tensor_bytes_activations")
            out[f"peak_vram_bytes_{window}_{model}"] = m.get("peak_vram_bytes")
    out["peak_tensor_reduction"] = reduction(out["peak_tensor_bytes_batch_full"], out["peak_tensor_bytes_batch_fragment"])
    out["peak_tensor_reduction_step"] = reduction(out["peak_tensor_bytes_step_full"], out["peak_tensor_bytes_step_fragment"])
    out["vram_reduction"] = reduction(out["peak_vram_bytes_batch_full"], out["peak_vram_bytes_batch_fragment"])
    return out
