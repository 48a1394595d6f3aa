"""Distance between two batches of final latents: the judge's stand-in for image quality without a VAE.

Used by FragmentExtractor's judge when no VAE is connected, and by the
in-ComfyUI peer bench, whose random-weight checkpoint has no images worth
judging; its limit is ``quality_gate.latent_rel_error_max`` in ``thresholds.yaml``.
"""
from __future__ import annotations

import torch


def latent_rel_error(reference: torch.Tensor, samples: torch.Tensor) -> float:
    """Mean over the batch of ``||samples - reference|| / ||reference||`` (per image).

    >>> round(latent_rel_error(torch.ones(2, 4, 2, 2), torch.ones(2, 4, 2, 2) * 1.1), 6)
    0.1
    """
    ref, out = reference.flatten(1).double(), samples.flatten(1).double()
    errors = (out - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-12)
    return float(errors.mean())
