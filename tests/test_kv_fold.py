"""Cross-attention K/V folding is exact, matches rows in any order, and refuses what it cannot serve (issue #7)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import comfyui_support as cs
from prompt_fragments.errors import FragmentError, IntegrityError
from prompt_fragments.fragment.surgery.kv_fold import FoldedContexts, FoldedProjection, cross_attention_paths, fold_model_kv
from prompt_fragments.fragment.surgery.heads import prune_heads
from prompt_fragments.fragment.surgery.selection import select_heads
from prompt_fragments.fragment.build import apply_fragment, build_fragment, describe_base
from prompt_fragments.fragment.format.store import load_fragment, save_fragment
from prompt_fragments.profiling.discovery import find_attention
from prompt_fragments.fragment.surgery.kv_fold import KVFoldLever
from prompt_fragments.fragment.surgery.heads import HeadLever


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def _ctx_key(inputs: dict) -> str:
    return "encoder_hidden_states" if "encoder_hidden_states" in inputs else "context"


def _check_fold(unet: nn.Module, make_inputs) -> None:
    inputs = make_inputs(batch=2, seed=3)
    key = _ctx_key(inputs)
    ctx = inputs[key]  # row 0 plays cond, row 1 uncond
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    folded = fold_model_kv(unet, ctx)
    with torch.no_grad():
        full = cs.unet_output(unet(**inputs))
        out = cs.unet_output(folded(**inputs))
        # ComfyUI may batch [uncond, cond, cond]: rows are matched one by one.
        swapped = make_inputs(batch=3, seed=5)
        swapped[key] = ctx[[1, 0, 0]]
        full_swapped = cs.unet_output(unet(**swapped))
        out_swapped = cs.unet_output(folded(**swapped))
    assert _relative_error(full, out) <= 1e-5
    assert _relative_error(full_swapped, out_swapped) <= 1e-5
    paths = cross_attention_paths(unet)
    assert paths and all(isinstance(folded.get_submodule(p).to_k, FoldedProjection) for p in paths)
    assert all(isinstance(unet.get_submodule(p).to_k, nn.Linear) for p in paths)  # the input model is untouched
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sum(p.numel() for p in folded.parameters()) < sum(p.numel() for p in unet.parameters())


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_diffusers_fold_is_exact(kind: str) -> None:
    unet, make_inputs = cs.make_small_diffusers_unet(kind)
    _check_fold(unet, make_inputs)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_comfy_fold_is_exact(comfyui, kind: str) -> None:
    unet, make_inputs = cs.make_small_comfy_unet(kind)
    _check_fold(unet, make_inputs)


def test_unknown_context_is_refused_when_weights_dropped_and_recomputed_when_kept() -> None:
    unet, make_inputs = cs.make_small_diffusers_unet("sd15")
    inputs = make_inputs(batch=2, seed=3)
    other = make_inputs(batch=2, seed=4)  # a different prompt
    dropped = fold_model_kv(unet, inputs["encoder_hidden_states"])
    kept = fold_model_kv(unet, inputs["encoder_hidden_states"], keep_weights=True)
    with torch.no_grad():
        with pytest.raises(FragmentError, match=r"attn2\.to_k: K/V were folded for 2 context row\(s\) of \d+ tokens"):
            dropped(**other)
        fewer_tokens = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"][:, :5])
        with pytest.raises(FragmentError, match="found a context of shape"):
            dropped(**fewer_tokens)
        assert _relative_error(cs.unet_output(unet(**other)), cs.unet_output(kept(**other))) <= 1e-5


def test_lcm_padded_context_matches_repeated_rows() -> None:
    unet, make_inputs = cs.make_small_diffusers_unet("sd15")
    inputs = make_inputs(batch=2, seed=3)
    folded = fold_model_kv(unet, inputs["encoder_hidden_states"])
    padded = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].repeat(1, 2, 1))
    with torch.no_grad():
        assert _relative_error(cs.unet_output(unet(**padded)), cs.unet_output(folded(**padded))) <= 1e-5


def test_in_place_change_of_a_matched_context_is_seen() -> None:
    rows = torch.randn(2, 3, 4)
    contexts = FoldedContexts(rows)
    ctx = rows.clone()
    assert contexts.match(ctx).tolist() == [0, 1]
    ctx[1, 0, 0] += 1.0  # same tensor object, new values: the cache must not answer
    assert contexts.match(ctx) is None


def test_fold_after_head_pruning_stores_only_kept_heads_and_round_trips(tmp_path) -> None:
    unet, make_inputs = cs.make_small_diffusers_unet("sdxl")
    inputs = make_inputs(batch=2, seed=3)
    g = torch.Generator().manual_seed(0)
    selection = select_heads({s.path: torch.rand(s.heads, generator=g) for s in find_attention(unet)}, ratio=0.4, scope="per_layer")
    fragment = build_fragment(unet, [HeadLever(selection), KVFoldLever(inputs["encoder_hidden_states"])],
                              base=describe_base(unet, "toy"), name="fold")
    block = fragment.manifest["compression"]["kv_fold"]
    assert block["rows"] == 2 and block["weights_dropped"] and len(block["row_sha256"]) == 2
    for path, entry in block["modules"].items():
        kept_heads = len(selection.kept[path])
        dim_head = unet.get_submodule(path).to_q.out_features // unet.get_submodule(path).heads
        assert entry["width"] == kept_heads * dim_head
        assert fragment.tensors[f"kv_fold.{path}.k"].shape[-1] == kept_heads * dim_head
    loaded = load_fragment(save_fragment(fragment, tmp_path))
    with torch.no_grad():
        reference = cs.unet_output(prune_heads(unet, selection.kept)(**inputs))
        out = cs.unet_output(apply_fragment(unet, loaded)(**inputs))
    assert _relative_error(reference, out) <= 1e-5


def test_a_folded_table_of_the_wrong_width_is_caught(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    unet, make_inputs = cs.make_small_diffusers_unet("sd15")
    inputs = make_inputs(batch=1, seed=3)
    selection = select_heads({s.path: torch.ones(s.heads) for s in find_attention(unet)}, ratio=0.0)
    path = save_fragment(build_fragment(unet, [HeadLever(selection), KVFoldLever(inputs["encoder_hidden_states"])],
                                        base=describe_base(unet, "toy"), name="fold"), tmp_path)
    tensors_file = tmp_path / "fold.safetensors"
    tensors = load_file(str(tensors_file))
    key = next(k for k in tensors if k.endswith(".k"))
    tensors[key] = tensors[key][..., :-1].contiguous()
    save_file(tensors, str(tensors_file))
    with pytest.raises(IntegrityError):  # the file hash catches it first; the shape check backs it up
        load_fragment(path)
