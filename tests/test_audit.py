"""Tier 1: the running audit (issue #26 item 4) on toy renders, the rule checked by hand, and the host helper."""
from __future__ import annotations

import math

import pytest
import torch

from prompt_fragments.errors import FragmentError
from prompt_fragments.fragment.audit import FULL, AuditRule, audit_interval, run_audited
from prompt_fragments.judge.latent_distance import latent_rel_error

LIMIT = 0.1


def full_image(seed: int) -> torch.Tensor:
    return torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(seed)) + 2.0


def make_renders(degrade_from_seed: dict[str, int]):
    """Fragment renders: a setting adds 1 % noise, and 50 % once the seed reaches ``degrade_from_seed[setting]``."""
    calls = {"full": [], "fragment": []}

    def render_fragment(setting: str, seeds):
        calls["fragment"].append((setting, list(seeds)))
        out = []
        for s in seeds:
            scale = 0.5 if s >= degrade_from_seed.get(setting, 10**9) else 0.01
            out.append(full_image(s) + scale * torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(10**6 + s)) * full_image(s).norm() / 16)
        return torch.stack(out)

    def render_full(seeds):
        calls["full"].append(list(seeds))
        return torch.stack([full_image(s) for s in seeds])

    return render_fragment, render_full, calls


def compare(full, frag):
    error = latent_rel_error(full[None], frag[None])
    return error <= LIMIT, {"latent_rel_error": error}


SEEDS = list(range(100, 132))


def test_degradation_from_mid_batch_switches_where_the_tally_says():
    # "strong" breaks from seed 112 (index 12); audits every 2nd image: 6 passes (0..10), then failures 12, 14, ...
    # failures - passes reaches 3 at the 9th failure, index 12 + 2 * 8 = 28: the rule weighs all the setting's audits.
    render_fragment, render_full, _ = make_renders({"strong": 112})
    batch = run_audited(SEEDS, render_fragment, render_full, compare, AuditRule(), ["weaker"], setting="strong", every=2)
    assert [r.passed for r in batch.records[:7]] == [True] * 6 + [False]
    assert batch.switched_at == 28 and batch.setting[29:] == ["weaker", FULL, "weaker"]


def test_switch_from_the_right_image_when_failing_from_the_start():
    render_fragment, render_full, calls = make_renders({"strong": 0})
    batch = run_audited(SEEDS, render_fragment, render_full, compare, AuditRule(), ["weaker"], setting="strong", every=4)
    # Audits at 0, 4, 8 all fail: the third failure (index 8) switches; images 9.. are the fallback's.
    assert batch.switched_at == 8
    assert batch.switches == [(8, "strong", "weaker")]
    assert batch.setting[:8] == [FULL, "strong", "strong", "strong", FULL, "strong", "strong", "strong"]
    assert all(s in ("weaker", FULL) for s in batch.setting[9:])
    assert [s for s, _ in calls["fragment"] if s == "weaker"] and calls["fragment"][3][0] == "weaker"
    assert all(r.passed for r in batch.records if r.index > 8)  # the fallback is clean: audited, never switched
    assert "audit failed at image 9 (strong): rest on weaker" in batch.summary()
    record = batch.record()
    assert record["switched_at"] == 8 and record["switches"][0] == {"index": 8, "from": "strong", "to": "weaker"}


def test_last_fallback_failing_puts_the_rest_on_the_full_model():
    render_fragment, render_full, calls = make_renders({"strong": 0, "weaker": 0})
    batch = run_audited(SEEDS, render_fragment, render_full, compare, AuditRule(), ["weaker"], setting="strong", every=2)
    assert [i for i, _, _ in batch.switches] == [4, 10]
    assert batch.switches[-1][2] == FULL
    assert batch.setting[11:] == [FULL] * (len(SEEDS) - 11)
    for i in range(11, len(SEEDS)):
        torch.testing.assert_close(batch.images[i], full_image(SEEDS[i]))
    assert not any(r.index > 10 for r in batch.records)  # nothing left to audit on the full model
    assert "rest on the full model" in batch.summary()


def test_audited_seeds_deliver_the_full_models_image():
    render_fragment, render_full, _ = make_renders({})
    batch = run_audited(SEEDS, render_fragment, render_full, compare, AuditRule(), [], setting="strong", every=8)
    audited = [r.index for r in batch.records]
    assert audited == [0, 8, 16, 24]
    for i, seed in enumerate(SEEDS):
        if i in audited:
            torch.testing.assert_close(batch.images[i], full_image(seed))
            assert batch.setting[i] == FULL
        else:  # the fragment's own image, not the full model's
            assert not torch.equal(batch.images[i], full_image(seed))
            assert batch.setting[i] == "strong"
    assert batch.delivered == 4


def test_clean_run_never_switches():
    render_fragment, render_full, _ = make_renders({})
    batch = run_audited(SEEDS, render_fragment, render_full, compare, AuditRule(), ["weaker"], setting="strong", every=2)
    assert batch.switches == [] and batch.switched_at is None
    assert len(batch.records) == 16 and all(r.passed for r in batch.records)
    assert batch.summary() == "audited 16 of 32: 16 passed"


def test_given_seeds_are_not_rendered_again_and_keep_their_positions():
    render_fragment, render_full, calls = make_renders({})
    given = {SEEDS[3]: full_image(SEEDS[3]), SEEDS[0]: full_image(SEEDS[0])}
    batch = run_audited(SEEDS[:8], render_fragment, render_full, compare, AuditRule(), [], setting="strong", every=4,
                        given=given)
    rendered = [s for _, seeds in calls["fragment"] for s in seeds] + [s for seeds in calls["full"] for s in seeds]
    assert SEEDS[0] not in rendered and SEEDS[3] not in rendered
    torch.testing.assert_close(batch.images[3], given[SEEDS[3]])
    assert batch.given == 2 and batch.setting[0] == batch.setting[3] == FULL
    assert [r.index for r in batch.records] == [1, 6]  # the 1st and 5th of the seeds still to render


@pytest.mark.parametrize("block", [3, 8, 32])
@pytest.mark.parametrize("degrade,every,given", [({}, 4, ()), ({"strong": 112}, 2, ()), ({"strong": 0}, 4, ()),
                                                 ({"strong": 0, "weaker": 0}, 2, ()), ({"strong": 105}, 3, (0, 3, 7))])
def test_rendering_in_blocks_gives_the_same_batch_in_fewer_calls(block: int, degrade: dict, every: int, given: tuple):
    def run(block_size: int):
        render_fragment, render_full, calls = make_renders(degrade)
        batch = run_audited(SEEDS, render_fragment, render_full, compare, AuditRule(), ["weaker"], setting="strong",
                            every=every, given={SEEDS[i]: full_image(SEEDS[i]) for i in given}, block=block_size)
        return batch, calls

    (one, one_calls), (many, calls) = run(1), run(block)
    assert many.setting == one.setting and many.switches == one.switches
    assert [(r.index, r.setting, r.passed) for r in many.records] == [(r.index, r.setting, r.passed) for r in one.records]
    for a, b in zip(many.images, one.images):
        torch.testing.assert_close(a, b)
    # stretches rendered together: fewer calls of the fragment, and no more of the full model
    assert len(calls["fragment"]) < len(one_calls["fragment"])
    assert len(calls["full"]) <= len(one_calls["full"])
    # every audited seed's full-model image is rendered once, also when a switch re-renders its block
    full_seeds = [s for seeds in calls["full"] for s in seeds]
    assert len(full_seeds) == len(set(full_seeds))


def test_a_block_below_one_is_refused():
    with pytest.raises(FragmentError, match="expected block >= 1"):
        run_audited([1], lambda s, x: x, lambda x: x, compare, setting="a", every=2, block=0)


def test_rule_decisions_by_hand():
    rule = AuditRule(p0=0.25, p1=0.75, alpha=0.05)
    # Each failure adds ln 3, each pass subtracts ln 3; the bound is ln 20 = 2.996: failures - passes >= 3.
    sequence = [True, False, False, True, False, False, False, True, False]  # True = passed
    decisions, failures = [], 0
    for n, passed in enumerate(sequence, start=1):
        failures += not passed
        decisions.append(rule.switch(failures, n))
    # failures - passes after each: -1, 0, 1, 0, 1, 2, 3 -> switch at the 7th audit, then 2, 3.
    assert decisions == [False, False, False, False, False, False, True, False, True]
    assert math.isclose(rule.llr(5, 7), 3 * math.log(3))
    assert rule.min_audits == 3
    # An asymmetric rule: p0 = 0.05, p1 = 0.5: a failure adds ln 10 = 2.303, a pass subtracts ln 1.9 = 0.642.
    strict = AuditRule(p0=0.05, p1=0.5, alpha=0.05)
    assert not strict.switch(1, 1) and strict.switch(2, 2) and strict.switch(2, 4) and not strict.switch(2, 5)
    assert strict.min_audits == 2


def test_rule_and_interval_refuse_bad_input():
    with pytest.raises(FragmentError, match="AuditRule: expected 0 < p0 < p1 < 1"):
        AuditRule(p0=0.5, p1=0.4)
    with pytest.raises(FragmentError, match="every >= 0"):
        run_audited([1], lambda s, x: x, lambda x: x, compare, setting="a", every=-1)


def test_audit_interval_follows_the_cost_model():
    # Each audit wastes 1 / raw_ratio u: 4 u at 2x pays 8 audits, at indices 0, 4, ..., 28.
    k = audit_interval(2.0, 32, 4.0)
    assert k == 4 and len(range(0, 32, k)) == 8
    # More allowance, more audits, never more often than every 2nd image.
    assert audit_interval(2.0, 32, 2.0) > audit_interval(2.0, 32, 6.0) >= audit_interval(2.0, 32, 1000.0) == 2
    # The floor: the rule needs 3 audits, so 3 are made even with nothing to spare ...
    assert len(range(0, 32, audit_interval(2.0, 32, 0.0))) == 3
    # ... and a batch too small for 3, or a fragment not faster than the full model, is not audited.
    assert audit_interval(2.0, 2, 5.0) == 0 and audit_interval(0.9, 32, 5.0) == 0


@pytest.fixture(scope="module")
def tiny_host():
    """A small diffusers UNet, a toy ``run`` (one denoiser call per seed), a broken fragment and a no-op fallback."""
    pytest.importorskip("diffusers")
    import comfyui_support as cs
    from prompt_fragments.fragment.build import build_fragment, describe_base
    from prompt_fragments.fragment.surgery.heads import HeadLever
    from prompt_fragments.fragment.surgery.selection import select_heads
    from prompt_fragments.profiling.profiler import HeadProfiler
    from prompt_fragments.profiling.scoring import score_heads

    unet, make_inputs = cs.make_small_diffusers_unet("sd15", seed=0)
    with HeadProfiler(unet, buckets=2) as prof, torch.no_grad():
        prof.begin_sample(1)
        unet(**make_inputs(seed=1))
    scores = score_heads(prof.result())
    broken, keeps_all = (build_fragment(unet, [HeadLever(select_heads(scores, ratio=r))], base=describe_base(unet, "tiny"),
                                        name=name) for r, name in ((0.75, "broken"), (0.0, "keeps_all")))

    def run(u, seeds, *, state=None, cfg_cutoff=None):
        return torch.stack([cs.unet_output(u(**make_inputs(batch=1, seed=s)))[0] for s in seeds])

    return unet, run, broken, keeps_all


def test_host_batch_switches_from_a_broken_fragment_to_its_fallback(tiny_host):
    from prompt_fragments.judge.audited_run import render_audited

    unet, run, broken, keeps_all = tiny_host

    def judge(full, images):
        error = latent_rel_error(full, images)
        return error <= LIMIT, {"latent_rel_error": error}

    counted: dict[str, int] = {}
    seeds = list(range(40, 48))
    batch = render_audited(unet, run, judge, [broken, keeps_all], seeds, every=2,
                           on_render=lambda what, n: counted.__setitem__(what, counted.get(what, 0) + n))
    with torch.no_grad():
        full = run(unet, seeds)
    assert batch.switches == [(4, "broken", "keeps_all")]  # audits 0, 2, 4 fail: the third switches
    assert all(not r.passed for r in batch.records[:3]) and all(r.passed for r in batch.records[3:])
    for i in (0, 2, 4, 6):  # the audited seeds are the full model's images
        torch.testing.assert_close(batch.images[i], full[i])
    for i in (5, 7):  # the fallback keeps every head: the full model's output, rendered as the fragment
        torch.testing.assert_close(batch.images[i], full[i])
        assert batch.setting[i] == "keeps_all"
    assert latent_rel_error(full[1:2], batch.images[1][None]) > LIMIT  # the broken fragment's own image, delivered
    assert counted == {"fragment": 8, "full": 4}


def half_failing_renders():
    """Fragment renders that fail the per-image limit on every odd seed (50 % noise), pass on the others (1 %)."""
    def render_fragment(setting: str, seeds):
        return torch.stack([full_image(s) + (0.5 if s % 2 else 0.01) * full_image(s).norm() / 16
                            * torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(10**6 + s)) for s in seeds])
    return render_fragment, lambda seeds: torch.stack([full_image(s) for s in seeds])


def means(full, frag):
    """The lead judged as one sample: the mean relative error of its images against the same limit."""
    errors = [latent_rel_error(a[None], b[None]) for a, b in zip(full, frag)]
    return sum(errors) / len(errors) <= LIMIT, {"latent_rel_error_mean": sum(errors) / len(errors)}


def test_a_lead_that_fails_on_its_means_switches_where_the_per_image_rule_cannot():
    render_fragment, render_full = half_failing_renders()
    seeds = list(range(100, 132))  # the lead: seeds 100, 101, 102: one failure, two passes
    plain = run_audited(seeds, render_fragment, render_full, compare, setting="half", every=10, lead=3)
    assert [r.passed for r in plain.records[:3]] == [True, False, True] and plain.switched_at is None
    checked = run_audited(seeds, render_fragment, render_full, compare, setting="half", every=10, lead=3,
                          lead_check=means)
    assert checked.switched_at == 2 and checked.lead["passed"] is False and checked.lead["images"] == 3
    assert checked.setting[3:] == [FULL] * 29 and "together failed the gate on their means" in checked.summary()
    assert checked.record()["lead"]["metrics"]["latent_rel_error_mean"] > LIMIT
    # a clean setting passes its lead's means, and the check is not run again after the lead
    calls = []
    render_clean, render_full_clean, _ = make_renders({})
    clean = run_audited(seeds, render_clean, render_full_clean, compare, setting="ok", every=10, lead=3,
                        lead_check=lambda f, g: calls.append(len(f)) or means(f, g))
    assert clean.switched_at is None and clean.lead["passed"] is True and calls == [3]
    # a lead the per-image rule already switched away from is not judged again on its means
    render_bad, render_full_bad, _ = make_renders({"bad": 0})
    calls.clear()
    bad = run_audited(seeds, render_bad, render_full_bad, compare, setting="bad", every=10, lead=3,
                      lead_check=lambda f, g: calls.append(len(f)) or means(f, g))
    assert bad.switched_at == 2 and bad.lead is None and calls == []


def test_a_lead_longer_than_a_block_switches_on_its_means_and_renders_the_rest_again():
    """Lead 3 in blocks of 2: the lead's last image opens the second chunk; its means fail and every later image is
    the full model's (the rest of that chunk rendered again), as with a per-image switch."""
    render_fragment, render_full = half_failing_renders()
    seeds = list(range(100, 110))
    batch = run_audited(seeds, render_fragment, render_full, compare, setting="half", every=10, lead=3, block=2,
                        lead_check=means)
    assert batch.switched_at == 2 and batch.lead["index"] == 2
    assert batch.setting == [FULL] * 10 and all(torch.equal(img, full_image(s)) for img, s in zip(batch.images, seeds))
    # the summary and the record name the lead's means, not a failed image (image 3 passed on its own)
    assert batch.records[2].passed and "audit failed at image" not in batch.summary()
    assert batch.summary().endswith("the first 3 together failed the gate on their means (half): rest on the full model")


def test_the_prior_keeps_the_leads_own_slack_when_its_means_switched():
    from prompt_fragments.fragment.audit import AuditedBatch, AuditRecord
    from prompt_fragments.fragment.calibration import Candidate
    from prompt_fragments.fragment.library.prior import audit_tries

    records = [AuditRecord(i, i, "x", i != 1, {"gate_slack": s}) for i, s in enumerate((0.2, -0.1, 0.2))]
    batch = AuditedBatch([0, 1, 2], [0] * 3, [FULL] * 3, records, switches=[(2, "x", FULL)],
                         lead={"passed": False, "images": 3, "index": 2, "metrics": {"gate_slack": -0.05}})
    (tried,) = audit_tries(Candidate({"heads": 0.2}, level=0.2), batch, "ab" * 8, "j")
    assert tried["passed"] is False and tried["slack"] == -0.05  # not the images' mean, +0.1
