"""Feed-forward channel pruning: profiled, selected, and the physical cut equals the mask (issue #7)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import comfyui_support as cs
from prompt_fragments.errors import IntegrityError, PruningError
from prompt_fragments.fragment.format.manifest import seal
from prompt_fragments.fragment.surgery.feed_forward import mask_ff_channels, prune_ff_channels, select_ff_channels
from prompt_fragments.fragment.surgery.selection import select_heads
from prompt_fragments.fragment.build import apply_fragment, build_fragment, describe_base
from prompt_fragments.fragment.format.store import load_fragment, save_fragment
from prompt_fragments.profiling.discovery import find_attention
from prompt_fragments.profiling.ff_profiler import FFProfiler, find_feed_forward, weight_norm_scores
from prompt_fragments.fragment.surgery.feed_forward import FeedForwardLever
from prompt_fragments.fragment.surgery.heads import HeadLever


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def _check_exact(unet: nn.Module, make_inputs) -> None:
    inputs = make_inputs(batch=2, seed=3)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with torch.no_grad():
        with FFProfiler(unet) as prof:
            full = cs.unet_output(unet(**inputs))
        scores = prof.scores()
        plan = select_ff_channels(scores, ratio=0.4).kept
        with mask_ff_channels(unet, plan):
            masked = cs.unet_output(unet(**inputs))
        cut_model = prune_ff_channels(unet, plan)
        cut = cs.unet_output(cut_model(**inputs))
        again = cs.unet_output(unet(**inputs))
    sites = {s.path: s for s in find_feed_forward(unet)}
    assert set(scores) == set(sites) and all(s.gated for s in sites.values())  # GEGLU in both UNets
    assert _relative_error(masked, cut) <= 1e-5
    assert _relative_error(full, masked) > 1e-3, "the plan must change the output, or the test proves nothing"
    assert torch.equal(full, again)
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for path, kept in plan.items():
        site, new = sites[path], cut_model.get_submodule(path)
        assert new.get_submodule(site.in_proj).out_features == 2 * len(kept)
        assert new.get_submodule(site.out_proj).in_features == len(kept)
        assert type(new.get_submodule(site.out_proj)) is type(unet.get_submodule(path).get_submodule(site.out_proj))


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_diffusers_ff_cut_equals_mask(kind: str) -> None:
    unet, make_inputs = cs.make_small_diffusers_unet(kind)
    _check_exact(unet, make_inputs)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_comfy_ff_cut_equals_mask(comfyui, kind: str) -> None:
    unet, make_inputs = cs.make_small_comfy_unet(kind)
    _check_exact(unet, make_inputs)


def test_profiler_scores_follow_activation_energy_and_hooks_are_removed() -> None:
    ff = nn.Module()
    ff.net = nn.Sequential(nn.Sequential(nn.Linear(2, 3), nn.GELU()), nn.Dropout(0.0), nn.Linear(3, 2))
    model = nn.ModuleDict({"ff": ff})
    with torch.no_grad():
        ff.net[0][0].weight.copy_(torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0]]))  # our own toy module
        ff.net[0][0].bias.zero_()
        ff.net[2].weight.fill_(1.0)
    with FFProfiler(model) as prof:
        ff.net(torch.tensor([[1.0, 0.0]]))
    assert not ff.net[2]._forward_pre_hooks
    scores = prof.scores()["ff"]
    assert scores[1] > scores[0] > scores[2] == 0.0
    assert select_ff_channels({"ff": scores}, ratio=1 / 3).kept == {"ff": [0, 1]}


def test_unknown_block_in_plan_is_refused() -> None:
    unet, _ = cs.make_small_diffusers_unet("sd15")
    with pytest.raises(PruningError, match="not a feed-forward block"):
        prune_ff_channels(unet, {"conv_in": [0]})


def test_fragment_records_kept_channels_and_round_trips(tmp_path) -> None:
    unet, make_inputs = cs.make_small_diffusers_unet("sdxl")
    inputs = make_inputs(batch=2, seed=3)
    ff = select_ff_channels(weight_norm_scores(unet), ratio=0.3)
    heads = select_heads({s.path: torch.ones(s.heads) for s in find_attention(unet)}, ratio=0.0)
    fragment = build_fragment(unet, [HeadLever(heads), FeedForwardLever(ff, {"method": "weight_norm"})],
                              base=describe_base(unet, "toy"), name="ff")
    block = fragment.manifest["compression"]["ff"]
    assert block["channels_removed"] == ff.removed_heads > 0
    assert {p: e["kept"] for p, e in block["modules"].items()} == ff.pruned_only()
    manifest_path = save_fragment(fragment, tmp_path)
    loaded = load_fragment(manifest_path)
    with torch.no_grad():
        with mask_ff_channels(unet, ff.kept):
            masked = cs.unet_output(unet(**inputs))
        out = cs.unet_output(apply_fragment(unet, loaded)(**inputs))
    assert _relative_error(masked, out) <= 1e-5
    # A manifest whose kept list disagrees with the stored indices is refused.
    data = json.loads(manifest_path.read_text())
    first = next(iter(data["compression"]["ff"]["modules"].values()))
    first["kept"] = first["kept"][1:]
    manifest_path.write_text(json.dumps(seal({k: v for k, v in data.items() if k != "integrity"})))
    with pytest.raises(IntegrityError, match="feed-forward channels"):
        load_fragment(manifest_path)
