"""Latency, throughput and the break-even point of building a fragment.

Timings wait for the device before reading the clock: CUDA kernels run
asynchronously, so without ``torch.cuda.synchronize()`` a timer measures how
fast work was *queued*, not done.  Every timer warms up first (allocator,
cuDNN autotuning and lazy module initialisation make the first calls slow)
and reports the median of repeats, which one slow outlier cannot move.

Break-even N (seed 002, "Metrics Collection Checklist", H5): how many
images the fragment must generate before the time spent profiling and
building it is paid back by its faster images::

    N = (profile_s + build_s) / (baseline_s_per_image - fragment_s_per_image)

A fragment that is not faster never pays back: N is ``None`` (JSON null),
reported as "never", not a negative or divide-by-zero number.
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from typing import Any, Callable

import torch

from ..errors import FragmentError

log = logging.getLogger(__name__)


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued device work; a no-op on CPU or when CUDA is absent.

    >>> synchronize("cpu")
    """
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type != "cuda":
        return
    if torch.cuda.is_available():
        torch.cuda.synchronize(dev)
    mps = getattr(torch, "mps", None)
    if dev is not None and dev.type == "mps" and mps is not None:  # pragma: no cover - Apple only
        mps.synchronize()


def _check_counts(warmup: int, repeats: int) -> None:
    if warmup < 0:
        raise FragmentError(f"timing option warmup: expected >= 0, found {warmup}")
    if repeats < 1:
        raise FragmentError(f"timing option repeats: expected >= 1, found {repeats}")


def time_call(
    fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 3, device: torch.device | str | None = None
) -> dict[str, Any]:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones; seconds, median first.

    The device is synchronised before each start and after each call.

    >>> r = time_call(lambda: sum(range(1000)), warmup=1, repeats=3)
    >>> sorted(r), r["repeats"], r["min_s"] <= r["median_s"] <= r["max_s"]
    (['max_s', 'median_s', 'min_s', 'repeats', 'samples_s', 'warmup'], 3, True)
    """
    _check_counts(warmup, repeats)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - t0)
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "repeats": repeats,
        "warmup": warmup,
        "samples_s": samples,
    }


def measure_latency(
    generate_one: Callable[[int], Any], *, warmup: int = 1, repeats: int = 3, device: torch.device | str | None = None
) -> dict[str, Any]:
    """Single-image latency: ``generate_one(i)`` makes image ``i``; milliseconds, median of repeats.

    >>> r = measure_latency(lambda i: i * i, warmup=0, repeats=2)
    >>> r["repeats"], r["latency_ms"] >= 0
    (2, True)
    """
    counter = iter(range(10**9))
    r = time_call(lambda: generate_one(next(counter)), warmup=warmup, repeats=repeats, device=device)
    return {"latency_ms": r["median_s"] * 1e3, "min_ms": r["min_s"] * 1e3, "max_ms": r["max_s"] * 1e3,
            "repeats": repeats, "warmup": warmup}


def measure_throughput(
    generate_batch: Callable[[int], Any],
    images: int,
    *,
    warmup: int = 1,
    repeats: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Batch throughput: ``generate_batch(images)`` makes ``images`` images; images per minute (median).

    >>> r = measure_throughput(lambda n: [0] * n, 32, warmup=0, repeats=1)
    >>> r["images"], r["images_per_min"] > 0
    (32, True)
    """
    if images < 1:
        raise FragmentError(f"throughput option images: expected >= 1, found {images}")
    r = time_call(lambda: generate_batch(images), warmup=warmup, repeats=repeats, device=device)
    seconds = max(r["median_s"], 1e-12)
    return {"images": images, "seconds": r["median_s"], "images_per_min": images * 60.0 / seconds,
            "s_per_image": r["median_s"] / images, "repeats": repeats, "warmup": warmup}


def speedup(baseline_s: float, fragment_s: float) -> float | None:
    """How many times faster the fragment is (baseline time / fragment time); ``None`` if unmeasured.

    >>> speedup(3.4, 2.0), speedup(1.0, 0.0)
    (1.7, None)
    """
    if fragment_s is None or baseline_s is None or fragment_s <= 0:
        return None
    return baseline_s / fragment_s


def break_even_variants(
    profile_s: float, build_s: float, baseline_s_per_image: float, fragment_s_per_image: float
) -> float | None:
    """Images after which profiling + building pays back; ``None`` when the fragment is not faster.

    >>> break_even_variants(30.0, 10.0, 5.0, 1.0)
    10.0
    >>> break_even_variants(30.0, 10.0, 5.0, 5.0) is None   # equal speed: never pays back
    True
    """
    for name, value in (("profile_s", profile_s), ("build_s", build_s),
                        ("baseline_s_per_image", baseline_s_per_image), ("fragment_s_per_image", fragment_s_per_image)):
        if value is None or not math.isfinite(value) or value < 0:
            raise FragmentError(f"break-even input {name}: expected a finite number >= 0, found {value!r}")
    saving = baseline_s_per_image - fragment_s_per_image
    if saving <= 0:
        return None
    return (profile_s + build_s) / saving


def break_even_block(profile_s: float, build_s: float, baseline_s_per_image: float, fragment_s_per_image: float) -> dict[str, Any]:
    """The break-even record for reports: inputs, N (or ``None``) and a readable verdict.

    >>> break_even_block(30.0, 10.0, 5.0, 6.0)["verdict"]
    'never: the fragment is not faster than the baseline'
    """
    n = break_even_variants(profile_s, build_s, baseline_s_per_image, fragment_s_per_image)
    return {
        "profile_s": profile_s,
        "build_s": build_s,
        "baseline_s_per_image": baseline_s_per_image,
        "fragment_s_per_image": fragment_s_per_image,
        "break_even_variants": n,
        "verdict": "never: the fragment is not faster than the baseline" if n is None else f"pays back after {math.ceil(n)} images",
    }


AMORTIZED_NS = (8, 16, 32, 64, 128)


def amortized_costs(
    *, stock_s_per_image: float, fragment_s_per_image: float, profile_s: float, profiled_images: int,
    build_s: float, calibrate_s: float, ns: tuple[int, ...] = AMORTIZED_NS,
) -> dict[str, Any]:
    """What the user waits for N images: stock N against profile + build + calibration + fragment images for the rest.

    The profiled runs are full-model images the user keeps, so they count as output: with P profiled
    images, the pack makes N - P images with the fragment (none when N <= P).  The amortized ratio is
    stock time over the pack's time (H4 at N = 32, as the design docs define it); the break-even N is
    the smallest N from which the pack is no slower than stock (H5), ``None`` if it never is.

    >>> r = amortized_costs(stock_s_per_image=1.0, fragment_s_per_image=0.25, profile_s=12.0, profiled_images=8,
    ...                     build_s=1.0, calibrate_s=3.0, ns=(8, 32))
    >>> [(row["n"], round(row["amortized_ratio"], 2)) for row in r["rows"]], r["break_even_images"]
    ([(8, 0.5), (32, 1.45)], 19)
    """
    for name, value in (("stock_s_per_image", stock_s_per_image), ("fragment_s_per_image", fragment_s_per_image),
                        ("profile_s", profile_s), ("build_s", build_s), ("calibrate_s", calibrate_s)):
        if value is None or not math.isfinite(value) or value < 0:
            raise FragmentError(f"amortized cost input {name}: expected a finite number >= 0, found {value!r}")
    if profiled_images < 0:
        raise FragmentError(f"amortized cost input profiled_images: expected >= 0, found {profiled_images!r}")
    setup = profile_s + build_s + calibrate_s

    def pack(n: int) -> float:
        return setup + fragment_s_per_image * max(n - profiled_images, 0)

    rows = [{"n": n, "stock_s": stock_s_per_image * n, "pack_s": pack(n),
             "amortized_ratio": stock_s_per_image * n / pack(n) if pack(n) > 0 else None} for n in ns]
    saving = stock_s_per_image - fragment_s_per_image
    start = max(profiled_images, 1)
    if pack(start) <= stock_s_per_image * start:
        even: int | None = start
    elif saving <= 0:
        even = None
    else:  # setup + f (N - P) <= s N  <=>  N >= (setup - f P) / (s - f)
        even = max(start, math.ceil((setup - fragment_s_per_image * profiled_images) / saving - 1e-9))
    return {"setup_s": setup, "profile_s": profile_s, "build_s": build_s, "calibrate_s": calibrate_s,
            "profiled_images": profiled_images, "stock_s_per_image": stock_s_per_image,
            "fragment_s_per_image": fragment_s_per_image, "rows": rows, "break_even_images": even,
            "verdict": "never: the fragment is not faster than stock" if even is None else f"pays back from {even} images"}
