"""Tier 1: a batch sampled with other settings than the calibration judged is said to be unjudged (issue #27, item 5):
``fragment.compat.sampler_mismatch`` names each setting that differs, and nothing when none does or none is known."""
from __future__ import annotations

import json

import pytest

from prompt_fragments.fragment.compat import SAMPLER_SETTINGS, sampler_mismatch

JUDGED = {"sampler_name": "euler", "scheduler": "normal", "steps": 20, "cfg": 7.0, "denoise": 1.0}


@pytest.mark.parametrize("name, other, shown", [("sampler_name", "dpmpp_2m_sde", "sampler_name euler"),
                                                ("scheduler", "karras", "scheduler normal"),
                                                ("steps", 30, "steps 20"), ("cfg", 5.5, "cfg 7"),
                                                ("denoise", 0.6, "denoise 1")])
def test_each_setting_that_differs_is_named_with_both_values(name: str, other: object, shown: str) -> None:
    found = format(other, "g") if isinstance(other, float) else str(other)
    assert sampler_mismatch(JUDGED, {**JUDGED, name: other}) == f"judged with {shown}; this run has {found}"


def test_the_same_settings_or_none_recorded_say_nothing() -> None:
    assert set(JUDGED) == set(SAMPLER_SETTINGS)
    assert sampler_mismatch(JUDGED, {**JUDGED, "steps": 20.0, "cfg": 7}) is None  # the same numbers, other types
    assert sampler_mismatch(JUDGED, {**JUDGED, "cfg": 7.0000000001}) is None  # cfg to a float's rounding
    assert sampler_mismatch(None, JUDGED) is None  # a fragment made before the settings were recorded
    assert sampler_mismatch({"sampler_name": "euler"}, {**JUDGED, "steps": 4}) is None  # only what both know


def test_several_differences_are_listed_in_order() -> None:
    text = sampler_mismatch(JUDGED, {"sampler_name": "uni_pc", "scheduler": "normal", "steps": 8, "cfg": 7.0,
                                     "denoise": 1.0})
    assert text == "judged with sampler_name euler, steps 20; this run has uni_pc, 8"


def test_a_hostile_value_in_a_shared_manifest_differs_instead_of_raising() -> None:
    text = sampler_mismatch({**JUDGED, "steps": "twenty", "cfg": [7]}, JUDGED)
    assert text == "judged with steps twenty, cfg [7]; this run has 20, 7"
    huge = json.loads('{"steps": 1' + "0" * 400 + ', "cfg": NaN, "denoise": Infinity, "sampler_name": "' + "x" * 500 + '"}')
    text = sampler_mismatch(huge, JUDGED)
    assert text is not None and text.startswith("judged with sampler_name " + "x" * 37 + "..., steps 1000")
    assert "cfg nan" in text and "denoise inf" in text and len(text) < 300
