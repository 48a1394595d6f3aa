"""Tests for profiling.anatomy: parameter split of SD1.5 / SDXL UNets on the meta device."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")

from prompt_fragments.errors import FragmentError  # noqa: E402
from prompt_fragments.profiling.anatomy import CATEGORIES, compute_anatomy, format_anatomy_table

# Measured percent of UNet parameters (see profiling/anatomy.py docstring).
EXPECTED = {
    "sd15": {
        "total": 860e6,
        "percent": {"attn1_qkvo": 5.8, "attn2_q": 1.4, "attn2_kv": 2.2, "attn2_out": 1.4, "feed_forward": 17.3},
    },
    "sdxl": {
        "total": 2567e6,
        "percent": {"attn1_qkvo": 16.0, "attn2_q": 4.0, "attn2_kv": 13.3, "attn2_out": 4.0, "feed_forward": 47.9},
    },
}


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    return {arch: compute_anatomy(arch) for arch in EXPECTED}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_percentages_match_measured_table(results: dict[str, dict], arch: str) -> None:
    cats = results[arch]["categories"]
    for name, pct in EXPECTED[arch]["percent"].items():
        got = 100.0 * cats[name]["fraction"]
        assert abs(got - pct) <= 0.2, f"{arch} {name}: {got:.2f}% vs {pct}%"


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_total_params(results: dict[str, dict], arch: str) -> None:
    total = results[arch]["total_params"]
    assert abs(total - EXPECTED[arch]["total"]) <= 5e6, total


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_categories_partition_the_model(results: dict[str, dict], arch: str) -> None:
    r = results[arch]
    assert r["arch"] == arch
    assert set(r["categories"]) == set(CATEGORIES)
    assert sum(c["fraction"] for c in r["categories"].values()) == pytest.approx(1.0)
    assert sum(c["params"] for c in r["categories"].values()) == r["total_params"]
    assert r["attention_modules"]["self"] == r["attention_modules"]["cross"] > 0


def test_attention_counts(results: dict[str, dict]) -> None:
    # SD1.5: 16 transformer blocks, 8 heads each; SDXL: 70 blocks, 1300 heads.
    assert results["sd15"]["attention_modules"] == {"self": 16, "cross": 16}
    assert results["sd15"]["heads"] == {"self": 128, "cross": 128}
    assert results["sdxl"]["attention_modules"] == {"self": 70, "cross": 70}
    assert results["sdxl"]["heads"] == {"self": 1300, "cross": 1300}


def test_bad_arch_raises() -> None:
    with pytest.raises(FragmentError, match="sd15.*sdxl"):
        compute_anatomy("sd3")


def test_format_table(results: dict[str, dict]) -> None:
    table = format_anatomy_table(results["sdxl"])
    assert "sdxl" in table
    for name in CATEGORIES:
        assert name in table
    assert "47.89%" in table


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    from prompt_fragments.cli import main

    assert main(["anatomy", "--arch", "sdxl", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["arch"] == "sdxl"
    assert abs(data["categories"]["feed_forward"]["percent"] - 47.9) <= 0.2


def test_missing_diffusers_raises_fragment_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` fail
    with pytest.raises(FragmentError, match=r"\[demo\]"):
        compute_anatomy("sd15")
