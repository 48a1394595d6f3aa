"""How many profiled seeds the profile needs: rankings and the calibration ladder from 2, 4 and 8 seeds (issue #26 item 6).

    nice -n 10 python tools/profile_seed_stability.py                 # default prompt, 2/4/8 seeds
    nice -n 10 python tools/profile_seed_stability.py --counts 1,2,4,8 --sets 3 --json out.json
    nice -n 10 python tools/profile_seed_stability.py --counts 8 --sets 1 --reference 8   # two independent 8-seed profiles

Each seed count is profiled on ``--sets`` disjoint seed sets, one batched run each (as ``bench batch``
profiles), and compared with a reference profile of ``--reference`` other seeds:

- ``heads_spearman``: mean over attention modules of the Spearman correlation of the head scores;
- ``heads_cut_jaccard``: overlap of the heads ``select_heads`` removes at H1's share (0.30), global scope;
- ``ff_spearman``: mean over FF modules of the Spearman correlation of the channel scores;
- ``step_change_max_rel``: the largest relative difference of the step-change curve (reuse depth 1);
- ``ladder_same``: whether ``candidate_ladder`` lists the same candidates (labels, in order) for each goal;
  ``ladder_rungs_same``: how many rungs agree, position by position, of the reference ladder's;
  ``ladder_max_amount_diff``: the largest difference of a lever amount between rungs at the same position.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
from typing import Any, Sequence

import torch

from prompt_fragments.defaults import DEFAULT_PROMPT
from prompt_fragments.fragment.calibration import candidate_ladder, profile_predictors
from prompt_fragments.fragment.surgery.selection import select_heads
from prompt_fragments.judge.reference_target import ReferenceTarget
from prompt_fragments.profiling.evidence import ProfileEvidence
from prompt_fragments.profiling.ff_profiler import FFProfiler
from prompt_fragments.profiling.profiler import HeadProfiler
from prompt_fragments.profiling.step_change import StepChangeProbe

log = logging.getLogger("profile_seed_stability")

CUT_RATIO = 0.30  # H1's share of heads


def profile(target: ReferenceTarget, seeds: Sequence[int]) -> ProfileEvidence:
    """The evidence of one batched profiled run over ``seeds`` (head, FF and step-change probes, as the bench)."""
    unet = target.unet
    with HeadProfiler(unet, buckets=4) as prof, FFProfiler(unet) as ff_prof, StepChangeProbe(unet, 1) as probe:
        prof.begin_sample("profile")
        with torch.no_grad():
            target.run(unet, list(seeds))
    return ProfileEvidence.from_probes(prof.result(), [ff_prof, probe])


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.flatten().double().argsort().argsort().double()
    rb = b.flatten().double().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = ra.norm() * rb.norm()
    return float((ra * rb).sum() / denom) if denom > 0 else 1.0


def _mean_spearman(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return statistics.fmean(_spearman(a[k], b[k]) for k in a if k in b and a[k].numel() > 1)


def _cut(evidence: ProfileEvidence) -> set[tuple[str, int]]:
    scores = evidence.scores()
    plan = select_heads(scores.heads, ratio=CUT_RATIO, protected=scores.protected)
    return {(path, h) for path, kept in plan.kept.items() for h in range(plan.heads[path]) if h not in set(kept)}


def ladders(evidence: ProfileEvidence, unet: torch.nn.Module, goals: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """``candidate_ladder``'s candidates (``Candidate.to_dict``) per goal."""
    return {g: [c.to_dict() for c in candidate_ladder(profile_predictors(evidence, unet, goal=g), g)] for g in goals}


def _amount_diff(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> float:
    # the largest difference of a numeric lever amount between rungs at the same position (a missing rung: 1.0)
    worst = 0.0 if len(a) == len(b) else 1.0
    for x, y in zip(a, b):
        for k, v in x.items():
            if k != "level" and isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(y.get(k), (int, float)):
                worst = max(worst, abs(float(v) - float(y[k])))
    return round(worst, 4)


def compare(evidence: ProfileEvidence, ref: ProfileEvidence, unet: torch.nn.Module, ref_ladders: dict[str, list[str]],
            goals: Sequence[str]) -> dict[str, Any]:
    """The stability figures of ``evidence`` against the reference profile ``ref`` (see the module docstring)."""
    cut, ref_cut = _cut(evidence), _cut(ref)
    changes = [(a, b) for a, b in zip(evidence.step_changes or [], ref.step_changes or []) if a is not None and b is not None]
    own = ladders(evidence, unet, goals)
    return {
        "heads_spearman": round(_mean_spearman(evidence.scores().heads, ref.scores().heads), 4),
        "heads_cut_jaccard": round(len(cut & ref_cut) / max(len(cut | ref_cut), 1), 4),
        "ff_spearman": round(_mean_spearman(evidence.ff_scores or {}, ref.ff_scores or {}), 4),
        "step_change_max_rel": round(max((abs(a - b) / abs(b) for a, b in changes if b), default=0.0), 4),
        "ladder_same": {g: [c["label"] for c in own[g]] == [c["label"] for c in ref_ladders[g]] for g in goals},
        "ladder_rungs_same": {g: f"{sum(x['label'] == y['label'] for x, y in zip(own[g], ref_ladders[g]))}/"
                                 f"{len(ref_ladders[g])}" for g in goals},
        "ladder_max_amount_diff": {g: _amount_diff(own[g], ref_ladders[g]) for g in goals},
        "ladder": own,
    }


def seed_stability(prompt: str = DEFAULT_PROMPT, counts: Sequence[int] = (2, 4, 8), sets: int = 3,
                   reference: int = 16, goals: Sequence[str] = ("speed", "both")) -> dict[str, Any]:
    """Profile ``prompt`` on the reference model with each seed count on ``sets`` disjoint seed sets and compare
    each with a ``reference``-seed profile (seeds 1000..); returns the per-set figures and the reference ladders."""
    target = ReferenceTarget(prompt, limits={})
    ref = profile(target, range(1000, 1000 + reference))
    ref_ladders = ladders(ref, target.unet, goals)
    out: dict[str, Any] = {"prompt": prompt, "reference_seeds": reference, "reference_ladder": ref_ladders, "counts": {}}
    for n in counts:
        rows = []
        for s in range(sets):
            seeds = list(range(s * n, (s + 1) * n))
            row = {"seeds": seeds, **compare(profile(target, seeds), ref, target.unet, ref_ladders, goals)}
            log.info("%d seeds %s: %s", n, seeds, {k: v for k, v in row.items() if k != "ladder"})
            rows.append(row)
        out["counts"][n] = rows
    return out


def summary(result: dict[str, Any]) -> list[str]:
    """One line per seed count: the figures' worst (min correlations, max curve difference) over the sets."""
    lines = [f"reference: {result['reference_seeds']} seeds; ladders "
             f"{ {g: [c['label'] for c in cs] for g, cs in result['reference_ladder'].items()} }"]
    for n, rows in result["counts"].items():
        same = {g: sum(r["ladder_same"][g] for r in rows) for g in rows[0]["ladder_same"]}
        lines.append(
            f"{n} seeds ({len(rows)} sets): heads spearman min {min(r['heads_spearman'] for r in rows):.3f}, "
            f"cut jaccard min {min(r['heads_cut_jaccard'] for r in rows):.3f}, "
            f"ff spearman min {min(r['ff_spearman'] for r in rows):.3f}, "
            f"step-change max rel diff {max(r['step_change_max_rel'] for r in rows):.3f}, "
            f"ladder identical {', '.join(f'{g} {k}/{len(rows)}' for g, k in same.items())}; "
            f"rungs {[r['ladder_rungs_same'] for r in rows]}, "
            f"largest amount difference {[r['ladder_max_amount_diff'] for r in rows]}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--counts", default="2,4,8")
    parser.add_argument("--sets", type=int, default=3)
    parser.add_argument("--reference", type=int, default=16)
    parser.add_argument("--goals", default="speed,both")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = seed_stability(args.prompt, [int(c) for c in args.counts.split(",")], args.sets, args.reference,
                            args.goals.split(","))
    for line in summary(result):
        print(line)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
