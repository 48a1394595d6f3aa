"""The running audit (issue #26, item 4): the held-out confirmation, moved into the user's batch.

Every ``k``-th variant of a batch is also rendered with the full model.  The
user gets that full-model image for the seed (it is output, not overhead),
and the fragment's image of the same seed is judged against it.  The only
waste is the fragment's own render of the audited seeds, about
``1 / raw_ratio`` u each (u = one stock image).

The per-image verdicts feed a sequential rule (``AuditRule``).  When it
fires, the rest of the batch switches to the next weaker confirmed setting
(``fallbacks``, strongest first) and the audit starts over on that setting;
past the last fallback the rest of the batch runs on the full model.

The rule is a one-sided Wald sequential probability ratio test on the
per-image failure rate: H0 "the setting fails at most ``p0`` of its images"
(a setting that passes the gate on means still has images past the mean's
limit: 16 of 64 on the default prompt, issue #26) against H1 "it fails
``p1`` of them".  After ``f`` failures in ``n`` audits the log-likelihood ratio is
``f ln(p1/p0) + (n - f) ln((1-p1)/(1-p0))``; the rule switches when it reaches
``ln(1/alpha)``.  There is no acceptance boundary: the audit never stops
watching, and under H0 the likelihood ratio is a martingale, so by Ville's
inequality the chance that it *ever* reaches ``1/alpha``, however long the
batch, is at most ``alpha``: a good setting is switched away from in at most
5 % of batches, and a clearly bad one is caught after a few audits.

An untried setting is led by the rule's fewest audits (``lead``), and the
host may judge the lead's images together as well (``lead_check``: the gate
on their means).  The per-image rule cannot tell a setting that fails half
its images (whose means fail the gate: 33 of 64 images under the SSIM limit,
mean 0.886, on one prompt of ``bench batch``) from a good one within a batch
of 32; the lead's means sometimes can (3 images are a small sample), at the
cost of switching away from a setting whose first images happen to be its worst.

Pure core: no ComfyUI.  ``nodes/batch_generator.py`` and
``judge/audited_run.py`` (hosts with ``run(unet, seeds, ...)``) wire it up.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ..errors import FragmentError

log = logging.getLogger(__name__)

#: The setting of an image the full model rendered (an audited seed, a seed rendered before, or after the last fallback).
FULL = "full model"

RenderFragment = Callable[[Any, Sequence[int]], Any]  # (setting, seeds) -> images, one per seed (indexable)
RenderFull = Callable[[Sequence[int]], Any]  # seeds -> the full model's images
Compare = Callable[[Any, Any], "tuple[bool, dict[str, Any]]"]  # (full, fragment) of one seed -> (passed, metrics)
# (full images, fragment images) of the lead's seeds -> (passed on their means, metrics)
LeadCheck = Callable[[list, list], "tuple[bool, dict[str, Any]]"]


@dataclass(frozen=True)
class AuditRule:
    """One-sided SPRT on the per-image failure rate; see the module docstring for why.

    The defaults (``p0 = 0.25``, ``p1 = 0.75``, ``alpha = 0.05``) make each failure
    and each pass weigh ``ln 3`` either way, so the rule reads: switch when the
    failures outnumber the passes by 3 (``3 ln 3 = 3.30 >= ln 20 = 3.00``).

    >>> rule = AuditRule()
    >>> rule.switch(3, 3), rule.switch(3, 4), rule.switch(4, 5), rule.min_audits
    (True, False, True, 3)
    """

    p0: float = 0.25  # a good setting's share of images past the per-image limit
    p1: float = 0.75  # a clearly bad setting's share
    alpha: float = 0.05  # the most chance of switching away from a good setting, over a whole batch

    def __post_init__(self) -> None:
        if not (0.0 < self.p0 < self.p1 < 1.0) or not (0.0 < self.alpha < 1.0):
            raise FragmentError(f"AuditRule: expected 0 < p0 < p1 < 1 and 0 < alpha < 1, found p0={self.p0}, "
                                f"p1={self.p1}, alpha={self.alpha}")

    def llr(self, failures: int, audits: int) -> float:
        """Log-likelihood ratio of H1 (rate ``p1``) to H0 (rate ``p0``) after ``failures`` in ``audits``.

        >>> round(AuditRule().llr(2, 2), 4)  # 2 ln 3
        2.1972
        """
        passes = audits - failures
        return failures * math.log(self.p1 / self.p0) + passes * math.log((1 - self.p1) / (1 - self.p0))

    @property
    def bound(self) -> float:
        """The switching boundary ``ln(1/alpha)``."""
        return math.log(1.0 / self.alpha)

    def switch(self, failures: int, audits: int) -> bool:
        """True when the setting is shown bad: the log-likelihood ratio reached ``ln(1/alpha)``."""
        return self.llr(failures, audits) >= self.bound - 1e-12

    @property
    def min_audits(self) -> int:
        """The fewest audits (all failing) that can make the rule switch: fewer audits are no audit at all."""
        return max(1, math.ceil(self.bound / math.log(self.p1 / self.p0) - 1e-12))

    def record(self) -> dict[str, Any]:
        return {"test": "one-sided SPRT on the per-image failure rate", "p0": self.p0, "p1": self.p1,
                "alpha": self.alpha}


#: The most of what a batch saves that its audit may spend: the audit guards the saving and must not eat it (given
#: all that the budget left, at 116 images it audited every 2nd image and the pack ran slower than stock).
AUDIT_SHARE = 0.1
#: The fewest images an audited batch of the bench and the demo renders per fragment call (``run_audited``'s block;
#: a lead renders alone): rendered one audited stretch at a time, a batch audited every 2nd image ran at 0.76x raw
#: on the reference model where the same fragment runs 1.58x paired.
AUDIT_BLOCK = 16


def audit_allowance(raw_ratio: float, n: int, left_u: float) -> float:
    """What the running audit of ``n`` fragment images at ``raw_ratio`` may spend, in u: what the calibration's budget
    left (``left_u``), at most ``AUDIT_SHARE`` of what the batch saves (``n * (1 - 1 / raw_ratio)`` u).

    >>> round(audit_allowance(2.0, 116, 40.0), 3), audit_allowance(2.0, 24, 1.0), audit_allowance(1.0, 24, 5.0)
    (5.8, 1.0, 0.0)
    """
    saving = n * (1.0 - 1.0 / raw_ratio) if raw_ratio > 1.0 else 0.0
    return max(0.0, min(left_u, AUDIT_SHARE * saving))


def audit_interval(raw_ratio: float, n: int, allowance_u: float, *, min_audits: int | None = None) -> int:
    """Audit every k-th image: the k whose audits fit ``allowance_u`` (in u), or 0 for no audit.

    An audit delivers the full model's image (output, not overhead) and wastes the
    fragment's render of that seed, about ``1 / raw_ratio`` u; so the allowance pays
    for ``floor(allowance_u * raw_ratio)`` audits.  Fewer than ``min_audits``
    (``AuditRule().min_audits``, 3) could never make the rule switch, so that many are
    audited whatever the allowance (their cost, ``min_audits / raw_ratio`` u, is the
    held-out confirmation's, moved into the batch); a batch too small for that many
    gets no audit (0): under 6 images, since at most every second image is audited (more
    would be the full model with extra work).

    Worked example: 32 images at 2x raw with 1.5 u to spare pays for 3 audits
    (3 x 0.5 u), so every 15th image is audited (images 0, 15, 30; the first image
    is always one); with 4 u, 8 audits fit: every 4th (0, 4, ..., 28); with nothing
    to spare, the floor of 3 audits still holds.

    >>> audit_interval(2.0, 32, 1.5), audit_interval(2.0, 32, 4.0), audit_interval(2.0, 32, 0.0)
    (15, 4, 15)
    >>> audit_interval(2.0, 5, 1.0), audit_interval(2.0, 6, 1.0), audit_interval(2.0, 32, 100.0), audit_interval(1.0, 32, 1.0)
    (0, 2, 2, 0)
    """
    floor = AuditRule().min_audits if min_audits is None else min_audits
    if n // 2 < max(floor, 1) or raw_ratio <= 1.0:
        # too few images for audits that could ever switch (at most every second one is audited), or a fragment that
        # saves nothing: the full model is the better batch
        return 0
    affordable = math.floor(max(0.0, allowance_u) * raw_ratio + 1e-9)
    audits = min(max(affordable, floor), n // 2)
    # Audited indices are 0, k, 2k, ...: ceil(n / k) of them; the largest k that still gives ``audits``.
    return max(2, (n - 1) // max(1, audits - 1)) if audits > 1 else n


def lead_interval(raw_ratio: float, images: int, lead: int, allowance_u: float) -> int:
    """The interval after a lead of ``lead`` audits (``run_audited``'s audits at ``lead - 1 + k``, ``lead - 1 + 2k``,
    ...): the k that fits the audits ``allowance_u`` still pays for after the lead's (``1 / raw_ratio`` u each), at
    most every 2nd image; ``images`` (the lead alone) when it pays for none.

    >>> lead_interval(2.0, 125, 3, 100.0), lead_interval(2.0, 125, 3, 6.0), lead_interval(2.0, 32, 3, 1.5)
    (2, 13, 32)
    """
    extra = math.floor(max(allowance_u - lead / raw_ratio, 0.0) * raw_ratio + 1e-9)
    if extra < 1 or images <= lead:
        return images
    return max(2, (images - lead) // extra)


def lead_pays(raw_ratio: float, images: int, lead: int) -> bool:
    """Whether a batch of ``images`` fragment images saves at least what a lead of ``lead`` audits costs: each audit
    turns a fragment image (``1 / raw_ratio`` u) into a full-model one (1 u) and throws the fragment's render away
    (``1 / raw_ratio`` u), so it costs 1 u more; the batch saves ``images * (1 - 1 / raw_ratio)`` u.  At 2x raw a
    lead of 3 needs 6 images.

    >>> lead_pays(2.0, 5, 3), lead_pays(2.0, 6, 3), lead_pays(1.0, 100, 3)
    (False, True, False)
    """
    return raw_ratio > 1.0 and lead <= images * (1.0 - 1.0 / raw_ratio) + 1e-9


def planned_audit_every(raw_ratio: float | None, images: int, *, lead: int = 0, left_u: float = math.inf) -> int:
    """The running audit's interval for a batch of ``images`` fragment images, from the cost model: the audits that
    ``audit_allowance`` pays for (what is ``left_u`` of the budget, at most ``AUDIT_SHARE`` of what the batch saves at
    ``raw_ratio``).  With a ``lead`` (the first images all audited: a setting no judged try confirmed) the interval
    after it (``lead_interval``; the lead alone when the allowance pays for nothing more: a pick no judged try
    confirmed is always led; whether that lead pays is the host's call, ``lead_pays``).  ``raw_ratio`` None (goal
    memory, repaid in bytes): the fewest audits that can switch.  The one rule ``bench batch`` and BatchGenerator's
    ``audit_every`` auto (-1) follow.

    Worked example: 32 images at 2x raw save 16 u, a tenth of it (1.6 u) pays for 3 audits at 0.5 u: every 15th
    image (0, 15, 30); a pick confirmed by no judged try is led by 3 audits (0, 1, 2) and the allowance's 0.1 u
    left pays for no more.

    >>> planned_audit_every(2.0, 32), planned_audit_every(2.0, 32, lead=3), planned_audit_every(2.0, 128, lead=3)
    (15, 32, 13)
    >>> planned_audit_every(None, 32), planned_audit_every(1.0, 32), planned_audit_every(2.0, 5, lead=3)
    (15, 0, 5)
    """
    if raw_ratio is None:
        return max(images, 1) if lead else audit_interval(2.0, images, 0.0)
    allowance = audit_allowance(raw_ratio, images, left_u)
    if lead:
        return lead_interval(raw_ratio, images, lead, allowance)
    return audit_interval(raw_ratio, images, allowance)


def planned_audits(raw_ratio: float | None, images: int, *, lead: int = 0, left_u: float = math.inf) -> int:
    """How many of ``images`` fragment images the running audit will audit (``planned_audit_every``'s interval,
    after a ``lead``): what a cost line counts before the batch runs.

    >>> planned_audits(2.0, 31), planned_audits(2.0, 31, lead=3), planned_audits(1.0, 31)
    (3, 3, 0)
    """
    every = planned_audit_every(raw_ratio, images, lead=lead, left_u=left_u)
    return len(audit_positions(images, every, lead if every else 0))


@dataclass
class AuditRecord:
    """One audited seed: its place in the batch, the setting judged, and the comparison's verdict and metrics."""

    seed: int
    index: int
    setting: str
    passed: bool
    metrics: dict[str, Any]

    def record(self) -> dict[str, Any]:
        return {"seed": self.seed, "index": self.index, "setting": self.setting, "passed": self.passed,
                "metrics": {k: v for k, v in self.metrics.items() if isinstance(v, (int, float, str, bool, list))}}


@dataclass
class AuditedBatch:
    """What ``run_audited`` made: ``images`` (one per seed, in order), the audit's ``records``, and where it switched.

    ``setting[i]`` names what rendered image ``i`` (``FULL`` for audited and given seeds);
    ``switched_at`` is the index of the audited image whose failure made the first switch
    (None when none did); ``switches`` lists every switch as ``(index, from, to)``.
    """

    seeds: list[int]
    images: list[Any]
    setting: list[str]
    records: list[AuditRecord] = field(default_factory=list)
    switches: list[tuple[int, str, str]] = field(default_factory=list)
    given: int = 0  # full-model images handed in (rendered before), delivered as they are
    every: int = 0
    # the lead judged as one sample (``run_audited``'s ``lead_check``): {"passed", "images", "metrics"}; None: not run
    lead: dict[str, Any] | None = None

    @property
    def switched_at(self) -> int | None:
        return self.switches[0][0] if self.switches else None

    @property
    def delivered(self) -> int:
        """Full-model images in the batch: audited seeds, given seeds and seeds after a switch to the full model."""
        return sum(1 for s in self.setting if s == FULL)

    def summary(self) -> str:
        """One line for a status, e.g. ``audited 4 of 32: 4 passed``.

        Rows given (full-model images already rendered) are not counted: the audit is of the images left to render.

        >>> b = AuditedBatch([1, 2], [0, 0], [FULL, "a"], [AuditRecord(1, 0, "a", True, {})])
        >>> b.summary()
        'audited 1 of 2: 1 passed'
        >>> AuditedBatch([1, 2, 3, 4], [0] * 4, [FULL] * 3 + ["a"], [AuditRecord(3, 2, "a", True, {})], given=2).summary()
        'audited 1 of 2: 1 passed'
        """
        rendered = len(self.seeds) - self.given
        if not self.records:
            return f"no audit of {rendered} images"
        passed = sum(r.passed for r in self.records)
        line = f"audited {len(self.records)} of {rendered}: {passed} passed"
        if passed < len(self.records):
            line += f", {len(self.records) - passed} failed"
        for index, old, new in self.switches:
            rest = "the full model" if new == FULL else new
            if self.lead is not None and not self.lead["passed"] and self.lead.get("index") == index:
                # a lead image may have passed on its own: the switch is the lead's, judged as one sample
                line += f"; the first {self.lead['images']} together failed the gate on their means ({old}): rest on {rest}"
            else:
                line += f"; audit failed at image {index + 1} ({old}): rest on {rest}"
        return line

    def record(self) -> dict[str, Any]:
        """Plain JSON for a manifest or a status: the rule's outcome, switches and every audited seed."""
        return {"every": self.every, "images": len(self.seeds), "audited": len(self.records),
                "passed": sum(r.passed for r in self.records), "given": self.given, "delivered_full": self.delivered,
                "switched_at": self.switched_at,
                "switches": [{"index": i, "from": a, "to": b} for i, a, b in self.switches],
                "records": [r.record() for r in self.records],
                "lead": None if self.lead is None else {**self.lead, "metrics": _plain(self.lead["metrics"])},
                "summary": self.summary()}


def _plain(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics`` as JSON keeps them: numbers (numpy scalars included) as finite floats or ints, bools, strings and
    lists of strings or numbers; anything else, and a non-finite number, is left out.

    >>> import numpy as np
    >>> _plain({"a": np.float32(0.5), "b": True, "c": float("nan"), "d": ["x", 1], "e": object()})
    {'a': 0.5, 'b': True, 'd': ['x', 1]}
    """
    def plain(v: Any) -> Any:
        if isinstance(v, (bool, str)) or v is None:
            return v
        if hasattr(v, "item") and not isinstance(v, (list, tuple)):  # numpy and torch scalars
            try:
                v = v.item()
            except (TypeError, ValueError):
                return _DROP
        if isinstance(v, bool):
            return v
        if isinstance(v, (int, float)):
            return v if math.isfinite(v) else _DROP
        if isinstance(v, (list, tuple)):
            items = [plain(x) for x in v]
            return _DROP if any(x is _DROP for x in items) else items
        return _DROP
    out = {k: plain(v) for k, v in metrics.items()}
    return {k: v for k, v in out.items() if v is not _DROP}


_DROP = object()


def audit_positions(count: int, every: int, lead: int = 0) -> list[int]:
    """Which of ``count`` rendered images are audited: the 1st and every ``every``-th, or the first ``lead`` and every
    ``every``-th after the last of them (none when ``every`` is 0).

    >>> audit_positions(8, 3), audit_positions(8, 4, lead=3), audit_positions(8, 0)
    ([0, 3, 6], [0, 1, 2, 6], [])
    """
    if every <= 0:
        return []
    # after a lead, every ``every``-th image from the last one led
    periodic = range(lead - 1 + every, count, every) if lead > 0 else range(0, count, every)
    return sorted(set(range(min(lead, count))) | set(periodic))


def _segments(todo: list[int], every: int, lead: int = 0) -> list[tuple[list[int], int | None]]:
    """Positions to render, cut so each piece ends at its audited position (``audit_positions``)."""
    if every <= 0:
        return [(todo, None)] if todo else []
    pieces, start = [], 0
    for j in audit_positions(len(todo), every, lead):
        pieces.append((todo[start:j + 1], todo[j]))
        start = j + 1
    if start < len(todo):
        pieces.append((todo[start:], None))
    return pieces


def run_audited(seeds: Sequence[int], render_fragment: RenderFragment, render_full: RenderFull, compare: Compare,
                rule: AuditRule | None = None, fallbacks: Sequence[Any] = (), *, setting: Any, every: int,
                given: Mapping[int, Any] | None = None, label: Callable[[Any], str] = str, block: int = 1,
                lead: int = 0, lead_check: LeadCheck | None = None) -> AuditedBatch:
    """Render ``seeds`` with ``setting``, auditing the 1st and every ``every``-th rendered image; see the module docstring.

    ``render_fragment(setting, seeds)`` and ``render_full(seeds)`` return one image per seed
    (a batch tensor or array, or a list); ``compare(full, fragment)`` judges one seed's pair.
    ``given`` maps seeds the full model already rendered to their images: they are
    delivered as they are, never rendered again.  ``every = 0`` turns the audit off.

    ``block`` is the fewest images one fragment render is given (a lead aside): the audited stretches are rendered together,
    then judged in order; with ``block > 1`` the audited seeds' full-model images are rendered first, in one call.
    A batch rendered one stretch at a time runs at the speed of batches of ``every`` images, and the full model
    at batches of one (on the reference model a lone image costs 2-3 stock images).  The result is the same for any ``block``:
    when the rule switches inside a block, the images after the switch are rendered again with the next setting
    (a seed's image does not depend on its neighbours in a batch).  The unaudited rest after the last audit joins
    a block only as far as it fills it, and a lead is rendered alone: a lead that fails has rendered its own
    images of the fragment, not a block or the batch.

    ``lead`` audits the first ``lead`` rendered images too: a setting no judged try confirmed (``calibrate``'s
    ``confirm_in_batch``) meets its confirmation before the batch is made of it, so a bad one is switched away from
    after ``AuditRule().min_audits`` images, not a third of the way in.

    >>> frag = lambda s, seeds: [10 * x + (1 if s == "bad" else 0) for x in seeds]
    >>> full = lambda seeds: [10 * x for x in seeds]
    >>> same = lambda a, b: (a == b, {"error": abs(a - b)})
    >>> b = run_audited(range(8), frag, full, same, AuditRule(), ["ok"], setting="bad", every=2)
    >>> b.images, b.switched_at, b.setting[-1]
    ([0, 11, 20, 31, 40, 50, 60, 70], 4, 'ok')
    >>> b.summary()
    'audited 4 of 8: 1 passed, 3 failed; audit failed at image 5 (bad): rest on ok'
    >>> run_audited(range(8), frag, full, same, AuditRule(), ["ok"], setting="bad", every=2, block=8).images == b.images
    True
    >>> run_audited(range(8), frag, full, same, AuditRule(), ["ok"], setting="bad", every=8, lead=3).switched_at
    2

    ``lead_check(full_images, fragment_images)`` judges the lead's images together, as one sample (the gate on their
    means), once the lead's audits are in and the rule has not switched: a fail switches as the rule does.  The
    per-image rule cannot tell a setting that fails half its images from one that fails a quarter (its two rates)
    within a batch; a setting whose lead fails the gate on its mean can be caught here (a small sample: whether it
    is depends on how its first images fall).

    >>> half = lambda s, seeds: [10 * x + (x % 2) for x in seeds]  # every odd seed off by one
    >>> means = lambda f, g: (sum(abs(a - b) for a, b in zip(f, g)) / len(f) < 0.3, {})
    >>> b = run_audited(range(8), half, full, same, setting="half", every=8, lead=3, lead_check=means)
    >>> b.switched_at, b.summary()
    (2, 'audited 3 of 8: 2 passed, 1 failed; the first 3 together failed the gate on their means (half): rest on the full model')
    """
    rule = rule or AuditRule()
    if every < 0:
        raise FragmentError(f"audit: expected every >= 0 (0 turns the audit off), found {every}")
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise FragmentError(f"audit: expected block >= 1 (the fewest images per fragment render), found {block!r}")
    seeds, given = list(seeds), dict(given or {})
    chain = [setting, *fallbacks]
    images: list[Any] = [None] * len(seeds)
    settings: list[str] = [FULL] * len(seeds)
    for i, s in enumerate(seeds):
        if s in given:
            images[i] = given[s]
    todo = [i for i, s in enumerate(seeds) if s not in given]
    batch = AuditedBatch(seeds, images, settings, given=len(seeds) - len(todo), every=every)
    step, failures, audits = 0, 0, 0  # the setting in use (chain index; len(chain) = the full model) and its tally
    if not isinstance(lead, int) or isinstance(lead, bool) or lead < 0:
        raise FragmentError(f"audit: expected lead >= 0 (the first images all audited), found {lead!r}")
    segments = _segments(todo, every, lead)
    full_images: dict[int, Any] = {}  # audited positions' full-model images, rendered once even when re-rendered after a switch
    audited_all = [a for _, a in segments if a is not None]
    if block > 1 and audited_all:
        # every audited seed's full-model image is delivered whatever the audit decides (as the audit's image, or
        # as the full model's after a switch to it), so all are rendered first, together, never one at a time
        full_images.update(zip(audited_all, render_full([seeds[a] for a in audited_all])))
    lead_pairs: list[tuple[Any, Any]] = []  # the first setting's lead: (full, fragment) per audited seed
    k = 0
    while k < len(segments):
        end, size = k, 0
        # a lead renders alone: an untried setting that fails it has cost its own images, not a block's
        limit = min(block, lead) if k == 0 and lead else block
        while end < len(segments) and (size == 0 or size < limit):
            piece, audited = segments[end]
            if size and audited is None and size + len(piece) > limit:
                # the unaudited rest after an audit: only what fills the block, so the audit is judged before the
                # rest is rendered
                segments[end:end + 1] = [(piece[:limit - size], None), (piece[limit - size:], None)]
                piece = piece[:limit - size]
            size, end = size + len(piece), end + 1
        chunk = segments[k:end]
        positions = [i for piece, _ in chunk for i in piece]
        if step >= len(chain):  # past the last fallback: the full model renders the rest
            missing = [i for i in positions if i not in full_images]
            for i, image in zip(missing, render_full([seeds[i] for i in missing]) if missing else []):
                full_images[i] = image
            for i in positions:
                images[i] = full_images[i]
            k = end
            continue
        current = chain[step]
        rendered = dict(zip(positions, render_fragment(current, [seeds[i] for i in positions])))
        wanted = [a for _, a in chunk if a is not None and a not in full_images]
        for a, image in zip(wanted, render_full([seeds[a] for a in wanted]) if wanted else []):
            full_images[a] = image
        k = end
        for n, (piece, audited) in enumerate(chunk):
            for i in piece:
                images[i], settings[i] = rendered[i], label(current)
            if audited is None:
                continue
            full_image = full_images[audited]
            passed, metrics = compare(full_image, images[audited])
            # The user keeps the full model's image of an audited seed; the fragment's is only judged.
            images[audited], settings[audited] = full_image, FULL
            batch.records.append(AuditRecord(seeds[audited], audited, label(current), bool(passed), dict(metrics)))
            audits += 1
            failures += not passed
            switch, by_lead = rule.switch(failures, audits), False
            if lead_check is not None and step == 0 and lead and len(lead_pairs) < lead:
                lead_pairs.append((full_image, rendered[audited]))
                if len(lead_pairs) == min(lead, len(todo)) and not switch:
                    ok, lead_metrics = lead_check([a for a, _ in lead_pairs], [b for _, b in lead_pairs])
                    batch.lead = {"passed": bool(ok), "images": len(lead_pairs), "index": audited,
                                  "metrics": dict(lead_metrics)}
                    switch = by_lead = not ok
            if switch:
                step += 1
                to = label(chain[step]) if step < len(chain) else FULL
                batch.switches.append((audited, label(current), to))
                why = (f"its first {len(lead_pairs)} images failed the gate on their means" if by_lead
                       else f"failed {failures} of {audits} audits")
                log.warning("audit: %s %s by image %d (seed %d): the rest of the batch runs on %s",
                            label(current), why, audited + 1, seeds[audited], to)
                failures = audits = 0  # a new setting starts its own tally
                k -= len(chunk) - n - 1  # the block's later stretches are rendered again on the new setting
                break
    return batch
