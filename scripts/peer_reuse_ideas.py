"""Ideas from the peer bench, measured on the reference model: DeepCache's deeper cached branch and its uniform interval.

The fragment's step reuse replays every block below ``shallow`` levels on the steps a drift budget picks
(``profiling.step_change.reuse_steps_for_count``).  DeepCache instead recomputes every k-th step and can cache
from a deeper branch.  This renders the bench's 32 variant seeds (25 DDIM steps) with the same profile's
schedules at shallow 1 and 2, for drift-budget shares 75 % / 85 % and uniform intervals 2..5, judged by the
quality gate against stock.  Usage (about 3 min on an idle 2-core CPU)::

    PYTHONPATH=<parent of the package> python scripts/peer_reuse_ideas.py ["prompt"] > ideas.jsonl
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from typing import Sequence

from prompt_fragments.bench.batch import BenchConfig, run_batch, timed
from prompt_fragments.defaults import DEFAULT_PROMPT, DEFAULT_THRESHOLDS, optional_lpips
from prompt_fragments.judge.fragment_judge import render
from prompt_fragments.judge.reference_target import ReferenceTarget
from prompt_fragments.fragment.calibration import Candidate
from prompt_fragments.fragment.extract import candidate_fragment
from prompt_fragments.fragment.schedule.apply import fragment_schedule, with_schedule
from prompt_fragments.judge.thresholds import load_thresholds
from prompt_fragments.profiling.step_change import reuse_steps_for_count

log = logging.getLogger("peer_reuse_ideas")


def main(argv: Sequence[str]) -> None:
    """Render every schedule idea on the bench's variant seeds; one JSON line per idea on stdout (the data)."""
    prompt = argv[0] if argv else DEFAULT_PROMPT
    limits = load_thresholds(DEFAULT_THRESHOLDS)["quality_gate"]
    target = ReferenceTarget(prompt, limits=limits, steps=25, lpips=optional_lpips(None)[0])
    report, run = run_batch(target, BenchConfig())
    stock_s = report["rows"][0]["s_per_image"]
    log.info("chosen %s, stock %.4f s/image", run.chosen.label if run.chosen else None, stock_s)
    base = candidate_fragment(run.evidence, target.unet, Candidate({"step_reuse": 0.5}), base=run.base, name="x")
    sched = fragment_schedule(base)
    changes = run.evidence.step_changes

    def trial(name: str, steps: Sequence[int], shallow: int) -> None:
        frag = with_schedule(base, dataclasses.replace(sched, reuse_steps=tuple(steps), shallow=shallow))
        (images, applied), seconds = timed(lambda: render(target.unet, frag, run.variants, target.run), "cpu")
        ok, q = target.judge(run.stock, images)
        row = {"name": name, "shallow": shallow, "reused": len(applied), "speedup": stock_s / (seconds / len(run.variants)),
               "pass": ok, "lpips": q.get("lpips_mean"), "ssim": q["ssim_mean"], "adh": q["adherence_delta"]}
        sys.stdout.write(json.dumps(row) + "\n")
        sys.stdout.flush()

    for share in (0.75, 0.85):
        steps, _ = reuse_steps_for_count(list(changes), int(share * len(changes)))
        for shallow in (1, 2):
            trial(f"drift budget {share:.0%}", steps, shallow)
    for k in (2, 3, 4, 5):
        for shallow in (1, 2):
            trial(f"uniform interval {k}", [i for i in range(25) if i % k != 0], shallow)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(sys.argv[1:])
