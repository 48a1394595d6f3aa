"""Issue #29 item 3: ``verify PACK --base UNET.safetensors`` runs the loader's schedule checks on the file.

The checkpoint is the committed reference UNet (the `demo` base) saved to a temporary safetensors file, bare
(diffusers names) or under ``model.diffusion_model.`` (a full checkpoint's layout); the fragment is the one of
``test_loadable`` (pruned heads, low-bit and fp8 layers, a schedule with buckets and step reuse).  Every hostile
case here was "compatible" with the file on a733f40: only the static rules, the base hash and the pruned modules'
``to_q`` rows were checked there.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("diffusers")

import comfyui_support as cs
from test_loadable import _set_schedule, _variant, _write_pack, demo  # noqa: F401  (demo is a fixture)

from prompt_fragments.cli import main
from prompt_fragments.errors import BaseModelMismatchError
from prompt_fragments.fragment.base_facts import BaseFacts
from prompt_fragments.fragment.build import check_loadable, describe_base, fragment_replacements
from prompt_fragments.fragment.library.sharing import check_against_base, check_lever_layers, read_pack
from prompt_fragments.profiling.discovery import block_layout, block_layout_of_keys, find_attention

MID = "mid_block.attentions.0.transformer_blocks.0.attn1"  # unpruned: 4 heads of 32, 128 to_q rows


@pytest.fixture(scope="module", params=["", "model.diffusion_model."], ids=["bare", "checkpoint"])
def unet_file(demo, tmp_path_factory, request) -> Path:  # noqa: F811
    path = tmp_path_factory.mktemp("base") / "unet.safetensors"
    save_file({request.param + k: v.contiguous() for k, v in demo[0].unet.state_dict().items()}, str(path))
    return path


def _pack(demo, tmp_path: Path, edit=None) -> Path:  # noqa: F811
    manifest, _, raw = _variant(demo[1], edit)
    return _write_pack(tmp_path / "case.fragment.safetensors", manifest, raw)


def test_a_good_fragment_is_compatible_with_the_file(demo, unet_file: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    pack = _pack(demo, tmp_path)
    assert main(["verify", str(pack), "--base", str(unet_file)]) == 0
    out = capsys.readouterr().out
    assert "OK compatible with unet.safetensors" in out and "schedule checked against its layout" in out
    assert "not checked" not in out  # the demo base's head rule is derivable: every bucket head was checked


@pytest.mark.parametrize(("field", "edit", "found"), [
    ("step_reuse.skips", lambda d: _set_schedule("step_reuse", "skips", value=30), "found 30"),
    ("step_reuse.shallow", lambda d: _set_schedule("step_reuse", "shallow", value=3), "found 3"),
    ("bucket 1", lambda d: _set_schedule("timestep_heads", "kept", "1",
                                         "down_blocks.0.attentions.0.transformer_blocks.0.attn9", value=[0]),
     "expected an attention module of .*unet.safetensors, found none"),
    ("bucket 1", lambda d: _set_schedule("timestep_heads", "kept", "1", MID, value=[0, 5]),
     r"expected heads below the model's 4 heads in .*unet\.safetensors, found \[5\]"),
    ("bucket 1", lambda d: _set_schedule("timestep_heads", "kept", "1", d[3], value=[0, 999]), r"found \[999\]"),
], ids=["skips_beyond_layout", "shallow_beyond_layout", "bucket_on_missing_module", "bucket_head_5_of_4",
        "bucket_head_999"])
def test_verify_with_a_file_refuses_what_the_loader_refuses(demo, unet_file: Path, tmp_path: Path,  # noqa: F811
                                                            field: str, edit, found: str, capsys) -> None:
    pack = _pack(demo, tmp_path, edit(demo))
    fragment = read_pack(pack).fragment  # statically fine: the misfit is with this model
    with pytest.raises(BaseModelMismatchError, match=rf"schedule.*{field}.*{found}") as exc:
        check_against_base(fragment, unet_file)
    assert str(unet_file) in str(exc.value)
    with pytest.raises(BaseModelMismatchError, match="schedule"):
        fragment_replacements(demo[0].unet, fragment)  # the loader, on the same weights loaded
    assert main(["verify", str(pack), "--base", str(unet_file)]) == 2


def test_the_reuse_bounds_are_the_loaders_exactly(demo, unet_file: Path, tmp_path: Path) -> None:  # noqa: F811
    # The deepest depth and one past it: the file's verdict is the loaded model's, for skips and shallow alike.
    layout = block_layout(demo[0].unet)
    for key, deepest in (("skips", layout.max_skips), ("shallow", min(len(layout.down), len(layout.up)) - 1)):
        for depth in (deepest, deepest + 1):
            def edit(m: dict, key=key, depth=depth) -> None:
                m["schedule"]["step_reuse"].pop("skips", None)
                m["schedule"]["step_reuse"][key] = depth
            fragment = read_pack(_pack(demo, tmp_path, edit)).fragment
            loads = _fits(lambda: fragment_replacements(demo[0].unet, fragment))
            assert _fits(lambda: check_against_base(fragment, unet_file)) == loads == (depth <= deepest), (key, depth)


def _fits(call) -> bool:
    try:
        call()
    except BaseModelMismatchError:
        return False
    return True


def test_where_heads_cannot_be_derived_verify_says_so_and_bounds_by_rows(demo, unet_file: Path,  # noqa: F811
                                                                          tmp_path: Path, capsys) -> None:
    # Without the base's recorded head total, "4 heads everywhere" and "width 8 everywhere" both fit the pruned
    # module (4 heads of width 8) and the demo base's modules: the file cannot tell MID's heads, so head 5 passes with a note and 999 > 128 rows is refused.
    def no_total(m: dict) -> None:
        m["base_model"].pop("attention_heads")
        _set_schedule("timestep_heads", "kept", "1", MID, value=[0, 5])(m)

    pack = _pack(demo, tmp_path, no_total)
    assert main(["verify", str(pack), "--base", str(unet_file)]) == 0
    out = capsys.readouterr().out
    assert "not checked: heads of 2 bucket module(s)" in out and "not derivable" in out
    pack = _pack(demo, tmp_path, lambda m: (no_total(m), _set_schedule("timestep_heads", "kept", "1", MID,
                                                                        value=[999])(m)))
    with pytest.raises(BaseModelMismatchError, match=r"below the model's 128 to_q rows .*found \[999\]"):
        check_against_base(read_pack(pack).fragment, unet_file)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_file_facts_equal_the_loaded_models_on_diffusers_unets(kind: str) -> None:
    unet, _ = cs.make_small_diffusers_unet(kind)
    _same_facts(unet, {k: list(v.shape) for k, v in unet.state_dict().items()})


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_file_facts_equal_the_loaded_models_on_comfy_unets(comfyui, kind: str) -> None:
    unet, _ = cs.make_small_comfy_unet(kind)
    _same_facts(unet, {f"model.diffusion_model.{k}": list(v.shape) for k, v in unet.state_dict().items()})


def _same_facts(unet: torch.nn.Module, shapes: dict[str, list[int]]) -> None:
    loaded = BaseFacts.of_module(unet)
    keys = {k.removeprefix("model.diffusion_model."): s for k, s in shapes.items()}
    assert block_layout_of_keys(keys) == block_layout(unet) == loaded.layout
    assert loaded.layout.max_skips >= 1
    site = find_attention(unet)[-1]  # one pruned module, as a fragment would record it
    manifest = {"base_model": describe_base(unet, "x"),
                "pruning": {"modules": {site.path: {"heads": site.heads, "dim_head": site.dim_head}}}}
    facts = BaseFacts.of_checkpoint(shapes, "x.safetensors", manifest)
    assert facts.layout == loaded.layout and facts.rows == loaded.rows and facts.heads == loaded.heads
    assert not facts.notes


def test_sd_conventions_name_the_head_rule_when_the_records_leave_two_open() -> None:
    # Two modules of 320 and 640 rows, one pruned as 8 heads of 40, no recorded total: "8 heads" and "width 40"
    # both fit.  A 768-wide context is SD 1.x (8 heads everywhere); a 2048-wide one SDXL (width 64) does not fit
    # the pruned entry, so that file's other heads stay unknown.
    def shapes(context: int) -> dict[str, list[int]]:
        out = {}
        for path, rows in (("a.attn2", 320), ("b.attn2", 640)):
            out |= {f"{path}.to_q.weight": [rows, rows], f"{path}.to_k.weight": [rows, context],
                    f"{path}.to_v.weight": [rows, context], f"{path}.to_out.0.weight": [rows, rows]}
        return out

    manifest = {"pruning": {"modules": {"a.attn2": {"heads": 8, "dim_head": 40}}}}
    assert BaseFacts.of_checkpoint(shapes(768), "sd15", manifest).heads == {"a.attn2": 8, "b.attn2": 8}
    facts = BaseFacts.of_checkpoint(shapes(2048), "sdxl", manifest)
    assert facts.heads == {"a.attn2": 8, "b.attn2": None} and "not derivable" in facts.notes[0]


def test_a_lever_layer_the_checkpoint_lacks_is_a_base_mismatch() -> None:
    manifest = {"compression": {"low_bit": {"layers": {"a.to_k": {}}}, "precision": {"layers": {"a.to_v": {}}}}}
    check_lever_layers(manifest, {"a.to_k.weight", "a.to_v.weight"}, "u.safetensors")
    with pytest.raises(BaseModelMismatchError, match=r"u\.safetensors: compression\.precision\.layers: a\.to_v"):
        check_lever_layers(manifest, {"a.to_k.weight"}, "u.safetensors")


def test_check_loadable_takes_facts_or_a_module_and_decides_the_same(demo) -> None:  # noqa: F811
    model, frag, *_ = demo
    manifest, tensors, _ = _variant(frag, _set_schedule("step_reuse", "skips", value=30))
    for base in (model.unet, BaseFacts.of_module(model.unet)):
        with pytest.raises(BaseModelMismatchError, match=r"x: schedule\.step_reuse\.skips: .*found 30"):
            check_loadable(manifest, tensors, "x", base=base)
    assert check_loadable(*_variant(frag)[:2], "x", base=BaseFacts.of_module(model.unet)).reuse_steps == (2, 4)
