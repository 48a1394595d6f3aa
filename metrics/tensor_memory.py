"""Peak live tensor bytes while a callable runs: exact, on any device, and on fake (shape-only) tensors.

Reported as ``peak_tensor_bytes``, never under a VRAM name: it is not what a
GPU allocator reserves.  What it counts, exactly:

- **resident**: the distinct tensor storages live before the call that it
  holds or reads: the ``resident`` objects declared by the caller (a model's
  parameters, buffers and tensor attributes; the inputs), plus every
  pre-existing storage an operator reads during the call;
- **activations**: every storage an aten operator creates during the call,
  from the operator that creates it until the last reference to it dies.
  A view shares its base's storage and an in-place or ``out=`` operator
  writes into an existing one, so neither adds bytes; a freed intermediate
  gives its bytes back before the next allocation is counted.

``peak_tensor_bytes = resident + peak activations``.  The running total is
kept by a ``TorchDispatchMode`` that sees every operator below autograd, so
the peak is that of the tensors themselves, on CPU, CUDA, meta or under
``FakeTensorMode`` (shapes and dtypes only, no data and no memory: how the
SDXL activation table is computed on a CPU machine).

Not counted, by design: scratch memory an operator's kernel allocates and
frees inside itself (oneDNN or flash-attention work buffers), and allocator
caching and fragmentation: on CUDA that is what ``peak_vram``
(``torch.cuda.max_memory_allocated``, NVML) measures, next to this figure.
Tensors made outside the dispatcher (``torch.from_numpy``) are counted as
resident when an operator first reads them.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class TensorPeak:
    """One measurement: resident bytes before the call, and the peak of what the call allocated on top."""

    resident_bytes: int  # distinct storages live before the call (declared, or read by the call)
    peak_activation_bytes: int  # most bytes the call's own allocations held at once
    end_bytes: int  # bytes the call allocated that are still live when it returns (its outputs, caches)
    allocations: int  # storages the call created
    ops: int  # aten operators dispatched
    peak_op: str | None  # the operator whose output set the peak
    device: str  # e.g. "cpu", "cuda:0", "cpu (fake tensors)"
    attention_ops: tuple[str, ...] = ()  # which attention kernels ran (fused ones hold no [tokens x tokens] matrix)

    @property
    def peak_tensor_bytes(self) -> int:
        return self.resident_bytes + self.peak_activation_bytes

    def to_dict(self) -> dict[str, Any]:
        """Plain data, every byte figure named ``peak_tensor_bytes*`` so it is never read as VRAM.

        >>> TensorPeak(10, 5, 0, 1, 2, "aten.add.Tensor", "cpu").to_dict()["peak_tensor_bytes"]
        15
        """
        d = asdict(self)
        d["attention_ops"] = list(self.attention_ops)
        return {"peak_tensor_bytes": self.peak_tensor_bytes,
                "peak_tensor_bytes_resident": d.pop("resident_bytes"),
                "peak_tensor_bytes_activations": d.pop("peak_activation_bytes"),
                "peak_tensor_bytes_at_end": d.pop("end_bytes"), **d}


def _storage(t: torch.Tensor) -> Any:
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, nested or wrapper tensors have no single storage
        return None


def resident_tensors(obj: Any, _depth: int = 0, _seen: set[int] | None = None) -> Iterator[torch.Tensor]:
    """Every tensor ``obj`` holds: a tensor itself, a module's parameters, buffers and tensor attributes
    (also inside plain attribute objects, dicts, lists and tuples, a few levels deep), or those of each item.

    Tensor attributes matter: a folded K/V model keeps its context rows in a plain
    object shared by its modules, not in a buffer.

    >>> m = nn.Linear(2, 3)
    >>> m.extra = {"table": torch.zeros(4)}
    >>> sorted(t.numel() for t in resident_tensors([m, torch.ones(5)]))
    [3, 4, 5, 6]
    """
    seen = set() if _seen is None else _seen
    if id(obj) in seen or _depth > 4:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, nn.Module):
        for module in obj.modules():
            if id(module) != id(obj) and id(module) in seen:
                continue
            seen.add(id(module))
            yield from module.parameters(recurse=False)
            yield from module.buffers(recurse=False)
            for name, value in vars(module).items():
                if name not in ("_parameters", "_buffers", "_modules") and not isinstance(value, nn.Module):
                    yield from resident_tensors(value, _depth + 1, seen)
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from resident_tensors(value, _depth + 1, seen)
    elif isinstance(obj, (list, tuple, set)):
        for value in obj:
            yield from resident_tensors(value, _depth + 1, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type) and _depth > 0:
        for value in vars(obj).values():
            yield from resident_tensors(value, _depth + 1, seen)


def storage_bytes(obj: Any) -> int:
    """Bytes of the distinct storages ``obj`` holds (see :func:`resident_tensors`): shared storage once.

    >>> w = torch.zeros(4, 4)
    >>> storage_bytes([w, w.t(), w[0]])  # one storage of 16 float32
    64
    """
    seen: set[int] = set()
    total = 0
    for t in resident_tensors(obj):
        s = _storage(t)
        if s is None:
            continue
        ref = StorageWeakRef(s)
        if ref.cdata not in seen:
            seen.add(ref.cdata)
            total += int(s.nbytes())
    return total


class TensorMemoryTracker(TorchDispatchMode):
    """A dispatch mode keeping the running total and the peak of live tensor bytes (see the module docstring).

    Weak references to each storage tell when it dies without keeping it alive;
    holding them also keeps a freed storage's address from being reused for a
    new one while it is tracked, so a key never names two storages.

    >>> with TensorMemoryTracker() as tracker:
    ...     a = torch.ones(256)      # 1 KiB
    ...     b = a * 2                # 1 KiB more
    ...     del a
    ...     c = b + 1                # a's KiB was given back first
    >>> tracker.result().peak_activation_bytes
    2048
    """

    def __init__(self, resident: Any = ()) -> None:
        super().__init__()
        self._resident: dict[int, int] = {}
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self._keep: list[StorageWeakRef] = []  # pins resident keys for the same reason
        self.live_bytes = 0
        self.peak_bytes = 0
        self.allocations = 0
        self.ops = 0
        self.peak_op: str | None = None
        self.device: str | None = None
        self.window_peak = 0  # the peak since begin_window(): one UNet call inside a sampler run
        self.attention_ops: set[str] = set()  # fused kernels, or the softmax of the unfused path: which one ran
        for t in resident_tensors(resident):
            self._note_resident(t)

    def _note_resident(self, t: torch.Tensor) -> None:
        s = _storage(t)
        if s is None:
            return
        ref = StorageWeakRef(s)
        if ref.cdata not in self._resident and ref.cdata not in self._live:
            self._resident[ref.cdata] = int(s.nbytes())
            self._keep.append(ref)

    def _release_dead(self) -> None:
        dead = [key for key, (ref, _) in self._live.items() if ref.expired()]
        for key in dead:
            self.live_bytes -= self._live.pop(key)[1]
        # the key stays pinned by its weak reference until popped here, so it is unique while tracked

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func)
        if name.startswith("prim."):  # FakeTensorMode's own device queries: not operators of the model
            return out
        self.ops += 1
        if "attention" in name or "softmax" in name:
            self.attention_ops.add(name)
        inputs: set[int] = set()
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and (s := _storage(t)) is not None:
                key = StorageWeakRef(s).cdata
                inputs.add(key)
                if key not in self._live and key not in self._resident:
                    self._note_resident(t)  # live before the call, or made outside the dispatcher
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or (s := _storage(t)) is None:
                continue
            ref = StorageWeakRef(s)
            key = ref.cdata
            if key in self._live:  # written in place or resized (resize_, out=): follow its size
                old = self._live[key][1]
                new = int(s.nbytes())
                if new != old:
                    self._live[key] = (self._live[key][0], new)
                    self.live_bytes += new - old
                    self._update_peak(func)
                continue
            if key in self._resident or key in inputs:  # a view or in-place result: no new bytes
                continue
            self._release_dead()  # what died since the last allocation gives its bytes back first
            self._live[key] = (ref, int(s.nbytes()))
            self.live_bytes += int(s.nbytes())
            self.allocations += 1
            if self.device is None:
                self.device = _device_label(t)
            self._update_peak(func)
        return out

    def begin_window(self) -> None:
        """Start a sub-window (e.g. one sampler step): :attr:`window_peak` is the peak of live call bytes since."""
        self._release_dead()
        self.window_peak = self.live_bytes

    def _update_peak(self, func: Any) -> None:
        self.window_peak = max(self.window_peak, self.live_bytes)
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            self.peak_op = str(func)

    def result(self) -> TensorPeak:
        """The measurement so far (the call's allocations still live count in ``end_bytes``)."""
        self._release_dead()
        return TensorPeak(resident_bytes=sum(self._resident.values()), peak_activation_bytes=self.peak_bytes,
                          end_bytes=self.live_bytes, allocations=self.allocations, ops=self.ops, peak_op=self.peak_op,
                          device=self.device or "none", attention_ops=tuple(sorted(self.attention_ops)))


def _device_label(t: torch.Tensor) -> str:
    from torch._subclasses.fake_tensor import FakeTensor

    return f"{t.device} (fake tensors)" if isinstance(t, FakeTensor) else str(t.device)


def measure_peak_tensor_bytes(fn: Callable[[], T], resident: Any = ()) -> tuple[T, TensorPeak]:
    """Run ``fn()`` under a :class:`TensorMemoryTracker`; its result and the :class:`TensorPeak`.

    ``resident`` is what is live before the call and must count even if the call
    never reads it: the model (``resident_tensors`` finds its weights) and the inputs.

    >>> lin = nn.Linear(256, 256, bias=False)              # 256 KiB of weights
    >>> x = torch.ones(4, 256)                              # 4 KiB of input
    >>> y, peak = measure_peak_tensor_bytes(lambda: lin(x).relu_(), resident=[lin, x])
    >>> peak.resident_bytes, peak.peak_activation_bytes     # relu_ writes in place: one 4 KiB output
    (266240, 4096)
    """
    tracker = TensorMemoryTracker(resident)
    with tracker:
        out = fn()
    return out, tracker.result()


def fake_tensors(tensors: Iterable[tuple[str, torch.Tensor]], fake_mode: Any, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Shape-only stand-ins of named tensors under ``fake_mode`` on ``device``: meta tensors become fake
    tensors of that device, real ones their fake twins (which the mode then uses for them too).

    >>> from torch._subclasses.fake_tensor import FakeTensorMode
    >>> f = fake_tensors([("w", torch.empty(2, 3, device="meta"))], FakeTensorMode())["w"]
    >>> f.device, f.shape
    (device(type='cpu'), torch.Size([2, 3]))
    """
    out: dict[str, torch.Tensor] = {}
    converter = fake_mode.fake_tensor_converter
    for name, t in tensors:
        if t.device.type == "meta":
            out[name] = converter.from_meta_and_device(fake_mode, t, torch.device(device))
        else:
            out[name] = fake_mode.from_tensor(t)
    return out


def fake_module_peak(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None, *,
                     device: str | torch.device = "cpu", keep_real: Iterable[str] = ()) -> TensorPeak:
    """:class:`TensorPeak` of ``module(*args, **kwargs)`` on fake tensors: the shapes a run on ``device`` would
    have (the same kernel choices, e.g. fused attention on CPU), without its data, time or memory.

    ``module`` may live on the meta device (built without weights) or be real; it is
    not changed (``torch.func.functional_call`` swaps fake weights in for the call).
    Tensor inputs are made fake the same way, except the keyword inputs named in
    ``keep_real``: those are passed as they are and count as resident.  That is for
    an input the model only matches by identity (a K/V-folded fragment's context,
    matched once before the call); an operator on any other real tensor is refused.

    >>> with torch.device("meta"):
    ...     lin = nn.Linear(256, 256, bias=False)
    >>> fake_module_peak(lin, (torch.empty(4, 256, device="meta"),)).peak_activation_bytes
    4096
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    kwargs = dict(kwargs or {})
    keep = set(keep_real)
    real = {k: kwargs.pop(k) for k in keep if k in kwargs}
    fake_mode = FakeTensorMode(allow_non_fake_inputs=bool(keep))
    state = fake_tensors(list(module.named_parameters(remove_duplicate=False))
                         + list(module.named_buffers(remove_duplicate=False)), fake_mode, device)
    flat, spec = tree_flatten((args, kwargs))
    converted = [fake_tensors([("x", x)], fake_mode, device)["x"] if isinstance(x, torch.Tensor) else x for x in flat]
    fake_args, fake_kwargs = spec.unflatten(converted)
    tracker = TensorMemoryTracker([list(state.values()), converted, list(real.values()), _plain_tensor_attributes(module)])
    with torch.no_grad(), fake_mode, tracker:
        out = torch.func.functional_call(module, state, tuple(fake_args), {**fake_kwargs, **real}, strict=False,
                                         tie_weights=False)
        peak = tracker.result()  # while the output is live, as after a real call
    del out
    return peak


def _plain_tensor_attributes(module: nn.Module) -> list[torch.Tensor]:
    """Tensors a module holds outside its parameters and buffers (folded context rows), counted as resident."""
    state = {id(t) for t in list(module.parameters()) + list(module.buffers())}
    return [t for t in resident_tensors(module) if id(t) not in state]
