"""Peak VRAM and latency of one UNet forward, base model versus fragment configurations (issue #7).

SDXL-architecture random weights in fp16 at 1024x1024 (latent 128x128), batch
1/4/8 by default.  Each configuration starts from a freshly built base on the
CPU; the fragment is built and applied there, the base is dropped, and only
the fragment model goes to the device, as ComfyUI's object patches leave it
(the replaced originals stay behind on the offload device).  Peak VRAM is
``torch.cuda.max_memory_allocated`` over one forward after a warm-up;
latency is the median of ``--repeats`` synchronised forwards.

Without CUDA it runs on the CPU in float32 at a tiny resolution, which is how
the tests exercise it (``--arch tiny``, seconds)::

    python tools/bench_gpu.py --json out.json                 # GPU: SDXL, 1024², batches 1 4 8
    python tools/bench_gpu.py --arch tiny --resolution 64 --batches 1 2
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from prompt_fragments.bench.weights import build_random_unet, head_weight_scores, random_context, resident_bytes
from prompt_fragments.fragment.build import apply_fragment, build_fragment, describe_base
from prompt_fragments.fragment.extract import plan_levers
from prompt_fragments.fragment.settings import ExtractionSettings, lever_settings
from prompt_fragments.profiling.evidence import ProfileEvidence

log = logging.getLogger("bench_gpu")

DEFAULT_CONFIGS = (
    lever_settings(),
    lever_settings(heads=0.3, kv_fold=True, ff=0.3),
    lever_settings(heads=0.3, kv_fold=True, ff=0.3, precision="fp8"),
)


def fragment_model(arch: str, config: ExtractionSettings, dtype: torch.dtype, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model for ``config`` (the base itself when no lever is on) on the CPU, and its (cond, uncond) context."""
    base = build_random_unet(arch, dtype=dtype, seed=seed)
    context = random_context(base)
    if config == lever_settings():
        return base, context
    evidence = ProfileEvidence.from_scores(head_weight_scores(base), kv_context=context)
    levers = plan_levers(evidence, config, model=base, name="bench")
    fragment = build_fragment(base, levers, base=describe_base(base, arch, sha256="random-weights", hash_kind="none"),
                              name="bench")
    return apply_fragment(base, fragment), context


def unet_inputs(model: torch.nn.Module, context: torch.Tensor, batch: int, resolution: int, device: torch.device) -> dict[str, Any]:
    """Inputs for one classifier-free-guidance-shaped forward: half cond rows, half uncond rows."""
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(batch)
    latent = resolution // 8
    rows = [0] * ((batch + 1) // 2) + [1] * (batch // 2)
    inputs: dict[str, Any] = {
        "sample": torch.randn(batch, 4, latent, latent, generator=g).to(device, dtype),
        "timestep": torch.full((batch,), 500.0, device=device),
        "encoder_hidden_states": context[rows].to(device, dtype),
    }
    cfg = model.config
    if getattr(cfg, "addition_embed_type", None) == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text_dim, generator=g).to(device, dtype),
            "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch, device=device, dtype=dtype),
        }
    return inputs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(model: torch.nn.Module, inputs: dict[str, Any], device: torch.device, repeats: int) -> dict[str, float]:
    """Peak device memory of one forward (CUDA only) and the median latency of ``repeats`` forwards."""
    with torch.no_grad():
        model(**inputs)  # warm-up: kernel selection, lazy device copies of folded contexts
        _sync(device)
        peak = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(**inputs)
            _sync(device)
            times.append(time.perf_counter() - start)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
    return {"latency_ms": round(1000 * statistics.median(times), 2), "peak_bytes": peak}


def run(arch: str, resolution: int, batches: Sequence[int], configs: Sequence[ExtractionSettings], repeats: int,
        device: torch.device) -> dict[str, Any]:
    """Every configuration at every batch size; the base row comes first so savings can be read against it."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows = []
    for config in configs:
        model, context = fragment_model(arch, config, dtype)
        weights = resident_bytes(model)
        model.to(device)  # our own model object: moving it is fine, nothing else holds it
        for batch in batches:
            result = time_forward(model, unet_inputs(model, context, batch, resolution, device), device, repeats)
            rows.append({"config": config.label, "batch": batch, "weight_bytes": weights, **result})
            log.info("%s batch %d: %s", config.label, batch, result)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"arch": arch, "resolution": resolution, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "rows": rows}


def format_table(report: dict[str, Any]) -> str:
    """Fixed-width table of a :func:`run` report."""
    lines = [f"{report['arch']} {report['resolution']}px {report['dtype']} on {report['device_name']}",
             f"{'configuration':<42}{'batch':>6}{'weights MiB':>13}{'peak MiB':>10}{'ms':>10}"]
    for r in report["rows"]:
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}"
        lines.append(f"{r['config']:<42}{r['batch']:>6}{r['weight_bytes'] / 2**20:>13.1f}{peak:>10}{r['latency_ms']:>10.1f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["sdxl", "sd15", "tiny"], default="sdxl")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default 1024 on CUDA, 64 on CPU)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 4 8 on CUDA, 1 2 on CPU")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None, help="default cuda when available, else cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    resolution = args.resolution or (1024 if device.type == "cuda" else 64)
    batches = args.batches or ([1, 4, 8] if device.type == "cuda" else [1, 2])
    report = run(args.arch, resolution, batches, DEFAULT_CONFIGS, args.repeats, device)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(format_table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
