"""Quality gate with refinement: bisection on the pruning ratio, on a small diffusers UNet."""
from __future__ import annotations

import pytest
import torch

from prompt_fragments.errors import FragmentError
from prompt_fragments.fragment.format.measurements import record_measurements, update_fragment_file
from prompt_fragments.fragment.refine import refine_ratio, refinement_record
from prompt_fragments.fragment.build import apply_fragment, build_fragment, describe_base
from prompt_fragments.fragment.format.store import load_fragment, save_fragment
from prompt_fragments.fragment.surgery.heads import HeadLever

import comfyui_support as cs


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


@pytest.fixture(scope="module")
def unet_case():
    unet, make_inputs = cs.make_small_diffusers_unet("sd15")
    inputs = make_inputs(batch=1, seed=1)
    with torch.no_grad():
        reference = cs.unet_output(unet(**inputs))
    # Fixed pseudo-scores: the same heads go first at every ratio, so more pruning only adds removals.
    from prompt_fragments.profiling.discovery import iter_attention

    g = torch.Generator().manual_seed(0)
    scores = {p: torch.rand(int(m.heads), generator=g) for p, m in iter_attention(unet)}
    return unet, inputs, reference, scores


def test_refinement_bisects_to_a_passing_fragment(unet_case, tmp_path) -> None:
    unet, inputs, reference, scores = unet_case
    base = describe_base(unet, "small-sd15")
    built: dict[float, object] = {}

    def evaluate(ratio: float) -> dict:
        frag = build_fragment(unet, [HeadLever.plan(scores, ratio=ratio)], base=base, name="refine")
        with torch.no_grad():
            out = cs.unet_output(apply_fragment(unet, frag)(**inputs))
        built[ratio] = frag
        return {"ratio": ratio, "drift": _rel(reference, out)}

    drifts = {r: evaluate(r)["drift"] for r in (0.25, 0.5, 0.75)}
    assert drifts[0.25] < drifts[0.5] < drifts[0.75]  # the premise of bisection on this model
    limit = (drifts[0.25] + drifts[0.5]) / 2  # passes at 0.25, fails at 0.5 and above
    gate = lambda m: (m["drift"] <= limit, [] if m["drift"] <= limit else [f"drift {m['drift']:.3g} > {limit:.3g}"])
    result = refine_ratio(evaluate, gate, start=0.75, tolerance=0.05, max_tries=8)
    assert result["status"] == "refined"
    assert [t["ratio"] for t in result["tries"]][:3] == [0.75, 0.375, 0.1875]
    assert 0.25 <= result["ratio"] < 0.5 and result["accepted"]["drift"] <= limit
    assert all(t["passed"] == (t["metrics"]["drift"] <= limit) for t in result["tries"])
    # Every try goes into the manifest's quality block, and the manifest is re-sealed and loads again.
    frag = built[result["ratio"]]
    path = save_fragment(frag, tmp_path)
    saved = update_fragment_file(path, quality={"refinement": refinement_record(result, {"drift_max": limit})}, verified=True)
    reloaded = load_fragment(saved).manifest["quality"]
    assert reloaded["verified"] is True and len(reloaded["refinement"]["tries"]) == len(result["tries"])
    assert reloaded["refinement"]["final_ratio"] == result["ratio"]


def test_refinement_falls_back_to_full_model() -> None:
    result = refine_ratio(lambda r: {"r": r}, lambda m: (False, ["always fails"]), start=0.4, tolerance=0.1)
    assert result["status"] == "fallback_full_model" and result["ratio"] == 0.0 and result["accepted"] is None
    assert [t["ratio"] for t in result["tries"]] == [0.4, 0.2, 0.1]
    assert refinement_record(result, {})["fallback_full_model"] is True
    with pytest.raises(FragmentError, match="start"):
        refine_ratio(lambda r: {}, lambda m: (True, []), start=1.5)


def test_record_measurements_refuses_nan() -> None:
    from prompt_fragments.errors import ManifestError
    from prompt_fragments.fragment.format.manifest import new_manifest, seal

    m = seal(new_manifest(name="x", base_model={"sha256": "a", "hash_kind": "file"}, profiling={},
                          pruning={"modules": {}}, compression={}, producer_version="0"))
    with pytest.raises(ManifestError, match="performance.speedup"):
        record_measurements(m, performance={"speedup": float("inf")})
