"""A report from ``prompt-fragments demo --report``: the demo's run, measured and judged.

What the numbers mean here (and the report says so in its notes): the demo
UNet has seeded random weights and no VAE, so its "images" are the final
latents' first three channels mapped through a fixed curve, ``(tanh(x/2)+1)/2``
(the same for the full model and the fragment, so differences are the
fragment's, not a normalisation's).  LPIPS, SSIM and pHash therefore
measure how far the fragment's output drifts from the full model's, not
image quality; CLIP is computed only when real weights are given; adherence
needs the reference-model analyzer, which does not exist yet, so a demo
report is INVALID (verified: false) by design until it does.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from ..fragment.masking import mask_heads
from ..fragment.measurements import update_fragment_file
from ..fragment.refine import refine_ratio, refinement_record
from ..fragment.selection import select_heads
from .hypotheses import load_thresholds
from .image_similarity import load_lpips, lpips_scorer
from .memory import memory_snapshot, reduction, resident_weight_mb
from .performance import break_even_block, speedup
from .quality import quality_block
from .report import write_report

log = logging.getLogger(__name__)

DEFAULT_THRESHOLDS = Path(__file__).resolve().parent.parent / "thresholds.yaml"
IMAGE_KIND = "demo latents as images: (tanh(latent[:3]/2)+1)/2, random-weight UNet, no VAE"


def latents_to_images(latents: torch.Tensor) -> torch.Tensor:
    """``[N, 4, h, w]`` latents -> IMAGE ``[N, h, w, 3]`` in 0..1 by a fixed curve (no per-image scaling).

    >>> latents_to_images(torch.zeros(1, 4, 2, 2))[0, 0, 0].tolist()
    [0.5, 0.5, 0.5]
    """
    return ((torch.tanh(latents[:, :3].float() / 2) + 1) / 2).permute(0, 2, 3, 1).contiguous()


def _optional_lpips(lpips_weights: str | None) -> tuple[Callable | None, str]:
    try:
        model = load_lpips("alex", weights=lpips_weights)
    except Exception as exc:  # no weights offline: the metric is then missing, and the report says why
        log.warning("LPIPS unavailable: %s", exc)
        return None, f"LPIPS not measured: {exc}"
    return lpips_scorer(model), "LPIPS: AlexNet v0.1 with real trunk weights"


def _optional_clip(clip_model: str | None, clip_weights: str | None) -> tuple[Callable | None, str]:
    if not clip_model and not clip_weights:
        return None, "CLIP not measured: no CLIP weights given (--clip-weights FILE or --clip-model local-dir:DIR)"
    from .clip_score import clip_scorer, load_clip

    clip = load_clip(clip_model or "ViT-B-32", pretrained=clip_weights)
    return clip_scorer(clip), f"CLIP: {clip.weights} (on latents-as-images: not meaningful until the reference model)"


def write_demo_report(
    reports_dir: str | Path,
    *,
    unet: nn.Module,
    small: nn.Module,
    sample: Callable[[nn.Module, int], torch.Tensor],
    prompt: str,
    profile: Any,
    scores: Mapping[str, torch.Tensor],
    selection: Any,
    protected: Any,
    manifest_path: Path,
    full_latents: Sequence[torch.Tensor],
    fragment_latents: Sequence[torch.Tensor],
    times: Mapping[str, float],
    variants: int,
    thresholds: str | Path | None = None,
    lpips_weights: str | None = None,
    clip_model: str | None = None,
    clip_weights: str | None = None,
    compare: str | None = "latest",
) -> Path:
    """Measure the demo's run, record the measurements in its fragment and write a report; return its folder.

    ``sample(model, seed)`` re-runs the demo's sampler (for the refinement sweep).

    >>> write_demo_report("reports", unet=unet, small=small, ...)  # doctest: +SKIP
    """
    gate = load_thresholds(thresholds or DEFAULT_THRESHOLDS)
    h1 = gate["hypotheses"].get("H1", {})
    lpips_fn, lpips_note = _optional_lpips(lpips_weights)
    clip_fn, clip_note = _optional_clip(clip_model, clip_weights)
    full_img = latents_to_images(torch.cat(list(full_latents)))
    frag_img = latents_to_images(torch.cat(list(fragment_latents)))
    quality = quality_block(full_img, frag_img, prompt, clip=clip_fn, lpips=lpips_fn, image_kind=IMAGE_KIND)

    # Refinement sweep on one seed with masked heads (equal to the pruned model in float32, and cheaper to build).
    seeds = [2000]  # one seed keeps the sweep cheap; the report's main comparison uses all variants
    reference = latents_to_images(torch.cat([sample(unet, s) for s in seeds]))

    def evaluate(ratio: float) -> dict[str, Any]:
        plan = select_heads(scores, ratio=ratio, protected=protected)
        with mask_heads(unet, plan.kept):
            imgs = latents_to_images(torch.cat([sample(unet, s) for s in seeds]))
        q = quality_block(reference, imgs, prompt, clip=clip_fn, lpips=lpips_fn, image_kind=IMAGE_KIND)
        return {"ratio": ratio, **{k: q.get(k) for k in ("lpips_mean", "ssim_mean", "phash_distance_mean", "clip_drop_rel")}}

    ssim_min = gate["hypotheses"].get("H2", {}).get("ssim_min", 0.9)
    gate_limits = {"clip_drop_rel_max": h1.get("clip_drop_rel_max", 0.02), "lpips_max": h1.get("lpips_max", 0.03)}

    def passes(m: Mapping[str, Any]) -> tuple[bool, list[str]]:
        # Gate on what was measured; a metric that is missing is reported in the notes, not used to fail every try.
        reasons = [f"{key} {m[key]:.4g} > {limit:.4g}" for key, limit in
                   (("lpips_mean", gate_limits["lpips_max"]), ("clip_drop_rel", gate_limits["clip_drop_rel_max"]))
                   if m.get(key) is not None and m[key] > limit]
        if m.get("lpips_mean") is None and m.get("ssim_mean") is not None and m["ssim_mean"] < ssim_min:
            reasons.append(f"ssim_mean {m['ssim_mean']:.4g} < {ssim_min:.4g}")
        return not reasons, reasons

    refined = refine_ratio(evaluate, passes, start=selection.removed_heads / selection.total_heads, tolerance=0.05, max_tries=5)
    curve = [t["metrics"] for t in refined["tries"]]

    per_full = times["full_variants"] / variants
    per_frag = times["fragment_variants"] / variants
    economics = break_even_block(times["profile"], times["build"], per_full, per_frag)
    mem = memory_snapshot()
    w_full, w_frag = resident_weight_mb(unet), resident_weight_mb(small)
    metrics: dict[str, Any] = {
        "pruned_head_pct": selection.removed_heads / selection.total_heads,
        **{k: quality.get(k) for k in ("clip_drop_rel", "clip_delta", "lpips_mean", "ssim_mean", "phash_distance_mean",
                                       "adherence_delta")},
        "weight_full_mb": w_full, "weight_fragment_mb": w_frag, "weight_reduction": reduction(w_full, w_frag),
        "vram_reduction": None,  # peak VRAM needs a GPU run of both models; the demo runs on CPU
        "reuse_pass_rate": None,  # needs the paraphrase reuse harness
        "latency_full_ms": per_full * 1e3, "latency_fragment_ms": per_frag * 1e3,
        "batch_speedup": speedup(times["full_variants"], times["fragment_variants"]), "batch_variants": variants,
        "break_even_variants": economics["break_even_variants"],
        "break_even_never": economics["break_even_variants"] is None,
        "profile_s": times["profile"], "build_s": times["build"],
    }
    notes = [
        "Demo model: small SD1.5-shaped UNet with random weights; 'images' are " + IMAGE_KIND + ".",
        "LPIPS/SSIM/pHash here measure output drift of the fragment from the full model, not image quality.",
        lpips_note, clip_note,
        "Adherence not measured: the reference-model analyzer is not plugged in yet.",
        "VRAM not measured (CPU run); weight_reduction is the resident-weight reduction instead, not a substitute for H2.",
        "Paraphrase reuse (H3) not measured: no reuse harness yet.",
        f"Refinement sweep: {refined['status']} at ratio {refined['ratio']:.3f} (informational: the saved fragment keeps the requested ratio).",
    ]
    performance = {k: metrics[k] for k in ("latency_full_ms", "latency_fragment_ms", "batch_speedup", "batch_variants",
                                           "weight_full_mb", "weight_fragment_mb")}
    performance.update(economics=economics, memory=mem, device="cpu" if not mem.get("cuda") else "cuda")
    manifest_quality = {**{k: v for k, v in quality.items()}, "refinement": refinement_record(refined, gate_limits)}
    verified = not quality["missing"]
    saved = update_fragment_file(manifest_path, quality=manifest_quality, performance=performance,
                                 reuse={"paraphrase_pass_rate": None, "measured": False}, verified=verified)
    import json

    manifest = json.loads(Path(saved).read_text())
    return write_report(
        reports_dir, metrics=metrics, thresholds=gate, manifest=manifest, profile=profile, scores=scores,
        kept=selection.kept, full_images=full_img, fragment_images=frag_img, quality_curve=curve,
        extra={"image_kind": IMAGE_KIND, "prompt": prompt, "quality": quality, "performance": performance,
               "refinement": refinement_record(refined, gate_limits), "model": "embedded demo UNet (random weights)"},
        notes=notes, compare=compare,
    )
