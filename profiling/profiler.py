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

import collections
import contextlib
import logging
import math
import random
import statistics
import time
from typing import Any, Callable, Sequence

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


# Defaults of the cheap profile (issue #15): a step in ``step_stride``, ``token_sample`` tokens of a call for
# the energy statistics and ``entropy_tokens`` queries for the entropy.  They keep the head ranking of the
# full-fidelity profile (tests/test_profiler.py measures the agreement) at a fraction of its cost.
DEFAULT_STEP_STRIDE = 2
DEFAULT_TOKEN_SAMPLE = 256
DEFAULT_ENTROPY_TOKENS = 32
FULL_FIDELITY: dict[str, Any] = {"step_stride": 1, "token_sample": None, "entropy_tokens": 256}  # HeadProfiler kwargs


def sample_stride(n: int, take: int | None) -> int:
    """Stride that keeps about ``take`` of ``n`` tokens (1 keeps all; ``take=None`` means all).

    >>> sample_stride(1024, 256), sample_stride(64, 256), sample_stride(1000, None), sample_stride(10, 3)
    (4, 1, 1, 4)
    """
    if take is None or take <= 0 or n <= take:
        return 1
    return -(-n // take)


class _Accumulator:
    """Device-side running sums of one attention module; moved to the CPU only in ``HeadProfiler.result``.

    Energy sums are shifted by the bucket's first mean (``sum(e - K)``, ``sum((e - K)^2)``), so the variance
    keeps float32 precision without a host round trip per call; token counts come from shapes and live on
    the host, so no hook ever waits for the device.
    """

    def __init__(self, buckets: int, heads: int, device: torch.device) -> None:
        self.shift = torch.zeros(buckets, heads, device=device)
        self.shifted = [False] * buckets
        self.sums = torch.zeros(buckets, 2, heads, device=device)  # [bucket, (sum d, sum d^2), head]
        self.entropy = torch.zeros(buckets, heads, device=device)
        self.sample_energy = torch.zeros(0, heads, device=device)
        self.tokens = [0.0] * buckets
        self.entropy_count = [0.0] * buckets
        self.sample_tokens: list[float] = []

    def to(self, device: torch.device) -> None:
        for name in ("shift", "sums", "entropy", "sample_energy"):
            setattr(self, name, getattr(self, name).to(device))

    def add_energy(self, bucket: int, sample: int, energy: torch.Tensor, owners: torch.Tensor | None = None,
                   counts: dict[int, int] | None = None) -> None:
        """Add ``energy`` ([tokens, heads]) to ``bucket``; its tokens belong to ``sample``, or, in a batched
        run, token ``i`` to sample ``owners[i]`` (a device tensor), ``counts`` tokens to each sample (known on
        the host, so no hook reads a device value back)."""
        n = float(energy.shape[0])
        if n == 0:
            return
        if not self.shifted[bucket]:
            self.shift[bucket] = energy.mean(0)
            self.shifted[bucket] = True
        d = energy - self.shift[bucket]
        s1 = d.sum(0)
        self.sums[bucket].add_(torch.stack((s1, (d * d).sum(0))))
        last = sample if owners is None or not counts else max(counts)
        if last >= self.sample_energy.shape[0]:
            grow = max(last + 1, 2 * self.sample_energy.shape[0]) - self.sample_energy.shape[0]
            self.sample_energy = torch.cat([self.sample_energy, self.sample_energy.new_zeros(grow, self.shift.shape[1])])
        self.sample_tokens.extend([0.0] * (last + 1 - len(self.sample_tokens)))
        self.tokens[bucket] += n
        if owners is None:
            self.sample_energy[sample].add_(s1 + n * self.shift[bucket])
            self.sample_tokens[sample] += n
            return
        self.sample_energy.index_add_(0, owners, energy)
        for owner, count in (counts or {}).items():
            self.sample_tokens[owner] += float(count)

    def add_entropy(self, bucket: int, entropy: torch.Tensor) -> None:
        self.entropy[bucket].add_(entropy.sum(0))
        self.entropy_count[bucket] += float(entropy.shape[0])

    def stats(self, site: Any, samples: int) -> ModuleStats:
        stats = ModuleStats.empty(site, len(self.tokens))
        tokens = torch.tensor(self.tokens, dtype=torch.float64)
        sums, shift = self.sums.cpu(), self.shift.cpu()
        n = tokens.to(torch.float32).clamp_min(1)[:, None]
        seen = (tokens > 0)[:, None]
        stats.tokens = tokens
        stats.energy_mean = torch.where(seen, shift + sums[:, 0] / n, torch.zeros_like(shift))
        stats.energy_m2 = torch.where(seen, (sums[:, 1] - sums[:, 0] ** 2 / n).clamp_min(0), torch.zeros_like(shift))
        stats.entropy_sum = self.entropy.cpu().to(torch.float64)
        stats.entropy_count = torch.tensor(self.entropy_count, dtype=torch.float64)
        have = min(samples, self.sample_energy.shape[0])
        stats.sample_energy = torch.zeros(samples, site.heads)
        stats.sample_energy[:have] = self.sample_energy[:have].cpu()
        stats.sample_tokens = torch.zeros(samples, dtype=torch.float64)
        stats.sample_tokens[: len(self.sample_tokens)] = torch.tensor(self.sample_tokens, dtype=torch.float64)
        return stats


class HeadProfiler(HookContext):
    """Context manager that accumulates per-head statistics over any number of forward passes.

    By default the profile is the cheap one: of each sample's steps in a timestep bucket every
    ``step_stride``-th is measured (the phase turns with the sample, so the seeds together cover
    every step, and a bucket's first step is always measured), energy is measured on about
    ``token_sample`` evenly spaced tokens per call (a seeded offset) and entropy on
    ``entropy_tokens`` queries.  ``step_stride=1, token_sample=None`` (``FULL_FIDELITY``) measures
    every token of every call.  ``calls_per_bucket`` counts every model call; the measured ones
    are in ``info["profiled_calls_per_bucket"]``.

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
        entropy_tokens: int = DEFAULT_ENTROPY_TOKENS,
        seed: int = 0,
        num_train_timesteps: int = 1000,
        info: dict[str, Any] | None = None,
        token_sample: int | None = DEFAULT_TOKEN_SAMPLE,
        step_stride: int = DEFAULT_STEP_STRIDE,
    ) -> None:
        if buckets < 1:
            raise ProfilingError(f"HeadProfiler: expected buckets >= 1, found {buckets}")
        if step_stride < 1:
            raise ProfilingError(f"HeadProfiler: expected step_stride >= 1, found {step_stride}")
        if token_sample is not None and token_sample < 1:
            raise ProfilingError(f"HeadProfiler: expected token_sample >= 1 or None (all tokens), found {token_sample}")
        self.model = model
        self.buckets = buckets
        self.entropy_tokens = max(0, int(entropy_tokens))
        self.token_sample = token_sample
        self.step_stride = int(step_stride)
        self.num_train_timesteps = num_train_timesteps
        self._rng = random.Random(seed)
        self._seed = seed
        super().__init__()
        self._sites: dict[str, Any] = {}
        self._acc: dict[str, _Accumulator] = {}
        self._gram: dict[str, torch.Tensor] = {}
        self._scratch: dict[str, dict[str, torch.Tensor]] = {}
        self._bucket = 0
        self._manual_timestep: float | None = None
        self._sample = -1
        self._batch = 0  # samples in the current batched run (begin_batch), 0 outside one
        self._last_t: float | None = None
        self._steps_seen: dict[tuple[int, int], int] = {}  # (sample, bucket) -> steps so far
        self._active = True
        self.samples: list[Any] = []
        self.calls_per_bucket = [0] * buckets
        self.profiled_calls_per_bucket = [0] * buckets
        self.info = dict(info or {})
        modules = list(iter_attention(model))
        if not modules:
            raise ProfilingError(f"{type(model).__name__}: no attention modules (to_q/to_k/to_v/to_out + heads) found")
        self._modules = modules
        for path, module in modules:
            self._sites[path] = describe(path, module)

    # -- control ----------------------------------------------------------------------------------------
    def begin_sample(self, label: Any) -> None:
        """Start a new sample (usually one seed); later statistics are attributed to it."""
        self.samples.append(label)
        self._sample = len(self.samples) - 1
        self._batch = 0
        self._last_t = None

    def begin_batch(self, labels: Sequence[Any]) -> None:
        """Start ``len(labels)`` samples rendered together as one batch (one seed each).

        Row ``r`` of every call's batch belongs to sample ``r % len(labels)``: the layout of a CFG batch
        (``[uncond; cond]``, or ComfyUI's equal ``cond_or_uncond`` chunks) keeps each seed's rows in that
        order.  So a batched profile keeps each seed's energy apart (rank stability) at the cost of one
        batched render, where ``begin_sample`` per seed needs one render per seed.  A call whose batch is
        not a multiple of ``len(labels)`` counts toward the first label.

        >>> with HeadProfiler(unet, buckets=4) as prof:  # doctest: +SKIP
        ...     prof.begin_batch([0, 1, 2, 3])
        ...     run_sampler(unet, seeds=[0, 1, 2, 3])  # one batch of four seeds
        >>> prof.result().module(path).per_sample_energy().shape  # doctest: +SKIP
        torch.Size([4, 8])
        """
        if not labels:
            raise ProfilingError("HeadProfiler.begin_batch: expected at least one sample label, found none")
        self._sample = len(self.samples)
        self.samples.extend(labels)
        self._batch = len(labels)
        self._last_t = None

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
        t = self._manual_timestep if self._manual_timestep is not None else timestep_from_call(args, kwargs)
        if self._manual_timestep is None and t is not None:
            self._bucket = timestep_bucket(t, self.buckets, self.num_train_timesteps)
        self.calls_per_bucket[self._bucket] += 1
        sample = self._current_sample()
        # A step is a run of calls at one timestep (CFG may split one step into two calls): all or none are measured.
        if t is None or self._last_t is None or abs(t - self._last_t) > 1e-6:
            key = (sample, self._bucket)
            step = self._steps_seen.get(key, 0)
            self._steps_seen[key] = step + 1
            self._active = (step + sample) % self.step_stride == 0
        self._last_t = t
        if self._active:
            self.profiled_calls_per_bucket[self._bucket] += 1

    def _keep(self, path: str, key: str) -> Callable:
        def hook(_m: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
            if self._active:
                self._scratch.setdefault(path, {})[key] = out.detach()

        return hook

    def _accumulator(self, path: str, device: torch.device) -> _Accumulator:
        acc = self._acc.get(path)
        if acc is None:
            acc = self._acc[path] = _Accumulator(self.buckets, self._sites[path].heads, device)
        elif acc.shift.device != device:  # a host that moves the model between calls (ComfyUI offloading)
            acc.to(device)
        return acc

    def _on_out_input(self, path: str, lin: nn.Linear) -> Callable:
        heads, d = self._sites[path].heads, self._sites[path].dim_head

        def hook(_m: nn.Module, inp: tuple) -> None:
            if not self._active:
                return
            x = inp[0].detach()
            with torch.no_grad():
                gram = self._gram.get(path)
                if gram is None or gram.device != x.device:
                    w = lin.weight.detach().to(device=x.device, dtype=torch.float32)
                    wh = w.reshape(w.shape[0], heads, d).permute(1, 0, 2)  # [H, out, d]
                    gram = wh.transpose(1, 2) @ wh  # [H, d, d]
                    self._gram[path] = gram
                sample, owners, counts = self._current_sample(), None, None
                if self._batch > 1 and x.dim() == 3 and x.shape[0] % self._batch == 0:
                    # a batched run: tokens are taken per row, so each row's tokens stay its own sample's
                    rows = x.reshape(x.shape[0], x.shape[1], heads * d)
                    stride = sample_stride(rows.shape[0] * rows.shape[1], self.token_sample)
                    if stride > 1:
                        rows = rows[:, self._rng.randrange(stride)::stride]
                    owner = sample + torch.arange(rows.shape[0], device=x.device) % self._batch
                    owners = owner.repeat_interleave(rows.shape[1])
                    counts = collections.Counter()
                    for r in range(rows.shape[0]):
                        counts[sample + r % self._batch] += rows.shape[1]
                    flat = rows.reshape(-1, heads * d)
                else:
                    flat = x.reshape(-1, heads * d)
                    stride = sample_stride(flat.shape[0], self.token_sample)
                    if stride > 1:  # evenly spaced tokens from a seeded offset: a view, no index tensor on the device
                        flat = flat[self._rng.randrange(stride)::stride]
                xh = flat.reshape(-1, heads, d).to(torch.float32)  # [tokens, H, d]
                energy = (torch.einsum("thd,hde->the", xh, gram) * xh).sum(-1)  # [tokens, H]: x_h^T G_h x_h
                acc = self._accumulator(path, x.device)
                acc.add_energy(self._bucket, sample, energy, owners, counts)
                scratch = self._scratch.pop(path, {})
                if self.entropy_tokens and "q" in scratch and "k" in scratch:
                    acc.add_entropy(self._bucket, self._entropy(scratch["q"], scratch["k"], heads, d))

        return hook

    def _entropy(self, q: torch.Tensor, k: torch.Tensor, heads: int, d: int) -> torch.Tensor:
        """Normalised attention entropy per batch item and head on a seeded, evenly spaced subset of queries."""
        b, n = q.shape[0], q.shape[1]
        m = k.shape[1]
        if m < 2:
            return q.new_zeros(b, heads, dtype=torch.float32)
        stride = sample_stride(n, self.entropy_tokens)
        offset = self._rng.randrange(stride) if stride > 1 else 0
        qs = q[:, offset::stride][:, : self.entropy_tokens].to(torch.float32)
        take = qs.shape[1]
        qs = qs.reshape(b, take, heads, d)
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
        """The statistics gathered so far, as plain data on the CPU (the profiler can keep running)."""
        samples = len(self.samples)
        modules: dict[str, ModuleStats] = {}
        for path, site in self._sites.items():
            acc = self._acc.get(path)
            if acc is None:
                empty = ModuleStats.empty(site, self.buckets)
                empty.sample_energy = torch.zeros(samples, site.heads)
                empty.sample_tokens = torch.zeros(samples, dtype=torch.float64)
                modules[path] = empty
            else:
                modules[path] = acc.stats(site, samples)
        return ProfileData(
            modules=modules,
            buckets=self.buckets,
            num_train_timesteps=self.num_train_timesteps,
            samples=list(self.samples),
            calls_per_bucket=list(self.calls_per_bucket),
            info={**self.info, "entropy_tokens": self.entropy_tokens, "entropy_seed": self._seed,
                  "token_sample": self.token_sample, "step_stride": self.step_stride,
                  "profiled_calls_per_bucket": list(self.profiled_calls_per_bucket)},
        )


def measure_overhead(
    model: nn.Module,
    run: Callable[[], Any],
    repeats: int = 3,
    contexts: Callable[[], Sequence[HookContext]] | None = None,
    warmup: bool = True,
    **profiler_kwargs: Any,
) -> dict[str, float]:
    """Median wall time of ``run()`` without and with profiling hooks, and the overhead in percent.

    ``contexts`` makes the hook contexts to measure (default: one ``HeadProfiler(model,
    **profiler_kwargs)``); pass ``lambda: profiling_stack(model)`` (``profiling.session``) for the
    whole stack the demo, the bench and ComfyUI attach.  Unhooked and hooked runs alternate, so a
    machine whose load drifts during the measurement shifts both medians alike.

    >>> lin = nn.Linear(2, 2)
    >>> sorted(measure_overhead(lin, lambda: lin(torch.ones(1, 2)), repeats=1, contexts=lambda: []))
    ['base_s', 'overhead_pct', 'profiled_s']
    """
    made = list(contexts()) if contexts is not None else [HeadProfiler(model, **profiler_kwargs)]

    def timed(hooked: bool) -> float:
        with contextlib.ExitStack() as stack:
            if hooked:
                for ctx in made:
                    stack.enter_context(ctx)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.no_grad():
                run()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return time.perf_counter() - start

    if warmup:  # first calls pay for allocation and kernel selection, hooked ones for the Gram matrices
        timed(False)
        timed(True)
    base_runs, profiled_runs = [], []
    for _ in range(max(1, repeats)):
        base_runs.append(timed(False))
        profiled_runs.append(timed(True))
    base, profiled = statistics.median(base_runs), statistics.median(profiled_runs)
    overhead = (profiled - base) / base * 100.0 if base > 0 else float("nan")
    log.info("profiling overhead: %.1f%% (%.4fs -> %.4fs)", overhead, base, profiled)
    return {"base_s": base, "profiled_s": profiled, "overhead_pct": overhead}
