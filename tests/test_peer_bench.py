"""Tier 1: the peer bench (issue #17) at a tiny size on the reference model: every row has every field, no peer is
silently missing, and the table, JSON and plot are written.  Timings are measured, never asserted."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

pytest.importorskip("diffusers")

from prompt_fragments.bench.batch import BenchConfig, run_batch
from prompt_fragments.bench.peers import (REFERENCE_METHODS, ROW_KEYS, PeerConfig, comfy_rows, format_peer_report,
                                          format_prompts_headline, headline, peer_row, prompts_headline, reference_rows,
                                          run_deepcache, write_peer_report)
from prompt_fragments.defaults import DEFAULT_PROMPT, DEFAULT_THRESHOLDS
from prompt_fragments.fragment.calibration import Candidate
from prompt_fragments.fragment.extract import candidate_fragment
from prompt_fragments.judge.fragment_judge import render
from prompt_fragments.judge.reference_target import ReferenceTarget
from prompt_fragments.judge.thresholds import load_thresholds
from prompt_fragments.metrics.performance import amortized_costs

PEERS = PeerConfig(deepcache_intervals=(2,), deepcache_branches=(0, 9), tome_ratios=(0.5,), cfg_cutoffs=(350.0,),
                   stack_intervals=(2,), cache_thresholds=(0.2,))
# goal both: the chosen fragment has byte levers, so the DeepCache stack needs no second (memory) calibration
CONFIG = BenchConfig(variants=5, profile_seeds=2, holdout_seeds=1, budget_images=8, goal="both", fresh_seeds=0)


@pytest.fixture(scope="module")
def bench():
    limits = load_thresholds(DEFAULT_THRESHOLDS)["quality_gate"]
    target = ReferenceTarget(DEFAULT_PROMPT, limits=limits, steps=4)
    report, run = run_batch(target, CONFIG)
    rows = reference_rows(target, report, run, CONFIG, PEERS)
    return target, report, run, rows


def test_every_row_has_every_field_and_every_method_a_row(bench) -> None:
    _target, report, _run, rows = bench
    assert all(set(row) == set(ROW_KEYS) for row in rows)
    assert {row["method"] for row in rows} == set(REFERENCE_METHODS)
    deepcache = [r for r in rows if r["method"] == "deepcache"]
    assert [r["setting"] for r in deepcache] == ["interval 2, branch 0", "interval 2, branch 9"]
    assert "maps to no block" in deepcache[1]["error"]  # a 3-level UNet has no block 3: an error row, not a gap
    stock_bytes = rows[0]["resident_unet_bytes"]
    for row in rows:
        if row["error"] is not None:
            assert row["s_per_image"] is None and row["passes_gate"] is None
            continue
        assert row["s_per_image"] > 0 and row["speedup"] > 0 and row["resident_unet_bytes"] > 0
        assert row["speedup"] == pytest.approx(rows[0]["s_per_image"] / row["s_per_image"])
        if row["method"] == "stock":
            continue
        assert isinstance(row["passes_gate"], bool) and {"ssim_mean", "adherence_delta"} <= set(row["quality"])
        if row["method"] in ("deepcache", "tome", "cfg_truncation", "easycache", "lazycache"):  # nothing to set up
            assert row["setup_s"] == 0.0 and row["amortized_ratio_32"] == row["speedup"]
            assert row["resident_unet_bytes"] == stock_bytes
        else:  # the fragment pays its profile, build and calibration at 32 variants
            t = report["timing_s"]
            assert row["setup_s"] >= t["profile"] + t["build"] + t["calibrate"]
            extra = row["setup_s"] - (t["profile"] + t["build"] + t["calibrate"])
            costs = amortized_costs(stock_s_per_image=rows[0]["s_per_image"], fragment_s_per_image=row["s_per_image"],
                                    profile_s=t["profile"], profiled_images=CONFIG.profile_seeds, build_s=t["build"],
                                    calibrate_s=t["calibrate"] + extra, ns=(32,))
            assert row["amortized_ratio_32"] == pytest.approx(costs["rows"][0]["amortized_ratio"])
    fragment = [r for r in rows if r["method"] == "fragment"]
    assert len(fragment) == max(len(report["rows"]) - 1, 1)
    # paired units against stock on the same seeds: every row that ran has its median and range (structure only)
    assert rows[0]["paired_speedup"] == 1.0 and rows[0]["paired_range"] == [1.0, 1.0]
    for row in rows[1:]:
        if row["error"] is not None:
            assert row["paired_speedup"] is None and row["paired_range"] is None
            continue
        low, high = row["paired_range"]
        assert 0 < low <= row["paired_speedup"] <= high, row["label"]
    for method in ("easycache", "lazycache"):  # the re-implemented rules ran, and say how many steps they skipped
        (row,) = [r for r in rows if r["method"] == method]
        assert row["setting"] == "reuse_threshold 0.2 (default)" and row["error"] is None
        assert "steps per sub-batch" in row["note"]
    stack = [r for r in rows if r["method"] == "deepcache+memory_fragment"]
    assert [r["setting"] for r in stack] == ["memory fragment alone", "interval 2, branch 2"]
    for row in stack:  # either it composes and keeps the fragment's smaller weights, or it says why not
        assert row["error"] is not None or row["resident_unet_bytes"] < stock_bytes


def test_a_peer_that_cannot_be_imported_is_an_error_row(bench, monkeypatch) -> None:
    target, report, run, _rows = bench
    monkeypatch.setitem(sys.modules, "DeepCache", None)  # `from DeepCache import ...` now raises ImportError
    rows = reference_rows(target, report, run, CONFIG, PEERS, skip=("tome", "cfg_truncation", "deepcache+memory_fragment"))
    assert {row["method"] for row in rows} == set(REFERENCE_METHODS)
    deepcache = [r for r in rows if r["method"] == "deepcache"]
    assert len(deepcache) == 2 and all(r["error"] for r in deepcache)
    assert "DeepCache is not installed" in deepcache[0]["error"]
    skipped = [r for r in rows if r["method"] in ("tome", "cfg_truncation", "deepcache+memory_fragment")]
    assert len(skipped) == 4 and all("not run" in r["error"] for r in skipped)


def test_deepcache_leaves_the_unet_as_it_found_it(bench) -> None:
    target, _report, run, _rows = bench
    seeds = run.variants[:1]
    # Compared bit for bit only with a run of the same batch (same seeds, same size): the first image of the bench's
    # stock batch is another batch size, so other CPU kernels, and differs by rounding on some machines (issue #29).
    before = target.run(target.unet, seeds)
    run_deepcache(target, target.unet, seeds, 2, 0)
    np.testing.assert_array_equal(target.run(target.unet, seeds), before)  # every wrapped forward restored
    # and no module keeps an instance-level forward: a fragment copied from it would run the original modules
    assert [name for name, m in target.unet.named_modules() if "forward" in m.__dict__] == []


def test_a_fragment_built_after_deepcache_is_the_fragment_not_the_stock_model(bench) -> None:
    target, _report, run, _rows = bench
    seeds = run.variants[:1]
    fragment = candidate_fragment(run.evidence, target.unet, Candidate({"heads": 0.5}), base=run.base, name="after")
    before, _ = render(target.unet, fragment, seeds, target.run)
    run_deepcache(target, target.unet, seeds, 2, 0)
    fragment = candidate_fragment(run.evidence, target.unet, Candidate({"heads": 0.5}), base=run.base, name="after")
    after, _ = render(target.unet, fragment, seeds, target.run)
    np.testing.assert_array_equal(after, before)
    assert np.abs(after.astype(float) - run.stock[:1].astype(float)).mean() > 1.0  # half the heads gone: not stock


def test_table_json_plot_and_headline(bench, tmp_path) -> None:
    target, report, _run, rows = bench
    rows = rows + comfy_rows(str(tmp_path / "no-comfyui"))
    assert rows[-1]["section"] == "comfyui" and rows[-1]["error"] and set(rows[-1]) == set(ROW_KEYS)
    peer_report = {"target": target.describe(), "device": "cpu", "variants": report["variants"], "steps": report["steps"],
                   "rows": rows, "lpips_limit": 0.035, "headline": headline(rows)}
    text = format_peer_report(peer_report)
    assert "headline" in text and "random weights have no image quality" in text and "ERROR" in text
    assert len(text.splitlines()) >= len(rows) + 3
    paths = write_peer_report([peer_report], tmp_path / "report")
    assert [p.name for p in paths] == ["peers.json", "peers.png"] and paths[1].stat().st_size > 0
    saved = json.loads(paths[0].read_text())["reports"][0]
    assert len(saved["rows"]) == len(rows) and set(saved["headline"]["targets"]) >= {"raw_1_3x_fastest_peer", "raw_1_5x_fastest_peer"}


def test_the_memory_only_fragment_strips_every_schedule_lever(bench) -> None:
    """The DeepCache stack's fragment keeps the chosen setting's byte levers and none of its schedule (a cross-attention
    cache left on was once measured as a "memory-only fragment" with no byte lever)."""
    import dataclasses

    from prompt_fragments.bench.peers import memory_fragment

    target, _report, run, _rows = bench
    chosen = Candidate({"ff": 0.1, "step_reuse": 0.3, "cfg_cutoff": 700.0, "cross_attn_cache": 700.0})
    fragment, candidate, extra_s, note = memory_fragment(target, dataclasses.replace(run, chosen=chosen), CONFIG)
    assert dict(candidate.levers) == {"ff": 0.1} and extra_s == 0.0 and "no schedule lever" in note
    assert not fragment.manifest.get("schedule")


def test_the_headline_ranks_on_paired_timing_too_where_one_timed_batch_says_otherwise() -> None:
    rows = [peer_row("reference", "stock", "full model", speedup=1.0, paired_speedup=1.0, passes_gate=True),
            # one timed batch flatters the peer; paired units against stock on the same seeds say otherwise
            peer_row("reference", "fragment", "f", speedup=1.5, paired_speedup=1.7, passes_gate=True),
            peer_row("reference", "deepcache", "d", speedup=1.8, paired_speedup=1.2, passes_gate=True),
            peer_row("reference", "deepcache", "failing", speedup=3.0, paired_speedup=3.0, passes_gate=False)]
    h = headline(rows)
    assert h["fragment_over_fastest_peer"] == pytest.approx(1.5 / 1.8) and not h["targets"]["raw_1_3x_fastest_peer"]
    assert h["fastest_peer_paired"] == {"method": "deepcache", "setting": "d", "paired_speedup": 1.2}
    assert h["fragment_over_fastest_peer_paired"] == pytest.approx(1.7 / 1.2)
    assert h["targets"]["paired_1_3x_fastest_peer"]
    summary = prompts_headline([{"target": {"prompt": "p"}, "headline": h}])
    assert summary["prompts"][0]["paired_ratio"] == pytest.approx(1.7 / 1.2) and summary["all_prompts_paired_1_3x"]
    assert "ratio 1.42: target 1.3x True" in format_prompts_headline(summary)
    # no paired timing (paired units off): nothing is ranked on it, and the target is not met by default
    unpaired = headline([{**r, "paired_speedup": None} for r in rows])
    assert unpaired["fragment_over_fastest_peer_paired"] is None and not unpaired["targets"]["paired_1_3x_fastest_peer"]
