"""A prior per model configuration: what earlier prompts on the same model, sampler and size measured and judged.

Public step-caching methods (TeaCache, MagCache, BudCache) calibrate once per
model configuration; how much skipping a prompt tolerates still varies by
prompt and seed.  So the prior keeps both halves, per :class:`PriorKey`
(base-model hash, sampler, scheduler, step count, resolution bucket, CFG):

* the step-change curves and the per-depth reuse costs the profiles measured
  (``ProfileEvidence.step_changes`` and ``.reuse_depths``), the steps' timesteps,
  the CFG gap and cross-attention change per timestep (``.cfg_gaps``,
  ``.cross_attn_changes``), as running means over the prompts that contributed;
  :meth:`Prior.evidence` gives them back as a profile's evidence, so a later
  prompt confirmed in its batch builds its ladder with no profile of its own, and
* every judged try of every calibration (the candidate's lever amounts, reuse
  depth and damage level, phase, verdict, slack, seed count, the judge's name,
  and a digest of the prompt, never the prompt itself), the running audits'
  verdicts included (``record_audit``: a batch confirmed in itself is a judged
  try too, so a prompt calibrated with no try up front still teaches the next).

:meth:`Prior.suggest` turns the judged tries into the ladder rung a new prompt
starts at, from the tries of the same judge only (a latent judge's slack says
nothing about a decoded SSIM/LPIPS gate); :func:`warm_start` and
:func:`update_prior` are the two calls
a caller (the extractor, the demo, ``bench batch``) makes around
``calibrate(..., start=..., confirm_only=True)``.

On disk: ``<fragments folder>/.library/priors/prior.<digest>.json``, one file
per key, written atomically (temporary file, fsync, rename) under the
library's lock, read size-capped and schema-checked: a hostile or truncated
file is a ``FragmentError`` naming it, and an update never loses the prior
that was there before.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ...errors import FragmentError, ReadError
from ..audit import AuditRule
from ..calibration import CFG_CUTOFFS, calibrate, cold_start
from ..format.store import ensure_folder
from ..format.untrusted import parse_json
from ..levers import LEVERS
from ...profiling.dataset import ProfileData
from ...profiling.evidence import ProfileEvidence
from ...profiling.step_change import ReuseDepth
from .index import library_dir, locked

log = logging.getLogger(__name__)

SCHEMA = "prompt_fragments.prior/1"
# SD's VAE divides a side by 8 and the UNet downsamples it three more times: sides within one 64-pixel bucket
# give the same deepest feature map (padded up), which is the feature step reuse caches and whose per-step
# change the prior keeps.  A finer bucket would split configurations that cache the same tensor shape; a
# coarser one would mix attention token counts 4x apart.
RESOLUTION_BUCKET = 64
MAX_PRIOR_BYTES = 4 << 20  # a prior of MAX_TRIES tries is about 1 MB: anything larger was not written by us
MAX_TRIES = 2000  # the newest tries are kept: about 60 prompts' calibrations
MAX_CURVE = 1000  # steps per curve: far above any sampler's step count
MAX_DEPTHS = 32
# The smallest slack a rung must be predicted to keep: the same margin the calibration's own search aims at.
MARGIN = 0.05
_TEXT = 256  # longest sampler, scheduler, label or phase string kept
# where a judged try was made: the calibration's two seed sets, or the running audit of a batch (``record_audit``)
PHASES = ("calibration", "holdout", "audit", "pick")  # "pick": a pick judged once on the profiled seeds
# the per-timestep measurements the prior keeps (``ProfileEvidence`` fields): running means keyed by timestep
PER_TIMESTEP = ("cfg_gaps", "cross_attn_changes")
MAX_POINTS = MAX_CURVE


def resolution_bucket(width: int, height: int) -> tuple[int, int]:
    """``(width, height)`` in pixels, each rounded up to the next multiple of 64 (see ``RESOLUTION_BUCKET``).

    >>> resolution_bucket(512, 512), resolution_bucket(520, 512), resolution_bucket(32, 32)
    ((512, 512), (576, 512), (64, 64))
    """
    sides = []
    for name, side in (("width", width), ("height", height)):
        if not isinstance(side, int) or isinstance(side, bool) or not 1 <= side <= 1 << 16:
            raise FragmentError(f"prior key resolution {name}: expected a pixel count in 1..65536, found {side!r}")
        sides.append(-(-side // RESOLUTION_BUCKET) * RESOLUTION_BUCKET)
    return sides[0], sides[1]


@dataclass(frozen=True)
class PriorKey:
    """One model configuration: the prior of another key never informs this one.

    ``resolution`` is ``(width, height)`` in pixels (an int means a square); it is stored bucketed.

    >>> k = PriorKey("ab" * 32, "ddim", "trailing", 25, 512, 7.5)
    >>> k.resolution, k.name
    ((512, 512), 'abababababababab-ddim-trailing-25steps-512x512-cfg7.5')
    >>> PriorKey("ab" * 32, "ddim", "trailing", 25, (500, 512), 7.5) == k
    True
    """

    base_sha256: str
    sampler: str
    scheduler: str
    steps: int
    resolution: Any
    cfg: float

    def __post_init__(self) -> None:
        sha = self.base_sha256
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise FragmentError(f"prior key base_sha256: expected 64 lower-case hex digits, found {str(sha)[:80]!r}")
        for name in ("sampler", "scheduler"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or len(value) > _TEXT:
                raise FragmentError(f"prior key {name}: expected a name of 1..{_TEXT} characters, found {str(value)[:80]!r}")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or not 1 <= self.steps <= MAX_CURVE:
            raise FragmentError(f"prior key steps: expected an integer in 1..{MAX_CURVE}, found {self.steps!r}")
        res = self.resolution
        width, height = (res, res) if isinstance(res, int) else tuple(res) if isinstance(res, (tuple, list)) and len(res) == 2 else (None, None)
        if width is None:
            raise FragmentError(f"prior key resolution: expected pixels or (width, height), found {res!r}")
        object.__setattr__(self, "resolution", resolution_bucket(width, height))
        cfg = self.cfg
        if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not math.isfinite(cfg) or not 0 <= cfg <= 100:
            raise FragmentError(f"prior key cfg: expected a guidance scale in 0..100, found {cfg!r}")
        object.__setattr__(self, "cfg", round(float(cfg), 3))
        object.__setattr__(self, "sampler", self.sampler.lower())
        object.__setattr__(self, "scheduler", self.scheduler.lower())

    @property
    def name(self) -> str:
        """A stable, readable string of the whole key (the base hash shortened to 16 digits)."""
        return (f"{self.base_sha256[:16]}-{self.sampler}-{self.scheduler}-{self.steps}steps-"
                f"{self.resolution[0]}x{self.resolution[1]}-cfg{self.cfg:g}")

    def to_dict(self) -> dict[str, Any]:
        return {"base_sha256": self.base_sha256, "sampler": self.sampler, "scheduler": self.scheduler,
                "steps": self.steps, "resolution": list(self.resolution), "cfg": self.cfg}

    @property
    def file_name(self) -> str:
        """The file the prior is kept in: a digest of the full key (sampler names may hold any character).

        >>> PriorKey("ab" * 32, "ddim", "trailing", 25, 512, 7.5).file_name
        'prior.5e2c977fef68652dd46d8aba.json'
        """
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return f"prior.{hashlib.sha256(canonical.encode('utf-8')).hexdigest()[:24]}.json"


def prompt_digest(prompt: str) -> str:
    """What the prior keeps of a prompt: enough to tell prompts apart, nothing to read them back from.

    >>> prompt_digest("a red circle in the top left")
    '7b40aa0c5fca4619'
    """
    return hashlib.sha256(prompt.strip().encode("utf-8")).hexdigest()[:16]


@dataclass
class Prior:
    """A configuration's measured curves, per-depth costs and judged tries (see the module docstring).

    >>> p = Prior(PriorKey("ab" * 32, "ddim", "trailing", 25, 32, 7.5))
    >>> p.tries = [{"prompt": "p1", "phase": "calibration", "level": 0.3, "passed": True, "slack": 0.2, "cfg": False},
    ...            {"prompt": "p1", "phase": "calibration", "level": 0.45, "passed": False, "slack": -0.1, "cfg": False}]
    >>> class Rung:
    ...     def __init__(self, level): self.level = level
    >>> p.suggest([Rung(0.6), Rung(0.45), Rung(0.35), Rung(0.3), Rung(0.2)])
    2
    """

    key: PriorKey
    step_changes: list[float | None] = field(default_factory=list)
    # skips -> {"changes": [...], "cost": float|None, "runs": n, "cache_point": str (priors written since the
    # warm path without a profile; older ones lack it and cannot stand in for a profile)}
    depths: dict[int, dict[str, Any]] = field(default_factory=dict)
    profiles: int = 0  # profiles averaged into step_changes
    tries: list[dict[str, Any]] = field(default_factory=list)
    step_timesteps: list[float] = field(default_factory=list)  # the first profile's timestep per step
    # "cfg_gaps" / "cross_attn_changes" -> {"runs": n, "points": {timestep: running mean}}
    per_timestep: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def prompts(self) -> list[str]:
        """The prompt digests with judged tries, oldest first."""
        return list(dict.fromkeys(t["prompt"] for t in self.tries))

    def predict(self, ladder: Sequence[Any], *, exclude: str | None = None, margin: float = MARGIN,
                judge: str | None = None) -> list[bool | None]:
        """Per rung of ``ladder`` (strongest first, each with a damage ``level``): ``True`` predicted to pass
        with ``margin``, ``False`` predicted to fail, ``None`` when the prior cannot tell.

        The rule is the hardest earlier prompt's: a rung passes only when every prompt with judged tries
        passes it.  For one prompt, the ladder's damage is monotone, so a pass at a level passes every
        weaker level and a fail fails every stronger one; between its strongest pass and its weakest fail
        its tries' slack, fitted against log level as the calibration's search fits it, decides (a rung
        predicted inside ``margin`` of the gate is not a pass).  Nothing is extrapolated beyond a prompt's
        judged range: a rung weaker than anything it tried is unknown unless it passed something stronger.
        CFG cut-off tries are left out (the cut-off is not on the damage axis; :meth:`cfg_plan` reads them), except
        the running audit's and a judged pick's (phase ``pick``), which judged their rung with its cut-off on top.  ``exclude`` leaves one
        prompt digest out (the leave-one-out bench).  ``judge`` keeps only the tries that judge made (tries
        written before the prior kept its judge have none, and count only when ``judge`` is ``None``).

        >>> p = Prior(PriorKey("ab" * 32, "ddim", "trailing", 25, 32, 7.5), tries=[{"prompt": "p1", "phase":
        ...     "calibration", "level": 0.3, "passed": True, "slack": 0.2, "cfg": False, "judge": "latent"}])
        >>> class Rung:
        ...     level = 0.2
        >>> p.predict([Rung()], judge="latent"), p.predict([Rung()], judge="decoded SSIM")
        ([True], [None])
        """
        by_prompt: dict[str, list[dict[str, Any]]] = {}
        for t in self.tries:
            # an audit judged its rung with the cut-off on top: a pass also passes the rung alone, and a fail blamed
            # on the rung only moves the next prompt to a weaker one (the safe side)
            if ((not t["cfg"] or t["phase"] in ("audit", "pick")) and t["level"] > 0 and t["prompt"] != exclude
                    and (judge is None or t.get("judge") == judge)):
                by_prompt.setdefault(t["prompt"], []).append(t)
        if not by_prompt:
            return [None] * len(ladder)
        out: list[bool | None] = []
        for rung in ladder:
            level = float(getattr(rung, "level", 0.0) or 0.0)
            verdicts = [_prompt_verdict(tries, level, margin) for tries in by_prompt.values()] if level > 0 else [None]
            out.append(False if False in verdicts else None if None in verdicts else True)
        return out

    def suggest(self, ladder: Sequence[Any], *, margin: float = MARGIN, exclude: str | None = None,
                judge: str | None = None) -> int | None:
        """The index of the strongest rung of ``ladder`` predicted to pass with ``margin`` (``predict``, on the
        tries of ``judge``), or ``None`` when the prior predicts none (the caller then searches cold)."""
        return next((i for i, ok in enumerate(self.predict(ladder, margin=margin, exclude=exclude, judge=judge)) if ok),
                    None)

    def start(self, ladder: Sequence[Any], *, judge: str | None = None) -> tuple[int | None, bool]:
        """Where a new prompt starts on ``ladder`` and whether that is warm: the strongest rung predicted to pass
        (``suggest``: warm), else, when earlier prompts failed rungs, the first rung at or below a cold search's
        start (3/5 down the ladder) not predicted to fail (cold, but not where they failed), or ``len(ladder)`` (the
        full model) when every one of those is, else ``(None, False)``.

        >>> p = Prior(PriorKey("ab" * 32, "ddim", "trailing", 25, 32, 7.5), tries=[{"prompt": "p1", "phase":
        ...     "audit", "level": 0.3, "passed": False, "slack": None, "cfg": True, "judge": "j"}])
        >>> class Rung:
        ...     def __init__(self, level): self.level = level
        >>> p.start([Rung(x) for x in (0.6, 0.45, 0.35, 0.3, 0.2)], judge="j")
        (4, False)
        """
        verdicts = self.predict(ladder, judge=judge)
        warm = next((i for i, ok in enumerate(verdicts) if ok), None)
        if warm is not None:
            return warm, True
        if False not in verdicts:
            return None, False
        cold = next((i for i in range(cold_start(len(ladder)), len(ladder)) if verdicts[i] is not False), None)
        return (cold, False) if cold is not None else (len(ladder), False)

    def cfg_plan(self, planned: Sequence[float], *, judge: str | None = None) -> tuple[float, ...]:
        """The planned CFG cut-offs (latest first) that no earlier prompt contradicts: a cut-off stays unless some
        prompt's CFG try of ``judge`` failed at it or at an earlier one (a cut-off at t = 200 leaves fewer steps
        without the unconditional pass than one at 350: if 200 failed, 350 fails too).  Any rung under it counts,
        so a failure the rung caused also vetoes the cut-off: the safe side, unless the same prompt passed the same
        cut-off or a later one on a rung no stronger (a judged pick that failed one rung and passed the next with the
        same cut-off): then the failure was its rung's, which :meth:`predict` already holds against it.

        >>> p = Prior(PriorKey("ab" * 32, "ddim", "trailing", 25, 32, 7.5), tries=[
        ...     {"prompt": "p1", "phase": "holdout", "level": 0.3, "passed": True, "cfg": True, "levers": {"cfg_cutoff": 350.0}},
        ...     {"prompt": "p1", "phase": "calibration", "level": 0.3, "passed": False, "cfg": True, "levers": {"cfg_cutoff": 500.0}}])
        >>> p.cfg_plan((500.0, 350.0, 200.0)), p.cfg_plan((650.0,))
        ((350.0, 200.0), ())
        >>> p.tries = [{"prompt": "p1", "phase": "pick", "level": 0.5, "passed": False, "cfg": True, "levers": {"cfg_cutoff": 350.0}},
        ...            {"prompt": "p1", "phase": "pick", "level": 0.4, "passed": True, "cfg": True, "levers": {"cfg_cutoff": 350.0}}]
        >>> p.cfg_plan((500.0, 350.0))
        (500.0, 350.0)
        """
        def cutoff(t: Mapping[str, Any]) -> float | None:
            c = (t.get("levers") or {}).get("cfg_cutoff")
            return float(c) if isinstance(c, (int, float)) and not isinstance(c, bool) else None

        mine = [t for t in self.tries if t["cfg"] and cutoff(t) is not None and (judge is None or t.get("judge") == judge)]
        failed = [cutoff(t) for t in mine if not t["passed"] and not any(
            p["passed"] and p["prompt"] == t["prompt"] and cutoff(p) >= cutoff(t) and p["level"] <= t["level"] for p in mine)]
        return tuple(float(c) for c in planned if not any(f <= float(c) for f in failed))

    def evidence(self, needs: Iterable[str]) -> ProfileEvidence | None:
        """The prior's curves as a profile's evidence (``profiling.evidence.ProfileEvidence``, ``source`` "prior"),
        when it holds every measurement in ``needs`` (``fragment.levers.goal_evidence``), else ``None`` (profile).

        What a schedule lever plans from is a property of the model, sampler and step count far more than of
        the prompt (the module docstring), so a prompt confirmed by its batch's running audit can plan from the
        mean of earlier prompts' profiles.  There is no head profile in it: only levers that read none of
        it (goal ``speed``) can use it.

        >>> p = Prior(PriorKey("ab" * 32, "ddim", "trailing", 25, 32, 7.5), step_changes=[None, 0.2], profiles=1,
        ...           step_timesteps=[999.0, 959.0])
        >>> p.evidence(["step_changes"]).step_timesteps, p.evidence(["cfg_gaps"])
        ((999.0, 959.0), None)
        """
        found: dict[str, Any] = {}
        steps = len(self.step_timesteps)
        if steps and not all(a > b for a, b in zip(self.step_timesteps, self.step_timesteps[1:])):
            log.warning("prior %s: its step timesteps do not decrease; profiling instead", self.key.name)
            return None
        for need in needs:
            if need == "step_changes":
                if not self.profiles or not steps or not any(c is not None for c in self.step_changes):
                    return None
                if len(self.step_changes) != steps:  # a file edited by hand, or another sampler's curve
                    log.warning("prior %s: %d step changes for %d timesteps; profiling instead", self.key.name,
                                len(self.step_changes), steps)
                    return None
                found.update(step_changes=tuple(self.step_changes), step_timesteps=tuple(self.step_timesteps))
            elif need == "reuse_depths":
                # depths measured before cache points were kept are left out: the ladder offers the others
                depths = {k: ReuseDepth(k, d["cache_point"], tuple(d["changes"]), d["cost"])
                          for k, d in sorted(self.depths.items()) if "cache_point" in d and len(d["changes"]) == steps}
                if not depths:
                    return None
                found["reuse_depths"] = depths
            elif need in PER_TIMESTEP:
                points = (self.per_timestep.get(need) or {}).get("points")
                if not points:
                    return None
                found[need] = dict(sorted(points.items(), reverse=True))
            else:  # feed-forward scores, activation statistics, heads: the prior keeps none of them
                return None
        return ProfileEvidence(ProfileData({}, 1, info={"source": f"prior {self.key.name}"}), source="prior", **found)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "key": self.key.to_dict(), "profiles": self.profiles,
                "step_changes": list(self.step_changes), "step_timesteps": list(self.step_timesteps),
                "depths": {str(k): dict(v) for k, v in sorted(self.depths.items())},
                "per_timestep": {name: {"runs": v["runs"], "points": [[t, x] for t, x in sorted(v["points"].items(),
                                                                                                reverse=True)]}
                                 for name, v in sorted(self.per_timestep.items())},
                "tries": [dict(t) for t in self.tries]}


def _prompt_verdict(tries: Sequence[Mapping[str, Any]], level: float, margin: float) -> bool | None:
    passed = [t["level"] for t in tries if t["passed"]]
    failed = [t["level"] for t in tries if not t["passed"]]
    strongest_pass = max(passed, default=None)
    weakest_fail = min(failed, default=None)
    if weakest_fail is not None and level >= weakest_fail:
        return False
    if strongest_pass is not None and level <= strongest_pass:
        # a pass right at this level must also have kept the margin (a bare pass on few seeds is a coin)
        at = [t["slack"] for t in tries if t["passed"] and t["level"] == level and t["slack"] is not None]
        return not at or max(at) >= margin or level < strongest_pass
    if strongest_pass is None or weakest_fail is None:
        return None
    points = [(math.log(t["level"]), float(t["slack"])) for t in tries if t["slack"] is not None]
    fit = _line(points)
    if fit is None:
        return None
    slope, intercept = fit
    return slope * math.log(level) + intercept >= margin


def _line(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares slope and intercept, ``None`` with fewer than two distinct x."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return slope, my - slope * mx


# ---- disk ----------------------------------------------------------------------------------------------------


def priors_dir(directory: str | os.PathLike) -> Path:
    """Where a fragments folder's priors live: ``<folder>/.library/priors``."""
    return library_dir(directory) / "priors"


def _checked_dir(directory: str | os.PathLike, *, create: bool) -> Path:
    """The priors folder after checking that it and ``.library`` are real folders, never symlinks (a symlinked
    one would send the write elsewhere, as the library index refuses for its own files)."""
    for path in (library_dir(directory), priors_dir(directory)):
        if path.is_symlink():
            raise FragmentError(f"{path}: expected a folder, found a symlink to {os.readlink(path)!r}; nothing was read or written through it")
        if path.exists() and not path.is_dir():
            raise FragmentError(f"{path}: expected a folder, found a file")
        if create:
            ensure_folder(path)
    return priors_dir(directory)


def load_prior(directory: str | os.PathLike, key: PriorKey) -> Prior | None:
    """The prior of ``key`` in the fragments folder ``directory``, or ``None`` when there is none yet.

    >>> import tempfile
    >>> load_prior(tempfile.mkdtemp(), PriorKey("ab" * 32, "ddim", "trailing", 25, 32, 7.5)) is None
    True
    """
    path = _checked_dir(directory, create=False) / key.file_name
    if not path.exists() and not path.is_symlink():
        return None
    return read_prior(path, key)


def read_prior(path: str | os.PathLike, key: PriorKey | None = None) -> Prior:
    """Read and validate one prior file (size-capped, schema-checked); ``key``, when given, must be its key."""
    path = Path(path)
    try:
        if path.is_symlink() or not path.is_file():
            raise FragmentError(f"{path}: expected a prior file, found a symlink, folder or special file")
        size = path.stat().st_size
        if size > MAX_PRIOR_BYTES:
            raise FragmentError(f"{path}: expected a prior under {MAX_PRIOR_BYTES} bytes, found {size}")
        raw = path.read_bytes()
    except OSError as exc:
        raise ReadError(f"{path}: cannot read the prior right now: {exc}") from exc
    if len(raw) > MAX_PRIOR_BYTES:  # grown since the stat
        raise FragmentError(f"{path}: expected a prior under {MAX_PRIOR_BYTES} bytes, found more")
    data = parse_json(raw, str(path), error=FragmentError, max_depth=8, what="prior", max_string=4096)
    prior = _from_dict(data, str(path))
    if key is not None and prior.key != key:
        raise FragmentError(f"{path}: expected the prior of {key.name}, found the prior of {prior.key.name}")
    return prior


def _from_dict(data: Any, source: str) -> Prior:
    def bad(where: str, expected: str, found: Any) -> FragmentError:
        return FragmentError(f"{source}: {where}: expected {expected}, found {str(found)[:80]!r}")

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def curve(v: Any, where: str) -> list[float | None]:
        if not isinstance(v, list) or len(v) > MAX_CURVE or not all(x is None or number(x) for x in v):
            raise bad(where, f"a list of at most {MAX_CURVE} numbers or nulls", v)
        return [None if x is None else float(x) for x in v]

    def count(v: Any, where: str) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 1 << 40:
            raise bad(where, "a count >= 0", v)
        return v

    if not isinstance(data, dict):
        raise bad("the document", "an object", type(data).__name__)
    if data.get("schema") != SCHEMA:
        raise bad("schema", repr(SCHEMA), data.get("schema"))
    raw_key = data.get("key")
    if not isinstance(raw_key, dict) or set(raw_key) != {"base_sha256", "sampler", "scheduler", "steps", "resolution", "cfg"}:
        raise bad("key", "an object of base_sha256, sampler, scheduler, steps, resolution, cfg", raw_key)
    try:
        res = raw_key["resolution"]
        key = PriorKey(raw_key["base_sha256"], raw_key["sampler"], raw_key["scheduler"], raw_key["steps"],
                       tuple(res) if isinstance(res, list) else res, raw_key["cfg"])
    except FragmentError as exc:
        raise FragmentError(f"{source}: {exc}") from None
    if key.to_dict() != {**raw_key, "resolution": list(key.resolution)} or list(key.resolution) != res:
        raise bad("key", "a key as written (bucketed resolution, lower-case names)", raw_key)
    depths: dict[int, dict[str, Any]] = {}
    raw_depths = data.get("depths")
    if not isinstance(raw_depths, dict) or len(raw_depths) > MAX_DEPTHS:
        raise bad("depths", f"an object of at most {MAX_DEPTHS} depths", raw_depths)
    for k, d in raw_depths.items():
        # cache_point is optional: priors written before the warm path without a profile lack it
        if (not k.isdigit() or len(k) > 3 or not isinstance(d, dict)
                or set(d) not in ({"changes", "cost", "runs"}, {"changes", "cost", "runs", "cache_point"})):
            raise bad(f"depths.{k[:20]}", "a skip count with changes, cost, runs (and optionally cache_point)", d)
        if d["cost"] is not None and not (number(d["cost"]) and 0 <= d["cost"] <= 1):
            raise bad(f"depths.{k}.cost", "a share in 0..1 or null", d["cost"])
        depths[int(k)] = {"changes": curve(d["changes"], f"depths.{k}.changes"),
                          "cost": None if d["cost"] is None else float(d["cost"]), "runs": count(d["runs"], f"depths.{k}.runs")}
        if "cache_point" in d:
            point = d["cache_point"]
            # depth 0 reuses the whole step: no module is cut, its point is ""
            if not isinstance(point, str) or len(point) > _TEXT or (not point) != (int(k) == 0):
                raise bad(f"depths.{k}.cache_point", f"a module path of 1 to {_TEXT} characters (\"\" at depth 0)",
                          point)
            depths[int(k)]["cache_point"] = point
    timesteps = data.get("step_timesteps", [])  # optional, as above
    if not isinstance(timesteps, list) or len(timesteps) > MAX_CURVE or not all(number(t) and _timestep(t) for t in timesteps):
        raise bad("step_timesteps", f"a list of at most {MAX_CURVE} timesteps in 0..10000", timesteps)
    per_timestep: dict[str, dict[str, Any]] = {}
    raw_per = data.get("per_timestep", {})
    if not isinstance(raw_per, dict) or not set(raw_per) <= set(PER_TIMESTEP):
        raise bad("per_timestep", f"an object of {', '.join(PER_TIMESTEP)}", raw_per)
    for name, v in raw_per.items():
        points = v.get("points") if isinstance(v, dict) else None
        if (not isinstance(v, dict) or set(v) != {"runs", "points"} or not isinstance(points, list)
                or len(points) > MAX_POINTS or not all(isinstance(x, list) and len(x) == 2 and number(x[0])
                                                       and _timestep(x[0]) and number(x[1]) and x[1] >= 0 for x in points)):
            raise bad(f"per_timestep.{name}", f"runs and at most {MAX_POINTS} [timestep, value >= 0] points", v)
        if len({float(t) for t, _ in points}) != len(points):
            raise bad(f"per_timestep.{name}", "one point per timestep", v)
        per_timestep[name] = {"runs": count(v["runs"], f"per_timestep.{name}.runs"),
                              "points": {float(t): float(x) for t, x in points}}
    tries = data.get("tries")
    if not isinstance(tries, list) or len(tries) > MAX_TRIES:
        raise bad("tries", f"a list of at most {MAX_TRIES} tries", type(tries).__name__)
    return Prior(key, curve(data.get("step_changes"), "step_changes"), depths, count(data.get("profiles"), "profiles"),
                 [_checked_try(t, f"tries[{i}]", bad) for i, t in enumerate(tries)],
                 [float(t) for t in timesteps], per_timestep)


_TRY_FIELDS = {"prompt", "phase", "label", "levers", "reuse_skips", "level", "cfg", "passed", "slack", "seeds"}


def _bad_try(where: str, expected: str, found: Any) -> FragmentError:
    return FragmentError(f"{where}: expected {expected}, found {str(found)[:80]!r}")


def _checked_try(t: Any, where: str, bad: Any) -> dict[str, Any]:
    # "judge" is optional: tries written before the prior kept the judge's name are still read
    if not isinstance(t, dict) or set(t) not in (_TRY_FIELDS, _TRY_FIELDS | {"judge"}):
        raise bad(where, f"an object of {', '.join(sorted(_TRY_FIELDS))} (and optionally judge)", t)
    if "judge" in t and not (isinstance(t["judge"], str) and len(t["judge"]) <= _TEXT):
        raise bad(f"{where}.judge", f"a judge name of at most {_TEXT} characters", t["judge"])

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    checks = (
        ("prompt", isinstance(t["prompt"], str) and len(t["prompt"]) == 16, "a 16-digit prompt digest"),
        ("phase", t["phase"] in PHASES, "'calibration', 'holdout', 'audit' or 'pick'"),
        ("label", isinstance(t["label"], str) and len(t["label"]) <= _TEXT, f"a label of at most {_TEXT} characters"),
        ("levers", isinstance(t["levers"], dict) and len(t["levers"]) <= 32
         and all(isinstance(k, str) and len(k) <= 64 and (number(v) or isinstance(v, bool)) for k, v in t["levers"].items()),
         "an object of lever name -> amount"),
        ("reuse_skips", t["reuse_skips"] is None or (isinstance(t["reuse_skips"], int) and not isinstance(t["reuse_skips"], bool)
                                                      and 0 <= t["reuse_skips"] <= MAX_DEPTHS), "a skip count or null"),
        ("level", number(t["level"]) and 0 <= t["level"] <= 10, "a damage level in 0..10"),
        ("cfg", isinstance(t["cfg"], bool), "true or false"),
        ("passed", isinstance(t["passed"], bool), "true or false"),
        ("slack", t["slack"] is None or (number(t["slack"]) and abs(t["slack"]) <= 1e6), "a number or null"),
        ("seeds", isinstance(t["seeds"], int) and not isinstance(t["seeds"], bool) and 0 <= t["seeds"] <= 1 << 20, "a seed count"),
    )
    for name, ok, expected in checks:
        if not ok:
            raise bad(f"{where}.{name}", expected, t[name])
    return {**t, "level": float(t["level"]), "slack": None if t["slack"] is None else float(t["slack"])}


def write_prior(directory: str | os.PathLike, prior: Prior) -> Path:
    """Write ``prior`` atomically: a temporary file, fsynced, renamed over the old one (a kill at any point
    leaves the old prior or the new one, never a mix).  Callers hold the library lock (``update_prior``)."""
    folder = _checked_dir(directory, create=True)
    path = folder / prior.key.file_name
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise FragmentError(f"{path}: expected a prior file to replace (or none), found a symlink, folder or special file; nothing was written")
    try:  # a NaN written here would make the file unreadable to every later reader (parse_json refuses it)
        body = json.dumps(prior.to_dict(), separators=(",", ":"), allow_nan=False).encode("utf-8")
    except ValueError as exc:
        raise FragmentError(f"{path}: expected finite numbers to write, found: {exc}; nothing was written") from None
    if len(body) > MAX_PRIOR_BYTES:  # cannot happen within MAX_TRIES; refusing beats writing what no reader accepts
        raise FragmentError(f"{path}: expected a prior under {MAX_PRIOR_BYTES} bytes, found {len(body)} to write")
    tmp = folder / f".{path.name}.tmp-{os.getpid()}"
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()  # a dead namesake's leftover or a planted link: never written through
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise FragmentError(f"{path}: expected a writable prior file, found: {exc}; the previous prior (if any) is unchanged") from exc
    finally:
        tmp.unlink(missing_ok=True)
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # folders cannot be fsynced everywhere (Windows): best effort, as store.install does
        pass
    return path


def _mean(old: list[float | None], n: int, new: Sequence[float | None]) -> list[float | None]:
    """Running mean per step over ``n`` earlier curves and ``new`` (a step only one side measured keeps that side)."""
    out: list[float | None] = []
    for i in range(max(len(old), len(new))):
        a = old[i] if i < len(old) else None
        b = new[i] if i < len(new) and new[i] is not None and math.isfinite(new[i]) else None  # NaN: unmeasured
        out.append(b if a is None else a if b is None else (a * n + float(b)) / (n + 1))
    return out[:MAX_CURVE]


def _timestep(t: float) -> bool:
    """A timestep the reader accepts (``_from_dict``): what is written must be readable again.

    >>> _timestep(999.0), _timestep(float("nan")), _timestep(-1.0)
    (True, False, False)
    """
    return math.isfinite(t) and 0 <= t <= 1e4


def _mean_points(old: Mapping[float, float], n: int, new: Mapping[float, float]) -> dict[float, float]:
    """Running mean per timestep over ``n`` earlier measurements and ``new`` (a timestep one side lacks keeps the
    other's), the most noise first, at most ``MAX_POINTS``.

    >>> _mean_points({999.0: 0.2, 500.0: 0.1}, 1, {500.0: 0.3, 1.0: 0.05})
    {999.0: 0.2, 500.0: 0.2, 1.0: 0.05}
    """
    out: dict[float, float] = {}
    new = {float(k): float(v) for k, v in new.items() if _timestep(float(k)) and math.isfinite(float(v)) and v >= 0}
    for t in sorted({*old, *new}, reverse=True)[:MAX_POINTS]:
        a, b = old.get(t), new.get(t)
        out[t] = float(b) if a is None else a if b is None else (a * n + float(b)) / (n + 1)
    return out


def update_prior(directory: str | os.PathLike, key: PriorKey, *, evidence: Any = None, calibration: Any = None,
                 prompt: str = "", tries: Sequence[Mapping[str, Any]] = ()) -> Prior:
    """Add a profile's curves (``evidence``: a ``ProfileEvidence``) and a calibration's judged tries
    (``calibration``: a ``fragment.calibration.Calibration``), and ``tries`` already in the prior's form
    (``audit_tries``), to the prior of ``key``; return the new prior.

    Read, merge and write happen under the library's lock, so two writers never lose each other's tries.
    An unreadable existing prior is an error, not a reason to start over: it is the user's data.

    >>> import tempfile; d = tempfile.mkdtemp(); key = PriorKey("ab" * 32, "ddim", "trailing", 25, 32, 7.5)
    >>> update_prior(d, key, prompt="a red circle").tries, load_prior(d, key).key == key
    ([], True)
    """
    with locked(directory):
        folder = _checked_dir(directory, create=True)
        for leftover in folder.glob(".prior.*.tmp-*"):  # every writer holds this lock: a temporary here is a dead one's
            if leftover.is_file() or leftover.is_symlink():
                leftover.unlink(missing_ok=True)
        prior = load_prior(directory, key) or Prior(key)
        digest = prompt_digest(prompt)
        if evidence is not None:
            changes = getattr(evidence, "step_changes", None)
            if changes:
                prior.step_changes = _mean(prior.step_changes, prior.profiles, list(changes))
                prior.profiles += 1
                # one key, one sampler and step count: the first profile's timesteps are every later one's
                timesteps = [float(t) for t in (getattr(evidence, "step_timesteps", None) or ())][:MAX_CURVE]
                if not prior.step_timesteps and all(_timestep(t) for t in timesteps):  # never what no reader accepts
                    prior.step_timesteps = timesteps
            for skips, depth in sorted((getattr(evidence, "reuse_depths", None) or {}).items())[:MAX_DEPTHS]:
                old = prior.depths.get(int(skips), {"changes": [], "cost": None, "runs": 0})
                cost = depth.cost if old["cost"] is None else old["cost"] if depth.cost is None else \
                    (old["cost"] * old["runs"] + depth.cost) / (old["runs"] + 1)
                prior.depths[int(skips)] = {"changes": _mean(old["changes"], old["runs"], list(depth.changes)),
                                            "cost": None if cost is None else min(1.0, max(0.0, float(cost))),
                                            "runs": old["runs"] + 1}
                point = str(depth.cache_point)[:_TEXT]
                if (not point) == (int(skips) == 0):  # "" at depth 0 only: a whole step is reused, no module is cut
                    prior.depths[int(skips)]["cache_point"] = point
            for name in PER_TIMESTEP:
                new = getattr(evidence, name, None)
                if new:
                    old = prior.per_timestep.get(name, {"runs": 0, "points": {}})
                    prior.per_timestep[name] = {"runs": old["runs"] + 1,
                                                "points": _mean_points(old["points"], old["runs"], new)}
        if calibration is not None or tries:
            prior.tries.extend(judged_tries(calibration, digest) if calibration is not None else [])
            prior.tries.extend(_checked_try(dict(t), f"prior {key.name}: new try", _bad_try) for t in tries)
            prior.tries = prior.tries[-MAX_TRIES:]
        write_prior(directory, prior)
    log.info("prior %s: %d profiles, %d judged tries over %d prompts", key.name, prior.profiles, len(prior.tries),
             len(prior.prompts))
    return prior


def judged_tries(calibration: Any, digest: str) -> list[dict[str, Any]]:
    """A calibration's tries as the prior keeps them (``Calibration.tries``: phase, candidate, seeds, verdict)."""
    judge = str(getattr(calibration, "judge", ""))
    return [_kept_try(t["candidate"], digest, t["phase"], bool(t["passed"]), t.get("slack"), len(t.get("seeds", ())),
                      judge) for t in calibration.tries]


def _kept_try(cand: Mapping[str, Any], digest: str, phase: str, passed: bool, slack: float | None, seeds: int,
              judge: str) -> dict[str, Any]:
    """One try as the prior keeps it, from a candidate's ``to_dict`` and the verdict."""
    levers = {k: v for k, v in cand.items() if k not in ("reuse_skips", "level", "label")
              and (isinstance(v, bool) or (isinstance(v, (int, float)) and math.isfinite(v))) and v}
    return {"prompt": digest, "phase": phase, "label": str(cand.get("label", ""))[:_TEXT], "levers": levers,
            "reuse_skips": cand.get("reuse_skips"), "level": float(cand.get("level") or 0.0),
            "cfg": bool(cand.get("cfg_cutoff")), "passed": passed,
            "slack": None if slack is None or not math.isfinite(slack) else float(slack), "seeds": seeds,
            "judge": judge[:_TEXT]}


def warm_start(directory: str | os.PathLike, key: PriorKey, ladder: Sequence[Any], judge: str | None = None) -> int | None:
    """The rung a new prompt's calibration starts at, from the prior of ``key`` and the tries of ``judge``
    (``None``: no prior, or it predicts no rung: search cold).  Pass it as ``calibrate(..., start=index, confirm_only=True)``, then
    ``update_prior(directory, key, evidence=..., calibration=..., prompt=...)`` records the new tries.

    An unreadable prior is logged and ignored: a warm start is an optimisation, the calibration still judges.

    >>> import tempfile
    >>> warm_start(tempfile.mkdtemp(), PriorKey("ab" * 32, "ddim", "trailing", 25, 32, 7.5), []) is None
    True
    """
    prior = _optional_prior(directory, key, "for a warm start")
    return prior.suggest(ladder, judge=judge) if prior is not None else None


def _optional_prior(directory: str | os.PathLike, key: PriorKey, purpose: str) -> Prior | None:
    """The prior of ``key``, or ``None`` when there is none or it cannot be read (logged: what it would have been
    used for is an optimisation, and the file is left as it is)."""
    try:
        return load_prior(directory, key)
    except FragmentError as exc:
        log.warning("prior %s not used %s: %s", key.name, purpose, exc)
        return None


def prior_evidence(directory: str | os.PathLike, key: PriorKey, needs: Iterable[str]) -> ProfileEvidence | None:
    """The prior of ``key``'s curves as evidence (:meth:`Prior.evidence`), or ``None``: no prior, one without
    every measurement in ``needs``, or an unreadable one (logged: the caller profiles, as with no prior).

    >>> import tempfile
    >>> prior_evidence(tempfile.mkdtemp(), PriorKey("ab" * 32, "ddim", "trailing", 25, 32, 7.5), ["step_changes"]) is None
    True
    """
    prior = _optional_prior(directory, key, "in place of a profile")
    return prior.evidence(needs) if prior is not None else None


def audit_tries(candidate: Any, batch: Any, digest: str, judge: str) -> list[dict[str, Any]]:
    """A running audit's verdict on ``candidate`` (``fragment.calibration.Candidate``, or a manifest's
    ``quality.refinement.chosen``: ``manifest_candidate``; the batch's first setting) as
    the prior keeps a try: one try, passed unless the audit switched away from it, over its audited seeds (``batch``:
    ``fragment.audit.AuditedBatch``), its slack the mean of the comparisons' ``gate_slack`` (None when one lacks it;
    the lead's own when the lead, judged as one sample, made the switch).
    No audit (``batch`` None or without records), or too few to have switched (``AuditRule.min_audits``) and none
    did: no try.

    >>> from prompt_fragments.fragment.audit import AuditedBatch, AuditRecord
    >>> from prompt_fragments.fragment.calibration import Candidate
    >>> c = Candidate({"heads": 0.2}, level=0.2)
    >>> b = AuditedBatch([1, 2, 3], [0] * 3, ["x"] * 3, [AuditRecord(i, i, "x", True, {}) for i in (1, 2, 3)])
    >>> [(t["phase"], t["passed"], t["seeds"], t["slack"]) for t in audit_tries(c, b, "ab" * 8, "j")]
    [('audit', True, 3, None)]
    >>> audit_tries(c, AuditedBatch([1], [0], ["x"], [AuditRecord(1, 0, "x", False, {})]), "ab" * 8, "j")
    []
    """
    cand = candidate.to_dict() if hasattr(candidate, "to_dict") else manifest_candidate(candidate)
    if cand is None or batch is None or not batch.records:
        return []
    label = batch.records[0].setting  # the first image is always audited, on the batch's first setting: candidate's
    audits = [r for r in batch.records if r.setting == label]
    switched = any(old == label for _, old, _ in batch.switches)
    if not switched and len(audits) < AuditRule().min_audits:
        return []  # too few audits to have switched: no verdict either way
    # the judge's per-image slack, averaged (lower than the slack of the mean metrics: the safe side), so a passed
    # audit is held to the prior's margin as a judged try is; unknown when a comparison did not give it
    slacks = [r.metrics.get("gate_slack") for r in audits]
    if batch.lead is not None and not batch.lead["passed"]:
        # the lead judged as one sample switched: its slack decided, whatever its images' own slacks say
        slacks = [batch.lead["metrics"].get("gate_slack")]
    slack = (sum(slacks) / len(slacks) if all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                              and math.isfinite(x) for x in slacks) else None)
    return [_kept_try(cand, digest, "audit", not switched, slack, len(audits), str(judge))]


def manifest_candidate(chosen: Any) -> dict[str, Any] | None:
    """A manifest's ``quality.refinement.chosen`` as a try's candidate (``Candidate.to_dict``'s form), for a batch that
    audits a fragment loaded from a file: only the registry's lever names with finite amounts, a bounded label.  A
    manifest may come from a stranger, so anything else is dropped; None when it names no lever.

    >>> manifest_candidate({"heads": 0.2, "junk": 1, "label": "heads 20%", "level": 0.2, "reuse_skips": None})
    {'heads': 0.2, 'reuse_skips': None, 'level': 0.2, 'label': 'heads 20%'}
    >>> manifest_candidate({"label": "x"}), manifest_candidate(None), manifest_candidate({"heads": float("nan")})
    (None, None, None)
    """
    if not isinstance(chosen, Mapping):
        return None
    names = {cls.name for cls in LEVERS}
    levers = {k: v for k, v in chosen.items() if k in names and not isinstance(v, bool) and isinstance(v, (int, float))
              and math.isfinite(v) and v}
    if not levers:
        return None
    skips, level = chosen.get("reuse_skips"), chosen.get("level")
    return {**levers,
            "reuse_skips": skips if isinstance(skips, int) and not isinstance(skips, bool) and 0 <= skips < 64 else None,
            "level": float(level) if isinstance(level, (int, float)) and not isinstance(level, bool)
            and math.isfinite(level) else 0.0,
            "label": str(chosen.get("label", ""))[:_TEXT]}


def record_audit(place: "PriorPlace", candidate: Any, batch: Any, judge: str) -> Prior | None:
    """Add a batch's running-audit verdict on ``candidate`` to the prior at ``place`` (``audit_tries``), so the next
    prompt on this model configuration starts from it; a prior that cannot be written is logged, not raised (the
    batch stands).  Returns the updated prior (``None``: nothing recorded).

    >>> record_audit(PriorPlace(tempfile.mkdtemp(), key, "a red circle"), chosen, batch, "quality gate")  # doctest: +SKIP
    """
    tries = audit_tries(candidate, batch, prompt_digest(place.prompt), judge)
    if not tries:
        return None
    try:
        return update_prior(place.directory, place.key, prompt=place.prompt, tries=tries)
    except FragmentError as exc:
        log.warning("prior %s: the audit's verdict was not recorded: %s", place.key.name, exc)
        return None


@dataclass(frozen=True)
class PriorPlace:
    """Where a calibration's prior lives: the fragments folder (its ``.library/priors``), the key, and the prompt
    (kept only as a digest) whose tries it records."""

    directory: str | os.PathLike
    key: PriorKey
    prompt: str


def calibrate_with_prior(ladder: Sequence[Any], judge: Any, *, directory: str | os.PathLike, key: PriorKey,
                         prompt: str, evidence: Any = None, **calibrate_kwargs: Any) -> Any:
    """``calibrate`` started from the prior of ``key`` (``warm_start``; cold when there is none), then the
    profile and the judged tries recorded into it (``update_prior``): the one call the extractor, the demo
    and ``bench batch`` make.  A prior that cannot be written is logged, not raised: the calibration stands.

    >>> import tempfile; from prompt_fragments.fragment.calibration import Candidate, Judgement
    >>> ladder = [Candidate({"heads": h}, level=h) for h in (0.5, 0.4, 0.3, 0.2)]
    >>> judge = lambda c, seeds: Judgement(c.level <= 0.3, slack=(0.35 - c.level) / 0.35)
    >>> d, key = tempfile.mkdtemp(), PriorKey("ab" * 32, "ddim", "trailing", 25, 32, 7.5)
    >>> run = dict(directory=d, key=key, calibration_seeds=[0], holdout_seeds=[9], goal="memory")
    >>> first = calibrate_with_prior(ladder, judge, prompt="a red circle", **run)
    >>> second = calibrate_with_prior(ladder, judge, prompt="a blue square", **run)
    >>> first.chosen.level, second.chosen.level, len(first.tries), len(second.tries)
    (0.3, 0.3, 3, 2)
    """
    warnings: list[str] = []
    in_batch = bool(calibrate_kwargs.get("confirm_in_batch"))
    try:
        prior = load_prior(directory, key)
    except FragmentError as exc:  # ReadError included: a warm start is an optimisation, the calibration still judges
        log.warning("prior %s not used: %s", key.name, exc)
        remedy = ("check the file's permissions and its disk, then run again: it is read again on the next calibration"
                  if isinstance(exc, ReadError) else
                  f"move it out of {priors_dir(directory)} to start warm again (the next calibration writes a new one)")
        warnings.append(f"the prior of this model configuration was not used, so the calibration started cold: {exc}; "
                        f"the file was left in place and not updated; {remedy}")
        prior = None
    # calibrate's own default name, so a caller that names no judge still meets its own earlier tries
    judge_name = calibrate_kwargs.get("judge_name", "judge")
    start, warm = prior.start(ladder, judge=judge_name[:_TEXT]) if prior is not None else (None, False)
    if not in_batch and not warm:
        start = None  # a judged cold search finds the failing rungs itself, from its usual start
    if in_batch and prior is not None:
        # no CFG try is made up front: only a cut-off that no earlier prompt contradicts rides on the pick
        planned = calibrate_kwargs.get("cfg_cutoffs", CFG_CUTOFFS)
        calibrate_kwargs = {**calibrate_kwargs, "cfg_cutoffs": prior.cfg_plan(planned, judge=judge_name[:_TEXT])}
    cal = calibrate(ladder, judge, start=start, confirm_only=warm, **calibrate_kwargs)
    cal.prior, cal.prior_prompts = key.name, len(prior.prompts) if prior is not None else 0
    cal.warnings.extend(warnings)
    if warnings:  # never over the user's file: update_prior would refuse it anyway
        return cal
    try:
        update_prior(directory, key, evidence=evidence, calibration=cal, prompt=prompt)
    except FragmentError as exc:
        log.warning("prior %s not updated: %s", key.name, exc)
        cal.warnings.append(f"the prior of this model configuration was not updated: {exc}")
    return cal
