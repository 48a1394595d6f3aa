"""A bench target with a random-weight Stable Diffusion 1.5 UNet at small size: timing only, no quality claim.

The UNet is diffusers' ``UNet2DConditionModel`` with the SD1.5 config
(``profiling/anatomy.py``) and seeded N(0, 0.02) weights; the sampler is
diffusers' DDIM with SD1.5's noise schedule and classifier-free guidance over
fixed random (uncond, cond) contexts.  With random weights there is no image
to judge, so the judge is a stand-in: the relative L2 distance of the final
latents to the stock run's, against ``max_relative_error``.  The report says so.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from ..fragment.schedule.state import ScheduleState
from .weights import build_random_unet, random_context

# SD1.5's training noise schedule (scaled linear betas); DDIM with "leading" spacing as SD pipelines use it.
SD15_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon"}


class RandomSDTarget:
    """SD1.5 architecture, random weights, ``size`` x ``size`` latents (8 x ``size`` pixels).

    >>> target = RandomSDTarget(size=8, steps=2)  # doctest: +SKIP
    >>> target.run(target.unet, [0, 1]).shape  # doctest: +SKIP
    torch.Size([2, 4, 8, 8])
    """

    def __init__(self, *, size: int = 8, steps: int = 10, guidance: float = 7.0, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0, max_relative_error: float = 0.1) -> None:
        if size % 8:
            raise ValueError(f"RandomSDTarget: size must be a multiple of 8 (three 2x downsamplings), found {size}")
        self.unet = build_random_unet("sd15", dtype=dtype, device=device, seed=seed)
        self.size, self.steps, self.guidance = size, steps, guidance
        self.context = random_context(self.unet, rows=2, seed=seed + 1)  # row 0: uncond, row 1: cond
        self.max_relative_error = max_relative_error
        self.name = f"random-sd15-{size * 8}px"

    def run(self, unet: nn.Module, seeds: Sequence[int], *, state: ScheduleState | None = None,
            cfg_cutoff: float | None = None) -> torch.Tensor:
        from diffusers import DDIMScheduler

        p = next(self.unet.parameters())
        scheduler = DDIMScheduler(**SD15_SCHEDULER)
        scheduler.set_timesteps(self.steps)
        x = torch.stack([torch.randn(4, self.size, self.size, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        x = x.to(device=p.device, dtype=p.dtype)
        n = len(seeds)
        both = torch.cat([self.context[:1].expand(n, -1, -1), self.context[1:].expand(n, -1, -1)])
        if state is not None:
            state.run_total_steps = self.steps
        for t in scheduler.timesteps:
            alone = cfg_cutoff is not None and float(t) < cfg_cutoff
            x_in, ctx = (x, both[n:]) if alone else (torch.cat([x, x]), both)
            if state is not None:
                state.begin_call(float(t), tuple(x_in.shape), rows=slice(n, 2 * n) if alone else None)
            eps = unet(x_in, t, ctx).sample
            if not alone:
                uncond, cond = eps.chunk(2)
                eps = uncond + self.guidance * (cond - uncond)
            x = scheduler.step(eps, t, x).prev_sample
        if state is not None:  # the run is over: free the cached deep features
            state.reset()
        return x.float().cpu()

    def judge(self, full: torch.Tensor, latents: torch.Tensor) -> tuple[bool, dict[str, Any]]:
        err = ((latents - full).flatten(1).norm(dim=1) / full.flatten(1).norm(dim=1).clamp_min(1e-12)).mean()
        ok = float(err) <= self.max_relative_error
        return ok, {"latent_relative_error": float(err),
                    "gate_failures": [] if ok else [f"latent_relative_error {float(err):.4g} > {self.max_relative_error:g}"],
                    "gate_slack": round((self.max_relative_error - float(err)) / self.max_relative_error, 4)}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "arch": "sd15", "weights": "random N(0, 0.02)", "latent_size": self.size,
                "guidance": self.guidance, "sampler": "DDIM (diffusers), SD1.5 noise schedule",
                "judge": f"stand-in: mean relative L2 of final latents <= {self.max_relative_error} (random weights: no image quality)"}
