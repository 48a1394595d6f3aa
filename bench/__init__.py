"""Benchmarks: weights (resident size per lever), batch (amortised speed), targets (random SD, reference)."""
