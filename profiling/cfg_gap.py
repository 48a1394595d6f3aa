"""How far the conditional prediction still is from the unconditional one, per timestep.

Classifier-free guidance moves each step by ``cfg * (cond - uncond)``.  Once
the two predictions agree, the unconditional pass adds little, and a sampler
can drop it for the rest of the run (the CFG cut-off lever).  This is the
signal Adaptive Guidance watches; here it is measured once, on the profiled
runs, and the cut-off is predicted from it (``fragment.schedule.cfg_lever``)
instead of trying cut-offs blindly.

The probe reads the model output of every call that carries both halves:

* in ComfyUI the call's ``transformer_options["cond_or_uncond"]`` names each
  chunk of the batch (0: cond, 1: uncond);
* elsewhere (the reference sampler, diffusers pipelines) an even batch is
  ``[uncond; cond]``, unless the host says otherwise (``uncond_first``).

A call with only one half (a sampler that already dropped the uncond pass, or
``cfg == 1``) is not counted.  Gaps are kept per timestep, not per step index,
so runs with other step counts or schedulers add to the timesteps they visit.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
import torch.nn as nn

from .hooks import HookContext
from .profiler import timestep_from_call

log = logging.getLogger(__name__)


class CfgGapProbe(HookContext):
    """Hook context recording ``||cond - uncond|| / ||cond||`` of the model output, averaged per timestep.

    >>> class Toy(nn.Module):
    ...     def forward(self, x, t, ctx): return x + ctx
    >>> toy = Toy()
    >>> with CfgGapProbe(toy) as probe:  # the batch is [uncond; cond]: outputs 1s and 2s
    ...     _ = toy(torch.ones(2, 3), torch.tensor(500.0), torch.tensor([[0.0], [1.0]]))
    >>> probe.gaps()
    {500.0: 0.5}
    """

    def __init__(self, model: nn.Module, *, uncond_first: bool = True) -> None:
        super().__init__()
        self.model = model
        self.uncond_first = uncond_first
        self._sums: dict[float, Any] = {}  # a float, or a device scalar (no sync per call)
        self._counts: dict[float, int] = {}
        self.calls = 0

    def _install(self) -> None:
        self._handles.append(self.model.register_forward_hook(self._on_output, with_kwargs=True))

    def _halves(self, kwargs: Mapping[str, Any], out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        options = kwargs.get("transformer_options")
        order = options.get("cond_or_uncond") if isinstance(options, Mapping) else None
        if isinstance(order, (list, tuple)) and order:
            if out.shape[0] % len(order) or 0 not in order or 1 not in order:
                return None
            chunks = out.chunk(len(order))
            return chunks[list(order).index(0)], chunks[list(order).index(1)]
        if out.shape[0] < 2 or out.shape[0] % 2:
            return None
        first, second = out.chunk(2)
        return (second, first) if self.uncond_first else (first, second)

    def _on_output(self, _module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        t = timestep_from_call(args, kwargs)
        h = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
        if t is None or not isinstance(h, torch.Tensor):
            return
        halves = self._halves(kwargs, h.detach())
        if halves is None:
            return
        cond, uncond = (x.to(torch.float32).flatten(1) for x in halves)
        gap = ((cond - uncond).norm(dim=1) / cond.norm(dim=1).clamp_min(1e-12)).mean()
        key = round(t, 2)
        self._sums[key] = self._sums.get(key, 0.0) + gap
        self._counts[key] = self._counts.get(key, 0) + 1
        self.calls += 1

    def gaps(self) -> dict[float, float]:
        """Mean relative gap per timestep seen with both halves, highest timestep (most noise) first."""
        return {t: float(self._sums[t]) / self._counts[t] for t in sorted(self._sums, reverse=True)}
