"""The pack's defaults, in one place: the demo's prompt, the shipped ``thresholds.yaml`` and the LPIPS loader.

The demo, ``bench/``, ``nodes/`` and ``cli.py`` read these here rather than
from one another (``tests/test_layout.py`` holds them to it), so a default is
changed once and every entry point follows.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

#: The reference model's prompt: the demo's, ``bench``'s and the CI quality gate's.
DEFAULT_PROMPT = "a red circle in the top left and a blue triangle in the bottom right on a white background"
#: The shipped limits: the quality gate, the H1–H5 hypotheses and the regression rules.
DEFAULT_THRESHOLDS = Path(__file__).resolve().parent / "thresholds.yaml"


def optional_lpips(weights: str | None = None) -> tuple[Callable[[Any, Any], list[float]] | None, str]:
    """The LPIPS scorer (AlexNet, offline weights) and a note; ``(None, why)`` without weights.

    One place decides where the weights come from (``weights``, else the
    cache or the offline conversion; see ``judge.image_similarity.load_lpips``).

    >>> scorer, note = optional_lpips("/nonexistent/lpips.pth")
    >>> scorer is None and note.startswith("LPIPS not measured")
    True
    """
    try:
        from .judge.image_similarity import load_lpips, lpips_scorer

        return lpips_scorer(load_lpips("alex", weights=weights)), "LPIPS: AlexNet v0.1 (offline weights), images upsampled to 64 px"
    except Exception as exc:  # offline and no weights: LPIPS is then missing, and the summary says why
        log.warning("LPIPS unavailable: %s", exc)
        return None, f"LPIPS not measured: {exc}"
