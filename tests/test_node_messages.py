"""Issue #28 items 2 and 3: ``raise`` means raise, a fallback says so, and every node error says what to do.

Tier 1 checks the core messages (``auto_mode``, the base-model mismatch);
tier 2 calls the nodes inside a real ComfyUI, on a toy diffusion model held
by ComfyUI's own ``ModelPatcher`` (hashing it takes microseconds, so no
checkpoint is loaded).

The "what to do" rule, applied to every message below: after a ``;`` or a
``.`` (optionally after "to fix,"), a clause starts with an imperative verb
from ``VERBS``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import torch
from torch import nn

from prompt_fragments.errors import BaseModelMismatchError, FragmentError, IntegrityError
from prompt_fragments.fragment.build import fragment_replacements
from prompt_fragments.fragment.format.manifest import Fragment, new_manifest
from prompt_fragments.fragment.format.store import check_name, named_by, save_fragment
from prompt_fragments.fragment.library import index as library
from prompt_fragments.fragment.library.auto_mode import auto_select, load_or_fallback
from prompt_fragments.fragment.surgery.heads import kept_key
from test_library import PATHS, emb

CHECKPOINT = "sd15_made_from.safetensors"
VERBS = ("connect", "choose", "load", "rebuild", "replace", "delete", "set", "turn", "merge", "apply", "put", "move",
         "check", "give", "run", "use", "re-extract", "profile", "pick")
WHAT_TO_DO = re.compile(r"(?:[.;]\s+)(?:to fix,\s+)?(?:" + "|".join(map(re.escape, VERBS)) + r")\b", re.IGNORECASE)


def says_what_to_do(message: str) -> bool:
    return WHAT_TO_DO.search(message) is not None


def made_for(name: str, base_sha: str = "ab" * 32, checkpoint: str = CHECKPOINT) -> Fragment:
    """A small valid fragment whose manifest says it was cut from ``checkpoint`` (sha256 ``base_sha``)."""
    kept = {PATHS[0]: [0, 1, 2], PATHS[1]: [1, 3, 5, 7]}
    modules = {p: {"kind": "attn1", "heads": 8, "dim_head": 8, "kept": k, "removed": [h for h in range(8) if h not in k]}
               for p, k in kept.items()}
    manifest = new_manifest(name=name, base_model={"name": checkpoint, "sha256": base_sha, "hash_kind": "state_dict_fp16"},
                            profiling={}, pruning={"heads_total": 8 * len(PATHS), "modules": modules},
                            compression={"low_rank": [], "precision": {"applied": False}}, producer_version="test")
    return Fragment(manifest, {kept_key(p): torch.tensor(k, dtype=torch.int64) for p, k in kept.items()})


def corrupt(folder: Path, name: str) -> tuple[Path, Path]:
    """Save ``name`` into ``folder`` and flip its last tensor bytes (the manifest's sha256 no longer matches)."""
    manifest = save_fragment(made_for(name), folder, overwrite=True)
    tensors = folder / f"{name}.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-7] + b"garbage")
    return manifest, tensors


# ---------------------------------------------------------------- tier 1: core messages


def test_the_rule_rejects_messages_without_a_way_out() -> None:
    assert not says_what_to_do("x.json: expected sha256 ab…, found cd…")
    assert not says_what_to_do("FragmentLoader: expected a fragment_name or a connected fragment input, found neither")
    assert says_what_to_do("x: found none; connect the positive CONDITIONING")


def test_mismatch_names_the_stored_checkpoint_and_both_ways_out() -> None:
    with pytest.raises(BaseModelMismatchError) as info:
        fragment_replacements(nn.Linear(2, 2), made_for("dog"), base_sha256="cd" * 32)
    message = str(info.value)
    assert f"load the checkpoint {CHECKPOINT!r} the fragment was made from" in message
    assert "rebuild the fragment from this checkpoint with FragmentExtractor" in message
    assert "built for base model" in message and says_what_to_do(message)


def test_library_mismatch_names_the_stored_checkpoint(tmp_path: Path) -> None:
    path = save_fragment(made_for("dog"), tmp_path)
    out = load_or_fallback(tmp_path, path, "cd" * 32)
    assert out.fragment is None and out.status.startswith("FALLBACK") and CHECKPOINT in out.status and path.exists()
    with pytest.raises(BaseModelMismatchError, match=re.escape(CHECKPOINT)) as info:
        load_or_fallback(tmp_path, path, "cd" * 32, on_error="raise")
    assert says_what_to_do(str(info.value))


def test_raise_on_a_corrupt_entry_raises_naming_it_and_moves_nothing(tmp_path: Path) -> None:
    manifest, tensors = corrupt(tmp_path, "dog")
    before = {p: p.read_bytes() for p in (manifest, tensors)}
    with pytest.raises(IntegrityError) as info:  # was: quarantined and the full model returned
        load_or_fallback(tmp_path, manifest, on_error="raise")
    message = str(info.value)
    assert str(manifest) in message and "dog.safetensors" in message and "nothing was moved" in message
    assert says_what_to_do(message)
    assert {p: p.read_bytes() for p in before} == before
    assert not (library.library_dir(tmp_path) / "quarantine").exists()


def test_raise_in_auto_mode_raises_for_a_corrupt_hit(tmp_path: Path) -> None:
    path = library.add(tmp_path, made_for("dog"), embedding=emb(1), prompt="a dog")
    tensors = tmp_path / named_by(path)[0]
    tensors.write_bytes(tensors.read_bytes()[:-7] + b"garbage")
    with pytest.raises(IntegrityError, match="dog.json is unusable"):
        auto_select(tmp_path, "ab" * 32, emb(1), on_error="raise")
    assert tensors.exists()
    out = auto_select(tmp_path, "ab" * 32, emb(1))  # fallback still quarantines, and says where
    assert out.fragment is None and out.quarantined and str(library.library_dir(tmp_path) / "quarantine") in out.status


def test_fallback_reports_the_quarantine_and_how_to_restore(tmp_path: Path) -> None:
    manifest, tensors = corrupt(tmp_path, "dog")
    out = load_or_fallback(tmp_path, manifest)
    quarantine = library.library_dir(tmp_path) / "quarantine"
    assert out.fragment is None and len(out.quarantined) == 2
    assert out.status.startswith("FALLBACK to the full model: dog.json is unusable")
    assert f"moved dog.json and dog.safetensors to {quarantine}" in out.status
    assert f"move them back to {tmp_path} under their old names (dog.json, dog.safetensors), or delete them" in out.status
    for moved in out.quarantined:  # the names the status gives are the files really there
        assert moved.parent == quarantine and moved.name in out.status
    # Following the instructions restores the entry (it is still corrupt: the user fixes or replaces it).
    for moved, original in zip(sorted(out.quarantined), sorted([manifest, tensors])):
        moved.rename(original)
    assert manifest.exists() and tensors.exists()


def test_unknown_on_error_is_refused_with_the_choices(tmp_path: Path) -> None:
    with pytest.raises(FragmentError, match="expected one of fallback, raise, found 'ignore'; choose") as info:
        load_or_fallback(tmp_path, tmp_path / "x.json", on_error="ignore")
    assert says_what_to_do(str(info.value))


def test_a_bad_fragment_name_says_what_to_use() -> None:
    with pytest.raises(FragmentError) as info:
        check_name("../evil")
    assert says_what_to_do(str(info.value))


# ---------------------------------------------------------------- tier 2: the nodes inside ComfyUI


class ToyBase(nn.Module):
    """What a ModelPatcher holds (``.diffusion_model``), as small as can be hashed."""

    def __init__(self) -> None:
        super().__init__()
        self.diffusion_model = nn.Sequential(nn.Linear(4, 4))


@pytest.fixture(scope="module")
def nodes(comfyui, comfyui_pack) -> SimpleNamespace:
    import comfy.model_patcher

    folder = Path(comfyui.folder_paths.get_folder_paths("fragments")[0])
    save_fragment(made_for("ne_other_base"), folder, overwrite=True)  # "ab"*32: not the toy's hash
    base = comfy.model_patcher.ModelPatcher(ToyBase(), torch.device("cpu"), torch.device("cpu"))
    comfyui.folder_paths.filename_list_cache.clear()
    mapping = comfyui_pack.NODE_CLASS_MAPPINGS
    return SimpleNamespace(folder=folder, base=base, loader=mapping["FragmentLoader"](),
                           extractor=mapping["FragmentExtractor"](), pack=comfyui_pack, comfyui=comfyui)


def family(exc: BaseException) -> set[str]:
    """Class names of ``exc`` and its bases: the pack runs under ComfyUI's module name, so its classes are not ours."""
    return {cls.__name__ for cls in type(exc).__mro__}


def _corrupt_in_comfyui(nodes: SimpleNamespace, name: str) -> tuple[Path, Path]:
    paths = corrupt(nodes.folder, name)
    nodes.comfyui.folder_paths.filename_list_cache.clear()
    return paths


def test_loader_raise_on_a_corrupt_fragment_raises_naming_the_file(nodes) -> None:
    manifest, tensors = _corrupt_in_comfyui(nodes, "ne_corrupt_raise")
    with pytest.raises(Exception) as info:  # was: quarantined, full model, "success"
        nodes.loader.apply(nodes.base, manifest.name, "raise")
    message = str(info.value)
    assert "IntegrityError" in family(info.value)
    assert str(manifest) in message and tensors.name in message and says_what_to_do(message)
    assert manifest.exists() and tensors.exists()  # still in the dropdown: the next run says the same


def test_loader_fallback_on_a_corrupt_fragment_warns_and_says_how_to_restore(nodes) -> None:
    manifest, tensors = _corrupt_in_comfyui(nodes, "ne_corrupt_fallback")
    model, status = nodes.loader.apply(nodes.base, manifest.name, "fallback")
    quarantine = nodes.folder / ".library" / "quarantine"
    assert status.startswith("WARNING: FALLBACK to the full model: ne_corrupt_fallback.json is unusable")
    assert f"moved {manifest.name} and {tensors.name} to {quarantine}" in status
    assert f"move them back to {nodes.folder} under their old names" in status and "or delete them" in status
    assert model.object_patches == {} and not manifest.exists()
    # The next run's dropdown no longer lists it; the loader's own error (a stale name from an API prompt) says where it went.
    nodes.comfyui.folder_paths.filename_list_cache.clear()
    with pytest.raises(Exception, match=re.escape(str(quarantine))) as info:
        nodes.loader.apply(nodes.base, manifest.name, "fallback")
    assert "FragmentError" in family(info.value) and says_what_to_do(str(info.value))


def test_loader_mismatch_names_the_stored_checkpoint_and_both_ways_out(nodes) -> None:
    model, status = nodes.loader.apply(nodes.base, "ne_other_base.json", "fallback")
    assert status.startswith("WARNING: FALLBACK to the full model") and model.object_patches == {}
    with pytest.raises(Exception) as info:
        nodes.loader.apply(nodes.base, "ne_other_base.json", "raise")
    message = str(info.value)
    assert "BaseModelMismatchError" in family(info.value)
    assert f"load the checkpoint {CHECKPOINT!r} the fragment was made from" in message
    assert "rebuild the fragment from this checkpoint with FragmentExtractor" in message


def _with_lora_on_pruned_weights(nodes: SimpleNamespace) -> Any:
    model = nodes.base.clone()
    model.patches[f"diffusion_model.{PATHS[0]}.to_q.weight"] = []  # what LoraLoader leaves: a patch on the key
    return model


def _with_attn2_replacement(nodes: SimpleNamespace) -> Any:
    model = nodes.base.clone()
    model.set_model_attn2_replace(lambda q, k, v, extra: q, "input", 1)
    return model


def _extract(nodes: SimpleNamespace, **overrides: Any) -> Any:
    args = dict(profile=SimpleNamespace(runs=[]), trigger={"samples": torch.zeros(1, 4, 8, 8)}, name="ne_x",
                overwrite=True)
    return nodes.extractor.extract(**{**args, **overrides})


def _kv_fold_without_prompts(nodes: SimpleNamespace) -> Any:
    (levers,) = nodes.pack.nodes.manual_levers.FragmentManualLevers().levers(kv_fold=True)
    return _extract(nodes, levers=levers)


def _recorded(**fields: Any) -> SimpleNamespace:
    """A profile whose recorded run is seed 3, 4 steps, cfg 7, euler/normal (``fields`` change it)."""
    run = RecordedRunLike(**{"seed": 3, "steps": 4, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", **fields})
    return SimpleNamespace(runs=[run])


@dataclass(frozen=True)
class RecordedRunLike:
    seed: int | None
    steps: int | None
    cfg: float | None
    sampler_name: str | None
    scheduler: str | None
    denoise: float | None = 1.0
    noise_from_seed: bool = True
    empty_latent: bool = True

    def describe(self) -> str:
        return f"seed {self.seed}, {self.steps} steps, cfg {self.cfg:g}, {self.sampler_name}/{self.scheduler}"


def _calibrate_with(nodes: SimpleNamespace, profile: Any, **inputs: Any) -> Any:
    return _extract(nodes, profile=profile, positive=[], negative=[], calibrate="on", **inputs)


def _judge_without_prompts(nodes: SimpleNamespace) -> Any:
    from_judge = nodes.pack.judge.comfy
    return from_judge.ComfyJudge(nodes.base, from_judge.SamplerSettings(1, 4, 7.0, "euler", "normal"), None, None, {},
                                 models=nodes.pack.nodes.fragment_loader.JUDGE_MODELS)


def _steps_disagree(nodes: SimpleNamespace) -> Any:
    from_judge = nodes.pack.judge.comfy
    return from_judge.check_steps(from_judge.SamplerSettings(1, 20, 7.0, "euler", "normal"), 4)


# Every condition a node raises a FragmentError for that a test can reach without sampling; each message is checked.
NODE_ERRORS: dict[str, Callable[[SimpleNamespace], Any]] = {
    "loader: no fragment": lambda n: n.loader.apply(n.base, "(none)", "raise"),
    "loader: auto without positive": lambda n: n.loader.apply(n.base, "(auto)", "raise"),
    "loader: name not in the folder": lambda n: n.loader.apply(n.base, "ne_gone.json", "raise"),
    "loader: corrupt with raise": lambda n: (_corrupt_in_comfyui(n, "ne_corrupt_each"),
                                             n.loader.apply(n.base, "ne_corrupt_each.json", "raise")),
    "loader: other base with raise": lambda n: n.loader.apply(n.base, "ne_other_base.json", "raise"),
    "loader: LoRA on pruned weights": lambda n: n.loader.apply(_with_lora_on_pruned_weights(n), "ne_other_base.json", "raise"),
    "loader: attn2 replacement": lambda n: n.loader.apply(_with_attn2_replacement(n), "ne_other_base.json", "raise"),
    "extractor: kv_fold without prompts": _kv_fold_without_prompts,
    "extractor: unknown calibrate": lambda n: _extract(n, calibrate="sometimes"),
    "extractor: calibrate on, prompts missing": lambda n: _extract(n, calibrate="on"),
    "extractor: no recorded run": lambda n: _calibrate_with(n, SimpleNamespace(runs=[])),
    "extractor: seed override disagrees": lambda n: _calibrate_with(n, _recorded(), seed=4),
    "extractor: cfg override disagrees": lambda n: _calibrate_with(n, _recorded(), cfg=8.0),
    "extractor: sampler not recorded": lambda n: _calibrate_with(n, _recorded(sampler_name=None)),
    "extractor: noise not from the seed": lambda n: _calibrate_with(n, _recorded(noise_from_seed=False)),
    "extractor: img2img profile": lambda n: _calibrate_with(n, _recorded(empty_latent=False, denoise=0.5)),
    "extractor: batch too small": lambda n: _calibrate_with(n, _recorded(), batch_images=4, confirm="judge"),
    "extractor: budget_images too small": lambda n: _calibrate_with(n, _recorded(), budget_images=2, confirm="judge"),
    "extractor: unknown confirm": lambda n: _extract(n, confirm="later"),
    "extractor: judge without prompts": _judge_without_prompts,
    "extractor: steps disagree with the profile": _steps_disagree,
}


def test_a_conflicting_override_names_what_was_recorded_and_given(nodes) -> None:
    with pytest.raises(Exception) as info:
        _calibrate_with(nodes, _recorded(), seed=4)
    message = str(info.value)
    assert "the seed input is 4, but the profiled run was recorded with seed 3" in message
    assert "seed 3, 4 steps, cfg 7, euler/normal" in message
    assert "disconnect the seed input" in message and "run the profiling sampler again with seed 4" in message


def test_a_batch_too_small_is_refused_with_the_least_that_works(nodes) -> None:
    extractor_module = nodes.pack.nodes.fragment_extractor
    least = extractor_module.least_batch_images(holdout=1)
    assert extractor_module.judged_image_budget(least, holdout=1) >= extractor_module.least_judged_images(1)
    assert extractor_module.judged_image_budget(least - 1, holdout=1) < extractor_module.least_judged_images(1)
    with pytest.raises(Exception) as info:
        _calibrate_with(nodes, _recorded(), batch_images=least - 1, confirm="judge")
    assert f"set batch_images to {least} or more" in str(info.value), info.value
    # The refusal comes before anything renders: the fake profile has no session, model or patcher to render with.
    with pytest.raises(Exception) as info:
        _calibrate_with(nodes, _recorded(), holdout_seeds=2, batch_images=8, confirm="judge")
    assert f"set batch_images to {extractor_module.least_batch_images(holdout=2)} or more" in str(info.value)


@pytest.mark.parametrize("condition", sorted(NODE_ERRORS))
def test_every_node_error_says_what_to_do(nodes, condition: str) -> None:
    with torch.inference_mode(), pytest.raises(Exception) as info:
        NODE_ERRORS[condition](nodes)
    assert "FragmentError" in family(info.value), f"{condition}: {info.value!r}"
    assert says_what_to_do(str(info.value)), f"{condition}: {info.value}"
