"""Tier 1: ``bench seeds`` (issue #26, item 6) profiles disjoint seed subsets on the reference model and counts how
often their in-batch pick is the reference profile's; the counts are the picks', not constants."""
from __future__ import annotations

from prompt_fragments.bench.profile_seeds import SeedsBenchConfig, bench_profile_seeds, format_seeds_report, pick
from prompt_fragments.cli import main
from prompt_fragments.reference.model import load_reference

PROMPTS = ["a red circle in the top left", "a green square in the center on a black background"]


def test_the_seed_bench_compares_disjoint_subsets_with_the_reference_pick() -> None:
    model = load_reference()
    config = SeedsBenchConfig(reference=2, sizes=(1,), subsets=2, steps=6)  # 6 steps: a ladder of 2 rungs
    report = bench_profile_seeds(model, PROMPTS, config)
    assert [row["prompt"] for row in report["rows"]] == PROMPTS
    for row in report["rows"]:
        reference, subsets = row["reference"], row["subsets"][1]
        assert reference["seeds"] == [0, 1] and [s["seeds"] for s in subsets] == [[100], [101]]
        assert reference["label"] is not None and reference["rung"] is not None
        assert reference["label"].startswith(reference["ladder"][reference["rung"]])
        # the same seeds profile to the same pick: the comparison is between seeds, not run-to-run noise
        assert pick(model, row["prompt"], [100], config)["label"] == subsets[0]["label"]
    by_hand = sum(s["label"] == row["reference"]["label"] for row in report["rows"] for s in row["subsets"][1])
    summary = report["summary"][1]
    assert summary["same"] == by_hand and summary["compared"] == 4 and summary["same_as_reference"] == f"{by_hand} of 4"
    agree = sum(row["subsets"][1][0]["label"] == row["subsets"][1][1]["label"] for row in report["rows"])
    assert summary["subsets_agree"] == f"{agree} of 2"
    assert f"the reference's pick in {by_hand} of 4 subsets" in format_seeds_report(report)


def test_the_seed_bench_command_prints_its_table(capsys) -> None:
    assert main(["bench", "seeds", "--prompt", PROMPTS[0], "--reference", "1", "--sizes", "1", "--subsets", "1",
                 "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("profiled seeds and the in-batch pick (goal speed, 3 steps") and "1 seeds: the reference's" in out
