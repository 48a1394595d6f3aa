"""``prompt-fragments demo``: the whole pipeline on the embedded default model, on CPU.

profile (N seeds, sampled DDIM steps) -> score -> select -> build -> save ->
reload and verify -> generate variants with the full model and the fragment.

Until the project's trained reference model lands, the embedded default is a
small SD1.5-shaped diffusers UNet with seeded random weights and a seeded
stand-in for the prompt embedding.  On such a model the pipeline, the
exactness of physical pruning and the size and speed figures are real; image
quality is not, so the summary reports output drift, not quality.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .fragment.errors import FragmentError
from .fragment.masking import mask_heads
from .fragment.selection import select_heads
from .fragment.store import apply_fragment, build_fragment, describe_base, load_fragment, save_fragment
from .profiling.profiler import HeadProfiler
from .profiling.scoring import rank_stability, score_heads, unstable_heads

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "A dog on a jet ski"


def build_default_unet(seed: int = 0) -> nn.Module:
    """A small SD1.5-shaped UNet (cross-attention at two resolutions, 8 heads per module), seeded."""
    try:
        from diffusers import UNet2DConditionModel
    except ImportError as exc:  # the node pack itself does not need diffusers
        raise FragmentError("demo: diffusers is not installed; run `pip install prompt-fragments[demo]`") from exc
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    ).eval()


def prompt_context(prompt: str, tokens: int = 8, dim: int = 64) -> torch.Tensor:
    """A deterministic stand-in for a text encoder: the prompt's SHA-256 seeds the embedding."""
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
    return torch.randn(1, tokens, dim, generator=torch.Generator().manual_seed(seed))


def sample(unet: nn.Module, context: torch.Tensor, seed: int, steps: int, size: int = 16) -> torch.Tensor:
    """Plain DDIM sampling (eta 0) from seeded noise; returns the final latent."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    x = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = unet(x, t, context).sample
            x = scheduler.step(eps, t, x).prev_sample
    return x


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm().clamp_min(1e-12))


def run_demo(
    out: str | Path, *, prompt: str = DEFAULT_PROMPT, seeds: int = 8, variants: int = 8, steps: int = 10, ratio: float = 0.3,
    report: str | Path | None = None, report_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the pipeline end to end and write ``fragments/`` and ``summary.json`` under ``out``.

    With ``report`` (a reports base folder), also measure the run and write a report there
    (``metrics.demo_report.write_demo_report``; ``report_options`` are passed on to it).

    >>> run_demo("outputs/demo", seeds=2, variants=2, steps=4)["pruning"]["heads_removed"]  # doctest: +SKIP
    38
    """
    out = Path(out)
    unet = build_default_unet()
    context = prompt_context(prompt)
    started = time.perf_counter()
    with HeadProfiler(unet, buckets=4, info={"prompt": prompt}) as prof:
        for seed in range(seeds):
            prof.begin_sample(seed)
            sample(unet, context, seed, steps)
    profile = prof.result()
    profile_s = time.perf_counter() - started
    stability = rank_stability(profile)
    scores, protected = score_heads(profile), unstable_heads(stability)
    selection = select_heads(scores, ratio=ratio, protected=protected)
    fragment = build_fragment(
        unet,
        selection,
        base=describe_base(unet, "embedded-default-random-sd15-small"),
        name="demo-" + hashlib.sha256(prompt.encode()).hexdigest()[:8],
        profiling={"prompt": prompt, "seeds": list(range(seeds)), "steps_profiled": steps, "total_steps": steps,
                   "timestep_buckets": profile.buckets, "method": "composite_score",
                   "rank_stability_mean": sum(s["spearman"] for s in stability.values()) / len(stability)},
    )
    manifest_path = save_fragment(fragment, out / "fragments", overwrite=True)
    build_s = time.perf_counter() - started - profile_s
    small = apply_fragment(unet, load_fragment(manifest_path), base_sha256=fragment.manifest["base_model"]["sha256"])

    probe_x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(123))
    with torch.no_grad(), mask_heads(unet, selection.kept):
        masked = unet(probe_x, 500, context.expand(2, -1, -1)).sample
    with torch.no_grad():
        physical = small(probe_x, 500, context.expand(2, -1, -1)).sample
    timings = {"full": 0.0, "fragment": 0.0}
    drift = []
    latents: dict[str, list[torch.Tensor]] = {"full": [], "fragment": []}  # kept for the optional report
    for seed in range(1000, 1000 + variants):
        t0 = time.perf_counter()
        full_x = sample(unet, context, seed, steps)
        t1 = time.perf_counter()
        frag_x = sample(small, context, seed, steps)
        timings["full"] += t1 - t0
        timings["fragment"] += time.perf_counter() - t1
        drift.append(_relative_error(full_x, frag_x))
        latents["full"].append(full_x)
        latents["fragment"].append(frag_x)

    def params(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    summary = {
        "model": "embedded default: small SD1.5-shaped UNet, random weights (quality figures need the reference model)",
        "prompt": prompt,
        "fragment_manifest": str(manifest_path),
        "pruning": {"heads_total": selection.total_heads, "heads_removed": selection.removed_heads,
                    "head_retention_ratio": selection.retention_ratio},
        "exactness_masked_vs_physical_rel_err": _relative_error(masked, physical),
        "params": {"full": params(unet), "fragment": params(small)},
        "time_s": {"profile": profile_s, "build": build_s, "full_variants": timings["full"],
                   "fragment_variants": timings["fragment"]},
        "throughput_ratio": timings["full"] / timings["fragment"] if timings["fragment"] else None,
        "output_drift_rel_l2_mean": sum(drift) / len(drift) if drift else None,
    }
    if report is not None:
        from .metrics.demo_report import write_demo_report

        summary["report"] = str(write_demo_report(
            report, unet=unet, small=small, sample=lambda m, s: sample(m, context, s, steps), prompt=prompt,
            profile=profile, scores=scores, selection=selection, protected=protected, manifest_path=manifest_path,
            full_latents=latents["full"], fragment_latents=latents["fragment"], times=summary["time_s"],
            variants=variants, **(report_options or {})))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A short table for the terminal."""
    p, t = summary["params"], summary["time_s"]
    rows = [
        ("heads removed", f"{summary['pruning']['heads_removed']} / {summary['pruning']['heads_total']}"),
        ("UNet params", f"{p['full']:,} -> {p['fragment']:,} ({1 - p['fragment'] / p['full']:.1%} fewer)"),
        ("masked vs physical", f"{summary['exactness_masked_vs_physical_rel_err']:.2e} relative error"),
        ("profile + build", f"{t['profile']:.1f}s + {t['build']:.1f}s"),
        ("variants full / fragment", f"{t['full_variants']:.1f}s / {t['fragment_variants']:.1f}s"),
        ("output drift (rel. L2)", f"{summary['output_drift_rel_l2_mean']:.3f}"),
        ("fragment", summary["fragment_manifest"]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
