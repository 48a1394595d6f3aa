"""The lever registry: a lever planted here, registered in one line, plans, predicts, builds, saves, loads,
applies and labels through the core's loops, with no other file touched; and old (schema v1) manifests load."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

from prompt_fragments.errors import FragmentError
from prompt_fragments.fragment import levers
from prompt_fragments.fragment.build import apply_fragment, build_fragment, describe_base, lever_weight_keys
from prompt_fragments.fragment.calibration import Candidate, Predictors, candidate_ladder, profile_predictors
from prompt_fragments.fragment.extract import plan_levers
from prompt_fragments.fragment.format.hashing import sha256_json
from prompt_fragments.fragment.format.manifest import V1_NAMES, seal
from prompt_fragments.fragment.format.store import load_fragment, save_fragment
from prompt_fragments.fragment.schedule.state import Schedule, fragment_schedule, with_schedule
from prompt_fragments.fragment.settings import ExtractionSettings, lever_settings
from prompt_fragments.fragment.surgery.lever import Built, InCompression, LeverBase, tensor
from prompt_fragments.fragment.surgery.tree import install, linear_like, module_at
from prompt_fragments.profiling.evidence import ProfileEvidence


@dataclass(frozen=True)
class BiasNudgeLever(InCompression, LeverBase):
    """A trivial lever: scales the bias of the model's first biased Linear by ``1 + amount`` and stores it."""

    layer: str
    amount: float
    name: ClassVar[str] = "bias_nudge"
    grid: ClassVar[tuple[Any, ...]] = (0.0, 0.5, 0.9)
    goals: ClassVar[tuple[str, ...]] = ("memory", "both")

    @classmethod
    def plan(cls, evidence: Any, settings: Any, model: nn.Module, name: str) -> "BiasNudgeLever | None":
        amount = settings.amount(cls.name)
        if not amount:
            return None
        layer = next(p for p, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is not None)
        return cls(layer, amount)

    @classmethod
    def predictor(cls, evidence: Any, model: nn.Module, settings: Any) -> dict[str, float]:
        return {"per_unit": 0.1}

    @classmethod
    def predict(cls, data: Mapping[str, float], amount: float) -> float:
        return data["per_unit"] * amount

    def build(self, model: nn.Module, replacements: dict[str, nn.Module], built: Mapping[str, Any]) -> Built:
        lin = module_at(model, replacements, self.layer)
        bias = (lin.bias.detach() * (1.0 + self.amount)).contiguous()
        install(replacements, {self.layer: linear_like(lin, lin.weight.detach(), bias)})
        return Built({f"nudge.{self.layer}.bias": bias}, {"layer": self.layer, "amount": self.amount})

    @classmethod
    def apply(cls, model: nn.Module, record: Any, tensors: Mapping[str, torch.Tensor],
              replacements: dict[str, nn.Module], source: str = "fragment") -> None:
        lin = module_at(model, replacements, record["layer"])
        bias = tensor(tensors, f"nudge.{record['layer']}.bias", "the nudged bias", source)
        install(replacements, {record["layer"]: linear_like(lin, lin.weight.detach(), bias)})

    @classmethod
    def check(cls, record: Any, tensors: Mapping[str, torch.Tensor], source: str) -> set[str]:
        key = f"nudge.{record['layer']}.bias"
        tensor(tensors, key, "the nudged bias", source)
        return {key}

    @classmethod
    def weight_keys(cls, record: Any, prefix: str = "") -> set[str]:
        return {f"{prefix}{record['layer']}.bias"}


@pytest.fixture
def planted():
    levers.register(BiasNudgeLever)  # the one line a new lever needs
    yield BiasNudgeLever
    levers.unregister(BiasNudgeLever.name)


def _toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def test_a_planted_lever_plans_predicts_builds_saves_loads_applies_and_labels(planted, tmp_path: Path) -> None:
    model, x = _toy(), torch.randn(3, 8)
    settings = ExtractionSettings(levers={"bias_nudge": 0.5})
    assert settings.label == "bias nudge 50%" and settings.amount("bias_nudge") == 0.5
    evidence = ProfileEvidence.from_scores({})
    planned = plan_levers(evidence, settings, model=model)
    assert [lv.name for lv in planned] == ["heads", "bias_nudge"]
    fragment = build_fragment(model, planned, base=describe_base(model, "toy"), name="nudge")
    assert fragment.manifest["compression"]["bias_nudge"] == {"layer": "0", "amount": 0.5}
    loaded = load_fragment(save_fragment(fragment, tmp_path))
    expected = model(x) + 0.0
    with torch.no_grad():
        nudged = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        nudged.load_state_dict(model.state_dict())
        nudged[0].bias.mul_(1.5)
        assert_close(apply_fragment(model, loaded)(x), nudged(x))
    assert_close(model(x), expected)  # the base model is unchanged
    assert lever_weight_keys(loaded.manifest) == {"0.bias"}
    # prediction: one predictor per lever from the evidence, one loop over the registry
    predictors = profile_predictors(evidence, model, settings, goal="memory")
    assert predictors.damage("bias_nudge", 1.0) == pytest.approx(0.1)
    assert "bias_nudge" in levers.goal_levers("memory") and "bias_nudge" not in levers.goal_levers("speed")


def test_the_registry_drives_the_ladder_and_the_labels(planted) -> None:
    ladder = candidate_ladder(Predictors({"bias_nudge": {"per_unit": 0.1}}), "memory", levels=(0.2, 0.06))
    assert [c.amount("bias_nudge") for c in ladder] == [0.9, 0.5]
    assert [c.label for c in ladder] == ["bias nudge 90%", "bias nudge 50%"]
    assert ladder[0].settings().amount("bias_nudge") == 0.9 and ladder[0].to_dict()["bias_nudge"] == 0.9
    assert candidate_ladder(Predictors({"bias_nudge": {"per_unit": 0.1}}), "speed") == []
    with pytest.raises(FragmentError, match="expected a fraction in"):
        Candidate({"bias_nudge": 2.0})


def test_unknown_levers_and_bad_amounts_say_where_and_what() -> None:
    with pytest.raises(FragmentError, match=r"extraction settings: levers: unknown lever 'ff_ratio'; expected one of heads, kv_fold, ff"):
        ExtractionSettings(levers={"ff_ratio": 0.3})
    with pytest.raises(FragmentError, match=r"extraction settings: levers: ff: expected a fraction in \[0, 1\), found 1\.5"):
        ExtractionSettings(levers={"ff": 1.5})
    with pytest.raises(FragmentError, match=r"calibration candidate: kv_fold: expected True or False"):
        Candidate({"kv_fold": 1})
    with pytest.raises(FragmentError, match="registered already"):
        levers.register(levers.lever("heads"))
    # the one label function for settings and candidates
    assert Candidate({"precision": 0.5, "low_bit": 0.5}).label == ExtractionSettings(levers={"precision": 0.5, "low_bit": 0.5}).label
    assert Candidate({"heads": 0.2}) == Candidate({"heads": 0.2, "ff": 0.0}) and len({Candidate({"heads": 0.2}), Candidate({"heads": 0.2})}) == 1


def _as_v1(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What the old code wrote: schema 1 and the v1 names (``V1_NAMES`` backwards), sealed as it sealed."""
    body = {k: v for k, v in manifest.items() if k != "integrity"}
    for block, names in V1_NAMES.items():
        old = {new: stored for stored, new in names.items()}
        if block in body:
            body[block] = {old.get(k, k): v for k, v in body[block].items()}
    body["schema_version"] = 1
    return seal(body)


def test_a_v1_manifest_loads_and_applies_identically(tmp_path: Path) -> None:
    model, x = _toy(), torch.randn(3, 8)
    heads = ProfileEvidence.from_scores({})
    planned = plan_levers(heads, lever_settings(ff=0.0, precision="int8", precision_ratio=1.0), model=model)
    fragment = build_fragment(model, planned, base=describe_base(model, "toy"), name="old")
    fragment = with_schedule(fragment, Schedule(cfg_cutoff=350.0))
    assert fragment.manifest["compression"]["precision"]["applied"] and fragment.manifest["schema_version"] == 2
    path = save_fragment(fragment, tmp_path)
    v1 = _as_v1(json.loads(path.read_text()))
    assert "quantization" in v1["compression"] and "precision" not in v1["compression"]
    assert v1["schedule"] == {"cfg_truncation": {"timestep": 350.0}}
    path.write_text(json.dumps(v1))
    old = load_fragment(path)
    assert old.manifest["schema_version"] == 2 and "precision" in old.manifest["compression"]
    assert fragment_schedule(old).cfg_cutoff == 350.0
    assert old.manifest["integrity"]["manifest_sha256"] == sha256_json({k: v for k, v in old.manifest.items() if k != "integrity"})
    with torch.no_grad():
        assert_close(apply_fragment(model, old)(x), apply_fragment(model, fragment)(x), rtol=0, atol=0)
    # an edited v1 manifest is still caught, by the hash it was written with
    tampered = dict(v1, name="other")
    path.write_text(json.dumps(tampered))
    with pytest.raises(FragmentError, match="modified after it was written"):
        load_fragment(path)


def test_a_v1_feed_forward_record_maps_to_ff() -> None:
    from prompt_fragments.fragment.format.manifest import upgrade_manifest

    v1 = {"schema_version": 1, "compression": {"ff_channels": {"modules": {}}, "quantization": {"applied": False}}}
    up = upgrade_manifest(v1)
    assert sorted(up["compression"]) == ["ff", "precision"] and up["schema_version"] == 2
    with pytest.raises(FragmentError, match="found both for"):
        upgrade_manifest({"schema_version": 1, "compression": {"ff_channels": {}, "ff": {}}})
    assert dataclasses.is_dataclass(BiasNudgeLever)  # the planted class is a plain dataclass, nothing registered here
    assert "bias_nudge" not in levers.names()


def test_a_goal_profiles_only_the_evidence_its_levers_read_and_ladders_as_a_full_profile_does() -> None:
    """Each lever names the ``ProfileEvidence`` measurements it reads; a profile for goal speed skips the feed-forward
    and activation probes (most of the hooks' cost) and still predicts the same speed ladder as a full profile."""
    from prompt_fragments.fragment.levers import goal_evidence
    from prompt_fragments.profiling.session import PROBE_EVIDENCE, profiled, stack_flags
    from prompt_fragments.reference.model import load_reference
    from prompt_fragments.reference.sampling import sample

    fields = {f.name for f in dataclasses.fields(ProfileEvidence)}
    assert all(set(cls.evidence) <= fields for cls in levers.LEVERS)
    assert stack_flags(goal_evidence("speed")) == {"ff": False, "steps": True, "activations": False, "cfg_gap": True,
                                                   "cross_attn": True}
    assert stack_flags(goal_evidence("both")) == stack_flags(None) == dict.fromkeys(PROBE_EVIDENCE, True)
    with pytest.raises(FragmentError, match="expected evidence among"):
        stack_flags({"ff_score"})

    model = load_reference()
    context, uncond = model.encode(["a red circle on a white background"]), model.encode([""])

    def evidence_of(needs: Any) -> ProfileEvidence:
        with profiled(model.unet, needs, buckets=2) as (prof, probes):
            prof.begin_sample("profile")
            with torch.no_grad():
                sample(model.unet, context, uncond, [0, 1], steps=6)
        return ProfileEvidence.from_probes(prof.result(), probes)

    full, speed = evidence_of(None), evidence_of(goal_evidence("speed"))
    assert speed.ff_scores is None and speed.activation_stats is None and full.ff_scores is not None
    ladder = [[c.label for c in candidate_ladder(profile_predictors(e, model.unet, goal="speed"), "speed")]
              for e in (full, speed)]
    assert ladder[0] and ladder[0] == ladder[1]
