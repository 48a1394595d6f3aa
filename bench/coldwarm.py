"""Cold and warm: ``bench batch`` over several prompts on one model configuration (issue #26, Targets).

The first prompt is calibrated on an empty prior (cold: the first prompt on
this model configuration); each later prompt is calibrated with the prior the
earlier prompts left (``fragment.library.prior``: warm when it predicts a
rung, the search then only confirms).  Every prompt is a whole
``bench.batch.run_batch``: its own stock timing (u), profile, calibration,
audited batch and fresh-seed check, so the figures of each row are that
prompt's own.  The prior lives in a temporary folder unless a folder is given.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Sequence

from ..fragment.library.prior import PriorKey, PriorPlace, load_prior, priors_dir
from .batch import BenchConfig, BenchTarget, format_batch_report, run_batch

log = logging.getLogger(__name__)


def cold_warm_row(prompt: str, report: dict[str, Any]) -> dict[str, Any]:
    """One row of the cold/warm table from a ``bench_batch`` report.

    >>> r = {"calibration": {"start": "cold", "tries": [{}, {}], "cost": {"images": 12}, "chosen": None},
    ...      "costs": {"overhead_u": 3.0}, "throughput_ratio": 1.0, "amortized_ratio_32": 0.9,
    ...      "break_even_images": None, "fresh_check": None, "audit_summary": "no audit"}
    >>> row = cold_warm_row("a red circle", r); row["start"], row["tries"], row["judged_images"]
    ('cold', 2, 12)
    """
    cal, fresh = report["calibration"], report.get("fresh_check")
    return {"prompt": prompt, "start": cal.get("start", "cold"), "warm_start": cal.get("warm_start"),
            "chosen": cal["chosen"]["label"] if cal["chosen"] else None, "tries": len(cal["tries"]),
            "judged_images": cal["cost"]["images"], "overhead_u": report["costs"]["overhead_u"],
            "raw_ratio": report["throughput_ratio"], "amortized_32": report["amortized_ratio_32"],
            # the paired median (``bench.paired``): stock and the fragment back to back, beside the one-run raw ratio
            "paired_ratio": (report.get("paired") or {}).get("raw_ratio"),
            "break_even_images": report["break_even_images"],
            "fresh_passes": None if not fresh else bool(fresh["passes_gate"]),
            "fresh_seeds": None if not fresh else fresh["seeds"], "audit": report.get("audit_summary"),
            "profiled": report.get("profile_source", "profile") == "profile"}  # False: planned from the prior's curves


def bench_cold_warm(targets: Sequence[BenchTarget], key: PriorKey, config: BenchConfig = BenchConfig(), *,
                    directory: str | Path | None = None) -> dict[str, Any]:
    """``run_batch`` on each target in order, the first cold on an empty prior, the rest warm from the earlier ones.

    ``targets`` each have a ``prompt`` (``judge.reference_target.ReferenceTarget``); ``key`` is their shared model
    configuration; ``directory`` keeps the prior (default: a temporary folder, removed afterwards).  The report holds
    the table rows (``cold_warm_row``), each prompt's full report, and the prior file.

    >>> report = bench_cold_warm([ReferenceTarget(p, limits=limits, steps=10) for p in prompts], key,  # doctest: +SKIP
    ...                          BenchConfig(variants=12, profile_seeds=2, holdout_seeds=2))
    >>> [row["start"] for row in report["rows"]]  # doctest: +SKIP
    ['cold', 'warm (prior)']
    """
    if not targets:
        raise ValueError("bench_cold_warm: expected at least one target (prompt), found none")
    with tempfile.TemporaryDirectory(prefix="pf-prior-") as scratch:
        folder = Path(directory) if directory is not None else Path(scratch)
        reports, rows = [], []
        for i, target in enumerate(targets):
            prompt = getattr(target, "prompt", None) or f"{target.name} #{i}"
            log.info("cold/warm: prompt %d of %d (%s): %r", i + 1, len(targets), "first" if i == 0 else "after the prior",
                     prompt)
            report, _ = run_batch(target, config, prior=PriorPlace(folder, key, prompt))
            reports.append(report)
            rows.append(cold_warm_row(prompt, report))
        prior = load_prior(folder, key)
        prior_file = priors_dir(folder) / key.file_name
        return {"key": key.to_dict(), "key_name": key.name, "rows": rows, "reports": reports,
                "prior": {"file": str(prior_file) if directory is not None else f"(temporary) {prior_file.name}",
                          "prompts": len(prior.prompts) if prior else 0, "tries": len(prior.tries) if prior else 0}}


def format_cold_warm(report: dict[str, Any], *, details: bool = False) -> str:
    """The cold/warm table: per prompt, how it started, what the calibration and the audit spent, and what it repays.

    >>> row = {"prompt": "a red circle", "start": "cold", "tries": 5, "judged_images": 40, "overhead_u": 9.5,
    ...        "raw_ratio": 2.0, "paired_ratio": 1.8, "amortized_32": 1.2, "break_even_images": 19, "fresh_passes": True,
    ...        "fresh_seeds": 64, "audit": "audited 3 of 20: 3 passed", "chosen": "ff 30%"}
    >>> print(format_cold_warm({"key_name": "k", "rows": [row], "prior": {"prompts": 1, "tries": 5}}).splitlines()[2])
    cold              5     40    9.50   2.00x   1.80x   1.20x         19  PASS/64  a red circle
    """
    lines = [f"cold / warm on {report['key_name']} (prior: {report['prior']['prompts']} prompts, "
             f"{report['prior']['tries']} judged tries at the end)",
             f"{'start':<12}{'tries':>7}{'judged':>7}{'u':>8}{'raw':>8}{'paired':>8}{'N=32':>8}{'break-even':>11}  "
             f"{'fresh':<7}  prompt"]
    for row in report["rows"]:
        start = ("warm" if row["start"].startswith("warm") else "cold") + ("" if row.get("profiled", True) else " *")
        fresh = "-" if row["fresh_passes"] is None else f"{'PASS' if row['fresh_passes'] else 'FAIL'}/{row['fresh_seeds']}"
        even = "never" if row["break_even_images"] is None else str(row["break_even_images"])
        n32 = "n/a" if row["amortized_32"] is None else f"{row['amortized_32']:.2f}x"
        paired = "-" if row.get("paired_ratio") is None else f"{row['paired_ratio']:.2f}x"
        lines.append(f"{start:<12}{row['tries']:>7}{row['judged_images']:>7}{row['overhead_u']:>8.2f}"
                     f"{row['raw_ratio']:>7.2f}x{paired:>8}{n32:>8}{even:>11}  {fresh:<7}  {row['prompt']}")
    lines.append("u: the pack's overhead in stock images (profile hooks, build, judging, the audit's waste); "
                 "paired: stock and the fragment timed back to back on a few seeds (median of the units); "
                 "N=32: amortized ratio; fresh: the chosen setting vs stock on seeds nothing else saw"
                 + ("; *: no profile, planned from the prior's curves"
                    if any(not row.get("profiled", True) for row in report["rows"]) else ""))
    for row in report["rows"]:
        lines.append(f"  {row['prompt']}: {row['chosen'] or 'the full model'}; audit: {row['audit']}")
    if details:
        for r in report.get("reports", []):
            lines += ["", format_batch_report(r)]
    return "\n".join(lines)
