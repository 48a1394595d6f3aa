"""H3 on the project's reference model: ``metrics.reuse``'s harness bound to the reference model.

Lives here, not in ``metrics``, so that the metrics package never imports the
reference model (``reference.measure`` imports the harness: the other way round
was an import circle).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from ..errors import FragmentError
from ..fragment.build import apply_fragment
from ..fragment.format.measurements import update_fragment_file
from ..fragment.format.store import load_fragment
from ..fragment.library.index import locked
from ..fragment.patching import base_sha256
from ..judge.image_similarity import load_lpips, lpips_scorer
from ..metrics.reuse import H2_BOUNDS, Bounds, ReuseReport, reuse_block
from .measure import paraphrase_reuse
from .model import load_reference
from .sampling import DEFAULT_GUIDANCE, check_steps

log = logging.getLogger(__name__)


def reference_reuse(
    manifest_path: str,
    paraphrases: Sequence[str],
    *,
    seeds: Sequence[int] = (0, 1, 2, 3),
    steps: int = 25,
    bounds: Bounds | None = None,
    record: bool = True,
) -> ReuseReport:
    """H3 on the project's reference model: a fragment of it against the full model, over paraphrases.

    Real measurement: the reference model's text encoder gives the embeddings,
    each paraphrase x seed is sampled with both models, and the pair must stay
    within H2's fidelity bounds (SSIM, and LPIPS when its weights are available
    offline).  The result is recorded in the manifest's reuse block (re-sealed, atomic).

    >>> reference_reuse("outputs/demo/fragments/demo-1a2b.json", ["top-left: a crimson disc"])  # doctest: +SKIP
    """
    # checked before any work: a figure from zero seeds or no steps would be recorded as a pass rate
    check_steps(steps, where=f"reuse {manifest_path}")
    seeds = list(seeds)
    if not seeds:
        raise FragmentError(f"reuse {manifest_path}: seeds: expected at least one seed, found none")
    fragment = load_fragment(manifest_path)
    model = load_reference()
    small = apply_fragment(model.unet, fragment, base_sha256=base_sha256(model.unet))
    try:
        lpips = lpips_scorer(load_lpips("alex"))
    except FragmentError as exc:  # offline without weights: bound on SSIM only, and say so
        log.warning("reuse: LPIPS unavailable (%s); bounding SSIM only", exc)
        lpips = None
    if not paraphrases:
        raise FragmentError(f"reuse: expected at least one paraphrase for {manifest_path}, found none")
    report = paraphrase_reuse(model, small, fragment.manifest["profiling"].get("prompt", ""), seeds, bounds or H2_BOUNDS,
                              lpips, steps=steps, guidance=DEFAULT_GUIDANCE, texts=paraphrases)
    if record:
        with locked(Path(manifest_path).parent):  # the library's writers take the same lock
            update_fragment_file(manifest_path, reuse=reuse_block(report, stand_in=False, note="reference model, H2 fidelity bounds"))
    return report
