"""The main job runs end to end on the embedded default (the reference model) and writes what it promises."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from prompt_fragments.cli import main
from prompt_fragments.fragment.format.store import load_fragment


def test_demo_cli_writes_fragment_grid_metrics_and_summary(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--seeds", "2", "--variants", "4", "--steps", "5", "--paraphrases", "2",
                 "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    fragment = load_fragment(summary["fragment_manifest"])
    assert fragment.manifest["profiling"]["seeds"] == [0, 1]
    assert fragment.manifest["base_model"]["name"] == "prompt-fragments-reference-v1"
    assert summary["pruning"]["heads_removed"] == fragment.manifest["pruning"]["heads_removed"] > 0
    assert summary["exactness_masked_vs_physical_rel_err"] <= 1e-5
    assert summary["params"]["fragment"] < summary["params"]["full"]
    metrics = json.loads((out / "metrics_summary.json").read_text())
    assert sorted(metrics["hypotheses"]) == ["H1", "H2", "H3", "H4", "H5"]
    assert metrics["metrics"]["batch_variants"] == 4 and 0.0 <= metrics["metrics"]["adherence_full"] <= 1.0
    assert [p["ratio"] for p in metrics["h1_curve"]] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    assert metrics["reuse"]["paraphrases"] == 2 and metrics["reuse"]["stand_in"] is False
    grid = Image.open(out / "grid.png")
    assert grid.size[0] > 2 * grid.size[1]  # two panels side by side, one row of 4 each
    assert fragment.manifest["quality"]["adherence_full"] == metrics["metrics"]["adherence_full"]
    printed = capsys.readouterr().out
    assert "heads removed" in printed and "adherence full / fragment" in printed and "H1" in printed


def test_demo_accepts_a_prompt_outside_the_grammar(tmp_path: Path) -> None:
    assert main(["demo", "--out", str(tmp_path), "--prompt", "A dog on a jet ski", "--seeds", "1", "--variants", "2",
                 "--steps", "2", "--no-curve", "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "metrics_summary.json").read_text())
    # nothing to check adherence against, and no paraphrases to make: missing, said, not invented
    assert metrics["metrics"]["adherence_delta"] is None and metrics["metrics"]["reuse_pass_rate"] is None
    assert any("H3 not measured" in n for n in metrics["notes"])
