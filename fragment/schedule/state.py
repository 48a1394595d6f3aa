"""A fragment's run-time schedule: head sets per noise level, steps that reuse deep features, CFG cut-off.

The structural fragment (pruned heads, levers) is the same at every step.  The
schedule says what changes *during* sampling, and is stored in the manifest's
``schedule`` block:

* ``timestep_heads``: per timestep bucket, the heads that stay on.  The weights
  are pruned to the union over buckets; the rest is masked per bucket, so
  switching costs no weight upload (``fragment.timestep_heads``);
* ``step_reuse``: the denoising steps on which the deep blocks replay their last
  outputs (``fragment.schedule.step_reuse``) below ``shallow`` blocks, or below
  ``skips`` skip connections when the schedule says so (``skips=0``: no skip
  connection stays computed, so the whole UNet call replays its last output,
  ``WHOLE_STEP``), calibrated for ``total_steps`` steps whose
  training timesteps are ``timesteps``.  At run time a call is matched to the
  calibrated step of the nearest timestep, so a run with another step count,
  a denoise below 1 or a later start still reuses at the same noise levels;
* ``cfg_cutoff`` (schema v1: ``cfg_truncation``): below this training timestep (0..999, low = little noise)
  the unconditional pass is skipped and the conditional prediction used alone;
* ``cross_attn_cache``: below this training timestep every cross-attention module replays its output from the
  last call it computed above it, for the same text context, instead of computing (T-GATE's idea,
  ``fragment.schedule.cross_attn``).

``ScheduleState`` is what the run-time wrappers share: the host calls
``begin_call(t, signature)`` before every UNet call and the wrappers read
``bucket`` and ``replaying``.  It also keeps the log of what it applied, so
tests can check a schedule ran exactly as stored.
"""
from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch

from ...errors import FragmentError
from ..format.manifest import Fragment
from ...profiling.profiler import timestep_bucket

log = logging.getLogger(__name__)
HISTORY_LIMIT = 10_000
# The cache key of a whole-step reuse (``skips=0``): the UNet call's own output.  No module path is empty, so it
# cannot collide with a block's key; every ScheduleState rule (slots per call, signatures, rows) applies unchanged.
WHOLE_STEP = ""


@dataclass(frozen=True)
class Schedule:
    """Plain data for the manifest's ``schedule`` block; every part optional.

    >>> s = Schedule(reuse_steps=(2, 4), total_steps=6, shallow=1, skips=2, cfg_cutoff=200.0,
    ...              step_timesteps=(999.0, 799.0, 599.0, 399.0, 199.0, 0.0), cross_attn_cache=200.0)
    >>> Schedule.from_manifest(s.to_manifest()) == s
    True
    """

    buckets: int = 0
    bucket_heads: Mapping[int, Mapping[str, Sequence[int]]] = field(default_factory=dict)
    total_steps: int = 0
    reuse_steps: tuple[int, ...] = ()
    shallow: int = 1
    # the depth in skip connections (overrides ``shallow``, counted in blocks); 0: the whole UNet call replays
    skips: int | None = None
    step_timesteps: tuple[float, ...] = ()  # the calibrated run's timestep per step (empty: match by step index)
    cfg_cutoff: float | None = None
    cross_attn_cache: float | None = None  # below this timestep cross-attention replays its last computed output
    calibration: Mapping[str, Any] = field(default_factory=dict)

    @property
    def whole_step(self) -> bool:
        """Whether reuse steps skip the whole UNet call (``skips == 0``) rather than its deep blocks.

        >>> Schedule(reuse_steps=(1,), total_steps=3, skips=0).whole_step, Schedule(skips=0).whole_step
        (True, False)
        """
        return bool(self.reuse_steps) and self.skips == 0

    @property
    def empty(self) -> bool:
        return (not self.bucket_heads and not self.reuse_steps and self.cfg_cutoff is None
                and self.cross_attn_cache is None)

    def to_manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.bucket_heads:
            out["timestep_heads"] = {"buckets": self.buckets, "num_train_timesteps": 1000,
                                     "kept": {str(b): {p: list(map(int, k)) for p, k in sorted(heads.items())}
                                              for b, heads in sorted(self.bucket_heads.items())}}
        if self.reuse_steps:
            out["step_reuse"] = {"total_steps": self.total_steps, "reuse_steps": sorted(self.reuse_steps),
                                 "shallow": self.shallow}
            if self.skips is not None:
                out["step_reuse"]["skips"] = self.skips
            if self.step_timesteps:
                out["step_reuse"]["timesteps"] = [round(float(t), 4) for t in self.step_timesteps]
        if self.cfg_cutoff is not None:
            out["cfg_cutoff"] = {"timestep": float(self.cfg_cutoff)}
        if self.cross_attn_cache is not None:
            out["cross_attn_cache"] = {"timestep": float(self.cross_attn_cache)}
        if self.calibration:
            out["calibration"] = dict(self.calibration)
        return out

    @classmethod
    def from_manifest(cls, block: Mapping[str, Any] | None, source: str = "manifest schedule") -> "Schedule":
        """Parse and check a manifest ``schedule`` block (``None`` or ``{}``: the empty schedule).

        Every field is type-checked before use and nothing is coerced (a string is never read as a list of
        heads, nor a list of pairs as an object); counts are bounded (``MAX_BUCKETS``, ``MAX_STEPS``,
        ``MAX_DEPTH``).  Only ``FragmentError`` leaves it.

        >>> Schedule.from_manifest({"timestep_heads": {"buckets": 2, "kept": {"0": {"m": "01"}}}}, "x")
        Traceback (most recent call last):
        ...
        prompt_fragments.errors.FragmentError: x.timestep_heads.kept.0.m: expected a list of head indices, found '01'
        """
        if block is None:
            return cls()
        if not isinstance(block, Mapping):
            raise FragmentError(f"{source}: expected an object, found {type(block).__name__}")
        if not block:
            return cls()
        calibration = block.get("calibration")
        if calibration is not None and not isinstance(calibration, Mapping):
            raise FragmentError(f"{source}.calibration: expected an object, found {type(calibration).__name__}")
        kwargs: dict[str, Any] = {"calibration": dict(calibration or {})}
        heads = _block(block, "timestep_heads", source)
        if heads:
            buckets = _int(heads.get("buckets"), f"{source}.timestep_heads.buckets", low=1, high=MAX_BUCKETS)
            kept = heads.get("kept")
            if not isinstance(kept, Mapping) or not kept:
                raise FragmentError(f"{source}.timestep_heads.kept: expected bucket -> {{module: [heads]}}, found {str(kept)[:200]}")
            parsed: dict[int, dict[str, list[int]]] = {}
            for b, modules in kept.items():
                index = _bucket_key(b, f"{source}.timestep_heads.kept key")
                if index >= buckets:
                    raise FragmentError(f"{source}.timestep_heads.kept: bucket {index} >= buckets {buckets}")
                if not isinstance(modules, Mapping):
                    raise FragmentError(f"{source}.timestep_heads.kept.{b}: expected an object module -> [heads], "
                                        f"found {str(modules)[:200]}")
                parsed[index] = {}
                for p, hs in modules.items():
                    where = f"{source}.timestep_heads.kept.{b}.{p}"
                    if not isinstance(p, str) or not isinstance(hs, list):
                        raise FragmentError(f"{where}: expected a list of head indices, found {str(hs)[:200]!r}"
                                            if isinstance(p, str) else f"{where}: expected a module path string")
                    if len(hs) > MAX_HEADS:
                        raise FragmentError(f"{where}: expected at most {MAX_HEADS} head indices, found {len(hs)}")
                    parsed[index][p] = [_int(h, where, low=0, high=MAX_HEADS - 1) for h in hs]
            kwargs.update(buckets=buckets, bucket_heads=parsed)
        reuse = _block(block, "step_reuse", source)
        if reuse:
            total = _int(reuse.get("total_steps"), f"{source}.step_reuse.total_steps", low=2, high=MAX_STEPS)
            listed = reuse.get("reuse_steps", [])
            if not isinstance(listed, list):
                raise FragmentError(f"{source}.step_reuse.reuse_steps: expected a list of step numbers, found {str(listed)[:200]!r}")
            steps = tuple(sorted(_int(s, f"{source}.step_reuse.reuse_steps", low=1, high=MAX_STEPS) for s in listed))
            if any(s >= total for s in steps):
                raise FragmentError(f"{source}.step_reuse: reuse steps {list(steps)[:20]} must lie in 1..{total - 1} "
                                    "(step 0 always computes)")
            kwargs.update(total_steps=total, reuse_steps=steps,
                          shallow=_int(reuse.get("shallow", 1), f"{source}.step_reuse.shallow", low=1, high=MAX_DEPTH))
            if reuse.get("skips") is not None:
                # 0 is the whole-step rung (no skip connection stays computed); negatives and non-integers are refused
                kwargs["skips"] = _int(reuse["skips"], f"{source}.step_reuse.skips", low=0, high=MAX_DEPTH)
            timesteps = reuse.get("timesteps")
            if timesteps is not None:
                if (not isinstance(timesteps, list) or len(timesteps) != total
                        or not all(_number(t) and 0 <= t <= 1000 for t in timesteps)):
                    raise FragmentError(f"{source}.step_reuse.timesteps: expected {total} numbers in 0..1000 "
                                        f"(one per calibrated step), found {str(timesteps)[:200]}")
                kwargs["step_timesteps"] = tuple(float(t) for t in timesteps)
        for key in ("cfg_cutoff", "cross_attn_cache"):
            below = _block(block, key, source)
            if below:
                t = below.get("timestep")
                if not _number(t) or not 0 <= t <= 1000:
                    raise FragmentError(f"{source}.{key}.timestep: expected a number in 0..1000, found {str(t)[:200]!r}")
                kwargs[key] = float(t)
        return cls(**kwargs)


# Bounds on what a schedule may ask for, checked before anything is allocated from it.  A bucket's mask row
# costs 4 bytes per channel of each masked module (SDXL: about 0.6 MB per bucket over all its attention
# modules); the profiler node offers at most 16 buckets, so 64 leaves room and bounds the masks to tens of MB
# (10**9 buckets ran out of memory: issue #29).  ComfyUI's samplers take at most 10000 steps.  No UNet has
# 64 levels or skip connections, the depths ``shallow`` and ``skips`` count (the base model's layout bounds
# them exactly: ``build.check_loadable``; ``skips=0``, the whole call, fits any model); head indices are below
# the schema's 1024 heads per module.
MAX_BUCKETS = 64
MAX_STEPS = 10_000
MAX_DEPTH = 64
MAX_HEADS = 1024


def _block(block: Mapping[str, Any], key: str, source: str) -> Mapping[str, Any] | None:
    """``block[key]``: absent, ``None`` or empty means off; anything but an object is refused."""
    value = block.get(key)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise FragmentError(f"{source}.{key}: expected an object, found {type(value).__name__}")
    return value


def _bucket_key(value: Any, where: str) -> int:
    """A bucket index as JSON writes object keys (decimal digits) or as an ``int`` from code."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 6:
        return int(value)
    return _int(value, where, low=0, high=MAX_BUCKETS - 1)


def _number(value: Any) -> bool:
    """A JSON number (never a bool, never NaN or infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _narrows(cached: Any, signature: Any, rows: slice | None) -> bool:
    """Whether a call of shape ``signature`` runs ``rows`` of a batch of shape ``cached``.

    >>> _narrows((4, 3, 8, 8), (2, 3, 8, 8), slice(2, 4)), _narrows((4, 3, 8, 8), (2, 3, 8, 8), None)
    (True, False)
    """
    if rows is None or not isinstance(cached, tuple) or not isinstance(signature, tuple) or not cached or not signature:
        return False
    start, stop, step = rows.indices(cached[0])
    return step == 1 and stop - start == signature[0] and cached[1:] == signature[1:] and signature[0] < cached[0]


def _take_rows(value: Any, rows: slice, batch: int) -> Any:
    """``value`` (a tensor, or tuples and lists of them) with its batch-first tensors cut to ``rows``."""
    if isinstance(value, (tuple, list)):
        return type(value)(_take_rows(v, rows, batch) for v in value)
    if hasattr(value, "shape") and len(value.shape) > 0 and value.shape[0] == batch:
        return value[rows]
    return value


def _copied(value: Any) -> Any:
    """``value`` with every tensor in it (tuples and lists too) cloned."""
    if isinstance(value, (tuple, list)):
        return type(value)(_copied(v) for v in value)
    return value.clone() if hasattr(value, "clone") else value


def _int(value: Any, where: str, low: int, high: int | None = None) -> int:
    """A JSON integer in ``low..high``: a bool, a float (``2.0``, ``1e20``) or a digit string is refused, not coerced."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise FragmentError(f"{where}: expected an integer >= {low}, found {repr(value)[:100]}")
    if high is not None and value > high:
        raise FragmentError(f"{where}: expected an integer <= {high}, found {repr(value)[:100]}")
    return value


def nearest_step(t: float, timesteps: Sequence[float]) -> int:
    """The calibrated step whose timestep is closest to ``t`` (the earlier step on a tie).

    >>> ts = (999.0, 749.0, 499.0, 249.0)
    >>> nearest_step(999.0, ts), nearest_step(520.0, ts), nearest_step(624.0, ts), nearest_step(0.0, ts)
    (0, 2, 1, 3)
    """
    return min(range(len(timesteps)), key=lambda i: (abs(timesteps[i] - t), i))


def map_step(step: int, actual_total: int | None, stored_total: int) -> int:
    """The calibrated step that run-time step ``step`` of ``actual_total`` corresponds to (same noise fraction).

    The fallback for schedules stored without ``timesteps``: it assumes the run
    covers the whole noise range, as the calibrated run did.

    >>> map_step(5, 10, 20), map_step(3, None, 20), map_step(9, 10, 20)
    (11, 3, 19)
    """
    if not actual_total or actual_total == stored_total or actual_total < 2:
        return step
    return round(step * (stored_total - 1) / (actual_total - 1))


class ScheduleState:
    """The run-time position in a schedule, shared by the wrappers of one patched model.

    A call whose timestep is lower than the previous call's is the next step; a
    higher one starts a new sampling run (the cache is dropped); an equal one is
    another call of the same step (say cond and uncond run separately), which
    gets its own cache slot.  A slot replays only when it was filled on a
    computed step by a call with the same ``signature`` (input shape).

    >>> state = ScheduleState(reuse_steps=[1], total_steps=3)
    >>> state.expect_keys(["deep"])
    >>> state.begin_call(999.0, (2, 4)); state.replaying
    False
    >>> state.store("deep", "features"); state.begin_call(600.0, (2, 4)); state.replaying
    True
    """

    def __init__(self, *, reuse_steps: Iterable[int] = (), total_steps: int = 0, buckets: int = 0,
                 num_train_timesteps: int = 1000, step_timesteps: Sequence[float] = ()) -> None:
        self.reuse_steps = frozenset(int(s) for s in reuse_steps)
        self.total_steps = int(total_steps)
        self.step_timesteps = tuple(float(t) for t in step_timesteps)
        self.buckets = int(buckets)
        self.num_train_timesteps = num_train_timesteps
        self.reuse_enabled = True
        self.heads_enabled = True
        self.cfg_enabled = True  # hosts that truncate CFG check this (the reference sampler takes a cut-off)
        # cross-attention replays below this timestep (``cross_attn_cache``); ``attn_enabled`` turns it off
        self.attn_gate: float | None = None
        self.attn_enabled = True
        self.attn_replaying = False
        # call of the step -> cross-attention path -> (its last output above the gate, the context it attended to)
        self._attn: dict[int, dict[str, tuple[Any, Any]]] = {}
        self._attn_signatures: dict[int, Any] = {}
        # per call: one stored copy per incoming context object, and each context comparison made (one sync each)
        self._context_copies: dict[int, Any] = {}
        self._context_same: dict[tuple[int, int], bool] = {}
        self.run_total_steps: int | None = None  # the running sampler's step count, when the host knows it
        self._keys: frozenset[str] = frozenset()
        self._protected: frozenset[str] = frozenset()
        self._cache: dict[int, dict[str, Any]] = {}
        self._signatures: dict[int, Any] = {}
        self._last_t: float | None = None
        self.step = -1
        self.call = 0
        self.bucket = 0
        self.replaying = False
        # One entry per UNet call, for checks and reports; bounded, since a ComfyUI server keeps a MODEL for days.
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY_LIMIT)

    @classmethod
    def for_schedule(cls, schedule: Schedule) -> "ScheduleState":
        state = cls(reuse_steps=schedule.reuse_steps, total_steps=schedule.total_steps, buckets=schedule.buckets,
                    step_timesteps=schedule.step_timesteps)
        state.attn_gate = schedule.cross_attn_cache
        return state

    def calibrated_step(self, t: float) -> int:
        """The calibrated step the current call stands for: by nearest timestep, else by step index."""
        if self.step_timesteps:
            return nearest_step(t, self.step_timesteps)
        return map_step(self.step, self.run_total_steps, self.total_steps)

    def expect_keys(self, keys: Iterable[str]) -> None:
        """The blocks that must all be cached before a slot can replay."""
        self._keys = self._keys | frozenset(keys)

    def protect(self, keys: Iterable[str]) -> None:
        """Blocks whose output the computed path reads: stored and replayed as copies.

        The first computed block after the cut may change its input in place
        (ComfyUI's FreeU scales ``h[:, :C // 2]`` in an ``output_block_patch``,
        diffusers' ``apply_freeu`` likewise); on the cached tensor itself that
        would compound on every reuse step.
        """
        self._protected = self._protected | frozenset(keys)

    def reset(self) -> None:
        """Forget the position and the cache (a new sampling run)."""
        self._cache.clear()
        self._signatures.clear()
        self._attn.clear()
        self._attn_signatures.clear()
        self._context_copies.clear()
        self._context_same.clear()
        self._last_t = None
        self.step = -1

    def begin_call(self, t: float, signature: Any = None, rows: slice | None = None) -> None:
        """Called by the host before each UNet call with its training-scale timestep (0..999).

        ``signature`` is the input's shape.  ``rows`` says that this call runs
        only those rows of the batch the previous calls ran (CFG truncation
        drops the uncond rows): a cache filled on the whole batch then replays
        those rows instead of being discarded.
        """
        t = float(t)
        if self._last_t is None or t > self._last_t + 1e-4:
            self.reset()
            self.step, self.call = 0, 0
        elif t < self._last_t - 1e-4:
            self.step, self.call = self.step + 1, 0
        else:
            self.call += 1
        self._last_t = t
        if self.buckets:
            self.bucket = timestep_bucket(t, self.buckets, self.num_train_timesteps)
        scheduled = self.reuse_enabled and self.calibrated_step(t) in self.reuse_steps
        slot = self._cache.get(self.call, {})
        cached_signature = self._signatures.get(self.call)
        narrowed = scheduled and _narrows(cached_signature, signature, rows)
        ready = bool(self._keys) and self._keys <= slot.keys() and (cached_signature == signature or narrowed)
        self.replaying = scheduled and ready
        if self.replaying and narrowed:
            self._cache[self.call] = {k: _take_rows(v, rows, cached_signature[0]) for k, v in slot.items()}
            self._signatures[self.call] = signature
        if scheduled and not ready:
            log.debug("step reuse: step %d call %d scheduled for reuse but its cache does not match; computing", self.step, self.call)
        if not self.replaying:
            self._cache[self.call] = {}
            self._signatures[self.call] = signature
        self._begin_attn(t, signature, rows)
        self.history.append({"step": self.step, "call": self.call, "t": t, "bucket": self.bucket,
                             "reused": self.replaying, "attn_replayed": False, "signature": signature})

    def _begin_attn(self, t: float, signature: Any, rows: slice | None) -> None:
        """Whether cross-attention may replay on this call: below the gate, from this call slot's outputs of the
        last call computed above it (the same input shape, or the rows of a narrowed call); a slot of another
        shape starts afresh."""
        gated = self.attn_gate is not None and self.attn_enabled and t < self.attn_gate
        cached = self._attn_signatures.get(self.call)
        self._context_copies, self._context_same = {}, {}
        if gated and cached != signature and _narrows(cached, signature, rows):
            narrowed: dict[int, Any] = {}  # contexts shared by many modules stay one object (one comparison)
            slot = self._attn.get(self.call, {})
            self._attn[self.call] = {k: (_take_rows(out, rows, cached[0]),
                                         narrowed.setdefault(id(ctx), _take_rows(ctx, rows, cached[0])))
                                     for k, (out, ctx) in slot.items()}
            self._attn_signatures[self.call] = signature
        elif cached != signature:
            self._attn[self.call] = {}
            self._attn_signatures[self.call] = signature
        self.attn_replaying = gated

    def attn_store(self, key: str, value: Any, context: Any = None) -> None:
        """Keep cross-attention ``key``'s output of this call and the context it attended to, above the gate only
        (a run that starts below it computes every call: it never replays what no judge saw).  Copies: hosts
        add the output to the residual, and a patch after attn2 may change it in place."""
        if self.attn_gate is None or not self.attn_enabled or self.attn_replaying:
            return
        if context is not None and id(context) not in self._context_copies:
            self._context_copies[id(context)] = _copied(context)
        self._attn.setdefault(self.call, {})[key] = (_copied(value),
                                                     None if context is None else self._context_copies[id(context)])

    def attn_replay(self, key: str, shape: Any, context: Any = None) -> Any:
        """A copy of cross-attention ``key``'s stored output for this call slot, when it has ``shape`` and was
        computed for the same ``context`` (a prompt switch mid-run computes again); ``None``: compute it."""
        entry = self._attn.get(self.call, {}).get(key)
        if entry is None or not self.attn_replaying:
            return None
        out, stored = entry
        if tuple(out.shape) != tuple(shape) or (stored is None) != (context is None):
            return None
        if context is not None:
            pair = (id(context), id(stored))
            if pair not in self._context_same:
                self._context_same[pair] = (context.shape == stored.shape and context.dtype == stored.dtype
                                            and bool(torch.equal(context, stored.to(context.device))))
            if not self._context_same[pair]:
                return None
        if self.history:
            self.history[-1]["attn_replayed"] = True
        return _copied(out)

    def store(self, key: str, value: Any) -> None:
        # Nothing is kept when no step can replay it: the deep outputs of a whole batch are large on a GPU.
        if not self.replaying and self.reuse_enabled and self.reuse_steps:
            self._cache.setdefault(self.call, {})[key] = _copied(value) if key in self._protected else value

    def cached(self, key: str) -> Any:
        return self._cache.get(self.call, {}).get(key)

    def replay(self, key: str) -> Any:
        """What block ``key`` returns on this reuse step (a copy for protected blocks; ``None``: nothing cached)."""
        value = self.cached(key)
        return _copied(value) if value is not None and key in self._protected else value

    def reused_steps(self) -> list[int]:
        """Steps on which every call replayed (from the log; for checks and reports)."""
        steps: dict[int, bool] = {}
        for entry in self.history:
            steps[entry["step"]] = steps.get(entry["step"], True) and entry["reused"]
        return sorted(s for s, reused in steps.items() if reused)


def fragment_schedule(fragment: Fragment) -> Schedule:
    """The schedule stored in a fragment's manifest (the empty schedule if it has none)."""
    return Schedule.from_manifest(fragment.manifest.get("schedule"), source=f"fragment {fragment.name!r}: schedule")


def with_schedule(fragment: Fragment, schedule: Schedule) -> Fragment:
    """A copy of ``fragment`` whose manifest carries ``schedule`` (the tensors are shared).

    The bucket head sets must lie inside what the fragment kept, else the
    loader could never switch to them.
    """
    for bucket, heads in schedule.bucket_heads.items():
        for path, kept in heads.items():
            allowed = set(fragment.kept.get(path, kept))
            if not set(kept) <= allowed:
                raise FragmentError(f"{path}: schedule bucket {bucket} keeps heads {sorted(set(kept) - allowed)} "
                                    f"that fragment {fragment.name!r} pruned")
    manifest = {**fragment.manifest, "schedule": schedule.to_manifest()}
    return Fragment(manifest=manifest, tensors=fragment.tensors)
