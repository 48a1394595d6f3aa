"""GPU memory, measured two ways, and the resident size of a model's weights.

- torch's allocator (``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``)
  sees only this process's tensors, precisely; it is what a fragment changes.
- NVML (``nvidia-ml-py``, module ``pynvml``) sees the whole device and each
  process, including the CUDA context and other programs; it is what the
  user's ``nvidia-smi`` shows.

Every function here works on a machine with no GPU, no driver or no
``pynvml``: it returns ``None`` (or leaves the key out), never raises, so a
CPU run still writes a report, where the missing VRAM is then visible.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn as nn

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
