"""Tier 2: FragmentExtractor starts cold, then warm from the model configuration's prior; it says what it spent and
when the batch pays it back; BatchGenerator audits the warm fragment (issue #26, the ComfyUI 0.3.64 target).

Run on both runtimes: the 2024 one by default, ComfyUI 0.3.64 with ``COMFYUI_PATH``.  Kept cheap: a random
SD1.5 at 64 px, 2 steps, the latent judge (no VAE), a budget of 3 judged images, and the ladder pinned to one rung
(heads 10 %), so a calibration is one try, one held-out reference and its confirmation.  The gate is made
permissive (every candidate passes) so the first prompt's tries certainly leave a pass in the prior: what is
checked is the cold/warm bookkeeping, the cost line and the manifest, not the search (tests/test_prior.py) or what
a random network tolerates.  The settings (2 steps, cfg 6.5) are this module's own, so no other module's
calibration shares the prior's key.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import torch

from prompt_fragments.fragment.format.store import load_fragment
from prompt_fragments.fragment.library.index import entries, forget
from prompt_fragments.fragment.library.prior import priors_dir
from test_node_messages import says_what_to_do

SEED, STEPS, CFG = 11, 2, 6.5
IN_BATCH_CFG = 5.5  # the in-batch test's own model configuration: a prior no judged test of this module wrote
SPENT = re.compile(r"spent (\d+\.\d) u \((\d+\.\d) s\), (pays back from image (\d+)|never pays back)")
AUDITED = re.compile(r"audited (\d+) of (\d+): (\d+) passed")
COST = re.compile(r"cost: u = (\d+\.\d\d) s \(a full-model image, timed (in this batch|by the extractor)\); fragment "
                  r"(\d+\.\d\d)x raw; this batch spent (\d+\.\d) u \(\d+\.\d s\) on its audits: \d+\.\d\dx of stock for "
                  r"(\d+) images; with the extraction \((cold|warm \(prior\))\): spent \d+\.\d u")


@pytest.fixture(scope="module")
def env(comfyui, comfyui_pack, sd15_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    nodes, mapping = comfyui.nodes, comfyui_pack.NODE_CLASS_MAPPINGS
    with torch.inference_mode():
        model, clip, vae, profile = mapping["ProfilerModelLoader"]().load(sd15_checkpoint, 2, 32, "accumulate")
        prompts = [nodes.CLIPTextEncode().encode(clip, text)[0] for text in ("A dog on a jet ski", "A red barn in snow")]
        negative = nodes.CLIPTextEncode().encode(clip, "blurry")[0]
        latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
    permissive = tmp_path_factory.mktemp("warm") / "thresholds.yaml"
    permissive.write_text("quality_gate:\n  variants: 1\n  latent_rel_error_max: 100.0\n")

    def sample(positive: Any, cfg: float = CFG) -> dict[str, Any]:
        """The profiled KSampler's run for ``positive``: the extractor takes its settings from it."""
        with torch.inference_mode():
            return nodes.KSampler().sample(model, SEED, STEPS, cfg, "euler", "normal", positive, negative, latent)[0]

    yield SimpleNamespace(nodes=nodes, mapping=mapping, model=model, vae=vae, profile=profile, prompts=prompts,
                          negative=negative, latent=latent, sample=sample, permissive=permissive, pack=comfyui_pack,
                          folder=Path(comfyui.model_dir("fragments")))
    for entry in entries(comfyui.model_dir("fragments")):  # out of the (auto) index, as test_comfy_judge does
        if entry["name"].startswith("warm_"):
            forget(comfyui.model_dir("fragments"), entry["name"])


def extract(env: SimpleNamespace, name: str, positive: Any, monkeypatch: pytest.MonkeyPatch, confirm: str = "judge",
            cfg: float = CFG, vae: Any = None) -> tuple[Any, str, Any]:
    monkeypatch.setattr(env.pack.judge.comfy, "DEFAULT_THRESHOLDS", env.permissive)
    rung = env.pack.fragment.calibration.Candidate({"heads": 0.1}, level=0.1)
    monkeypatch.setattr(env.pack.fragment.extract, "candidate_ladder", lambda predictors, goal: [rung])
    trigger = env.sample(positive, cfg)
    with torch.inference_mode():
        out = env.mapping["FragmentExtractor"]().extract(env.profile, trigger, name, calibrate="on", goal="speed",
                                                         positive=positive, negative=env.negative, budget_images=3,
                                                         holdout_seeds=1, overwrite=True, confirm=confirm, vae=vae)
    handle, status, latents = out["result"]
    assert out["ui"]["text"] == [status]
    return handle, status, latents


def check_cost(status: str, manifest: dict[str, Any], start: str) -> None:
    match = SPENT.search(status)
    assert match, status
    refinement = manifest["quality"]["refinement"]
    assert refinement["start"] == start, refinement["start"]
    assert isinstance(refinement["cost"]["units"], float) and refinement["cost"]["units"] >= 0
    calibration = manifest["performance"]["calibration"]
    ledger = calibration["ledger"]
    assert calibration["start"] == start and calibration["unit_s"] > 0
    assert f"{ledger['overhead_u']:.1f}" == match.group(1) and ledger["n"] == 32
    assert ledger["break_even_images"] == (int(match.group(4)) if match.group(4) else None)


def test_second_prompt_starts_warm_and_batch_generator_audits_it(env, monkeypatch: pytest.MonkeyPatch) -> None:
    handle, cold, _ = extract(env, "warm_first", env.prompts[0], monkeypatch)
    assert "cold start (no prior for this model configuration yet)" in cold, cold
    check_cost(cold, load_fragment(handle.manifest_path).manifest, "cold")
    assert list(priors_dir(env.folder).glob("prior.*.json")), "the first calibration left no prior"

    handle, warm, latents = extract(env, "warm_second", env.prompts[1], monkeypatch)
    assert "warm start (the prior of 1 earlier prompt on this model configuration)" in warm, warm
    manifest = load_fragment(handle.manifest_path).manifest
    check_cost(warm, manifest, "warm (prior)")
    assert manifest["quality"]["refinement"]["prior_prompts"] == 1 and not manifest["quality"]["refinement"]["warnings"]
    print(f"\ncold: {cold}\nwarm: {warm}")

    # BatchGenerator on the warm fragment, auditing every 2nd image, with the extractor's full-model latents given.
    with torch.inference_mode():
        fragment_model, _ = env.mapping["FragmentLoader"]().apply(env.model, "(none)", "raise", fragment=handle)
        cls = env.mapping["BatchGenerator"]
        out = getattr(cls(), cls.FUNCTION)(model=fragment_model, positive=env.prompts[1], negative=env.negative,
                                           latent_image=env.latent, seed=SEED, count=4, batch_size=4, steps=STEPS,
                                           cfg=CFG, sampler_name="euler", scheduler="normal", denoise=1.0, audit_every=2,
                                           rendered=latents)
    text = out["ui"]["text"][0]
    print(f"batch: {text}")
    given = len(latents["fragment_seeds"])  # the profiled seed and the held-out seed: delivered, not rendered again
    assert f"{given} rows from rendered (not rendered again)" in text, text
    match = AUDITED.search(text)
    assert match and match.group(1) == "1", text  # 2 fragment rows: the 1st is audited
    assert f"full-model images delivered: {given + 1}" in text, text
    assert out["result"][0]["samples"].shape[0] == 4
    # what it cost, measured in the batch (its audit timed u), with the warm extraction's own cost
    cost = COST.search(text)
    assert cost and cost.group(2, 5, 6) == ("in this batch", "4", "warm (prior)"), text
    kept = load_fragment(handle.manifest_path).manifest["quality"]["audits"][-1]["measured"]
    assert f"{kept['raw_ratio']:.2f}" == cost.group(3) and f"{kept['unit_s']:.2f}" == cost.group(1), (kept, text)


def test_an_unreadable_prior_is_left_in_place_and_the_run_is_cold_with_a_warning(env,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    extractor = sys.modules[env.mapping["FragmentExtractor"].__module__]
    trigger = env.sample(env.prompts[0])
    digest = extractor.base_sha256(env.profile.diffusion_model, extractor.unpatched_originals(env.profile.patcher))
    settings = extractor.SamplerSettings(SEED, STEPS, CFG, "euler", "normal")
    place = extractor.prior_place(digest, settings, trigger, env.prompts[0])
    path = priors_dir(env.folder) / place.key.file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = path.read_bytes() if path.exists() else None
    hostile = b'{"schema": "prompt_fragments.prior/1", "key": {"base_sha256": "' + b"9" * 5000 + b'"}}'
    path.write_bytes(hostile)
    try:
        handle, status, _ = extract(env, "warm_hostile", env.prompts[0], monkeypatch)
        assert path.read_bytes() == hostile, "the unreadable prior was changed"
    finally:
        path.write_bytes(kept) if kept is not None else path.unlink()
    assert "cold start (the prior could not be used: see the warning)" in status, status
    assert "WARNING: the prior of this model configuration was not used" in status and str(path) in status, status
    assert "left in place" in status and "move it out of" in status, status
    assert status.startswith("calibrated (speed)") or status.startswith("FULL MODEL used"), status
    refinement = load_fragment(handle.manifest_path).manifest["quality"]["refinement"]
    assert refinement["start"] == "cold" and says_what_to_do(refinement["warnings"][0]), refinement
    print(f"\nhostile: {status}")


def batch(env: SimpleNamespace, model: Any, positive: Any, count: int, cfg: float, **optional: Any) -> dict[str, Any]:
    cls = env.mapping["BatchGenerator"]
    with torch.inference_mode():
        return getattr(cls(), cls.FUNCTION)(model=model, positive=positive, negative=env.negative,
                                            latent_image=env.latent, seed=SEED, count=count, batch_size=3, steps=STEPS,
                                            cfg=cfg, sampler_name="euler", scheduler="normal", denoise=1.0, **optional)


def test_an_in_batch_pick_is_led_by_the_audit_which_keeps_its_verdict_in_the_manifest_and_the_prior(
        env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped default (confirm in batch, audit_every auto): nothing is judged before the batch, the batch's
    first 3 images are audited, and the verdict lands in the fragment's manifest and the configuration's prior,
    so the next prompt's pick starts warm from it."""
    handle, status, latents = extract(env, "warm_in_batch", env.prompts[0], monkeypatch, confirm="in batch",
                                      cfg=IN_BATCH_CFG)
    assert status.startswith("picked (speed), untried: heads 10%"), status  # a planned CFG cut-off may ride on it
    assert "; the batch's running audit confirms it" in status and " judge: " in status, status
    assert "cold start (no prior for this model configuration yet)" in status and "0 tries, 0 images" in status
    manifest = load_fragment(handle.manifest_path).manifest
    refinement = manifest["quality"]["refinement"]
    assert (refinement["status"], refinement["tries"], manifest["quality"]["quality_gate"]) == ("in_batch", [], "in_batch")
    assert latents["fragment_seeds"] == [SEED]  # only the reference check rendered: its image is the batch's
    with torch.inference_mode():
        model, loaded = env.mapping["FragmentLoader"]().apply(env.model, "(none)", "raise", fragment=handle)
    assert "picked untried (extracted with confirm: in batch)" in loaded, loaded

    out = batch(env, model, env.prompts[0], 8, IN_BATCH_CFG, rendered=latents)
    text = out["ui"]["text"][0]
    print(f"\nin batch: {status}\nbatch: {text}")
    assert "1 rows from rendered (not rendered again)" in text, text
    assert AUDITED.search(text).group(1, 2, 3) == ("3", "7", "3"), text  # the lead: images 1-3 of the 7 rendered
    assert "audit kept in the manifest (quality.audits)" in text, text
    assert "audit recorded in the prior of this model configuration" in text, text
    (kept,) = load_fragment(handle.manifest_path).manifest["quality"]["audits"]
    # every = 7: the lead alone (the allowance of a batch this size pays for no audit after it)
    assert (kept["audited"], kept["passed"], kept["every"], kept["switched_at"]) == (3, 3, 7, None), kept
    assert kept["settings"]["cfg"] == IN_BATCH_CFG and kept["settings"]["images"] == 8
    assert kept["settings"]["schedule"] == "as stored" and kept["settings"]["denoise"] == 1.0
    # the cost line: u and the raw ratio timed in this batch (what its manifest record keeps), the cold extraction
    cost = COST.search(text)
    assert cost and cost.group(2, 5, 6) == ("in this batch", "8", "cold"), text
    assert f"{kept['measured']['raw_ratio']:.2f}" == cost.group(3), (kept, text)
    assert re.search(r"with the extraction \(cold\): spent [^;]*, (pays back from image \d+|never pays back)", text)

    digest = (load_fragment(handle.manifest_path).manifest["base_model"]["sha256"])
    extractor = sys.modules[env.mapping["FragmentExtractor"].__module__]
    place = extractor.run_prior(digest, "euler", "normal", STEPS, IN_BATCH_CFG, env.latent["samples"], env.prompts[0])
    # the pack's own load_prior: ComfyUI imported the pack under another module name, so its PriorKey is another class
    audits = [t for t in env.pack.fragment.library.prior.load_prior(env.folder, place.key).tries if t["phase"] == "audit"]
    assert [(t["label"], t["passed"], t["seeds"]) for t in audits] == [(refinement["chosen"]["label"], True, 3)], audits
    assert audits[0]["levers"]["heads"] == 0.1

    # the same loaded MODEL, a second batch (ComfyUI keeps the loader's output between queues): led and recorded again
    text = batch(env, model, env.prompts[0], 7, IN_BATCH_CFG)["ui"]["text"][0]
    assert "audit kept in the manifest (quality.audits)" in text and "audited 3 of 7" in text, text
    assert load_fragment(handle.manifest_path).manifest["quality"]["audits"][-1]["every"] == 7  # led again
    # the schedule off for a batch: audited, kept in the manifest as such, but no verdict on the pick in the prior
    text = batch(env, model, env.prompts[0], 7, IN_BATCH_CFG, schedule="off")["ui"]["text"][0]
    assert "audit kept in the manifest" in text and "audit recorded in the prior" not in text, text
    assert load_fragment(handle.manifest_path).manifest["quality"]["audits"][-1]["settings"]["schedule"] == "off"
    # loaded again from its file, the pick is confirmed by those audits: no lead, the cost model's interval only
    with torch.inference_mode():
        reloaded, loaded = env.mapping["FragmentLoader"]().apply(env.model, handle.manifest_path.name, "raise")
    assert "confirmed since by a batch's running audit (quality.audits)" in loaded, loaded
    text = batch(env, reloaded, env.prompts[0], 7, IN_BATCH_CFG)["ui"]["text"][0]
    assert "audited 3 of 7" in text and "audit kept in the manifest" in text, text
    assert load_fragment(handle.manifest_path).manifest["quality"]["audits"][-1]["every"] == 3  # images 1, 4 and 7
    # too small a batch to pay for an untried pick's lead, or audit_every 0: the batch runs, the report warns
    text = batch(env, model, env.prompts[0], 4, IN_BATCH_CFG)["ui"]["text"][0]
    assert text.startswith("WARNING: ") and "would cost more than a batch of 4 saves" in text, text
    assert "render 6 or more images, or extract with confirm judge" in text and not AUDITED.search(text), text
    # no full-model image in the batch: u is the extractor's reference check's
    assert COST.search(text).group(2, 5) == ("by the extractor", "4"), text
    text = batch(env, model, env.prompts[0], 7, IN_BATCH_CFG, audit_every=0)["ui"]["text"][0]
    assert text.startswith("WARNING: ") and "picked untried" in text and "set audit_every to -1 (auto)" in text, text

    # the next prompt, with a VAE wired as the shipped workflows do: an untried pick reads the audits' (latent) tries
    _, second, _ = extract(env, "warm_in_batch_2", env.prompts[1], monkeypatch, confirm="in batch", cfg=IN_BATCH_CFG,
                           vae=env.vae)
    assert "warm start (the prior of 1 earlier prompt on this model configuration)" in second, second
