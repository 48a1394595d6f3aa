"""The calibration's judge for hosts that run a diffusers UNet: render with a fragment, compare with the full model.

``fragment_judge`` turns a sampler and a comparison into the ``judge_fragment``
callable that ``fragment.extract.calibrated_fragment`` takes.  The full
model's images of the calibration seeds are given (the profiled run made
them); the held-out seeds' references are rendered once, on first use, and
that cost lands in the calibration's time, where it belongs.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..fragment.calibration import Judgement
from ..fragment.format.manifest import Fragment
from ..fragment.schedule.apply import apply_schedule, fragment_schedule

Run = Callable[..., Any]  # run(unet, seeds, *, state=None, cfg_cutoff=None) -> images [N, ...]
Compare = Callable[[Any, Any], "tuple[bool, dict[str, Any]]"]  # compare(full, images) -> (passed, metrics)


def stack(items: Sequence[Any]) -> Any:
    """Per-seed outputs back into one batch (numpy images or torch latents).

    >>> stack([np.zeros((2, 2)), np.ones((2, 2))]).shape
    (2, 2, 2)
    """
    return torch.stack(list(items)) if isinstance(items[0], torch.Tensor) else np.stack(list(items))


def render(unet: nn.Module, fragment: Fragment, seeds: Sequence[int], run: Run) -> tuple[Any, list[int]]:
    """The fragment's outputs for ``seeds`` with its schedule on, and the steps it really reused."""
    small, state = apply_schedule(unet, fragment)
    with torch.no_grad():
        images = run(small, list(seeds), state=state, cfg_cutoff=fragment_schedule(fragment).cfg_cutoff)
    return images, state.reused_steps()


def fragment_judge(unet: nn.Module, run: Run, compare: Compare, known_seeds: Sequence[int],
                   known_images: Any) -> Callable[[Fragment, Sequence[int]], Judgement]:
    """A ``judge_fragment(fragment, seeds)`` over ``run`` and ``compare``; ``known_images`` are the full model's for ``known_seeds``.

    ``compare`` returns ``(passed, metrics)``; ``metrics["gate_failures"]`` and ``metrics["gate_slack"]``,
    when present, become the judgement's reasons and slack.

    >>> judge = fragment_judge(unet, target.run, target.judge, range(8), profile_images)  # doctest: +SKIP
    >>> judge(fragment, [100, 101]).passed  # doctest: +SKIP
    True
    """
    references: dict[int, Any] = dict(zip(list(known_seeds), list(known_images)))

    def judge(fragment: Fragment, seeds: Sequence[int]) -> Judgement:
        missing = [s for s in seeds if s not in references]
        if missing:
            with torch.no_grad():
                references.update(zip(missing, list(run(unet, missing))))
        images, _steps = render(unet, fragment, seeds, run)
        ok, metrics = compare(stack([references[s] for s in seeds]), images)
        return Judgement(bool(ok), metrics, list(metrics.get("gate_failures", [])), metrics.get("gate_slack"))

    return judge


