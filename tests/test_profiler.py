"""Profiling hooks: known-answer energies, entropy, buckets, samples, clean removal, saved dataset."""
from __future__ import annotations


import pytest
import torch
from diffusers.models.attention_processor import Attention
from torch.testing import assert_close

import comfyui_support as cs
from prompt_fragments.profiling.dataset import load_profile, save_profile
from prompt_fragments.profiling.profiler import HeadProfiler, measure_overhead, timestep_bucket


class Wrapper(torch.nn.Module):
    """A root module with a timestep argument, like a UNet, around one attention module."""

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor, timestep: float, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.attn(x, encoder_hidden_states=context)


def _attention(heads: int = 4, dim_head: int = 3, query_dim: int = 10, cross: int | None = None) -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim, cross_attention_dim=cross, heads=heads, dim_head=dim_head, out_bias=True).eval()


def _hooks_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_energy_matches_brute_force_projection() -> None:
    attn = _attention()
    model = Wrapper(attn)
    x = torch.randn(2, 5, 10)
    captured = {}
    attn.to_out[0].register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0].detach()))
    with HeadProfiler(model, buckets=1, entropy_tokens=0) as prof:
        with torch.no_grad():
            model(x, 10.0)
    stats = prof.result().module("attn")
    heads_out = captured["x"].reshape(2, 5, 4, 3)
    w = attn.to_out[0].weight  # [out, heads*dim_head]
    expected = torch.stack(
        [(heads_out[..., h, :] @ w[:, h * 3 : (h + 1) * 3].T).pow(2).sum(-1).flatten() for h in range(4)], dim=-1
    )  # [tokens, heads]
    assert_close(stats.energy(), expected.mean(0), rtol=1e-5, atol=1e-6)
    assert_close(stats.variance(), expected.var(0, unbiased=False), rtol=1e-4, atol=1e-6)
    assert stats.tokens.sum().item() == 10


def test_zeroed_head_has_zero_energy_and_uniform_attention_has_entropy_one() -> None:
    attn = _attention(heads=3, dim_head=2, query_dim=6)
    with torch.no_grad():
        attn.to_out[0].weight[:, 2:4] = 0.0  # head 1 writes nothing
        attn.to_q.weight.zero_()  # q = 0: every key equally likely
    model = Wrapper(attn)
    with HeadProfiler(model, buckets=1, entropy_tokens=4) as prof, torch.no_grad():
        model(torch.randn(1, 8, 6), 0.0)
    stats = prof.result().module("attn")
    assert stats.energy()[1].item() == 0.0
    assert stats.energy()[0].item() > 0.0
    assert_close(stats.entropy(), torch.ones(3))


def test_peaked_attention_has_low_entropy_and_entropy_is_normalised() -> None:
    attn = _attention(heads=2, dim_head=4, query_dim=8)
    with torch.no_grad():
        attn.to_q.weight.copy_(torch.eye(8) * 50)
        attn.to_k.weight.copy_(torch.eye(8) * 50)
    model = Wrapper(attn)
    # 4 tokens, each one-hot inside both heads' 4 channels: every query matches exactly one key per head
    x = torch.cat([torch.eye(4), torch.eye(4)], dim=1)[None]
    with HeadProfiler(model, buckets=1) as prof, torch.no_grad():
        model(x, 0.0)
    ent = prof.result().module("attn").entropy()
    assert bool((ent >= 0).all() and (ent <= 1).all())
    assert ent.max().item() < 0.1


def test_buckets_samples_and_hook_removal() -> None:
    unet, make_inputs = cs.make_small_diffusers_unet("sd15")
    before = _hooks_count(unet)
    with HeadProfiler(unet, buckets=4) as prof, torch.no_grad():
        for seed in (11, 22):
            prof.begin_sample(seed)
            for t in (950.0, 600.0, 100.0):
                inputs = make_inputs(batch=1, seed=seed)
                inputs["timestep"] = torch.tensor([t])
                unet(**inputs)
        assert _hooks_count(unet) > before
    assert _hooks_count(unet) == before
    data = prof.result()
    assert data.samples == [11, 22]
    assert data.calls_per_bucket == [2, 0, 2, 2]
    stats = next(iter(data.modules.values()))
    assert stats.tokens[1].item() == 0 and stats.tokens[0].item() > 0
    assert stats.per_sample_energy().shape == (2, stats.site.heads)


def test_hooks_are_removed_when_the_forward_raises() -> None:
    attn = _attention()
    model = Wrapper(attn)
    before = _hooks_count(model)
    with pytest.raises(RuntimeError):
        with HeadProfiler(model, buckets=1):
            model(torch.randn(1, 3, 7), 0.0)  # wrong width: raises inside the hooked forward
    assert _hooks_count(model) == before


def test_timestep_bucket_edges() -> None:
    assert [timestep_bucket(t, 4) for t in (0, 249.9, 250, 999, 1500, -3)] == [0, 0, 1, 3, 3, 0]


def test_profile_dataset_round_trip(tmp_path) -> None:
    unet, make_inputs = cs.make_small_diffusers_unet("sdxl")
    with HeadProfiler(unet, buckets=2, info={"prompt": "a dog"}) as prof, torch.no_grad():
        prof.begin_sample(7)
        unet(**make_inputs())
    data = prof.result()
    _, json_path = save_profile(data, tmp_path / "profile")
    again = load_profile(json_path)
    assert again.samples == [7] and again.info["prompt"] == "a dog"
    for path, stats in data.modules.items():
        assert_close(again.module(path).energy(), stats.energy())
        assert_close(again.module(path).entropy(), stats.entropy())
        assert again.module(path).site == stats.site


def test_comfy_unet_profiles_with_timesteps_keyword(comfyui) -> None:
    unet, make_inputs = cs.make_small_comfy_unet("sd15")
    with HeadProfiler(unet, buckets=2) as prof, torch.no_grad():
        inputs = make_inputs(batch=1)
        inputs["timesteps"] = torch.tensor([900.0])
        unet(**inputs)
    data = prof.result()
    assert data.calls_per_bucket == [0, 1]
    assert all(s.energy(1).gt(0).all() for s in data.modules.values())


def test_measure_overhead_reports_both_timings() -> None:
    unet, make_inputs = cs.make_small_diffusers_unet("sd15")
    inputs = make_inputs()
    result = measure_overhead(unet, lambda: unet(**inputs), repeats=2)
    assert set(result) == {"base_s", "profiled_s", "overhead_pct"}
    assert result["base_s"] > 0 and result["profiled_s"] > 0
    assert _hooks_count(unet) == 0
