"""One cost model for the pack's own work, in ``u`` and in seconds (issue #26).

``u`` is the cost of one stock image: the seconds of one full-model image,
measured beside stock in the same run.  Seconds move with the machine's load;
a count in ``u`` does not, because both sides of the ratio move together.

What counts (``CostLedger.add`` kinds):

* ``profile_hooks``: the profiled run's seconds minus the stock seconds of the
  images it made (those images are the user's, so only the hooks are overhead);
* ``judged``: the candidates' renders and the judge's own work;
* ``decode``: VAE decodes done only to judge (when there are any);
* ``build``: turning the profile into fragments;
* ``audit``: the running audit's extra work;
* ``reference``: full-model renders made for the judge (delivered when the user keeps them).

A full-model image the user keeps is output, not overhead: an entry's overhead
is its seconds minus one stock image for each image it delivered (never below
zero).  What a batch can repay follows from the raw ratio ``r`` (stock time
over fragment time): each fragment image saves ``1 - 1/r`` u, and only the
images the pack still has to render (``n - delivered``) save anything.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..errors import FragmentError

COST_KINDS = ("profile_hooks", "judged", "decode", "build", "audit", "reference")


def _check_ratio(raw_ratio: float, where: str) -> float:
    if raw_ratio is None or not math.isfinite(raw_ratio) or raw_ratio <= 0:
        raise FragmentError(f"{where} raw_ratio: expected a finite number > 0, found {raw_ratio!r}")
    return float(raw_ratio)


class CostLedger:
    """The pack's own costs in one run, in seconds and in ``u`` (``unit_s`` seconds = one stock image).

    >>> ledger = CostLedger(unit_s=0.5)
    >>> ledger.add("profile_hooks", 5.0, images=8, delivered=8)   # 8 images kept: only 1 s of hooks is overhead
    >>> ledger.add("judged", 2.0, images=8)
    >>> ledger.overhead_s, ledger.overhead_u, ledger.delivered
    (3.0, 6.0, 8)
    """

    def __init__(self, unit_s: float) -> None:
        if unit_s is None or not math.isfinite(unit_s) or unit_s <= 0:
            raise FragmentError(f"cost ledger unit_s (seconds of one stock image): expected a finite number > 0, "
                                f"found {unit_s!r}")
        self.unit_s = float(unit_s)
        self.entries: list[dict[str, Any]] = []

    def add(self, kind: str, seconds: float, *, images: int = 0, delivered: int = 0) -> None:
        """Count ``seconds`` of work of ``kind``; ``delivered`` of its ``images`` are full-model images the user keeps."""
        if kind not in COST_KINDS:
            raise FragmentError(f"cost ledger kind: expected one of {', '.join(COST_KINDS)}, found {kind!r}")
        if seconds is None or not math.isfinite(seconds) or seconds < 0:
            raise FragmentError(f"cost ledger {kind} seconds: expected a finite number >= 0, found {seconds!r}")
        for name, value in (("images", images), ("delivered", delivered)):
            if not isinstance(value, int) or value < 0:
                raise FragmentError(f"cost ledger {kind} {name}: expected an integer >= 0, found {value!r}")
        if delivered > images:
            raise FragmentError(f"cost ledger {kind}: delivered ({delivered}) exceeds the images rendered ({images})")
        overhead = max(float(seconds) - delivered * self.unit_s, 0.0)
        self.entries.append({"kind": kind, "seconds": float(seconds), "images": images, "delivered": delivered,
                             "overhead_s": overhead})

    @property
    def overhead_s(self) -> float:
        return sum(e["overhead_s"] for e in self.entries)

    @property
    def overhead_u(self) -> float:
        return self.overhead_s / self.unit_s

    @property
    def delivered(self) -> int:
        return sum(e["delivered"] for e in self.entries)

    def record(self, raw_ratio: float | None = None, n: int | None = None) -> dict[str, Any]:
        """Plain JSON data: the unit, the totals, per kind; with ``raw_ratio`` and ``n``, the break-even and the
        amortized ratio at ``n``.

        >>> ledger = CostLedger(2.0); ledger.add("judged", 4.0, images=4)
        >>> r = ledger.record(raw_ratio=2.0, n=32); r["overhead_u"], r["break_even_images"], r["amortized_ratio"]
        (2.0, 4, 1.7777777777777777)
        """
        kinds: dict[str, dict[str, Any]] = {}
        for e in self.entries:
            k = kinds.setdefault(e["kind"], {"seconds": 0.0, "overhead_s": 0.0, "images": 0, "delivered": 0})
            for key in ("seconds", "overhead_s", "images", "delivered"):
                k[key] += e[key]
        for k in kinds.values():
            k["overhead_u"] = k["overhead_s"] / self.unit_s
        out: dict[str, Any] = {"unit_s": self.unit_s, "overhead_s": self.overhead_s, "overhead_u": self.overhead_u,
                               "delivered": self.delivered, "by_kind": kinds}
        if raw_ratio is not None:
            out["raw_ratio"] = raw_ratio
            out["break_even_images"] = break_even_images(self.overhead_u, raw_ratio, self.delivered)
            if n is not None:
                out["n"] = n
                out["amortized_ratio"] = amortized_ratio(self.overhead_u, raw_ratio, n, self.delivered)
        return out


def repayable_units(n: int, raw_ratio: float, delivered: int = 0) -> float:
    """The most overhead (in u) a batch of ``n`` images can repay: ``(n - delivered) * (1 - 1 / raw_ratio)``.

    >>> repayable_units(32, 2.0), repayable_units(32, 2.0, delivered=12), repayable_units(32, 0.9)
    (16.0, 10.0, 0.0)
    """
    raw_ratio = _check_ratio(raw_ratio, "repayable_units")
    if raw_ratio <= 1:
        return 0.0
    return max(n - delivered, 0) * (1.0 - 1.0 / raw_ratio)


def break_even_images(overhead_u: float, raw_ratio: float, delivered: int = 0) -> int | None:
    """The smallest batch from which the pack is no slower than stock (``None``: never).

    The pack's batch of N costs ``overhead_u + delivered + (N - delivered) / raw_ratio`` u, stock costs N.

    >>> break_even_images(4.0, 2.0), break_even_images(4.0, 2.0, delivered=8), break_even_images(1.0, 1.0)
    (8, 16, None)
    """
    raw_ratio = _check_ratio(raw_ratio, "break_even_images")
    if overhead_u <= 0:
        return max(delivered, 1)
    if raw_ratio <= 1:
        return None
    return max(delivered, 1, math.ceil(delivered + overhead_u / (1.0 - 1.0 / raw_ratio) - 1e-9))


def amortized_ratio(overhead_u: float, raw_ratio: float, n: int, delivered: int = 0) -> float:
    """Stock time over the pack's time for a batch of ``n``: ``n / (overhead_u + delivered + (n - delivered) / r)``.

    >>> amortized_ratio(0.0, 2.0, 32), amortized_ratio(4.0, 2.0, 32, delivered=8)
    (2.0, 1.3333333333333333)
    """
    raw_ratio = _check_ratio(raw_ratio, "amortized_ratio")
    kept = min(delivered, n)
    return n / (max(overhead_u, 0.0) + kept + (n - kept) / raw_ratio)


def cost_line(ledger: CostLedger, raw_ratio: float, n: int, never: str = "the fragment is not faster") -> str:
    """The one line the node, the demo and the bench print (``never``: why a batch that never pays back does not).

    >>> ledger = CostLedger(2.0); ledger.add("judged", 4.2, images=4)
    >>> cost_line(ledger, 2.0, 32)
    'spent 2.1 u (4.2 s), pays back from image 5 at 2.00x raw; amortized 1.77x at N=32'
    """
    even = break_even_images(ledger.overhead_u, raw_ratio, ledger.delivered)
    pays = f"never pays back ({never})" if even is None else f"pays back from image {even}"
    return (f"spent {ledger.overhead_u:.1f} u ({ledger.overhead_s:.1f} s), {pays} at {raw_ratio:.2f}x raw; "
            f"amortized {amortized_ratio(ledger.overhead_u, raw_ratio, n, ledger.delivered):.2f}x at N={n}")


def calibration_costs(cal: Any, *, unit_s: float | None, n: int, raw_ratio: float | None,
                      reference_s: float = 0.0, reference_images: int = 0,
                      profiled_images: int = 0, planned_audits: int = 0,
                      ratio_note: str = "estimated before judging") -> tuple[str | None, dict[str, Any]]:
    """One host's calibration (``fragment.calibration.Calibration``) as a ledger: the status line and the record.

    ``unit_s`` is the seconds of one stock image as the host measured it (ComfyJudge: its reference check, a
    full-model render of the profiled seed); ``reference_s`` / ``reference_images`` that check, overhead (the
    user already has that image); the calibration's own time counts as judged work, its held-out references
    delivered.  ``profiled_images`` (the profiled run's images, which the batch keeps) are delivered too; the
    profile hooks' own time is not measured here, and the record says so.  ``raw_ratio`` is the estimate the
    budget used; with no lever chosen (the full model) the ratio is 1 and the line says it never pays back.
    ``planned_audits``: the audited images the batch's running audit will make (``fragment.audit.planned_audits``),
    counted before it runs: each is a full-model image the user keeps (one stock image, delivered) and a fragment
    render of the same seed thrown away (``1 / raw_ratio`` u, overhead).  Without ``unit_s`` there is no line.

    >>> from types import SimpleNamespace
    >>> cal = SimpleNamespace(seconds=3.0, images=3, delivered=1, chosen="heads 20%")
    >>> line, rec = calibration_costs(cal, unit_s=0.5, n=32, raw_ratio=2.0, reference_s=0.5, reference_images=1,
    ...                               profiled_images=1)
    >>> line
    'spent 6.0 u (3.0 s), pays back from image 14 at 2.00x raw; amortized 1.39x at N=32'
    >>> rec["overhead_u"], rec["break_even_images"], rec["profile_hooks"]
    (6.0, 14, 'not measured')
    >>> calibration_costs(cal, unit_s=None, n=32, raw_ratio=2.0)[0] is None
    True
    """
    if unit_s is None or not math.isfinite(unit_s) or unit_s <= 0:
        return None, {"unit_s": None, "note": "no stock image was timed: no cost in u"}
    ratio = float(raw_ratio) if cal.chosen is not None and raw_ratio else 1.0
    ledger = CostLedger(unit_s)
    if reference_images:
        ledger.add("reference", max(float(reference_s), 0.0), images=int(reference_images))
    if profiled_images:  # the profiled run's images are the user's: output at one stock image each
        ledger.add("profile_hooks", unit_s * int(profiled_images), images=int(profiled_images),
                   delivered=int(profiled_images))
    ledger.add("judged", max(float(cal.seconds), 0.0), images=int(cal.images), delivered=int(cal.delivered))
    audits = int(planned_audits) if cal.chosen is not None else 0
    if audits:
        ledger.add("audit", unit_s * audits * (1.0 + 1.0 / ratio), images=2 * audits, delivered=audits)
    record = ledger.record(raw_ratio=ratio, n=n)
    record["profile_hooks"] = "not measured"
    record["audit"] = f"{audits} planned audits, estimated at the raw ratio" if audits else "none planned"
    record["raw_ratio_source"] = ratio_note if cal.chosen is not None and raw_ratio else \
        "1.0: the full model was kept" if cal.chosen is None else "1.0: no estimate"
    return cost_line(ledger, ratio, n), record


@dataclasses.dataclass(frozen=True)
class BatchTimes:
    """One batch as it ran (BatchGenerator): its renders counted and timed, by model.

    ``fragment_images`` counts every fragment image rendered (kept, audited, or rendered again after a switch),
    ``kept`` those the batch delivers; every full-model image (``full_images``: audits, and the rest after a
    switch to the full model) is delivered.  ``given`` rows were rendered before the batch (FragmentExtractor's
    ``full_model_latents``) and not again.  ``wall_s`` is the whole batch; what no render explains (the audits'
    comparisons) is the audit's when there were audits.  A render's seconds include loading its model (BatchGenerator
    times the whole sampler call): the model swaps an audit causes are in the renders' seconds, not in the rest.
    """

    images: int
    wall_s: float
    fragment_s: float = 0.0
    fragment_images: int = 0
    kept: int = 0
    full_s: float = 0.0
    full_images: int = 0
    given: int = 0


def extraction_costs(performance: Any) -> dict[str, Any] | None:
    """What a fragment's extraction cost, read from its manifest's ``performance`` block (``calibration.ledger``,
    written by :func:`calibration_costs`), checked as untrusted data: ``{"unit_s", "start", "by_kind"}`` with only
    the known kinds and finite, non-negative numbers within ``MAX_UNIT_S``/``MAX_SECONDS``/``MAX_IMAGES``, the planned
    audits left out (a batch measures its own); None when the manifest records no ledger or a malformed one.

    >>> perf = {"calibration": {"start": "cold", "ledger": {"unit_s": 0.5, "by_kind": {
    ...     "reference": {"seconds": 0.5, "images": 1, "delivered": 0},
    ...     "audit": {"seconds": 2.25, "images": 6, "delivered": 3}}}}}
    >>> extraction_costs(perf)
    {'unit_s': 0.5, 'start': 'cold', 'by_kind': {'reference': {'seconds': 0.5, 'images': 1, 'delivered': 0}}}
    >>> extraction_costs({"calibration": {"ledger": {"unit_s": float("nan"), "by_kind": {}}}}) is None
    True
    """
    calibration = performance.get("calibration") if isinstance(performance, dict) else None
    ledger = calibration.get("ledger") if isinstance(calibration, dict) else None
    if not isinstance(ledger, dict) or not isinstance(ledger.get("by_kind"), dict):
        return None
    unit_s = ledger.get("unit_s")
    if not _finite(unit_s, MAX_UNIT_S) or unit_s < 1e-6:
        return None
    kinds: dict[str, dict[str, Any]] = {}
    for kind, entry in ledger["by_kind"].items():
        if kind == "audit":  # the extractor's estimate of the batch's audits: the batch times its own
            continue
        if kind not in COST_KINDS or not isinstance(entry, dict):
            return None
        seconds, images, delivered = entry.get("seconds"), entry.get("images"), entry.get("delivered")
        if not (_finite(seconds) and seconds >= 0 and _count(images) and _count(delivered) and delivered <= images):
            return None
        kinds[kind] = {"seconds": float(seconds), "images": images, "delivered": delivered}
    start = calibration.get("start")
    return {"unit_s": float(unit_s), "start": start if start in ("cold", "warm (prior)") else None, "by_kind": kinds}


def batch_costs(times: BatchTimes, extraction: dict[str, Any] | None = None, *,
                extraction_unit: bool = True) -> tuple[str | None, dict[str, Any]]:
    """A batch's cost line, measured: ``u`` and the raw ratio from its own renders, its audits' overhead, and
    with ``extraction`` (:func:`extraction_costs`) the fragment's whole cost for this batch of ``times.images``.

    ``u`` is the seconds of one full-model image of the batch (its audits) or, when the batch rendered none, the
    extractor's (only with ``extraction_unit``: the batch runs the sampler settings the extractor timed); the raw
    ratio is ``u`` over the seconds of one fragment image.  A render's seconds include loading its model.  An audit's full-model image is
    delivered; its fragment render, and any render made again after a switch, is overhead.  Rows given by the
    extractor count as delivered images whose cost is the extraction's (a reference check's image first, then
    held-out references); given rows no extraction record explains count one ``u`` each.  No ``u`` (no full-model
    image timed anywhere) or no fragment image: no line.

    >>> t = BatchTimes(images=32, wall_s=10.5, fragment_s=8.0, fragment_images=32, kept=29, full_s=1.5, full_images=3)
    >>> line, rec = batch_costs(t)
    >>> line
    'u = 0.50 s (a full-model image, timed in this batch); fragment 2.00x raw; this batch spent 3.5 u (1.8 s) on its audits: 1.52x of stock for 32 images'
    >>> ext = {"unit_s": 0.5, "start": "cold", "by_kind": {"reference": {"seconds": 0.5, "images": 1, "delivered": 0}}}
    >>> line, rec = batch_costs(t, ext); line.split("; ")[-2:]
    ['with the extraction (cold): spent 4.5 u (2.2 s), pays back from image 12 at 2.00x raw', 'amortized 1.45x at N=32']
    """
    unit_s, source = None, None
    if times.full_images > 0 and times.full_s > 0:
        unit_s, source = times.full_s / times.full_images, "a full-model image, timed in this batch"
    elif extraction is not None and extraction_unit:
        unit_s, source = extraction["unit_s"], "a full-model image, timed by the extractor"
    if times.fragment_images <= 0 or times.fragment_s <= 0:
        return None, {"unit_s": None, "note": "no fragment image was rendered: no raw ratio"}
    if unit_s is None:
        return None, {"unit_s": None, "note": "no full-model image of these settings was timed: no cost in u"}
    per_fragment = times.fragment_s / times.fragment_images
    raw = unit_s / per_fragment
    wasted = max(times.fragment_images - times.kept, 0)
    rest_s = max(times.wall_s - times.fragment_s - times.full_s, 0.0) if times.full_images or wasted else 0.0

    def ledger_of(with_extraction: bool) -> CostLedger:
        ledger = CostLedger(unit_s)
        if times.full_images or wasted:
            ledger.add("audit", times.full_s + wasted * per_fragment + rest_s, images=times.full_images + wasted,
                       delivered=times.full_images)
        left = max(int(times.given), 0)
        for kind, entry in (extraction or {}).get("by_kind", {}).items() if with_extraction else ():
            if kind == "profile_hooks":  # the profiled run's images are outside the batch; only its hooks count
                ledger.add(kind, max(entry["seconds"] - entry["delivered"] * extraction["unit_s"], 0.0))
                continue
            # the extractor's full-model renders that came into the batch as given rows are its images
            take = min(left, entry["images"] if kind == "reference" else entry["delivered"])
            ledger.add(kind, entry["seconds"], images=entry["images"], delivered=take)
            left -= take
        if left:
            ledger.add("reference", left * unit_s, images=left, delivered=left)
        return ledger

    if not math.isfinite(raw) or raw <= 0:
        return None, {"unit_s": unit_s, "note": f"raw ratio {raw!r} is not a finite number: no cost line"}
    alone = ledger_of(False)
    record: dict[str, Any] = {"unit_s": unit_s, "unit_source": source, "raw_ratio": raw,
                              "batch": alone.record(raw_ratio=raw, n=times.images)}
    line = (f"u = {unit_s:.2f} s ({source}); fragment {raw:.2f}x raw; this batch spent {alone.overhead_u:.1f} u "
            f"({alone.overhead_s:.1f} s) on its audits: {record['batch']['amortized_ratio']:.2f}x of stock for "
            f"{times.images} images")
    if extraction is not None:  # its numbers are bounded (extraction_costs): the ledger stays finite
        whole = ledger_of(True)
        record["with_extraction"] = {**whole.record(raw_ratio=raw, n=times.images), "start": extraction["start"]}
        line += f"; with the extraction ({extraction['start'] or 'start not recorded'}): " + cost_line(whole, raw,
                                                                                                      times.images)
    return line, record


#: What a stored ledger may claim (a manifest is untrusted): seconds per image, seconds per entry, images per entry.
MAX_UNIT_S, MAX_SECONDS, MAX_IMAGES = 1e4, 1e7, 10**6


def _finite(value: Any, limit: float = MAX_SECONDS) -> bool:
    # JSON keeps huge integers: bound them before float arithmetic (math.isfinite would overflow on one)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and -limit <= value <= limit \
        and math.isfinite(value)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_IMAGES
