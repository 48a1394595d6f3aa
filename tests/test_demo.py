"""The main job runs end to end on the embedded default and writes what it promises."""
from __future__ import annotations

import json
from pathlib import Path

from prompt_fragments.cli import main
from prompt_fragments.fragment.store import load_fragment


def test_demo_cli_writes_fragment_and_summary(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--seeds", "2", "--variants", "2", "--steps", "3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    fragment = load_fragment(summary["fragment_manifest"])
    assert fragment.manifest["profiling"]["seeds"] == [0, 1]
    assert summary["pruning"]["heads_removed"] == fragment.manifest["pruning"]["heads_removed"] > 0
    assert summary["exactness_masked_vs_physical_rel_err"] <= 1e-5
    assert summary["params"]["fragment"] < summary["params"]["full"]
    printed = capsys.readouterr().out
    assert "heads removed" in printed and "masked vs physical" in printed
