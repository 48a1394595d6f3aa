"""Profiling hooks: known-answer energies, entropy, buckets, samples, clean removal, saved dataset, cheap = full ranking."""
from __future__ import annotations


import pytest
import torch
from diffusers.models.attention_processor import Attention
from torch.testing import assert_close

import comfyui_support as cs
from prompt_fragments.profiling.dataset import load_profile, save_profile
from prompt_fragments.profiling.ff_profiler import FFProfiler
from prompt_fragments.profiling.profiler import (
    DEFAULT_STEP_STRIDE,
    DEFAULT_TOKEN_SAMPLE,
    FULL_FIDELITY,
    HeadProfiler,
    measure_overhead,
    timestep_bucket,
)
from prompt_fragments.profiling.scoring import rank_stability, score_heads
from prompt_fragments.profiling.session import profiling_stack


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


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().to(torch.float64)
    rb = b.argsort().argsort().to(torch.float64)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@pytest.fixture(scope="module")
def reference_profiles():
    """The reference model profiled twice on the same seeds: full fidelity and the cheap defaults."""
    from prompt_fragments.reference.model import load_reference
    from prompt_fragments.reference.sampling import sample

    model = load_reference()
    context, uncond = model.encode(["a red circle in the top left"]), model.encode([""])
    profiles = {}
    for name, kwargs, ff_kwargs in (("full", FULL_FIDELITY, {"token_sample": None}), ("cheap", {}, {})):
        with HeadProfiler(model.unet, buckets=2, **kwargs) as prof, FFProfiler(model.unet, **ff_kwargs) as ff:
            for seed in range(4):
                prof.begin_sample(seed)
                sample(model.unet, context, uncond, [seed], steps=10)
        profiles[name] = prof.result()
        profiles[name + "_ff"] = ff.scores()
    return profiles


def test_cheap_profile_ranks_heads_like_the_full_one(reference_profiles) -> None:
    from prompt_fragments.fragment.surgery.selection import select_heads

    full, cheap = reference_profiles["full"], reference_profiles["cheap"]
    assert cheap.info["step_stride"] == DEFAULT_STEP_STRIDE and cheap.info["token_sample"] == DEFAULT_TOKEN_SAMPLE
    assert full.calls_per_bucket == cheap.calls_per_bucket  # every call is counted, measured or not
    assert sum(cheap.info["profiled_calls_per_bucket"]) < sum(full.info["profiled_calls_per_bucket"])
    for bucket in (None, 0, 1):  # pooled (score_heads) and per bucket (select_bucket_heads)
        sf, sc = score_heads(full, bucket=bucket), score_heads(cheap, bucket=bucket)
        rho = _spearman(torch.cat(list(sf.values())), torch.cat(list(sc.values())))
        assert rho > 0.97, f"bucket {bucket}: global Spearman {rho:.3f}"
        # what a fragment removes: the 30 % least important heads, chosen from either profile
        removed_full = {(p, h) for p, kept in select_heads(sf, ratio=0.3).kept.items()
                        for h in range(full.module(p).site.heads) if h not in kept}
        removed_cheap = {(p, h) for p, kept in select_heads(sc, ratio=0.3).kept.items()
                         for h in range(cheap.module(p).site.heads) if h not in kept}
        overlap = len(removed_full & removed_cheap) / len(removed_full)
        assert overlap >= 0.85, f"bucket {bucket}: pruned-set overlap {overlap:.2f}"
    # per-sample rankings (rank stability) stay measured for every seed, and close to the full profile's
    stab_full, stab_cheap = rank_stability(full), rank_stability(cheap)
    assert all(entry["samples"] == 4 for entry in stab_cheap.values())
    mean_full = sum(e["spearman"] for e in stab_full.values()) / len(stab_full)
    mean_cheap = sum(e["spearman"] for e in stab_cheap.values()) / len(stab_cheap)
    assert abs(mean_full - mean_cheap) < 0.05, (mean_full, mean_cheap)
    # feed-forward channels: the cheap token sample ranks every block's channels like all tokens do
    for path, full_ff in reference_profiles["full_ff"].items():
        rho = _spearman(full_ff, reference_profiles["cheap_ff"][path])
        assert rho > 0.95, f"{path}: FF channel Spearman {rho:.3f}"


def test_step_stride_turns_with_the_sample_and_measures_every_bucket() -> None:
    unet, make_inputs = cs.make_small_diffusers_unet("sd15")
    with HeadProfiler(unet, buckets=2, step_stride=3) as prof, torch.no_grad():
        for seed in (0, 1, 2):
            prof.begin_sample(seed)
            for t in (900.0, 800.0, 700.0, 600.0, 300.0, 200.0):
                inputs = make_inputs(batch=1, seed=seed)
                inputs["timestep"] = torch.tensor([t])
                unet(**inputs)
    data = prof.result()
    assert data.calls_per_bucket == [6, 12]
    # bucket 1 has 4 steps a sample: measured steps 0,3 / 2 / 1; bucket 0 has 2: steps 0 / - / 1
    assert data.info["profiled_calls_per_bucket"] == [2, 4]
    stats = next(iter(data.modules.values()))
    assert bool((stats.tokens > 0).all())
    assert stats.sample_tokens.tolist()[1] > 0 and stats.sample_tokens.tolist()[2] > 0


def test_token_sample_is_seeded_and_all_tokens_match_full_fidelity() -> None:
    unet, make_inputs = cs.make_small_diffusers_unet("sd15")
    inputs = make_inputs(batch=1, seed=3)

    def profile(**kwargs) -> dict:
        with HeadProfiler(unet, buckets=1, **kwargs) as prof, torch.no_grad():
            unet(**inputs)
        return prof.result().modules

    a, b = profile(token_sample=4, seed=5), profile(token_sample=4, seed=5)
    everything, full = profile(token_sample=10**9), profile(**FULL_FIDELITY)
    for path in a:
        assert_close(a[path].energy(), b[path].energy())
        assert_close(everything[path].energy(), full[path].energy())
        assert_close(everything[path].variance(), full[path].variance(), rtol=1e-4, atol=1e-7)
        assert a[path].tokens.sum() < full[path].tokens.sum() or full[path].tokens.sum() <= 4


def test_measure_overhead_times_the_whole_stack() -> None:
    unet, make_inputs = cs.make_small_diffusers_unet("sd15")
    inputs = make_inputs()
    stack = profiling_stack(unet, buckets=2)
    assert [type(c).__name__ for c in stack] == ["HeadProfiler", "FFProfiler", "StepChangeProbe", "ActivationStats", "CfgGapProbe",
                                                "CrossAttnChangeProbe"]
    result = measure_overhead(unet, lambda: unet(**inputs), repeats=1, contexts=lambda: stack)
    assert result["base_s"] > 0 and result["profiled_s"] > 0
    assert _hooks_count(unet) == 0
    assert stack[0].result().total_calls == 2 and stack[1].calls == 2  # warm-up and one timed run were hooked
    assert stack[3].calls == 1 and stack[3].stats()  # call_stride 3: the first of the two calls is measured


def test_batched_profile_keeps_each_seed_apart_like_one_run_per_seed() -> None:
    """begin_batch: one batched render per CFG layout ([uncond; cond]) gives each seed the energy that one
    render per seed gives it; the bucket statistics are the same tokens, so they agree too."""
    unet, make_inputs = cs.make_small_diffusers_unet("sd15")
    seeds = (3, 4, 5)
    per_seed = {s: make_inputs(batch=2, seed=s) for s in seeds}  # one seed's rows: its uncond and its cond

    def call(inputs: dict, t: float) -> None:
        inputs = dict(inputs, timestep=torch.tensor([t]))
        unet(**inputs)

    def stacked(key: str) -> torch.Tensor:  # [uncond of every seed; cond of every seed]
        rows = [per_seed[s][key] for s in seeds]
        return torch.cat([r[:1] for r in rows] + [r[1:] for r in rows])

    kwargs = dict(buckets=2, token_sample=None, step_stride=1, entropy_tokens=0)
    with HeadProfiler(unet, **kwargs) as alone, torch.no_grad():
        for s in seeds:
            alone.begin_sample(s)
            for t in (900.0, 100.0):
                call(per_seed[s], t)
    batch_inputs = {k: stacked(k) if torch.is_tensor(v) and v.shape[0] == 2 else v for k, v in per_seed[seeds[0]].items()}
    with HeadProfiler(unet, **kwargs) as together, torch.no_grad():
        together.begin_batch(list(seeds))
        for t in (900.0, 100.0):
            call(batch_inputs, t)
    a, b = alone.result(), together.result()
    assert b.samples == list(seeds)
    for path, stats in a.modules.items():
        other = b.modules[path]
        assert_close(other.per_sample_energy(), stats.per_sample_energy(), rtol=1e-4, atol=1e-5)
        assert_close(other.sample_tokens, stats.sample_tokens)
        assert_close(other.energy(), stats.energy(), rtol=1e-4, atol=1e-5)
    ranks = rank_stability(b)
    assert ranks and all(entry["spearman"] == entry["spearman"] for entry in ranks.values())  # computed, not NaN
    # a batch that is not a multiple of the seeds counts toward the first seed, never out of range
    with HeadProfiler(unet, **kwargs) as odd, torch.no_grad():
        odd.begin_batch([1, 2])
        call(per_seed[3] | {k: v[:1] for k, v in per_seed[3].items() if torch.is_tensor(v) and v.shape[0] == 2}, 500.0)
    first = next(iter(odd.result().modules.values()))
    assert first.sample_tokens[0] > 0 and first.sample_tokens[1] == 0


def test_begin_batch_refuses_an_empty_batch() -> None:
    from prompt_fragments.errors import ProfilingError

    with pytest.raises(ProfilingError, match="begin_batch"):
        HeadProfiler(Wrapper(_attention())).begin_batch([])
