"""The running audit for hosts that render with ``run(unet, seeds, *, state=None, cfg_cutoff=None)``: the bench and the demo.

``render_audited`` renders a batch with a chosen fragment (and its confirmed
fallbacks, strongest first), auditing every ``every``-th seed against the full
model as ``fragment.audit.run_audited`` describes; ``compare(full, images)`` is
the host's batch judge (``target.judge``), asked about one seed at a time.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from ..fragment.audit import AuditedBatch, AuditRule, run_audited
from ..fragment.format.manifest import Fragment
from ..fragment.schedule.apply import apply_schedule, fragment_schedule
from .fragment_judge import Compare, Run, stack


def render_audited(unet: nn.Module, run: Run, compare: Compare, fragments: Sequence[Fragment], seeds: Sequence[int], *,
                   every: int, rule: AuditRule | None = None, given: Mapping[int, Any] | None = None,
                   on_render: Callable[[str, int], None] | None = None, block: int = 1, lead: int = 0,
                   lead_means: bool = False) -> AuditedBatch:
    """``seeds`` rendered with ``fragments[0]``, audited every ``every``-th image; a failed audit moves to the next.

    ``given`` maps seeds the full model already rendered (the calibration's) to their images: delivered,
    not rendered again.  ``on_render(what, images)`` (``what`` is "fragment" or "full") lets the host count
    its costs: full-model renders are delivered images, fragment renders of audited seeds are the audit's waste.
    ``AuditedBatch.images`` is a list, one image per seed; ``stack`` it for the host's batch.  ``block``: the
    fewest images per fragment render; ``lead``: the first images all audited (``fragment.audit.run_audited``);
    ``lead_means``: the lead's images are also judged together by ``compare`` (the gate on their means).

    >>> batch = render_audited(unet, target.run, target.judge, [chosen, weaker], range(10_000, 10_032), every=8)  # doctest: +SKIP
    >>> batch.summary()  # doctest: +SKIP
    'audited 4 of 32: 4 passed'
    """
    if not fragments:
        raise ValueError("render_audited: expected at least one fragment (the chosen one, then its fallbacks), found none")
    by_name = {f"{i}:{f.name}": f for i, f in enumerate(fragments)}
    labels = list(by_name)

    def note(what: str, count: int) -> None:
        if on_render is not None:
            on_render(what, count)

    applied: dict[str, tuple[nn.Module, Any]] = {}  # each fragment is put on once, not once per audited stretch

    def render_fragment(label: str, group: Sequence[int]) -> list[Any]:
        if label not in applied:
            applied.clear()  # a switch never goes back: free the stronger fragment's copy of the UNet
            applied[label] = apply_schedule(unet, by_name[label])
        small, state = applied[label]
        with torch.no_grad():
            images = run(small, list(group), state=state, cfg_cutoff=fragment_schedule(by_name[label]).cfg_cutoff)
        note("fragment", len(group))
        return list(images)

    def render_full(group: Sequence[int]) -> list[Any]:
        with torch.no_grad():
            images = run(unet, list(group))
        note("full", len(group))
        return list(images)

    def judge_lead(full: list, images: list) -> tuple[bool, dict[str, Any]]:
        passed, metrics = compare(stack(full), stack(images))
        return bool(passed), dict(metrics)

    def judge_one(full: Any, image: Any) -> tuple[bool, dict[str, Any]]:
        return judge_lead([full], [image])  # one seed's pair, stacked as a batch of one

    return run_audited(seeds, render_fragment, render_full, judge_one, rule, labels[1:], setting=labels[0],
                       every=every, given=given, label=lambda key: key.split(":", 1)[1], block=block,
                       lead=lead, lead_check=judge_lead if lead_means else None)
