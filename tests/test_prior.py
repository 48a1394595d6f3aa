"""The prior per model configuration (issue #26, item 3): exact keys, round trip, killed and hostile files, suggest.

No model: calibrations come from ``calibrate`` over a toy judge whose pass/fail
follows the damage level, as the calibration doctests do.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
from pathlib import Path

import pytest

from prompt_fragments.errors import FragmentError
from prompt_fragments.fragment.calibration import Candidate, Judgement, calibrate
from prompt_fragments.fragment.library import prior as priors
from prompt_fragments.fragment.library.prior import (
    MAX_PRIOR_BYTES, Prior, PriorKey, load_prior, priors_dir, read_prior, update_prior, warm_start)
from prompt_fragments.profiling.evidence import ProfileEvidence
from prompt_fragments.profiling.dataset import ProfileData
from prompt_fragments.profiling.step_change import ReuseDepth

BASE = "ab" * 32
KEY = PriorKey(BASE, "ddim", "trailing", 25, 32, 7.5)
LEVELS = (0.6, 0.45, 0.35, 0.27, 0.2, 0.15, 0.11, 0.08)
LADDER = [Candidate({"step_reuse": round(0.1 * (len(LEVELS) - i), 2)}, level=lv, reuse_skips=1) for i, lv in enumerate(LEVELS)]


def toy_judge(tolerance: float):
    """Passes a rung at or below ``tolerance``; the slack is the relative distance to it."""
    def judge(candidate: Candidate, seeds) -> Judgement:
        slack = (tolerance - candidate.level) / tolerance
        return Judgement(slack >= 0, {"level": candidate.level}, [] if slack >= 0 else ["too strong"], slack)
    return judge


def cold(tolerance: float):
    return calibrate(LADDER, toy_judge(tolerance), calibration_seeds=[0, 1], holdout_seeds=[9], goal="memory")


def evidence(scale: float = 1.0) -> ProfileEvidence:
    depths = {1: ReuseDepth(1, "up.2", (None, 0.2 * scale, 0.1 * scale), 0.3),
              2: ReuseDepth(2, "up.1", (None, 0.4 * scale, 0.2 * scale), 0.5)}
    return ProfileEvidence(ProfileData({}, 4), step_changes=[None, 0.3 * scale, 0.1 * scale], reuse_depths=depths)


def test_the_prior_is_keyed_exactly(tmp_path: Path) -> None:
    update_prior(tmp_path, KEY, calibration=cold(0.27), prompt="a red circle in the top left")
    assert load_prior(tmp_path, KEY) is not None
    misses = [PriorKey(BASE, "euler", "trailing", 25, 32, 7.5), PriorKey(BASE, "ddim", "karras", 25, 32, 7.5),
              PriorKey(BASE, "ddim", "trailing", 20, 32, 7.5), PriorKey(BASE, "ddim", "trailing", 25, 32, 5.0),
              PriorKey("cd" * 32, "ddim", "trailing", 25, 32, 7.5), PriorKey(BASE, "ddim", "trailing", 25, 72, 7.5),
              PriorKey(BASE, "ddim", "trailing", 25, (32, 72), 7.5)]
    for key in misses:
        assert load_prior(tmp_path, key) is None, key.name
        assert key.file_name != KEY.file_name
    # the same 64-pixel bucket is the same configuration (the same deepest feature map)
    same = PriorKey(BASE, "DDIM", "trailing", 25, (40, 64), 7.5)
    assert same == KEY and load_prior(tmp_path, same).tries == load_prior(tmp_path, KEY).tries
    with pytest.raises(FragmentError, match="steps"):
        PriorKey(BASE, "ddim", "trailing", 0, 32, 7.5)
    with pytest.raises(FragmentError, match="base_sha256"):
        PriorKey("../x", "ddim", "trailing", 25, 32, 7.5)


def test_round_trip_keeps_curves_costs_and_every_judged_try(tmp_path: Path) -> None:
    cal = cold(0.27)
    written = update_prior(tmp_path, KEY, evidence=evidence(), calibration=cal, prompt="a red circle in the top left")
    loaded = load_prior(tmp_path, KEY)
    assert loaded == written
    assert loaded.step_changes == [None, 0.3, 0.1] and loaded.depths[1]["cost"] == 0.3 and loaded.profiles == 1
    assert len(loaded.tries) == len(cal.tries)
    assert [(t["phase"], t["level"], t["passed"], t["seeds"]) for t in loaded.tries] == \
        [(t["phase"], t["candidate"]["level"], t["passed"], len(t["seeds"])) for t in cal.tries]
    assert "red" not in json.dumps(loaded.to_dict())  # a digest of the prompt, never its words
    # a second prompt: curves and costs become running means, tries accumulate
    again = update_prior(tmp_path, KEY, evidence=evidence(3.0), calibration=cold(0.2), prompt="a blue square")
    assert again.profiles == 2 and again.step_changes[1] == pytest.approx(0.6)
    assert again.depths[2]["changes"][1] == pytest.approx(0.8) and len(again.prompts) == 2
    assert load_prior(tmp_path, KEY) == again


def _killed_writer(folder: str) -> None:
    def die(*_args, **_kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    os.replace = die  # the kill lands after the temporary is written, before the rename
    update_prior(folder, KEY, calibration=cold(0.6), prompt="another prompt")


def test_a_killed_writer_loses_nothing_and_its_temporary_is_swept(tmp_path: Path) -> None:
    before = update_prior(tmp_path, KEY, calibration=cold(0.27), prompt="first")
    proc = mp.get_context("fork").Process(target=_killed_writer, args=(str(tmp_path),))
    proc.start()
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    assert list(priors_dir(tmp_path).glob(".prior.*.tmp-*")), "the writer died with its temporary written"
    assert load_prior(tmp_path, KEY) == before
    after = update_prior(tmp_path, KEY, calibration=cold(0.2), prompt="second")
    assert not list(priors_dir(tmp_path).glob(".prior.*.tmp-*"))
    assert after.tries[:len(before.tries)] == before.tries


def _valid(tmp_path: Path) -> tuple[Path, dict]:
    update_prior(tmp_path, KEY, calibration=cold(0.27), prompt="first")
    path = priors_dir(tmp_path) / KEY.file_name
    return path, json.loads(path.read_text())


@pytest.mark.parametrize("case", ["truncated", "not an object", "tries a dict", "level a string", "slack NaN",
                                  "extra try field", "another key", "huge", "deep", "symlink", "folder",
                                  "cache_point a number", "timesteps a string", "per_timestep unknown",
                                  "per_timestep negative", "per_timestep twice at a timestep", "runs true"])
def test_a_hostile_or_partial_prior_is_refused_naming_the_file_and_kept(tmp_path: Path, case: str) -> None:
    path, data = _valid(tmp_path)
    if case == "truncated":
        body = path.read_bytes()[: path.stat().st_size // 2]
    elif case == "not an object":
        body = b"[1, 2]"
    elif case == "tries a dict":
        body = json.dumps({**data, "tries": {"a": 1}}).encode()
    elif case == "level a string":
        data["tries"][0]["level"] = "0.3"
        body = json.dumps(data).encode()
    elif case == "slack NaN":
        body = json.dumps(data).replace('"slack":', '"slack": NaN, "x":', 1).encode()
    elif case == "extra try field":
        data["tries"][0]["evil"] = 1
        body = json.dumps(data).encode()
    elif case == "another key":
        data["key"]["steps"] = 30
        body = json.dumps(data).encode()
    elif case == "huge":
        body = b'{"schema": "' + b"x" * (MAX_PRIOR_BYTES + 1) + b'"}'
    elif case == "deep":
        body = b"[" * 100 + b"]" * 100
    elif case == "cache_point a number":
        body = json.dumps({**data, "depths": {"1": {"changes": [None, 0.2], "cost": 0.3, "runs": 1, "cache_point": 7}}}).encode()
    elif case == "timesteps a string":
        body = json.dumps({**data, "step_timesteps": "999"}).encode()
    elif case == "per_timestep unknown":
        body = json.dumps({**data, "per_timestep": {"heads": {"runs": 1, "points": []}}}).encode()
    elif case == "per_timestep twice at a timestep":
        body = json.dumps({**data, "per_timestep": {"cfg_gaps": {"runs": 1, "points": [[999, 0.5], [999.0, 0.4]]}}}).encode()
    elif case == "runs true":
        body = json.dumps({**data, "per_timestep": {"cfg_gaps": {"runs": True, "points": [[999.0, 0.5]]}}}).encode()
    elif case == "per_timestep negative":
        body = json.dumps({**data, "per_timestep": {"cfg_gaps": {"runs": 1, "points": [[999.0, -0.5]]}}}).encode()
    if case == "symlink":
        target = tmp_path / "elsewhere.json"
        target.write_bytes(path.read_bytes())
        path.unlink()
        path.symlink_to(target)
        body = target.read_bytes()
    elif case == "folder":
        path.unlink()
        path.mkdir()
        body = None
    else:
        path.write_bytes(body)
    with pytest.raises(FragmentError, match=str(path.name)):
        load_prior(tmp_path, KEY)
    with pytest.raises(FragmentError, match=str(path.name)):
        update_prior(tmp_path, KEY, calibration=cold(0.6), prompt="second")  # never starts over on the user's data
    if body is not None:
        assert (path.read_bytes() if not path.is_symlink() else path.resolve().read_bytes()) == body
    assert warm_start(tmp_path, KEY, LADDER) is None  # the warm start falls back to a cold search


def test_suggest_moves_with_planted_results(tmp_path: Path) -> None:
    assert Prior(KEY).suggest(LADDER) is None  # nothing judged: search cold
    update_prior(tmp_path, KEY, calibration=cold(0.35), prompt="easy prompt")
    easy = load_prior(tmp_path, KEY).suggest(LADDER)
    assert LADDER[easy].level <= 0.35
    update_prior(tmp_path, KEY, calibration=cold(0.15), prompt="hard prompt")
    hard = load_prior(tmp_path, KEY)
    assert hard.suggest(LADDER) > easy and LADDER[hard.suggest(LADDER)].level <= 0.15  # the hardest prompt rules
    assert hard.predict(LADDER)[0] is False  # stronger than what failed: predicted to fail
    assert hard.suggest(LADDER, margin=2.0) is None or LADDER[hard.suggest(LADDER, margin=2.0)].level < 0.15
    # a CFG cut-off try is off the damage axis: even a failing one moves nothing
    cfg_fail = {**hard.tries[0], "cfg": True, "passed": False, "level": 0.02, "prompt": "f" * 16}
    assert Prior(KEY, tries=[*hard.tries, cfg_fail]).suggest(LADDER) == hard.suggest(LADDER)
    # leaving the hard prompt out gives back the easy prompt's answer
    hard_digest = priors.prompt_digest("hard prompt")
    assert hard.predict(LADDER, exclude=hard_digest) == Prior(KEY, tries=hard.tries[:len(cold(0.35).tries)]).predict(LADDER)


def test_a_warm_start_only_confirms_and_never_keeps_a_failing_rung(tmp_path: Path) -> None:
    for tolerance, prompt in ((0.3, "p1"), (0.4, "p2"), (0.3, "p3")):
        update_prior(tmp_path, KEY, calibration=cold(tolerance), prompt=prompt)
    start = warm_start(tmp_path, KEY, LADDER)
    assert start is not None and LADDER[start].level == 0.27  # the hardest prompt's strongest pass with margin
    base = dict(calibration_seeds=[0, 1], holdout_seeds=[9], goal="memory")
    warm = calibrate(LADDER, toy_judge(0.3), start=start, confirm_only=True, **base)
    assert warm.chosen.level == 0.27 and [t["phase"] for t in warm.tries] == ["calibration", "holdout"]
    assert cold(0.3).chosen.level == 0.27 and warm.images < cold(0.3).images
    # a new prompt harder than the prior said: the warm start fails and the search goes weaker, never keeping a fail
    harder = calibrate(LADDER, toy_judge(0.15), start=start, confirm_only=True, **base)
    assert harder.chosen is not None and harder.chosen.level <= 0.15
    assert all(not t["passed"] for t in harder.tries if t["candidate"]["level"] > 0.15)


def test_a_prior_warm_starts_only_the_judge_that_made_its_tries(tmp_path: Path) -> None:
    run = dict(directory=tmp_path, key=KEY, calibration_seeds=[0, 1], holdout_seeds=[9], goal="memory")
    priors.calibrate_with_prior(LADDER, toy_judge(0.3), prompt="p1", judge_name="latent", **run)
    tries = load_prior(tmp_path, KEY).tries
    assert tries and {t["judge"] for t in tries} == {"latent"}
    # the same judge on a new prompt only confirms; another judge's gate is another scale: it searches cold
    same = priors.calibrate_with_prior(LADDER, toy_judge(0.3), prompt="p2", judge_name="latent", **run)
    other = priors.calibrate_with_prior(LADDER, toy_judge(0.3), prompt="p3", judge_name="decoded SSIM", **run)
    assert same.warm_start is not None and other.warm_start is None
    assert warm_start(tmp_path, KEY, LADDER, judge="latent") is not None
    # a prior written before tries kept their judge is still read; its tries inform only a caller naming no judge
    path = priors_dir(tmp_path) / KEY.file_name
    data = json.loads(path.read_text())
    data["tries"] = [{k: v for k, v in t.items() if k != "judge"} for t in data["tries"]]
    path.write_text(json.dumps(data))
    old = load_prior(tmp_path, KEY)
    assert old.suggest(LADDER) is not None and old.suggest(LADDER, judge="latent") is None
    data["tries"][0]["judge"] = ["not", "a", "name"]
    path.write_text(json.dumps(data))
    with pytest.raises(FragmentError, match=r"tries\[0\]\.judge: expected a judge name"):
        load_prior(tmp_path, KEY)


def test_read_prior_checks_the_key_it_is_asked_for(tmp_path: Path) -> None:
    update_prior(tmp_path, KEY, calibration=cold(0.27), prompt="first")
    other = PriorKey(BASE, "ddim", "trailing", 30, 32, 7.5)
    moved = priors_dir(tmp_path) / other.file_name
    os.replace(priors_dir(tmp_path) / KEY.file_name, moved)  # a file copied under another configuration's name
    with pytest.raises(FragmentError, match=f"{moved.name}.*expected the prior of .*30steps"):
        load_prior(tmp_path, other)
    assert read_prior(moved).key == KEY


def _record(prompt: str, tolerance: float, holdout_tolerance: float | None = None) -> dict:
    """A judged prompt as ``bench.prior.prompt_record`` writes it, from the toy judge."""
    def verdict(tol: float, c: Candidate) -> dict:
        v = toy_judge(tol)(c, [])
        return {"passed": v.passed, "slack": v.slack, "reasons": list(v.reasons)}
    return {"prompt": prompt, "steps": 25, "step_changes": [None, 0.3, 0.1], "reuse_depths": {},
            "rungs": [{"candidate": c.to_dict(), "calibration": verdict(tolerance, c),
                       "holdout": verdict(holdout_tolerance or tolerance, c)} for c in LADDER]}


def test_the_prior_bench_counts_false_passes_and_warm_savings_from_the_judged_records(tmp_path: Path) -> None:
    from prompt_fragments.bench.prior import PriorBenchConfig, format_prior_report, replay_prior

    config = PriorBenchConfig(seeds=2, holdout=1, goal="speed")
    alike = replay_prior([_record(f"p{i}", 0.3) for i in range(4)], KEY, config, str(tmp_path / "a"))
    s = alike["summary"]
    assert s["false_pass"] == 0 and s["accuracy"] == 1.0 and s["warm_images"] < s["cold_images"]
    assert all(row["warm"]["chosen"] == row["cold"]["chosen"] for row in alike["rows"])
    # one prompt tolerates less than the others: the prior from the others predicts passes it fails
    odd = replay_prior([*(_record(f"p{i}", 0.3) for i in range(3)), _record("hard", 0.12)], KEY, config, str(tmp_path / "b"))
    hard = next(row for row in odd["rows"] if row["prompt"] == "hard")
    assert odd["summary"]["false_pass"] == sum(r["predicted"] is True and not r["judged_pass"] for r in hard["rungs"]) > 0
    assert hard["warm"]["chosen"] == hard["cold"]["chosen"]  # the confirmation still finds its own rung
    assert "false passes" in format_prior_report(odd)


def test_calibrating_over_an_unreadable_prior_starts_cold_says_so_and_keeps_the_file(tmp_path: Path) -> None:
    from prompt_fragments.fragment.library.prior import calibrate_with_prior
    from prompt_fragments.fragment.pipeline import Judging, calibration_status
    from test_node_messages import says_what_to_do

    run = dict(directory=tmp_path, key=KEY, calibration_seeds=[0, 1], holdout_seeds=[9], goal="memory")
    first = calibrate_with_prior(LADDER, toy_judge(0.27), prompt="a red circle", **run)
    assert first.warm_start is None and first.prior == KEY.name and first.prior_prompts == 0 and not first.warnings
    second = calibrate_with_prior(LADDER, toy_judge(0.27), prompt="a blue square", **run)
    assert second.warm_start is not None and second.prior_prompts == 1 and second.record()["start"] == "warm (prior)"
    path = priors_dir(tmp_path) / KEY.file_name
    hostile = b'{"schema": "prompt_fragments.prior/1", "tries": [' + b"[" * 64 + b"]" * 64 + b"]}"
    path.write_bytes(hostile)
    third = calibrate_with_prior(LADDER, toy_judge(0.27), prompt="a green star", **run)
    assert third.warm_start is None and third.record()["start"] == "cold" and third.chosen is not None
    assert path.read_bytes() == hostile  # neither deleted nor written over
    (warning,) = third.warnings
    assert str(path) in warning and "left in place" in warning and says_what_to_do(warning), warning
    status = calibration_status(third, Judging(None, "toy", [0, 1], [9]))
    assert "cold start (the prior could not be used: see the warning)" in status and f"; WARNING: {warning}" in status


def _reference_profile(prompt: str, steps: int = 6):
    """The reference model profiled for goal speed on two seeds: the evidence a warm prompt would not need."""
    import torch
    from prompt_fragments.fragment.levers import goal_evidence
    from prompt_fragments.profiling.session import profiled
    from prompt_fragments.reference.model import load_reference
    from prompt_fragments.reference.sampling import sample

    model = load_reference(None)
    with profiled(model.unet, goal_evidence("speed"), buckets=4) as (prof, probes):
        prof.begin_batch([0, 1])
        with torch.no_grad():
            sample(model.unet, model.encode([prompt]), model.encode([""]), [0, 1], steps=steps, guidance=7.5)
    return model, ProfileEvidence.from_probes(prof.result(), probes)


def test_the_prior_stands_in_for_a_profile_with_the_same_ladder_and_cut_offs(tmp_path: Path) -> None:
    from torch.testing import assert_close
    from prompt_fragments.fragment.calibration import candidate_ladder, profile_predictors
    from prompt_fragments.fragment.levers import goal_evidence

    model, measured = _reference_profile("a red circle in the top left")
    needs = goal_evidence("speed")
    key = PriorKey(BASE, "ddim", "trailing", 6, 32, 7.5)
    assert priors.prior_evidence(tmp_path, key, needs) is None  # no prior: profile
    update_prior(tmp_path, key, evidence=measured, prompt="a red circle in the top left")
    planned = priors.prior_evidence(tmp_path, key, needs)
    assert planned is not None and planned.source == "prior" and measured.source == "profile"
    assert priors.prior_evidence(tmp_path, key, goal_evidence("memory")) is None  # no FF scores in a prior
    assert planned.step_timesteps == tuple(measured.step_timesteps)
    assert_close(planned.cfg_gaps, measured.cfg_gaps) and assert_close(planned.cross_attn_changes, measured.cross_attn_changes)
    for skips, depth in measured.reuse_depths.items():
        got = planned.reuse_depths[skips]
        assert got.cache_point == depth.cache_point and got.cost == pytest.approx(depth.cost)
    a, b = (profile_predictors(e, model.unet, goal="speed") for e in (measured, planned))
    ladder_a, ladder_b = candidate_ladder(a, "speed"), candidate_ladder(b, "speed")
    assert ladder_a and [c.label for c in ladder_a] == [c.label for c in ladder_b]
    assert_close([c.level for c in ladder_a], [c.level for c in ladder_b])
    assert a.cfg_cutoffs() == b.cfg_cutoffs() and a.cross_attn_gate() == b.cross_attn_gate()
    # the strongest rung built from either: the same schedule, and the same images sampled with it (which are not
    # the full model's: the schedule reuses steps)
    import numpy as np
    import torch
    from prompt_fragments.fragment.build import describe_base
    from prompt_fragments.fragment.extract import candidate_fragment
    from prompt_fragments.fragment.schedule.apply import apply_schedule, fragment_schedule
    from prompt_fragments.reference.sampling import sample

    base = describe_base(model.unet, "reference")
    built = [candidate_fragment(e, model.unet, ladder[0], base=base, name="x")
             for e, ladder in ((measured, ladder_a), (planned, ladder_b))]
    assert built[0].manifest["schedule"] == built[1].manifest["schedule"]
    context, uncond = model.encode(["a red circle in the top left"]), model.encode([""])
    images = []
    with torch.no_grad():
        for f in built:
            small, state = apply_schedule(model.unet, f)
            images.append(sample(small, context, uncond, [5], steps=6, guidance=7.5, state=state,
                                 cfg_cutoff=fragment_schedule(f).cfg_cutoff))
        full = sample(model.unet, context, uncond, [5], steps=6, guidance=7.5)
    assert_close(images[0], images[1]) and not np.array_equal(images[0], full)
    # a second profile makes every curve a running mean of the two, per step and per timestep
    other = _reference_profile("a blue square in the center", steps=6)[1]
    update_prior(tmp_path, key, evidence=other, prompt="a blue square in the center")
    mean = priors.prior_evidence(tmp_path, key, needs)
    t = next(iter(measured.cfg_gaps))
    assert mean.cfg_gaps[t] == pytest.approx((measured.cfg_gaps[t] + other.cfg_gaps[t]) / 2)
    i = next(i for i, c in enumerate(measured.step_changes) if c is not None)
    assert mean.step_changes[i] == pytest.approx((measured.step_changes[i] + other.step_changes[i]) / 2)
    # a curve whose length disagrees with the timesteps (a file edited by hand) is not planned from: profile instead
    path = priors_dir(tmp_path) / key.file_name
    good = path.read_text()
    data = json.loads(good)
    data["step_changes"] = data["step_changes"][:-1]
    path.write_text(json.dumps(data))
    assert load_prior(tmp_path, key) is not None and priors.prior_evidence(tmp_path, key, needs) is None
    path.write_text(good)
    # a non-finite measurement is left out of the means, and never written (the file would be unreadable)
    nan_gaps = ProfileEvidence(ProfileData({}, 4), cfg_gaps={t: float("nan")})
    assert update_prior(tmp_path, key, evidence=nan_gaps, prompt="x").per_timestep["cfg_gaps"]["points"][t] == \
        pytest.approx(mean.cfg_gaps[t])
    # a prior written before it kept the timesteps and cache points cannot stand in for a profile, yet still loads
    path = priors_dir(tmp_path) / key.file_name
    data = json.loads(path.read_text())
    data.pop("step_timesteps"), data.pop("per_timestep")
    for d in data["depths"].values():
        d.pop("cache_point")
    path.write_text(json.dumps(data))
    assert load_prior(tmp_path, key).profiles == 2 and priors.prior_evidence(tmp_path, key, needs) is None


def test_a_pick_planned_from_the_prior_is_untried_and_records_no_profile(tmp_path: Path) -> None:
    from prompt_fragments.fragment.build import describe_base
    from prompt_fragments.fragment.extract import calibrated_fragment
    from prompt_fragments.fragment.levers import goal_evidence
    from prompt_fragments.fragment.library.prior import PriorPlace

    model, measured = _reference_profile("a red circle in the top left")
    key = PriorKey(BASE, "ddim", "trailing", 6, 32, 7.5)
    update_prior(tmp_path, key, evidence=measured, prompt="a red circle in the top left")
    planned = priors.prior_evidence(tmp_path, key, goal_evidence("speed"))
    judged = []

    def judge(fragment, seeds):
        judged.append(seeds)
        return Judgement(True)

    run = dict(base=describe_base(model.unet, "reference"), name="warm", calibration_seeds=[0, 1], holdout_seeds=[9],
               goal="speed", prior=PriorPlace(tmp_path, key, "a blue square in the center"))
    fragment, cal = calibrated_fragment(planned, model.unet, judge, confirm_in_batch=True, **run)
    assert not judged and cal.status == "in_batch" and cal.untried and fragment is not None
    assert fragment.manifest["schedule"]["step_reuse"]["timesteps"] == [round(t, 4) for t in measured.step_timesteps]
    after = load_prior(tmp_path, key)
    assert after.profiles == 1  # the prior's own means were not counted again as a profile
    # a judged try needs the profiled images the prior does not have: refused, naming what to pass
    for kwargs in ({"confirm_in_batch": False}, {"confirm_in_batch": True, "judge_pick": True}):
        with pytest.raises(FragmentError, match="'warm'.*prior's means.*confirm_in_batch=True"):
            calibrated_fragment(planned, model.unet, judge, **kwargs, **run)
    assert not judged


def test_an_untried_pick_needs_no_profiled_seeds_but_a_judged_try_does() -> None:
    cal = calibrate(LADDER, toy_judge(0.3), calibration_seeds=[], holdout_seeds=[9], goal="speed", confirm_in_batch=True)
    assert cal.status == "in_batch" and cal.untried and cal.tries == []
    for kwargs in ({}, {"confirm_in_batch": True, "judge_pick": True}):
        with pytest.raises(FragmentError, match="expected calibration and held-out seeds, found 0 and 1"):
            calibrate(LADDER, toy_judge(0.3), calibration_seeds=[], holdout_seeds=[9], goal="speed", **kwargs)


def test_the_whole_step_depth_survives_the_prior_with_its_empty_cache_point(tmp_path: Path) -> None:
    changes = (None, 0.3, 0.1)
    measured = ProfileEvidence(ProfileData({}, 4), step_changes=list(changes), step_timesteps=[999.0, 666.0, 333.0],
                               reuse_depths={0: ReuseDepth(0, "", changes, 0.0), 1: ReuseDepth(1, "up.2", changes, 0.3)})
    update_prior(tmp_path, KEY, evidence=measured, prompt="p")
    planned = priors.prior_evidence(tmp_path, KEY, ["step_changes", "reuse_depths"])
    assert planned.reuse_depths == measured.reuse_depths  # depth 0 kept, its point "" (no module is cut)
    path = priors_dir(tmp_path) / KEY.file_name
    data = json.loads(path.read_text())
    data["depths"]["1"]["cache_point"] = ""  # only the whole step has no module path
    path.write_text(json.dumps(data))
    with pytest.raises(FragmentError, match=r"depths\.1\.cache_point: expected a module path"):
        load_prior(tmp_path, KEY)


def test_the_prior_never_writes_what_its_reader_refuses(tmp_path: Path) -> None:
    """A host whose timesteps fall outside what a prior file may hold (or a depth with no module path) still gets a
    readable prior: those measurements are left out, and planning from it falls back to profiling."""
    odd = ProfileEvidence(ProfileData({}, 4), step_changes=[None, 0.2], step_timesteps=[2e4, 1e4 + 1],
                          cfg_gaps={-5.0: 0.1, 500.0: 0.2}, cross_attn_changes={500.0: float("inf")},
                          reuse_depths={1: ReuseDepth(1, "", (None, 0.2), 0.3)})
    written = update_prior(tmp_path, KEY, evidence=odd, prompt="p")
    loaded = load_prior(tmp_path, KEY)
    assert loaded == written and loaded.step_timesteps == [] and "cache_point" not in loaded.depths[1]
    assert loaded.per_timestep["cfg_gaps"]["points"] == {500.0: 0.2} and not loaded.per_timestep.get(
        "cross_attn_changes", {}).get("points")
    assert priors.prior_evidence(tmp_path, KEY, ["step_changes"]) is None
