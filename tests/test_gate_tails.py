"""The quality gate's tails and its counted adherence rule (issue #26 item 5).

- Every image judge reports per-image tails beside the means (``ssim_p10``, ``lpips_p90``, ``lpips_max``,
  ``ssim_below_limit``); a tail limit (``lpips_p90_max``) is gated where written and dropped where LPIPS is not
  measured.
- Adherence on 8 images is 48 attributes: one wrong attribute (2.08 points) must not fail a 2-point limit, a
  clear drop must, and the room above the limit shrinks as the sample grows.
"""
from __future__ import annotations

import numpy as np
import pytest

from prompt_fragments.defaults import DEFAULT_PROMPT
from prompt_fragments.errors import FragmentError
from prompt_fragments.judge.gate import (adherence_allowance, gate_failures, gate_slack, image_tails,
                                         measurable_limits)
from prompt_fragments.judge.thresholds import validate_thresholds
from prompt_fragments.reference.measure import adherence, compare, fidelity, scene_from_prompt
from prompt_fragments.reference.shapes import Scene, render

GATE = {"variants": 16, "adherence_drop_max": 0.02, "ssim_min": 0.90, "lpips_max": 0.035}


def _drop(wrong: int, attributes: int) -> dict:
    # the drop as the judge computes it: a difference of two float shares, not k / n
    return {"adherence_delta": 1.0 - (attributes - wrong) / attributes, "adherence_attributes": attributes}


def _scene_images(wrong_images: int) -> tuple[np.ndarray, np.ndarray]:
    """8 renders of the default prompt's scene, and the same with ``wrong_images`` of them given a wrong colour."""
    scene = scene_from_prompt(DEFAULT_PROMPT)
    full = np.stack([render(scene)] * 8)
    first = scene.objects[0]
    other = "green" if first.colour != "green" else "yellow"
    bad = render(Scene(scene.background, (type(first)(first.shape, other, first.position), *scene.objects[1:])))
    frag = full.copy()
    frag[:wrong_images] = bad
    return full, frag


def test_one_wrong_attribute_of_48_passes_the_adherence_limit() -> None:
    full, frag = _scene_images(1)
    measured = compare(full, frag, DEFAULT_PROMPT, None, adherence(full, DEFAULT_PROMPT), GATE["ssim_min"])
    assert measured["adherence_attributes"] == 48
    assert measured["adherence_delta"] == pytest.approx(1 / 48)
    limits = measurable_limits(GATE, ["lpips_mean", "latent_rel_error"])
    assert not [f for f in gate_failures(measured, limits) if f.startswith("adherence")]
    # the bare comparison (no count) is what rejected stronger candidates: the count is what changes the verdict
    bare = {k: v for k, v in measured.items() if k != "adherence_attributes"}
    assert any(f.startswith("adherence_delta") for f in gate_failures(bare, limits))
    assert gate_slack({"adherence_delta": measured["adherence_delta"], "adherence_attributes": 48},
                      {"adherence_drop_max": 0.02}) == pytest.approx(0.0, abs=1e-4)


def test_a_clear_adherence_drop_fails() -> None:
    full, frag = _scene_images(3)  # 3 of 8 images lose their first object's colour: 3 of 48 attributes
    measured = compare(full, frag, DEFAULT_PROMPT, None, adherence(full, DEFAULT_PROMPT), GATE["ssim_min"])
    assert measured["adherence_delta"] == pytest.approx(3 / 48)
    failures = gate_failures(measured, {"adherence_drop_max": 0.02})
    assert failures and failures[0].startswith("adherence_delta 0.0625 >")
    assert gate_failures(_drop(2, 48), {"adherence_drop_max": 0.02})  # two of 48 (4.17 points) is a drop too
    assert gate_slack(_drop(2, 48), {"adherence_drop_max": 0.02}) < 0


@pytest.mark.parametrize("attributes", [6, 12, 24, 48, 49, 50, 51, 96, 384, 4800])
def test_adherence_allowance_is_under_one_attribute_above_the_limit(attributes: int) -> None:
    allowed = adherence_allowance(0.02, attributes)
    assert 0.02 <= allowed < 0.02 + 1 / attributes
    k = round(allowed * attributes)
    assert not gate_failures(_drop(k, attributes), {"adherence_drop_max": 0.02})
    assert gate_failures(_drop(k + 1, attributes), {"adherence_drop_max": 0.02})


def test_adherence_rule_tightens_as_the_sample_grows() -> None:
    limits = {"adherence_drop_max": 0.02}
    # the same 4.17-point drop: one attribute of 24 cannot be told from the limit, two of 48 can
    assert not gate_failures(_drop(1, 24), limits)
    assert gate_failures(_drop(2, 48), limits)
    # the same 2.08-point drop: one of 48 passes, 100 of 4800 does not
    assert not gate_failures(_drop(1, 48), limits)
    assert gate_failures(_drop(100, 4800), limits)
    room = [adherence_allowance(0.02, n) - 0.02 for n in (24, 48, 96, 480, 4800)]
    assert room == sorted(room, reverse=True) and room[-1] == 0.0
    # a limit of 0 stays 0 however many attributes were judged
    assert gate_failures(_drop(1, 48), {"adherence_drop_max": 0.0})


def test_image_tails_report_the_worst_images() -> None:
    rng = np.random.default_rng(3)
    s, d = list(rng.uniform(0.8, 1.0, 64)), list(rng.uniform(0.0, 0.1, 64))
    tails = image_tails(s, d, 0.9)
    assert tails["ssim_p10"] == pytest.approx(np.percentile(s, 10), abs=1e-6)
    assert tails["lpips_p90"] == pytest.approx(np.percentile(d, 90), abs=1e-6)
    assert tails["lpips_max"] == max(d)
    assert tails["ssim_below_limit"] == sum(v < 0.9 for v in s) > 0


def test_fidelity_reports_tails_beside_the_means() -> None:
    full, _ = _scene_images(0)
    frag = full.copy()
    frag[:2] = 255 - frag[:2]  # two images inverted: structure gone, far below the SSIM limit
    distances = [0.5, 0.3] + [0.0] * 6

    def fake_lpips(a, b):  # a scorer's per-image list, as lpips_distance returns it
        assert len(a) == len(b) == 8
        return distances

    fid = fidelity(full, frag, fake_lpips, 0.9)
    assert fid["lpips_mean"] == pytest.approx(0.1)
    assert fid["lpips_max"] == 0.5
    assert fid["lpips_p90"] == pytest.approx(np.percentile(distances, 90))
    assert fid["ssim_below_limit"] == 2
    assert fid["ssim_p10"] < min(0.9, fid["ssim_mean"])


def test_tail_limit_is_gated_where_written_and_only_where_measured() -> None:
    limits = {**GATE, "lpips_p90_max": 0.07}
    measured = {"adherence_delta": 0.0, "ssim_mean": 0.95, "lpips_mean": 0.02, "lpips_p90": 0.09}
    assert gate_failures(measured, limits) == ["lpips_p90 0.09 > 0.07"]
    assert gate_failures({**measured, "lpips_p90": None}, limits) == ["lpips_p90 missing"]
    # the ComfyUI latent judge measures neither SSIM nor LPIPS: the tail limit goes with the mean's
    latent = measurable_limits(limits, ["adherence_delta", "ssim_mean", "lpips_mean"])
    assert "lpips_p90_max" not in latent and "lpips_max" not in latent
    assert "lpips_p90_max" in measurable_limits(limits, ["adherence_delta", "latent_rel_error"])
    # the shipped gate holds no tail limit: the means decide, the tails are reported
    assert "lpips_p90_max" not in GATE


def test_tail_limit_below_the_mean_limit_is_refused() -> None:
    with pytest.raises(FragmentError, match=r"t.yaml: quality_gate.lpips_p90_max: expected a number >= lpips_max"):
        validate_thresholds({"quality_gate": {"lpips_max": 0.035, "lpips_p90_max": 0.02}}, "t.yaml")
    assert validate_thresholds({"quality_gate": {"lpips_max": 0.035, "lpips_p90_max": 0.07}})["quality_gate"][
        "lpips_p90_max"] == 0.07
