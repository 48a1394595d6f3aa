"""The main job runs end to end on the embedded default (the reference model) and writes what it promises."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from prompt_fragments.cli import main
from prompt_fragments.fragment.format.store import load_fragment


def test_demo_cli_writes_fragment_grid_metrics_and_summary(tmp_path: Path, capsys) -> None:
    # --ratio: the fixed heads-only fragment kept for study; the default (calibrated) run is the next test
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--seeds", "2", "--variants", "4", "--steps", "5", "--paraphrases", "2",
                 "--ratio", "0.3", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    fragment = load_fragment(summary["fragment_manifest"])
    assert fragment.manifest["profiling"]["seeds"] == [0, 1]
    assert fragment.manifest["base_model"]["name"] == "prompt-fragments-reference-v1"
    assert summary["pruning"]["heads_removed"] == fragment.manifest["pruning"]["heads_removed"] > 0
    assert summary["exactness_masked_vs_physical_rel_err"] <= 1e-5
    assert summary["params"]["fragment"] < summary["params"]["full"]
    metrics = json.loads((out / "metrics_summary.json").read_text())
    assert sorted(metrics["hypotheses"]) == ["H1", "H2", "H3", "H4", "H5"]
    assert metrics["metrics"]["batch_variants"] == 4 and 0.0 <= metrics["metrics"]["adherence_full"] <= 1.0
    assert [p["ratio"] for p in metrics["h1_curve"]] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    assert metrics["reuse"]["paraphrases"] == 2 and metrics["reuse"]["stand_in"] is False
    grid = Image.open(out / "grid.png")
    assert grid.size[0] > 2 * grid.size[1]  # two panels side by side, one row of 4 each
    assert fragment.manifest["quality"]["adherence_full"] == metrics["metrics"]["adherence_full"]
    assert summary["calibration"] is None and fragment.manifest["pruning"]["heads_removed"] > 0
    printed = capsys.readouterr().out
    assert "heads removed" in printed and "adherence full / fragment" in printed and "H1" in printed
    assert "fixed (--ratio), not calibrated" in printed


def test_the_judged_demo_builds_the_calibrated_fragment_and_counts_its_cost(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--seeds", "3", "--variants", "4", "--steps", "5", "--paraphrases", "0",
                 "--no-curve", "--budget-images", "20", "--holdout", "2", "--confirm", "judge", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    metrics = json.loads((out / "metrics_summary.json").read_text())
    cal = metrics["calibration"]
    assert cal["cost"]["images"] <= 20 and cal["calibration_seeds"] == [0, 1, 2] and cal["holdout_seeds"] == [500, 501]
    assert metrics["metrics"]["calibration_images"] == cal["cost"]["images"]
    printed = capsys.readouterr().out
    amortized = metrics["amortized"]  # the CostLedger's record, in u (one stock image) and seconds
    assert [r["n"] for r in amortized["rows"]] == [8, 16, 32, 64, 128]
    # the 3 profiled images and the confirmed held-out references are delivered: output, not overhead (4 variants
    # are too few for a running audit that could switch: none)
    assert amortized["delivered"] == 3 + cal["cost"]["delivered"] and "audit" not in amortized["by_kind"]
    assert amortized["by_kind"]["profile_hooks"]["delivered"] == 3
    # cold / warm: the cold prompt first, on an empty prior; then this prompt, from the prior it left
    cold, warm = summary["cold_warm"]["cold"], summary["cold_warm"]["warm"]
    assert cold["start"] == "cold" and cold["prompt"] != summary["prompt"] == warm["prompt"]
    assert warm["start"] == cal["start"] and warm["tries"] == len(cal["tries"])
    if cold["chosen"] is not None:  # a confirmed pass in the prior: this prompt only confirms
        # (not "fewer judged images than the cold prompt": the prompts differ, and the budget each search may spend
        # follows the timed u, so a warm start that fails its predicted rung can judge more than a cut-short cold one)
        assert warm["start"] == "warm (prior)", warm
        tries = cal["tries"]
        first = next((i for i, t in enumerate(tries) if t["phase"] == "calibration" and t["passed"]), None)
        if first is not None and first + 1 < len(tries):  # a pass goes straight to confirmation, no stronger probe
            assert tries[first + 1]["phase"] == "holdout", [(t["phase"], t["candidate"]["label"]) for t in tries]
    assert warm["overhead_u"] == pytest.approx(amortized["overhead_u"]) and warm["delivered"] == amortized["delivered"]
    for line in (cold, warm):  # each line's figures are its own ledger's arithmetic
        kept = min(line["delivered"], 32)
        assert line["amortized"]["32"] == pytest.approx(32 / (line["overhead_u"] + kept + (32 - kept) / line["batch_ratio"]))
    # H4 is judged on the warm line (this prompt's ledger at the batch size), H5 on the cold line's break-even
    assert summary["cold_warm"]["h4_judged_on"] == "warm" and summary["cold_warm"]["h5_judged_on"] == "cold"
    assert metrics["metrics"]["batch_speedup"] == amortized_ratio_at(amortized, 4)
    assert metrics["metrics"]["break_even_variants"] == cold["break_even_images"]
    assert metrics["metrics"]["cold_break_even_images"] == cold["break_even_images"]
    assert metrics["metrics"]["warm_amortized_32"] == pytest.approx(warm["amortized"]["32"])
    assert any("H4 is judged on the warm line" in n for n in metrics["notes"])
    assert "cold (first prompt)" in printed and "warm (after its prior)" in printed
    # the batch of 32 (the default --batch) sets the budget; a try starts only when its estimate fits what is left
    # (timed tries: the last one may run past its estimate, and the ledger above counts what it really cost)
    assert cal["budget"]["batch"] == 32 and cal["budget"]["image_u"] >= 1.0
    spent = 0.0
    for t in cal["tries"]:
        assert spent + t["estimate_u"] <= cal["budget"]["units"] + 1e-3, cal["tries"]
        spent += t["units"]
    assert "amortized ratio" in printed and "break-even" in printed and "calibration cost" in printed
    assert "costs" in printed and "spent " in printed and "peak batch tensors" in printed
    if cal["chosen"] is None:  # nothing passed: no fragment claims quality it does not have
        assert summary["fragment_manifest"] is None and "the full model" in printed
        return
    fragment = load_fragment(summary["fragment_manifest"])
    refinement = fragment.manifest["quality"]["refinement"]
    assert refinement["status"] == "passed" and refinement["chosen"]["label"] == cal["chosen"]["label"]
    assert len(refinement["tries"]) == len(cal["tries"]) and fragment.manifest["quality"]["quality_gate"] == "passed"
    assert fragment.manifest["performance"]["calibration_images"] == cal["cost"]["images"]
    assert sum(lv["saved_mb"] for lv in summary["levers"]) == pytest.approx(
        summary["weights_mb"]["full"] - summary["weights_mb"]["fragment"], abs=1e-6)


def test_the_default_demo_confirms_its_untried_pick_in_the_batch_and_counts_the_audit(tmp_path: Path, capsys) -> None:
    """The default (--confirm batch): no judged try; the variants' running audit leads with 3 audited images, whose
    full-model images are delivered and whose fragment renders are the audit's overhead; the fresh-seed gate judges
    the variants the audit did not see; the cold prompt's audit verdict goes into the prior the main prompt reads."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--seeds", "2", "--variants", "6", "--steps", "4", "--paraphrases", "0",
                 "--no-curve", "--no-progress", "--prior-dir", str(tmp_path / "prior")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    metrics = json.loads((out / "metrics_summary.json").read_text())
    cal = metrics["calibration"]
    assert (cal["status"], cal["tries"], cal["cost"]["images"]) == ("in_batch", [], 0), cal
    audit, amortized = metrics["running_audit"], metrics["amortized"]
    # the main prompt is planned from the prior the cold prompt's profile left: its own 2 profiled seeds are the head
    # study's, not images of its batch and not a cost of it; of the batch of 32, the 6 variants are rendered
    assert summary["profile_source"].startswith("prior") and "profile_hooks" not in amortized["by_kind"]
    assert summary["cold_warm"]["cold"]["profiled_images"] == 2 and summary["cold_warm"]["warm"]["profiled_images"] == 0
    assert audit["images"] == 6 and audit["audited"] >= 3 and [r["index"] for r in audit["records"][:3]] == [0, 1, 2]
    # the lead's means are judged, unless its 3 images had all failed (the per-image rule switched first)
    assert audit["lead"] is not None or not any(r["passed"] for r in audit["records"][:3])
    spent = amortized["by_kind"]["audit"]
    assert spent["delivered"] == audit["delivered_full"] and spent["images"] >= spent["delivered"] + 1
    assert amortized["delivered"] == audit["delivered_full"]
    assert metrics["fresh_seed_gate"]["seeds"] == 6 - audit["audited"]
    assert summary["running_audit"] == audit["summary"] and summary["confirm"] == "batch"
    fragment = load_fragment(summary["fragment_manifest"])
    assert fragment.manifest["quality"]["refinement"]["status"] == "in_batch"
    cold = summary["cold_warm"]["cold"]
    assert cold["confirmation"] == "in_batch" and cold["judged_images"] == 0 and cold["audit"].startswith("audited ")
    priors = list((tmp_path / "prior" / ".library" / "priors").glob("prior.*.json"))
    tries = [t for t in json.loads(priors[0].read_text())["tries"] if t["phase"] == "audit"]
    assert len(tries) == 2, tries  # the cold prompt's and the main prompt's verdicts
    printed = capsys.readouterr().out
    assert "picked untried: the batch's running audit confirms it" in printed
    warm = next(line for line in printed.splitlines() if line.startswith("warm (after its prior)"))
    assert "no profile (the prior's curves)" in warm and "no profile" not in printed.split("warm (after")[0].split("cold (first")[1]
    # the worst images beside the means: the variants' own tails, and the count under the gate's SSIM limit
    fid = summary["fidelity"]
    worst = next(line for line in printed.splitlines() if line.startswith("worst images "))
    assert f"SSIM min {fid['ssim_min']:.3f} (p10 {fid['ssim_p10']:.3f})" in worst and fid["ssim_min"] <= fid["ssim_mean"]
    assert worst.endswith(f"{fid['ssim_below_limit']} of 6 below the SSIM limit")
    assert any(line.startswith("running audit ") and line.endswith(audit["summary"]) for line in printed.splitlines())


def test_the_demo_judge_branches_candidates_from_the_profiled_run(tmp_path: Path) -> None:
    # a batch large enough to repay every try (the default test's budget may refuse the first, on timings)
    assert main(["demo", "--out", str(tmp_path), "--seeds", "2", "--variants", "2", "--steps", "5", "--paraphrases", "0",
                 "--no-curve", "--budget-images", "12", "--holdout", "1", "--batch", "10000", "--no-cold-warm",
                 "--confirm", "judge", "--no-progress"]) == 0
    cal = json.loads((tmp_path / "metrics_summary.json").read_text())["calibration"]
    tries = cal["tries"]
    assert tries, "no candidate was judged"
    # a schedule-only candidate skips the steps it shares with the full model: branch_step 0 on every try would
    # mean no recorded trajectory reached the judge
    assert any(t["metrics"]["branch_step"] > 0 for t in tries), [t["metrics"] for t in tries]
    # the first try is budgeted at the profiled batch's measured cost per image (a small judged batch costs more
    # per image than one image of the stock batch of 32), never below one stock image
    assert cal["budget"]["image_u"] >= 1.0
    assert tries[0]["estimate_u"] == pytest.approx(len(tries[0]["seeds"]) * cal["budget"]["image_u"], abs=1e-3)


def amortized_ratio_at(amortized: dict, n: int) -> float:
    """The amortized ratio at ``n`` images, recomputed from the ledger's own figures (in u)."""
    kept = min(amortized["delivered"], n)
    return pytest.approx(n / (amortized["overhead_u"] + kept + (n - kept) / amortized["raw_ratio"]))


def test_demo_accepts_a_prompt_outside_the_grammar(tmp_path: Path) -> None:
    assert main(["demo", "--out", str(tmp_path), "--prompt", "A dog on a jet ski", "--seeds", "1", "--variants", "2",
                 "--steps", "2", "--no-curve", "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "metrics_summary.json").read_text())
    # nothing to check adherence against, and no paraphrases to make: missing, said, not invented
    assert metrics["metrics"]["adherence_delta"] is None and metrics["metrics"]["reuse_pass_rate"] is None
    assert any("H3 not measured" in n for n in metrics["notes"])


def test_the_profiled_demo_judges_its_pick_on_the_profiled_seeds_and_audits_without_a_lead(tmp_path: Path) -> None:
    """--confirm profiled: the pick's tries are on the profiled seeds only (no held-out reference is rendered), and
    a pick that passed its try is audited every k-th image, not led by 3 audited images."""
    assert main(["demo", "--out", str(tmp_path), "--seeds", "2", "--variants", "6", "--steps", "4", "--paraphrases", "0",
                 "--no-curve", "--no-progress", "--no-cold-warm", "--batch", "10000", "--confirm", "profiled"]) == 0
    metrics = json.loads((tmp_path / "metrics_summary.json").read_text())
    cal, amortized = metrics["calibration"], metrics["amortized"]
    assert cal["tries"] and {t["phase"] for t in cal["tries"]} == {"pick"}
    assert all(t["seeds"] == [0, 1] for t in cal["tries"]) and cal["cost"]["delivered"] == 0
    assert amortized["by_kind"]["judged"]["images"] == cal["cost"]["images"] == 2 * len(cal["tries"])
    assert amortized["delivered"] == 2 + (metrics["running_audit"] or {}).get("delivered_full", 0)
    if cal["status"] == "in_batch":
        assert cal["tries"][-1]["passed"] and cal["method"].startswith("predicted rung, judged on the profiled seeds")
        audit = metrics["running_audit"]
        indices = [r["index"] for r in audit["records"]]
        assert indices[0] == 0 and indices[:3] != [0, 1, 2], audit["records"]  # no lead of 0, 1, 2
        assert audit["every"] >= 2 and indices == list(range(0, 6, audit["every"]))[:len(indices)]
    else:
        assert cal["status"] == "fallback_full_model" and metrics["running_audit"] is None
