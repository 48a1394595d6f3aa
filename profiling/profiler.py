"""Forward hooks that measure what each attention head contributes.

For every attention module the profiler hooks three places, all by structure:

* ``to_q`` and ``to_k`` (forward hooks): keep q and k of the current call, for
  the attention entropy of a seeded random subset of query tokens;
* ``to_out[0]`` (forward pre-hook): its input is the concatenated head outputs.
  A head's contribution to the module output is ``W_out[:, h] @ x_h``; its
  squared norm per token is ``x_h^T (W_h^T W_h) x_h``, computed with the small
  ``dim_head x dim_head`` Gram matrix instead of a full projection per head.

A pre-hook on the model root reads the timestep of each UNet call (diffusers
passes ``timestep``, ComfyUI ``timesteps``; both are 0..999 on the training
scale), so statistics are kept per timestep bucket.  Hooks never modify
activations, and the context manager removes every handle on exit, also on error.
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import ProfilingError
from .dataset import ModuleStats, ProfileData
from .discovery import describe, iter_attention, out_linear
from .hooks import HookContext

log = logging.getLogger(__name__)


def timestep_bucket(t: float, buckets: int, num_train_timesteps: int = 1000) -> int:
    """Bucket index of a training-scale timestep; bucket 0 holds the least noisy (last) steps.

    >>> timestep_bucket(999.0, 4), timestep_bucket(0.0, 4), timestep_bucket(500.0, 4)
    (3, 0, 2)
    """
    b = int(float(t) / num_train_timesteps * buckets)
    return min(max(b, 0), buckets - 1)


def timestep_from_call(args: tuple, kwargs: dict) -> float | None:
    t = kwargs.get("timestep", kwargs.get("timesteps"))
    if t is None and len(args) > 1:
        t = args[1]
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return float(t.flatten()[0]) if t.numel() else None
    return float(t)


class HeadProfiler(HookContext):
    """Context manager that accumulates per-head statistics over any number of forward passes.

    >>> with HeadProfiler(unet, buckets=4) as prof:  # doctest: +SKIP
    ...     for seed in (1, 2, 3):
    ...         prof.begin_sample(seed)
    ...         run_sampler(unet, seed)
    >>> data = prof.result()  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        buckets: int = 4,
        entropy_tokens: int = 256,
        seed: int = 0,
        num_train_timesteps: int = 1000,
        info: dict[str, Any] | None = None,
    ) -> None:
        if buckets < 1:
            raise ProfilingError(f"HeadProfiler: expected buckets >= 1, found {buckets}")
        self.model = model
        self.buckets = buckets
        self.entropy_tokens = max(0, int(entropy_tokens))
        self.num_train_timesteps = num_train_timesteps
        self._generator = torch.Generator().manual_seed(seed)
        self._seed = seed
        super().__init__()
        self._stats: dict[str, ModuleStats] = {}
        self._gram: dict[str, torch.Tensor] = {}
        self._scratch: dict[str, dict[str, torch.Tensor]] = {}
        self._bucket = 0
        self._manual_timestep: float | None = None
        self._sample = -1
        self.samples: list[Any] = []
        self.calls_per_bucket = [0] * buckets
        self.info = dict(info or {})
        modules = list(iter_attention(model))
        if not modules:
            raise ProfilingError(f"{type(model).__name__}: no attention modules (to_q/to_k/to_v/to_out + heads) found")
        self._modules = modules
        for path, module in modules:
            self._stats[path] = ModuleStats.empty(describe(path, module), buckets)

    # -- control ----------------------------------------------------------------------------------------
    def begin_sample(self, label: Any) -> None:
        """Start a new sample (usually one seed); later statistics are attributed to it."""
        self.samples.append(label)
        self._sample = len(self.samples) - 1

    def set_timestep(self, t: float | None) -> None:
        """Force the timestep used for bucketing (None: read it from each model call)."""
        self._manual_timestep = t
        if t is not None:
            self._bucket = timestep_bucket(t, self.buckets, self.num_train_timesteps)

    def _current_sample(self) -> int:
        if self._sample < 0:  # nobody called begin_sample: everything is one sample
            self.begin_sample("default")
        return self._sample

    # -- hooks ------------------------------------------------------------------------------------------
    def _on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._manual_timestep is None:
            t = timestep_from_call(args, kwargs)
            if t is not None:
                self._bucket = timestep_bucket(t, self.buckets, self.num_train_timesteps)
        self.calls_per_bucket[self._bucket] += 1

    def _keep(self, path: str, key: str) -> Callable:
        def hook(_m: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
            self._scratch.setdefault(path, {})[key] = out.detach()

        return hook

    def _on_out_input(self, path: str, lin: nn.Linear) -> Callable:
        stats = self._stats[path]
        heads, d = stats.site.heads, stats.site.dim_head

        def hook(_m: nn.Module, inp: tuple) -> None:
            x = inp[0].detach()
            with torch.no_grad():
                gram = self._gram.get(path)
                if gram is None or gram.device != x.device:
                    w = lin.weight.detach().to(device=x.device, dtype=torch.float32)
                    wh = w.reshape(w.shape[0], heads, d).permute(1, 0, 2)  # [H, out, d]
                    gram = wh.transpose(1, 2) @ wh  # [H, d, d]
                    self._gram[path] = gram
                xh = x.reshape(-1, heads, d).to(torch.float32)  # [tokens, H, d]
                energy = (torch.einsum("thd,hde->the", xh, gram) * xh).sum(-1)  # [tokens, H]
                stats.add_energy(self._bucket, self._current_sample(), energy.cpu())
                scratch = self._scratch.pop(path, {})
                if self.entropy_tokens and "q" in scratch and "k" in scratch:
                    stats.add_entropy(self._bucket, self._entropy(scratch["q"], scratch["k"], heads, d).cpu())

        return hook

    def _entropy(self, q: torch.Tensor, k: torch.Tensor, heads: int, d: int) -> torch.Tensor:
        """Normalised attention entropy per batch item and head on a seeded subset of queries."""
        b, n = q.shape[0], q.shape[1]
        m = k.shape[1]
        if m < 2:
            return torch.zeros(b, heads)
        take = min(self.entropy_tokens, n)
        idx = torch.randperm(n, generator=self._generator)[:take].to(q.device)
        qs = q[:, idx].to(torch.float32).reshape(b, take, heads, d)
        ks = k.to(torch.float32).reshape(b, m, heads, d)
        logits = torch.einsum("bshd,bmhd->bhsm", qs, ks) * (d**-0.5)
        logp = torch.log_softmax(logits, dim=-1)
        ent = -(logp.exp() * logp).sum(-1).mean(-1)  # [b, heads]
        return ent / math.log(m)

    # -- lifecycle --------------------------------------------------------------------------------------
    def _install(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        for path, module in self._modules:
            lin = out_linear(module, path)
            self._handles.append(lin.register_forward_pre_hook(self._on_out_input(path, lin)))
            if self.entropy_tokens:
                self._handles.append(module.to_q.register_forward_hook(self._keep(path, "q")))
                self._handles.append(module.to_k.register_forward_hook(self._keep(path, "k")))

    def _on_remove(self) -> None:
        self._scratch.clear()

    def result(self) -> ProfileData:
        """The statistics gathered so far, as plain data (the profiler can keep running)."""
        return ProfileData(
            modules=self._stats,
            buckets=self.buckets,
            num_train_timesteps=self.num_train_timesteps,
            samples=list(self.samples),
            calls_per_bucket=list(self.calls_per_bucket),
            info={**self.info, "entropy_tokens": self.entropy_tokens, "entropy_seed": self._seed},
        )


def measure_overhead(
    model: nn.Module, run: Callable[[], Any], repeats: int = 3, **profiler_kwargs: Any
) -> dict[str, float]:
    """Median wall time of ``run()`` without and with profiling hooks, and the overhead in percent.

    >>> measure_overhead(unet, lambda: unet(**inputs), repeats=3)  # doctest: +SKIP
    {'base_s': 0.021, 'profiled_s': 0.034, 'overhead_pct': 61.9}
    """

    def timed() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed()  # warm-up: first calls pay for allocation and kernel selection
    base = statistics.median(timed() for _ in range(repeats))
    with HeadProfiler(model, **profiler_kwargs):
        timed()
        profiled = statistics.median(timed() for _ in range(repeats))
    overhead = (profiled - base) / base * 100.0 if base > 0 else float("nan")
    log.info("profiling overhead: %.1f%% (%.4fs -> %.4fs)", overhead, base, profiled)
    return {"base_s": base, "profiled_s": profiled, "overhead_pct": overhead}
