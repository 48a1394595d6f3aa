"""Benchmarks: weights (resident size per lever), batch (amortised speed), targets (random SD, reference)."""

# The reference benches' calibration budget in judged images.  48 find and confirm the levers on the reference
# model (4-5 tries of 8 seeds, one held-out check of 4 seeds plus their 4 references); 8 more let a CFG cut-off
# on top be tried and confirmed too (8 + 4).  The amortized figures count every one of them.
BENCH_BUDGET_IMAGES = 56
