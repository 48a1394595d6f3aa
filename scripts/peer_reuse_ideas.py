"""Ideas from the peer bench, measured on the reference model: DeepCache's deeper cached branch and its uniform interval.

The fragment's step reuse replays every block below ``shallow`` levels on the steps a drift budget picks
(``profiling.step_change.reuse_steps_for_count``).  DeepCache instead recomputes every k-th step and can cache
from a deeper branch.  This renders the bench's 32 variant seeds (25 DDIM steps) with the same profile's
schedules at shallow 1 and 2, for drift-budget shares 75 % / 85 % and uniform intervals 2..5, judged by the
quality gate against stock.  Usage (about 3 min on an idle 2-core CPU)::

    PYTHONPATH=<parent of the package> python scripts/peer_reuse_ideas.py ["prompt"] > ideas.jsonl
"""
import dataclasses, json, sys
from prompt_fragments.bench.batch import BenchConfig, run_batch, timed
from prompt_fragments.bench.judging import render
from prompt_fragments.bench.reference_target import ReferenceTarget
from prompt_fragments.demo import DEFAULT_PROMPT, DEFAULT_THRESHOLDS, optional_lpips
from prompt_fragments.fragment.calibration import Candidate
from prompt_fragments.fragment.extract import candidate_fragment
from prompt_fragments.fragment.schedule.apply import fragment_schedule, with_schedule
from prompt_fragments.metrics.hypotheses import load_thresholds
from prompt_fragments.profiling.step_change import reuse_steps_for_count

prompt = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_PROMPT
limits = load_thresholds(DEFAULT_THRESHOLDS)["quality_gate"]
target = ReferenceTarget(prompt, limits=limits, steps=25, lpips=optional_lpips(None)[0])
report, run = run_batch(target, BenchConfig())
stock_s = report["rows"][0]["s_per_image"]
print("chosen", run.chosen.label if run.chosen else None, "stock s/img", round(stock_s, 4), flush=True)
base = candidate_fragment(run.profile, target.unet, Candidate(step_reuse=0.5), base=run.base, name="x", **run.sources)
sched = fragment_schedule(base)
changes = run.sources["step_changes"]
out = []
def trial(name, steps, shallow):
    frag = with_schedule(base, dataclasses.replace(sched, reuse_steps=tuple(steps), shallow=shallow))
    (images, applied), seconds = timed(lambda: render(target.unet, frag, run.variants, target.run), "cpu")
    ok, q = target.judge(run.stock, images)
    row = {"name": name, "shallow": shallow, "reused": len(applied), "speedup": stock_s / (seconds / len(run.variants)),
           "pass": ok, "lpips": q.get("lpips_mean"), "ssim": q["ssim_mean"], "adh": q["adherence_delta"]}
    out.append(row); print(json.dumps(row), flush=True)
for share in (0.75, 0.85):
    steps, _ = reuse_steps_for_count(list(changes), int(share * len(changes)))
    for shallow in (1, 2):
        trial(f"drift budget {share:.0%}", steps, shallow)
for k in (2, 3, 4, 5):
    steps = [i for i in range(25) if i % k != 0]
    for shallow in (1, 2):
        trial(f"uniform interval {k}", steps, shallow)
