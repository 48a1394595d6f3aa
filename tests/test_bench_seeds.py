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


def test_the_seed_bench_summary_places_each_pick_on_the_reference_ladder(monkeypatch) -> None:
    """Synthetic picks: the summary's counts follow them (same label, distance on the reference's ladder, picks that
    are not on it, and subsets that agree), and a reference with no rung is left out of the distances."""
    import prompt_fragments.bench.profile_seeds as bench

    ladder = ["step reuse 50%", "step reuse 45%", "step reuse 40%"]
    labels = {("p1", 0): "step reuse 50% + CFG off", ("p1", 100): "step reuse 40% + CFG off",
              ("p1", 101): "step reuse 50% + CFG off", ("p2", 0): "CFG off", ("p2", 100): "CFG off",
              ("p2", 101): "step reuse 35% + CFG off"}

    def fake_pick(model, prompt, seeds, config):
        seeds = list(seeds)
        label = labels[(prompt, seeds[0])]
        return {"seeds": seeds, "label": label, "rung": bench.rung_of(label, ladder), "ladder": ladder,
                "s_per_image": 0.1 * len(seeds)}

    monkeypatch.setattr(bench, "pick", fake_pick)
    report = bench.bench_profile_seeds(None, ["p1", "p2"], SeedsBenchConfig(reference=2, sizes=(1,), subsets=2))
    s = report["summary"][1]
    assert (s["same"], s["compared"], s["subsets_agree"]) == (2, 4, "0 of 2")  # p1's 101 and p2's 100 match
    assert s["max_rungs_apart"] == 2 and s["off_ladder"] == 0  # p2's reference is no rung: not placed
    assert s["s_per_image"] == 0.1 and report["reference_s_per_image"] == 0.2


def test_the_seed_bench_refuses_what_it_cannot_compare() -> None:
    import pytest

    from prompt_fragments.errors import FragmentError

    with pytest.raises(FragmentError, match="goal: expected 'speed'"):
        SeedsBenchConfig(goal="memory")
    with pytest.raises(FragmentError, match="at least one prompt"):
        bench_profile_seeds(None, [], SeedsBenchConfig())
