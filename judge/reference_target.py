"""The reference model as a batch-bench target: real images, judged by the quality gate.

The judge is the CI quality gate of ``thresholds.yaml`` (adherence drop,
SSIM, LPIPS when its weights are available) against the full model's images
of the same seeds: the same limits H1 and H2 set before the model was trained.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch.nn as nn

from ..fragment.schedule.state import ScheduleState
from ..reference import measure
from ..reference.model import ReferenceModel, load_reference
from ..reference.sampling import DEFAULT_GUIDANCE, DEFAULT_STEPS, Trajectory, ddim_timesteps, sample
from .fragment_judge import SequentialStop, fragment_judge
from .gate import gate_failures, gate_slack, measurable_limits


class ReferenceTarget:
    """``prompt`` on the reference model, ``steps`` DDIM steps, judged against ``limits`` (the quality gate).

    >>> target = ReferenceTarget("a red circle in the top left", limits={"ssim_min": 0.9})  # doctest: +SKIP
    >>> target.judge(target.run(target.unet, [0]), target.run(target.unet, [0]))[0]  # doctest: +SKIP
    True
    """

    def __init__(self, prompt: str, *, limits: Mapping[str, float], steps: int = DEFAULT_STEPS,
                 guidance: float = DEFAULT_GUIDANCE, model: ReferenceModel | None = None,
                 lpips: Callable[[Any, Any], Sequence[float]] | None = None, batch_size: int = 32) -> None:
        self.model = model if model is not None else load_reference()
        self.unet = self.model.unet
        self.prompt, self.steps, self.guidance = prompt, steps, guidance
        self.limits, self.lpips, self.batch_size = dict(limits), lpips, batch_size
        self.context, self.uncond = self.model.encode([prompt]), self.model.encode([""])
        self.name = "reference"
        # the full model's per-step states of the seeds being judged (``watch``), for branched candidate renders
        self.trajectory = Trajectory()
        self.watched: set[int] = set()
        self.timesteps = ddim_timesteps(steps)

    def watch(self, seeds: Sequence[int]) -> None:
        """Record the full model's per-step states of ``seeds`` whenever it renders them (the judged seeds)."""
        self.watched |= {int(s) for s in seeds}

    def run(self, unet: nn.Module, seeds: Sequence[int], *, state: ScheduleState | None = None,
            cfg_cutoff: float | None = None, record: Trajectory | None = None,
            branch: tuple[int, Trajectory] | None = None, raw: bool = False) -> Any:
        seeds = list(seeds)
        if record is None and unet is self.unet and state is None and cfg_cutoff is None and branch is None \
                and seeds and set(seeds) <= self.watched:
            record = self.trajectory
        return sample(unet, self.context, self.uncond, seeds, steps=self.steps, guidance=self.guidance,
                      batch_size=self.batch_size, state=state, cfg_cutoff=cfg_cutoff, record=record,
                      branch=branch, raw=raw)

    def fragment_judge(self, known_seeds: Sequence[int], known_images: Any, *, branching: bool = True,
                       group: int | None = 2) -> Callable[..., Any]:
        """``judge.fragment_judge`` on this target: candidates branch from the watched seeds' recorded states
        (``branching``) and are judged ``group`` seeds at a time with a :class:`SequentialStop` (``None``: all at once).

        >>> target.watch(range(8)); reference = target.run(target.unet, range(8))  # doctest: +SKIP
        >>> judge = target.fragment_judge(range(8), reference)  # doctest: +SKIP
        """
        stop = SequentialStop(self.limits, group=group) if group else None
        return fragment_judge(self.unet, self.run, self.judge, known_seeds, known_images,
                              trajectory=self.trajectory if branching else None,
                              timesteps=self.timesteps if branching else None, sequential=stop)

    def judge(self, full: np.ndarray, images: np.ndarray) -> tuple[bool, dict[str, Any]]:
        base = measure.adherence(full, self.prompt)
        result = measure.compare(full, images, self.prompt, self.lpips, base, self.limits.get("ssim_min"))
        # the gate fails a missing value: no LPIPS scorer, or a prompt the analyzer cannot read, drops that limit
        # ... and the latent-space proxy is for judges without images (FragmentExtractor without a VAE): not this one
        unmeasured = [m for m, absent in (("lpips_mean", self.lpips is None), ("adherence_delta", base is None),
                                          ("latent_rel_error", True)) if absent]
        limits = measurable_limits(self.limits, unmeasured)
        failures = gate_failures(result, limits)
        return not failures, {**result, "gate_failures": failures, "gate_slack": gate_slack(result, limits)}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "prompt": self.prompt, "guidance": self.guidance, "sampler": "DDIM (diffusers), trailing",
                "judge": "quality_gate of thresholds.yaml vs the full model's same-seed images", "limits": self.limits,
                "lpips": self.lpips is not None}
