"""``prompt-fragments demo``: the whole pipeline on the embedded default, the project's trained reference model.

profile (8 seeds x 25 DDIM steps, with CFG) -> score -> select -> build ->
save -> reload and verify -> 32 variants with the full model and with the
fragment -> measure (adherence through the analyzer, SSIM/LPIPS fidelity, the
H1 ratio curve, H3 paraphrase reuse, timings) -> ``grid.png``,
``metrics_summary.json`` (H1–H5 against ``thresholds.yaml``), ``summary.json``.

The reference model (``reference/``) is a small pixel-space diffusers UNet
with a CLIP text encoder, trained by ``tools/train_reference.py``; it needs
the ``[demo]`` extra (diffusers, transformers), which the node pack does not.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .fragment.build import apply_fragment, describe_base
from .fragment.extract import extract_fragment, score_profile
from .fragment.format.measurements import update_fragment_file
from .fragment.format.store import load_fragment
from .fragment.refine import refine_ratio, refinement_record
from .fragment.settings import ExtractionSettings
from .fragment.surgery.masking import mask_heads
from .profiling.ff_profiler import FFProfiler
from .profiling.profiler import HeadProfiler

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "a red circle in the top left and a blue triangle in the bottom right on a white background"
BASE_NAME = "prompt-fragments-reference-v1"
CURVE_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
DEFAULT_THRESHOLDS = Path(__file__).resolve().parent / "thresholds.yaml"


class _Progress:
    """A tqdm bar over denoising steps when tqdm is installed and wanted, else silent."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="step", desc="demo", leave=False)
            except ImportError:
                pass

    def __call__(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def optional_lpips(weights: str | None) -> tuple[Any, str]:
    try:
        from .metrics.image_similarity import load_lpips, lpips_scorer

        return lpips_scorer(load_lpips("alex", weights=weights)), "LPIPS: AlexNet v0.1 (offline weights), images upsampled to 64 px"
    except Exception as exc:  # offline and no weights: LPIPS is then missing, and the summary says why
        log.warning("LPIPS unavailable: %s", exc)
        return None, f"LPIPS not measured: {exc}"


def _refine(unet: torch.nn.Module, scores: Any, protected: Any, ratio: float, seeds: list[int], full: np.ndarray,
            run: Any, prompt: str, lpips: Any, limits: dict[str, float]) -> dict[str, Any]:
    """The extractor's quality gate: bisect the ratio down from ``ratio`` until the masked model passes ``limits``."""
    from .metrics.hypotheses import gate_failures, measurable_limits
    from .reference import measure

    base = measure.adherence(full, prompt)
    # the gate fails a missing value; what this run cannot measure at all is left out by name (the notes say so)
    limits = measurable_limits(limits, [m for m, absent in (("lpips_mean", lpips is None), ("adherence_delta", base is None))
                                        if absent])

    def evaluate(r: float) -> dict[str, Any]:
        point = measure.masked_point(unet, scores, protected, r, seeds, run, prompt, full, lpips, base)
        return {k: point[k] for k in ("adherence_delta", "ssim_mean", "lpips_mean")}

    def passes(m: dict[str, Any]) -> tuple[bool, list[str]]:
        reasons = gate_failures(m, limits)
        return not reasons, reasons

    return refine_ratio(evaluate, passes, start=ratio, tolerance=0.02, max_tries=6)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm().clamp_min(1e-12))


def run_demo(
    out: str | Path, *, prompt: str = DEFAULT_PROMPT, seeds: int = 8, variants: int = 32, steps: int = 25,
    ratio: float | None = None, guidance: float | None = None, weights: str | Path | None = None, thresholds: str | Path | None = None,
    lpips_weights: str | None = None, reuse_paraphrases: int = 8, curve: bool = True, levers: bool = False,
    progress: bool = True, report: str | Path | None = None,
) -> dict[str, Any]:
    """Run the pipeline end to end on the reference model; write the fragment, grid, metrics and summary under ``out``.

    ``ratio`` is the fraction of heads to remove; by default H1's target share (30 %), rounded up to whole heads.
    ``levers`` adds quality-versus-ratio curves for every lever beyond heads (``reference.lever_curves``).

    >>> run_demo("outputs/demo", seeds=2, variants=4, steps=5)["pruning"]["heads_removed"]  # doctest: +SKIP
    16
    """
    from .metrics.hypotheses import load_thresholds
    from .metrics.memory import reduction, resident_weight_mb
    from .metrics.performance import break_even_block, speedup
    from .metrics.report import build_summary
    from .metrics.reuse import h2_bounds, reuse_block
    from .reference import measure
    from .reference.model import load_reference, unet_input
    from .reference.sampling import DEFAULT_GUIDANCE, sample

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    guidance = DEFAULT_GUIDANCE if guidance is None else guidance
    gate = load_thresholds(thresholds or DEFAULT_THRESHOLDS)
    # H1 on this model is "30 % of heads for <= 2 points of adherence" (issue #4): no CLIP model applies
    # to 32x32 shape images, so the CLIP check is dropped here (and the summary says so), not faked.
    gate["hypotheses"].get("H1", {}).pop("clip_drop_rel_max", None)
    model = load_reference(weights)
    unet = model.unet
    if unknown := model.tokenizer.unknown_words(prompt):
        log.warning("demo: words outside the reference model's vocabulary are read as <unk>: %s", ", ".join(unknown))
    context, uncond = model.encode([prompt]), model.encode([""])
    variant_seeds = list(range(1000, 1000 + variants))
    lever_count = 0
    if levers:
        from .reference.lever_curves import default_points

        lever_count = len(default_points())
    batches = -(-variants // 32)  # sub-batches of 32 per set of variants; refinement tries one batch of 16 each
    total = steps * (seeds + (2 + lever_count) * batches + ((len(CURVE_RATIOS) * batches + 6) if curve else 0)
                     + (2 * reuse_paraphrases * 4 if reuse_paraphrases else 0))
    bar = _Progress(total, progress)

    def run(model_unet: torch.nn.Module, seed_list: list[int]) -> np.ndarray:
        return sample(model_unet, context, uncond, seed_list, steps=steps, guidance=guidance, on_step=bar)

    started = time.perf_counter()
    with HeadProfiler(unet, buckets=4, info={"prompt": prompt}) as prof, FFProfiler(unet) as ff_prof:
        for seed in range(seeds):
            prof.begin_sample(seed)
            run(unet, [seed])
    profile = prof.result()
    profile_s = time.perf_counter() - started
    scored = score_profile(profile)  # the extractor's score step, for the curves below
    scores, protected = scored.heads, scored.protected
    if ratio is None:  # H1's share of heads, rounded UP to whole heads (select_heads rounds its budget down)
        total_heads = sum(int(v.numel()) for v in scores.values())
        ratio = math.ceil(gate["hypotheses"].get("H1", {}).get("pruned_head_pct_min", 0.3) * total_heads - 1e-9) / total_heads
    base = describe_base(unet, BASE_NAME)
    fragment, manifest_path = extract_fragment(
        profile, unet, base=base, name="demo-" + hashlib.sha256(prompt.encode()).hexdigest()[:8],
        settings=ExtractionSettings(amount=ratio), directory=out / "fragments", overwrite=True,
    )
    pruning = fragment.manifest["pruning"]
    kept = {p: list(range(int(v.numel()))) for p, v in scores.items()} | fragment.kept  # every module, pruned or not
    build_s = time.perf_counter() - started - profile_s
    small = apply_fragment(unet, load_fragment(manifest_path), base_sha256=fragment.manifest["base_model"]["sha256"])

    probe = unet_input(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(123)))
    with torch.no_grad(), mask_heads(unet, kept):
        masked = unet(probe, 500, context.expand(2, -1, -1)).sample
    with torch.no_grad():
        physical = small(probe, 500, context.expand(2, -1, -1)).sample

    t0 = time.perf_counter()
    full_images = run(unet, variant_seeds)
    t1 = time.perf_counter()
    frag_images = run(small, variant_seeds)
    t2 = time.perf_counter()
    lpips, lpips_note = optional_lpips(lpips_weights)
    adh_full, adh_frag = measure.adherence(full_images, prompt), measure.adherence(frag_images, prompt)
    fid = measure.fidelity(full_images, frag_images, lpips)
    h1_curve = (measure.ratio_curve(unet, scores, protected, CURVE_RATIOS, variant_seeds, run, prompt, full_images, lpips)
                if curve else [])
    refined = _refine(unet, scores, protected, ratio, variant_seeds[:16], full_images[:16], run, prompt, lpips,
                      gate.get("quality_gate", {})) if curve else None
    bounds = h2_bounds(gate)
    reuse = (measure.paraphrase_reuse(model, small, prompt, [0, 1, 2, 3], bounds, lpips, steps=steps,
                                      guidance=guidance, count=reuse_paraphrases) if reuse_paraphrases else None)
    lever_results = None
    if levers:
        from .reference.lever_curves import lever_curves

        lever_results = lever_curves(unet, base=base, head_scores=scores, protected=protected, ff_scores=ff_prof.scores(),
                                     kv_context=torch.cat([uncond, context]), seeds=variant_seeds, sampler=run,
                                     prompt=prompt, full_images=full_images, lpips=lpips)
    bar.close()
    grid = measure.grid_png(full_images, frag_images, out / "grid.png")

    economics = break_even_block(profile_s, build_s, (t1 - t0) / variants, (t2 - t1) / variants)
    w_full, w_frag = resident_weight_mb(unet), resident_weight_mb(small)
    metrics: dict[str, Any] = {
        "pruned_head_pct": pruning["heads_removed"] / pruning["heads_total"],
        "adherence_full": adh_full and adh_full["attribute_accuracy"],
        "adherence_fragment": adh_frag and adh_frag["attribute_accuracy"],
        "adherence_delta": (adh_full["attribute_accuracy"] - adh_frag["attribute_accuracy"]) if adh_full and adh_frag else None,
        **fid,
        "weight_full_mb": w_full, "weight_fragment_mb": w_frag, "weight_reduction": reduction(w_full, w_frag),
        "vram_reduction": None,  # peak VRAM needs a GPU; the demo runs on CPU
        "reuse_pass_rate": reuse.pass_rate if reuse else None,
        "latency_full_ms": (t1 - t0) / variants * 1e3, "latency_fragment_ms": (t2 - t1) / variants * 1e3,
        "batch_speedup": speedup(t1 - t0, t2 - t1), "batch_variants": variants,
        "break_even_variants": economics["break_even_variants"], "break_even_never": economics["break_even_variants"] is None,
        "profile_s": profile_s, "build_s": build_s,
    }
    holds = [p for p in h1_curve if p["adherence_delta"] is not None and p["adherence_delta"] <= gate["hypotheses"]["H1"].get(
        "adherence_delta_max", 0.02)]
    notes = [
        "Model: the project's reference model (reference/MODEL_CARD.md), 32x32 RGB pixel space, CPU.",
        f"Adherence: analyzer attribute accuracy (shape, colour, position per object) against {prompt!r}.",
        "CLIP not measured: no CLIP model applies to these images; H1 is judged on adherence and LPIPS instead.",
        lpips_note,
        "VRAM not measured (CPU run): H2 is MISSING; weight_reduction is the resident-weight reduction, not a substitute.",
        "H1 curve (heads masked, same seeds): largest ratio within the adherence bound: "
        + (f"{max(p['ratio'] for p in holds):.2f}" if holds else "none") + ".",
    ]
    if refined is not None:
        notes.append(f"Refinement (the extractor's gate, bisection on 16 seeds): {refined['status']} at ratio "
                     f"{refined['ratio']:.3f}; informational, the saved fragment keeps the requested ratio.")
    if reuse is None and reuse_paraphrases:
        notes.append("H3 not measured: the prompt does not name every attribute, so no grammar paraphrases exist.")
    extra = {"prompt": prompt, "model": BASE_NAME, "steps": steps, "guidance": guidance, "seeds_profiled": seeds,
             "variant_seeds": [variant_seeds[0], variant_seeds[-1]], "h1_curve": h1_curve,
             "adherence": {"full": adh_full, "fragment": adh_frag}, "economics": economics, "lever_curves": lever_results,
             "refinement": refined and refinement_record(refined, gate.get("quality_gate", {})),
             "reuse": reuse_block(reuse, stand_in=False)["h3"] if reuse else None}
    summary_doc = build_summary("demo", metrics, gate, manifest=fragment.manifest, extra=extra, notes=notes)
    (out / "metrics_summary.json").write_text(json.dumps(summary_doc, indent=2, default=str))
    update_fragment_file(manifest_path, quality={**fid, "adherence_full": metrics["adherence_full"],
                                                 "adherence_fragment": metrics["adherence_fragment"],
                                                 "adherence_delta": metrics["adherence_delta"], "h1_curve": h1_curve,
                                                 **({"refinement": extra["refinement"]} if refined else {})},
                         performance={k: metrics[k] for k in ("latency_full_ms", "latency_fragment_ms", "batch_speedup",
                                                              "batch_variants", "weight_full_mb", "weight_fragment_mb")},
                         reuse=reuse_block(reuse, stand_in=False) if reuse else None, verified=summary_doc["verified"])

    def params(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    summary = {
        "model": BASE_NAME, "prompt": prompt, "fragment_manifest": str(manifest_path), "grid": str(grid),
        "metrics_summary": str(out / "metrics_summary.json"), "status": summary_doc["status"],
        "hypotheses": {k: v["status"] for k, v in summary_doc["hypotheses"].items()},
        "pruning": {k: pruning[k] for k in ("heads_total", "heads_removed", "head_retention_ratio")},
        "exactness_masked_vs_physical_rel_err": _relative_error(masked, physical),
        "params": {"full": params(unet), "fragment": params(small)},
        "adherence": {"full": metrics["adherence_full"], "fragment": metrics["adherence_fragment"]},
        "fidelity": fid,
        "time_s": {"profile": profile_s, "build": build_s, "full_variants": t1 - t0, "fragment_variants": t2 - t1,
                   "total": time.perf_counter() - started},
        "throughput_ratio": metrics["batch_speedup"],
        "reuse_pass_rate": metrics["reuse_pass_rate"],
    }
    if report is not None:
        from .metrics.report import write_report

        run_dir = write_report(report, metrics=metrics, thresholds=gate, manifest=json.loads(Path(manifest_path).read_text()),
                               profile=profile, scores=scores, kept=kept,
                               full_images=measure.as_float(full_images), fragment_images=measure.as_float(frag_images),
                               quality_curve=h1_curve, extra=extra, notes=notes)
        summary["report"] = str(run_dir)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def format_summary(summary: dict[str, Any]) -> str:
    """A short table for the terminal."""
    p, t, f = summary["params"], summary["time_s"], summary["fidelity"]
    rows = [
        ("heads removed", f"{summary['pruning']['heads_removed']} / {summary['pruning']['heads_total']}"),
        ("UNet params", f"{p['full']:,} -> {p['fragment']:,} ({1 - p['fragment'] / p['full']:.1%} fewer)"),
        ("masked vs physical", f"{summary['exactness_masked_vs_physical_rel_err']:.2e} relative error"),
        ("adherence full / fragment", f"{_pct(summary['adherence']['full'])} / {_pct(summary['adherence']['fragment'])}"),
        ("fidelity SSIM / LPIPS", f"{f['ssim_mean']:.3f} / " + ("n/a" if f["lpips_mean"] is None else f"{f['lpips_mean']:.3f}")),
        ("paraphrase reuse (H3)", _pct(summary["reuse_pass_rate"])),
        ("profile + build", f"{t['profile']:.1f}s + {t['build']:.1f}s"),
        ("variants full / fragment", f"{t['full_variants']:.1f}s / {t['fragment_variants']:.1f}s"),
        ("hypotheses", " ".join(f"{k} {v}" for k, v in summary["hypotheses"].items()) + f" -> {summary['status']}"),
        ("grid", summary["grid"]),
        ("fragment", summary["fragment_manifest"]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
