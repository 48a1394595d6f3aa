"""Cold and warm (issue #26): bench batch over two prompts on one model configuration, with the running audit.

The first prompt is calibrated on an empty prior (cold), the second from the prior the first left (warm:
confirm only).  What is checked is what the report says and counts, never a timing.
"""
from __future__ import annotations

import dataclasses
import json

import pytest

pytest.importorskip("diffusers")

from prompt_fragments.bench.coldwarm import format_cold_warm
from prompt_fragments.cli import main
from prompt_fragments.defaults import DEFAULT_PROMPT
from prompt_fragments.fragment.format.hashing import sha256_file
from prompt_fragments.bench.batch import BenchConfig
from prompt_fragments.errors import FragmentError
from prompt_fragments.fragment.library.prior import PriorKey, load_prior, priors_dir, prompt_digest
from prompt_fragments.reference.model import WEIGHTS_FILE
from prompt_fragments.reference.sampling import DEFAULT_GUIDANCE

SECOND = "a green square in the center on a black background"
STEPS = 4


def test_bench_batch_cold_then_warm_with_the_audit(tmp_path, capsys) -> None:
    out, prior_dir = tmp_path / "bench.json", tmp_path / "fragments"
    # 9 variants: 2 profiled + 2 held-out (delivered when confirmed), the fragment renders the rest, every 3rd audited
    code = main(["bench", "batch", "--model", "reference", "--variants", "9", "--steps", str(STEPS),
                 "--profile-seeds", "2", "--holdout", "2", "--budget-batch", "10000", "--fresh-seeds", "1", "--no-lpips",
                 "--prompt", DEFAULT_PROMPT, "--prompt", SECOND, "--prior-dir", str(prior_dir), "--audit-every", "3",
                 "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    data = json.loads(out.read_text())
    cold, warm = data["rows"]
    assert [cold["prompt"], warm["prompt"]] == [DEFAULT_PROMPT, SECOND]
    assert cold["start"] == "cold" and cold["warm_start"] is None
    first = data["reports"][0]["calibration"]
    # The second prompt starts warm only where the first prompt's tries predict a rung with margin (the prior's
    # own tests cover the warm path: tests/test_prior.py); warm, it judges no more than the cold prompt did.
    assert warm["start"] in ("cold", "warm (prior)") and (warm["warm_start"] is None) == (warm["start"] == "cold")
    if warm["start"] == "warm (prior)":
        assert first["chosen"] is not None and warm["judged_images"] <= cold["judged_images"]
    # the prior is one file under the given folder, keyed by the model configuration, holding both prompts' tries
    key = PriorKey(sha256_file(WEIGHTS_FILE), "ddim", "trailing", STEPS, 32, DEFAULT_GUIDANCE)
    assert (priors_dir(prior_dir) / key.file_name).is_file() and data["key"] == key.to_dict()
    prior = load_prior(prior_dir, key)
    # each calibration's tries, and each batch's running audit as one more try (phase "audit") when it ran the 3 audits
    # that can switch, or switched
    audits = sum(1 for report in data["reports"] if report["audit"] and (
        report["audit"]["audited"] >= 3 or report["audit"]["switched_at"] is not None))
    assert len(prior.prompts) == 2 and len(prior.tries) == cold["tries"] + warm["tries"] + audits == data["prior"]["tries"]
    assert sum(t["phase"] == "audit" for t in prior.tries) == audits
    # exactly keyed: another step count or another sampler is a miss (a calibration there starts cold)
    assert load_prior(prior_dir, dataclasses.replace(key, steps=STEPS + 1)) is None
    assert load_prior(prior_dir, dataclasses.replace(key, sampler="euler")) is None
    for row, report in zip(data["rows"], data["reports"]):
        assert row["tries"] == len(report["calibration"]["tries"])
        assert row["judged_images"] == report["calibration"]["cost"]["images"]
        assert row["overhead_u"] == pytest.approx(report["costs"]["overhead_u"])
        assert row["amortized_32"] == pytest.approx(report["amortized_ratio_32"])
        assert row["break_even_images"] == report["break_even_images"]
        assert row["audit"] == report["audit_summary"]
        if report["audit"] is not None:  # the running audit: the 1st, 4th... rendered seed (every 3rd, from the 1st)
            audit = report["audit"]
            assert audit["every"] == 3 and audit["images"] == report["rendered_seeds"]
            assert [r["index"] for r in audit["records"]][:2] == [0, 3][:len(audit["records"])]
            by_kind = report["costs"]["by_kind"]["audit"]
            assert by_kind["delivered"] == audit["delivered_full"] and by_kind["images"] == (
                audit["delivered_full"] + audit["audited"])
    # the printed table: one cold and one warm-or-cold row, the audit summaries, every report before it
    table = printed[printed.index("cold / warm on"):]
    assert table == format_cold_warm(data) + "\n"
    lines = table.splitlines()
    assert lines[2].startswith("cold") and lines[3].split()[0] in ("warm", "cold")
    assert f"audit: {data['rows'][1]['audit']}" in table and printed.count("batch bench:") == 2


def test_bench_batch_confirmed_in_the_batch(tmp_path, capsys) -> None:
    out, prior_dir = tmp_path / "bench.json", tmp_path / "fragments"
    # a budget no judged try fits (the batch of 10 repays little): the calibration picks untried, the audit confirms
    code = main(["bench", "batch", "--model", "reference", "--variants", "10", "--steps", str(STEPS),
                 "--profile-seeds", "2", "--holdout", "2", "--fresh-seeds", "1", "--no-lpips", "--confirm", "batch",
                 "--prompt", DEFAULT_PROMPT, "--prompt", SECOND, "--prior-dir", str(prior_dir), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    data = json.loads(out.read_text())
    key = PriorKey(sha256_file(WEIGHTS_FILE), "ddim", "trailing", STEPS, 32, DEFAULT_GUIDANCE)
    prior = load_prior(prior_dir, key)
    assert data["reports"][0]["calibration"]["chosen"] is not None  # cold: the search's first rung, untried
    first, second = data["reports"]
    assert (first["profile_source"], first["profile_seeds"], second["profile_source"], second["profile_seeds"]) == (
        "profile", 2, "prior", 0)
    assert "profile_hooks" in first["costs"]["by_kind"] and "profile_hooks" not in second["costs"]["by_kind"]
    assert second["timing_s"]["profile"] == 0.0 and second["variants"] == 10
    assert prior.profiles == 1  # the second prompt's plan was the prior's own means: not recorded again
    assert printed.count("profile: none; the ladder was planned from the prior's curves") == 1
    table = printed[printed.index("cold / warm on"):].splitlines()
    assert table[2].split()[1] != "*" and table[3].split()[1] == "*" and "*: no profile, planned from" in table[4]
    for i, report in enumerate(data["reports"]):
        cal = report["calibration"]
        assert report["config"]["confirm"] == "batch"
        assert cal["tries"] == [] and cal["cost"]["images"] == 0 and cal["cost"]["delivered"] == 0
        if cal["chosen"] is None:
            assert report["audit"] is None
            continue
        assert cal["status"] == "in_batch" and "the running audit confirms it in the batch" in cal["reason"]
        # no held-out confirmation was rendered: the held-out seeds are the batch's, and the audit leads it; the
        # second prompt planned from the prior's curves (the first's profile): no profiled seed, all 10 rendered
        assert report["rendered_seeds"] == 10 - report["profile_seeds"] and report["delivered_seeds"] == list(
            range(report["profile_seeds"]))
        audit = report["audit"]
        assert [r["index"] for r in audit["records"]][:3] == [0, 1, 2][:len(audit["records"])]
        assert len(audit["records"]) >= min(3, report["rendered_seeds"])
        # the lead is also judged as one sample (the gate on its means) unless its own audits already switched
        assert (audit["lead"] is not None and audit["lead"]["images"] == 3) or not any(
            r["passed"] for r in audit["records"][:3]), audit
        if audit["lead"] is not None and not audit["lead"]["passed"]:
            assert audit["switched_at"] == 2 and "together failed the gate on their means" in audit["summary"]
        # its verdict is in the prior, for this prompt
        mine = [t for t in prior.tries if t["phase"] == "audit" and t["prompt"] == prompt_digest([DEFAULT_PROMPT, SECOND][i])]
        assert mine and mine[0]["passed"] == (audit["switched_at"] is None)
        assert cal["method"] == "predicted rung, untried, confirmed by the running audit of the batch"
    assert "calibration (in_batch" in printed
    with pytest.raises(FragmentError, match="confirm 'batch' moves the confirmation into the running audit"):
        BenchConfig(confirm="batch", audit_every=0)
    with pytest.raises(FragmentError, match="confirm: expected one of judge, batch, found 'maybe'"):
        BenchConfig(confirm="maybe")


def test_bench_batch_audit_off(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    code = main(["bench", "batch", "--model", "reference", "--variants", "6", "--steps", "4", "--profile-seeds", "1",
                 "--holdout", "1", "--budget-batch", "96", "--fresh-seeds", "0", "--no-lpips", "--audit-every", "0",
                 "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    report = json.loads(out.read_text())
    assert report["audit"] is None and report["audit_every"] == 0 and "audit" not in report["costs"]["by_kind"]
    assert report["calibration"]["start"] == "cold" and "calibration (" in printed and ", cold)" in printed
    assert "running audit: off (--audit-every 0)" in printed
    assert report["cold_warm"]["rows"][0]["start"] == "cold"  # one prompt: its report, with its cold row beside it
    assert "cold / warm on" in printed



def test_a_batch_planned_from_the_prior_judges_each_seed_against_its_own_stock_image(tmp_path) -> None:
    """The planned batch has other seeds than a profiled one: stock must be rendered for those very seeds."""
    import numpy as np

    from prompt_fragments.bench.batch import run_batch
    from prompt_fragments.defaults import DEFAULT_THRESHOLDS
    from prompt_fragments.fragment.library.prior import PriorPlace
    from prompt_fragments.judge.reference_target import ReferenceTarget
    from prompt_fragments.judge.thresholds import load_thresholds
    from prompt_fragments.reference.model import load_reference

    model = load_reference(None)
    limits = load_thresholds(DEFAULT_THRESHOLDS)["quality_gate"]
    key = PriorKey(sha256_file(WEIGHTS_FILE), "ddim", "trailing", STEPS, 32, DEFAULT_GUIDANCE)
    config = BenchConfig(variants=7, profile_seeds=2, holdout_seeds=1, fresh_seeds=0, confirm="batch", audit_every=3,
                         paired_units=0)
    runs = [run_batch(ReferenceTarget(p, limits=limits, steps=STEPS, model=model), config,
                      prior=PriorPlace(tmp_path, key, p))[1] for p in (DEFAULT_PROMPT, SECOND)]
    assert runs[0].profile_seeds == [0, 1] and runs[1].profile_seeds == [] and runs[1].evidence.source == "prior"
    target = ReferenceTarget(SECOND, limits=limits, steps=STEPS, model=model)
    assert len(runs[1].variants) == 7 and np.array_equal(runs[1].stock, target.run(model.unet, runs[1].variants))
    with pytest.raises(FragmentError, match="no profiled full-model images to judge"):
        runs[1].judge_fragment(None, [1])
