"""Many-seed batches: which seeds, and how many images per forward pass fit in memory."""
from __future__ import annotations

import re
from typing import Sequence

from ..errors import FragmentError

_SEED_TOKEN = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_seed_list(text: str, *, source: str = "seed_list") -> list[int]:
    """Seeds from a comma/space separated string; ranges like ``10-13`` expand.

    >>> parse_seed_list("1, 5 10-12")
    [1, 5, 10, 11, 12]
    """
    seeds: list[int] = []
    for token in text.replace(",", " ").split():
        match = _SEED_TOKEN.match(token)
        if not match or (match[2] is not None and int(match[2]) < int(match[1])):
            raise FragmentError(f"{source}: expected non-negative integers or ranges like 10-13, found {token!r}")
        first = int(match[1])
        seeds.extend(range(first, int(match[2] or first) + 1))
    return seeds


def variant_seeds(seed: int, count: int, seed_list: str = "") -> list[int]:
    """The seeds of a batch: the explicit list when given, else ``seed, seed+1, ...`` (``count`` of them).

    >>> variant_seeds(100, 3), variant_seeds(0, 3, "7,9")
    ([100, 101, 102], [7, 9])
    """
    if seed_list.strip():
        seeds = parse_seed_list(seed_list)
        if not seeds:
            raise FragmentError("seed_list: expected at least one seed, found none")
        return seeds
    if count < 1:
        raise FragmentError(f"count: expected at least 1 variant, found {count}")
    return [seed + i for i in range(count)]


def plan_sub_batches(count: int, batch_size: int, per_item_bytes: float, free_bytes: float, reserve: float = 0.2) -> list[int]:
    """Split ``count`` images into sub-batches of at most ``batch_size`` that fit in free memory.

    ``reserve`` is the share of free memory left alone (other models, fragmentation).
    At least one image per pass, even if the estimate says it will not fit:
    the sampler's own attention splitting may still make it work.

    >>> plan_sub_batches(10, 4, per_item_bytes=1.0, free_bytes=100.0)
    [4, 4, 2]
    >>> plan_sub_batches(5, 8, per_item_bytes=30.0, free_bytes=100.0)
    [2, 2, 1]
    """
    if count < 1 or batch_size < 1:
        raise FragmentError(f"plan_sub_batches: expected count and batch_size >= 1, found {count} and {batch_size}")
    fits = int(free_bytes * (1.0 - reserve) // per_item_bytes) if per_item_bytes > 0 else batch_size
    size = max(1, min(batch_size, fits))
    sizes = [size] * (count // size)
    if count % size:
        sizes.append(count % size)
    return sizes


def chunk(seq: Sequence[int], sizes: Sequence[int]) -> list[list[int]]:
    """Cut ``seq`` into consecutive pieces of the given sizes.

    >>> chunk([1, 2, 3, 4, 5], [2, 2, 1])
    [[1, 2], [3, 4], [5]]
    """
    out, start = [], 0
    for n in sizes:
        out.append(list(seq[start : start + n]))
        start += n
    return out
