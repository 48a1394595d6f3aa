"""Tier 1: a batch's running-audit verdict kept in the fragment's manifest and in the prior (issue #26 item 4).

Real files in temporary folders: a fragment saved by the store, its manifest rewritten by ``record_batch_audit``
(sealed again, the tensors untouched, a kill at every write step leaving the old manifest or the new one), a
manifest replaced since the batch loaded it left alone, a hostile ``chosen`` kept out of the prior, and the cost
model's audit interval for a pick no judged try confirmed.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import pytest

from prompt_fragments.errors import FragmentError
from prompt_fragments.fragment.audit import (
    FULL, AuditedBatch, AuditRecord, audit_positions, lead_pays, planned_audit_every
)
from prompt_fragments.fragment.format.store import (
    KEPT_AUDITS, load_fragment, manifest_identity, read_manifest, record_batch_audit, save_fragment
)
from prompt_fragments.fragment.library.audit_outcome import (
    LISTED_FAILURES, audit_confirmed, audit_summary, keep_audit_outcome
)
from prompt_fragments.fragment.library.prior import PriorKey, PriorPlace, load_prior, manifest_candidate
from test_library import synthetic

CHOSEN = {"heads": 0.2, "step_reuse": 0.3, "reuse_skips": 1, "level": 0.2, "label": "heads 20% + step reuse 30%"}
KEY = PriorKey("ab" * 32, "euler", "normal", 20, (512, 512), 7.0)


def audited(passes: list[bool], every: int = 2) -> AuditedBatch:
    n = every * len(passes)
    positions = list(range(0, n, every))
    settings = [FULL if i in positions else "fragment" for i in range(n)]
    records = [AuditRecord(100 + i, i, "fragment", ok, {"latent_rel_error": 0.1 if ok else 0.9})
               for i, ok in zip(positions, passes)]
    return AuditedBatch(list(range(100, 100 + n)), [0] * n, settings, records, every=every)


def saved(tmp_path: Path) -> tuple[Path, str]:
    path = save_fragment(synthetic("dog"), tmp_path)
    return path, manifest_identity(read_manifest(path))


def test_the_verdict_is_kept_in_the_manifest_sealed_again_with_the_tensors_untouched(tmp_path: Path) -> None:
    path, identity = saved(tmp_path)
    tensors_before = {p.name: p.read_bytes() for p in tmp_path.glob("*.safetensors")}
    batch = audited([True, True, False, True])
    notes = keep_audit_outcome(batch, judge="latent", manifest_path=path, manifest_id=identity,
                               settings={"steps": 20, "sampler_name": "euler", "bad": object()})
    assert notes == ["audit kept in the manifest (quality.audits)"]
    frag = load_fragment(path)  # the full verification: schema, the new seal, the tensors' hash
    (kept,) = frag.manifest["quality"]["audits"]
    assert (kept["audited"], kept["passed"], kept["failed_at"], kept["images"]) == (4, 3, [4], 8)
    assert kept["settings"] == {"steps": 20, "sampler_name": "euler"} and kept["judge"] == "latent"
    assert "records" not in kept and kept["summary"] == batch.summary()
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.safetensors")} == tensors_before
    assert manifest_identity(frag.manifest) == identity  # the same fragment: a second batch records too


def test_the_manifest_keeps_the_latest_audits_only_and_a_long_batch_lists_few_failures(tmp_path: Path) -> None:
    path, identity = saved(tmp_path)
    for i in range(KEPT_AUDITS + 3):  # every batch of the loaded fragment records: earlier audits keep its identity
        record_batch_audit(path, identity, {"n": i})
    kept = read_manifest(path)["quality"]["audits"]
    assert [a["n"] for a in kept] == list(range(3, KEPT_AUDITS + 3))
    many = audited([False] * (LISTED_FAILURES + 10))
    assert len(audit_summary(many)["failed_at"]) == LISTED_FAILURES and audit_summary(many)["audited"] == LISTED_FAILURES + 10


def test_a_manifest_replaced_since_the_batch_loaded_it_is_left_alone(tmp_path: Path) -> None:
    path, identity = saved(tmp_path)
    save_fragment(synthetic("dog", {"down.0.attn1": [4, 5]}), tmp_path, overwrite=True)
    before = path.read_bytes()
    place = PriorPlace(tmp_path, KEY, "a dog")
    notes = keep_audit_outcome(audited([True] * 4), judge="latent", chosen=CHOSEN, manifest_path=path,
                               manifest_id=identity, prior=place)
    assert path.read_bytes() == before
    assert notes[0].startswith("audit not kept in the manifest: ") and str(path) in notes[0]
    assert "load the fragment again" in notes[0]
    assert notes[1] == "audit recorded in the prior of this model configuration"  # the prior still learns
    with pytest.raises(FragmentError, match="a fragment was saved under this name since it was loaded"):
        record_batch_audit(path, identity, {"n": 1})


def test_the_prior_records_the_verdict_as_an_audit_try_and_a_hostile_chosen_is_kept_out(tmp_path: Path) -> None:
    place = PriorPlace(tmp_path, KEY, "a dog")
    assert keep_audit_outcome(audited([True] * 4), judge="latent", chosen=CHOSEN, prior=place) == [
        "audit recorded in the prior of this model configuration"]
    (t,) = [t for t in load_prior(tmp_path, KEY).tries if t["phase"] == "audit"]
    assert (t["passed"], t["seeds"], t["levers"], t["reuse_skips"], t["judge"]) == (
        True, 4, {"heads": 0.2, "step_reuse": 0.3}, 1, "latent")
    failed = audited([False] * 3)  # failures outnumber passes by 3: the rule switched away
    failed.switches.append((4, "fragment", FULL))
    keep_audit_outcome(failed, judge="latent", chosen=CHOSEN, prior=PriorPlace(tmp_path, KEY, "a cat"))
    assert [t["passed"] for t in load_prior(tmp_path, KEY).tries if t["phase"] == "audit"] == [True, False]
    hostile = {"label": "x" * 10_000, "evil": 1.0, **{f"k{i}": 1.0 for i in range(1000)}, "heads": float("inf")}
    assert manifest_candidate(hostile) is None and manifest_candidate([1, 2]) is None
    assert keep_audit_outcome(audited([True] * 4), judge="latent", chosen=hostile,
                              prior=PriorPlace(tmp_path, KEY, "a fox")) == []
    assert len(manifest_candidate({**CHOSEN, "label": "y" * 10_000})["label"]) == 256
    assert keep_audit_outcome(AuditedBatch([1], [0], ["fragment"]), judge="latent", chosen=CHOSEN, prior=place) == []


def _killed_writer(path: str, identity: str, k: int) -> None:
    count = [0]

    def step(real):
        def counted(*args, **kwargs):
            count[0] += 1
            if count[0] == k:
                os._exit(113)
            return real(*args, **kwargs)
        return counted

    os.fsync, os.replace = step(os.fsync), step(os.replace)
    record_batch_audit(path, identity, {"n": 1})
    os._exit(0)


def test_a_writer_killed_at_every_step_leaves_the_old_manifest_or_the_new_one(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    outcomes = set()
    for k in range(1, 6):
        folder = tmp_path / f"k{k}"
        path, identity = saved(folder)
        old = path.read_bytes()
        child = ctx.Process(target=_killed_writer, args=(str(path), identity, k))
        child.start()
        child.join(60)
        frag = load_fragment(path)  # always a complete, valid pair
        audits = frag.manifest["quality"].get("audits")
        outcomes.add("new" if audits else "old")
        assert audits == [{"n": 1}] or path.read_bytes() == old
        if child.exitcode == 0:
            break
    assert outcomes == {"old", "new"}, outcomes  # some kill came before the switch, and the run after it finished


def test_a_pick_no_judged_try_confirmed_is_led_by_the_fewest_audits_that_can_switch() -> None:
    # at 32 images the tenth of the saving (1.6 u) pays for the lead (1.5 u) and nothing after it
    assert audit_positions(32, planned_audit_every(2.0, 32, lead=3), lead=3) == [0, 1, 2]
    assert audit_positions(32, planned_audit_every(2.0, 32), lead=0) == [0, 15, 30]
    # a longer batch saves more, so its tenth pays for more audits after the lead
    led = audit_positions(128, planned_audit_every(2.0, 128, lead=3), lead=3)
    assert led[:3] == [0, 1, 2] and len(led) == 3 + 9 and led[3] == 2 + 13
    assert planned_audit_every(1.0, 32) == 0  # a fragment that saves nothing: no audit, the full model is better
    # an untried pick is always led (bench batch must confirm it); whether the lead pays is the host's call: a lead
    # costs 1 u an audit, so a batch under 6 images at 2x saves less (BatchGenerator then warns instead)
    assert audit_positions(5, planned_audit_every(2.0, 5, lead=3), lead=3) == [0, 1, 2]
    assert not lead_pays(2.0, 5, 3) and lead_pays(2.0, 6, 3) and not lead_pays(1.5, 8, 3) and lead_pays(1.6, 8, 3)
    # no audits that cannot switch: under 6 images a confirmed pick gets none
    assert planned_audit_every(2.0, 5) == 0 and len(audit_positions(6, planned_audit_every(2.0, 6))) == 3


def test_the_latest_audit_of_the_fragment_as_picked_confirms_it_and_a_later_switch_revokes_it() -> None:
    picked = {"schedule": "as stored", "denoise": 1.0, "sampler_name": "euler", "steps": 20}
    ok = {"audited": 3, "passed": 3, "switched_at": None, "settings": picked}
    switched = {**ok, "passed": 0, "switched_at": 2}
    sampler = {"sampler_name": "euler", "steps": 20, "denoise": 1.0}
    assert audit_confirmed({"audits": [ok], "sampler": sampler})
    assert not audit_confirmed({"audits": [ok, switched], "sampler": sampler})  # revoked by the latest
    assert audit_confirmed({"audits": [switched, ok], "sampler": sampler})
    # records that did not test the fragment as picked are not counted either way
    for other in ({**picked, "schedule": "off"}, {**picked, "denoise": 0.5}, {**picked, "steps": 30}):
        assert not audit_confirmed({"audits": [{**ok, "settings": other}], "sampler": sampler}), other
        assert audit_confirmed({"audits": [ok, {**switched, "settings": other}], "sampler": sampler}), other
    hostile = [{"audited": 3, "settings": picked}, {"audited": True, "switched_at": None, "settings": picked}, "x", None]
    assert not any(audit_confirmed({"audits": [h]}) for h in hostile) and not audit_confirmed({"audits": "x"})


def test_a_batch_that_did_not_run_the_pick_keeps_no_verdict_in_the_prior_and_a_symlink_is_not_written(
        tmp_path: Path) -> None:
    place = PriorPlace(tmp_path, KEY, "a dog")
    off = keep_audit_outcome(audited([True] * 4), judge="latent", chosen=CHOSEN, prior=place,
                             settings={"schedule": "off"})
    assert off == [] and load_prior(tmp_path, KEY) is None
    path, identity = saved(tmp_path / "real")
    link = tmp_path / "link.json"
    link.symlink_to(path)
    before = path.read_bytes()
    notes = keep_audit_outcome(audited([True] * 4), judge="latent", manifest_path=link, manifest_id=identity)
    assert notes[0].startswith("audit not kept in the manifest: ") and "found a symlink" in notes[0], notes
    assert link.is_symlink() and path.read_bytes() == before


def test_a_manifest_near_the_size_limit_drops_its_oldest_audits_and_never_passes_the_limit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import prompt_fragments.fragment.format.store as store

    path, identity = saved(tmp_path)
    size = len(path.read_bytes())
    record_batch_audit(path, identity, {"n": 0, "pad": "x" * 2000})
    monkeypatch.setattr(store, "MAX_MANIFEST_BYTES", size + 3000)  # room for one padded record, not two
    record_batch_audit(path, identity, {"n": 1, "pad": "y" * 2000})
    assert [a["n"] for a in read_manifest(path)["quality"]["audits"]] == [1]
    before = path.read_bytes()
    with pytest.raises(FragmentError, match="expected room for an audit record"):
        record_batch_audit(path, identity, {"n": 2, "pad": "z" * 5000})
    assert path.read_bytes() == before and len(before) <= size + 3000
