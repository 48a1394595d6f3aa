"""Activation-memory table: weights + peak live activation bytes of one UNet call, full model vs fragments.

``prompt-fragments bench memory --arch sdxl --size 1024 --batch 4``: one sampler
step of SDXL at 1024² with classifier-free guidance (the UNet sees a batch of
2 x 4), on **fake tensors** (``metrics.tensor_memory.fake_module_peak``): the
UNet is built on the meta device from the anatomy config (no weights), the
fragment is built on it with the same ``build_fragment`` users run, and one
forward runs under ``FakeTensorMode`` with CPU semantics, so every operator
sees the shapes a real CPU run would (the same attention kernel choice) while
nothing is computed or allocated.  The figures are ``peak_tensor_bytes``
(exact live tensor bytes at the operator level), not VRAM: no allocator
caching, no kernel scratch, no CUDA context.

Which heads and FF channels go: seeded random scores (there are no weights to
score), so each lever takes about its share from every block; a real prompt's
profile decides the split, and the activation figure moves with it (heads cut
at the 64² level shrink the biggest attention tensors, at 32² the smallest).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..errors import FragmentError
from ..fragment.build import apply_fragment, build_fragment, describe_base
from ..fragment.extract import plan_levers
from ..fragment.settings import ExtractionSettings, lever_settings
from ..fragment.surgery.kv_fold import FoldedProjection
from ..metrics.tensor_memory import fake_module_peak, storage_bytes
from ..profiling.discovery import iter_attention
from ..profiling.evidence import ProfileEvidence
from ..profiling.ff_profiler import iter_feed_forward
from .weights import CONTEXT_TOKENS, unet_config

log = logging.getLogger(__name__)

ATTENTION = ("fused", "math")


def meta_unet(arch: str, dtype: torch.dtype = torch.float16) -> nn.Module:
    """The ``arch`` UNet (``sd15``, ``sdxl``, ``tiny``) on the meta device in ``dtype``: shapes only.

    >>> next(meta_unet("tiny").parameters()).device
    device(type='meta')
    """
    try:
        from diffusers import UNet2DConditionModel
    except ImportError as exc:
        raise FragmentError("bench memory: needs diffusers; install the [demo] extra or pip install diffusers") from exc
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(arch))
    quiet = logging.getLogger("diffusers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its fp32-modules warning does not apply to a shapes-only model
    try:
        return unet.to(dtype=dtype).eval().requires_grad_(False)
    finally:
        quiet.setLevel(level)


def unet_call(unet: nn.Module, size: int, batch: int, *, seed: int = 1) -> tuple[tuple[Any, ...], dict[str, Any], torch.Tensor]:
    """One CFG step's UNet inputs at ``size`` pixels for ``batch`` images: (args, kwargs, the 2 context rows).

    The latent is a meta tensor; the context is real (cond and uncond rows, seeded), repeated per image,
    because a K/V fold matches it by value once before the call.

    >>> args, kwargs, rows = unet_call(meta_unet("tiny"), 64, 2)
    >>> list(args[0].shape), list(kwargs["encoder_hidden_states"].shape), list(rows.shape)
    ([4, 4, 8, 8], [4, 77, 48], [2, 77, 48])
    """
    cfg = unet.config
    if size % 8:
        raise FragmentError(f"bench memory: size must be a multiple of 8 pixels (the VAE's factor), found {size}")
    dtype = next(unet.parameters()).dtype
    rows = torch.randn(2, CONTEXT_TOKENS, int(cfg.cross_attention_dim), generator=torch.Generator().manual_seed(seed)).to(dtype)
    n = 2 * batch  # classifier-free guidance: uncond and cond rows in one call
    context = rows.repeat_interleave(batch, 0)
    latent = torch.empty(n, int(cfg.in_channels), size // 8, size // 8, device="meta", dtype=dtype)
    kwargs: dict[str, Any] = {"encoder_hidden_states": context}
    if cfg.addition_embed_type == "text_time":
        time_dim = 6 * int(cfg.addition_time_embed_dim)
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.empty(n, int(cfg.projection_class_embeddings_input_dim) - time_dim, device="meta", dtype=dtype),
            "time_ids": torch.empty(n, 6, device="meta", dtype=dtype)}
    return (latent, torch.tensor(999.0)), kwargs, rows


def random_scores(unet: nn.Module, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Seeded random head and FF-channel scores for a weightless UNet (see the module docstring for what that means).

    >>> heads, ff = random_scores(meta_unet("tiny"))
    >>> all(s.device.type == "cpu" for s in heads.values()) and len(ff) > 0
    True
    """
    g = torch.Generator().manual_seed(seed)
    heads = {path: torch.rand(int(m.heads), generator=g) for path, m in iter_attention(unet)}
    ff = {path: torch.rand(site.hidden, generator=g) for path, _, site in iter_feed_forward(unet)}
    return heads, ff


def _sdpa(attention: str) -> Any:
    if attention not in ATTENTION:
        raise FragmentError(f"bench memory: attention must be one of {', '.join(ATTENTION)}, found {attention!r}")
    if attention == "fused":
        import contextlib

        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def measure_row(unet: nn.Module, config: ExtractionSettings | None, size: int, batch: int, *, seed: int = 0,
                attention: str = "fused") -> dict[str, Any]:
    """Weights and the peak of one CFG step for the full model (``config`` None) or the fragment ``config`` describes.

    >>> r = measure_row(meta_unet("tiny"), None, 64, 1)
    >>> r["config"], r["peak_tensor_bytes"] == r["peak_tensor_bytes_resident"] + r["peak_tensor_bytes_activations"]
    ('full model', True)
    """
    started = time.perf_counter()
    args, kwargs, rows = unet_call(unet, size, batch, seed=seed + 1)
    model, keep_real = unet, []
    if config is not None:
        heads, ff = random_scores(unet, seed)
        evidence = ProfileEvidence.from_scores(heads, ff_scores=ff, kv_context=rows if config.on("kv_fold") else None)
        levers = plan_levers(evidence, config, model=unet, name="bench-memory")
        fragment = build_fragment(unet, levers, base=describe_base(unet, "random", sha256="random", hash_kind="none"),
                                  name="bench-memory")
        model = apply_fragment(unet, fragment)
        folded = [m for m in model.modules() if isinstance(m, FoldedProjection)]
        if folded:  # the fold matches the context by value once per context; it caches the match by identity
            if folded[0].contexts.match(kwargs["encoder_hidden_states"]) is None:
                raise FragmentError("bench memory: the folded context did not match its own rows")
            keep_real = ["encoder_hidden_states"]
    with _sdpa(attention):
        peak = fake_module_peak(model, args, kwargs, keep_real=keep_real)
    result = {"config": "full model" if config is None else config.label,
              "levers": None if config is None else config.to_dict(),
              "weights_bytes": storage_bytes(model), **peak.to_dict(),
              "seconds": round(time.perf_counter() - started, 2)}
    del model
    return result


def memory_configs(heads: float, kv_fold: bool, ff: float, sweep: bool) -> list[ExtractionSettings]:
    """The fragment settings to measure: the combination, preceded by each lever alone with ``sweep``.

    >>> [c.label for c in memory_configs(0.3, True, 0.3, True)]
    ['heads 30%', 'kv-fold', 'ff 30%', 'heads 30% + kv-fold + ff 30%']
    """
    combined = lever_settings(heads, kv_fold, ff)
    alone = [c for c, on in ((lever_settings(heads=heads), heads > 0), (lever_settings(kv_fold=True), kv_fold),
                             (lever_settings(ff=ff), ff > 0)) if on]
    return (alone if sweep and len(alone) > 1 else []) + ([combined] if alone else [])


def bench_memory(arch: str, size: int, batch: int, configs: Sequence[ExtractionSettings], *, seed: int = 0,
                 attention: str = "fused", dtype: torch.dtype = torch.float16) -> dict[str, Any]:
    """The full model's row, then one per config, each with its reduction against the full model.

    >>> r = bench_memory("tiny", 64, 1, [lever_settings(heads=0.5)])
    >>> [row["config"] for row in r["rows"]], r["rows"][1]["peak_tensor_bytes"] < r["rows"][0]["peak_tensor_bytes"]
    (['full model', 'heads 50%'], True)
    """
    unet = meta_unet(arch, dtype)
    rows = [measure_row(unet, None, size, batch, seed=seed, attention=attention)]
    rows += [measure_row(unet, c, size, batch, seed=seed, attention=attention) for c in configs]
    full = rows[0]
    for row in rows:
        for key in ("weights_bytes", "peak_tensor_bytes_activations", "peak_tensor_bytes"):
            row[f"{key}_reduction"] = round(1.0 - row[key] / full[key], 4) if full[key] else None
    return {"arch": arch, "size": size, "batch": batch, "cfg_batch": 2 * batch, "dtype": str(dtype).replace("torch.", ""),
            "attention": attention, "measured_on": "fake tensors, CPU semantics (no data, no allocation)",
            "figure": "peak_tensor_bytes: live tensor storages at the operator level, not VRAM", "rows": rows}


def format_memory_table(report: dict[str, Any]) -> str:
    """Fixed-width table of a :func:`bench_memory` report (MiB).

    >>> print(format_memory_table({"arch": "x", "size": 8, "batch": 1, "cfg_batch": 2, "dtype": "float16",
    ...     "attention": "fused", "rows": [{"config": "full model", "weights_bytes": 2**20,
    ...     "peak_tensor_bytes_activations": 2**21, "peak_tensor_bytes": 3 * 2**20, "peak_tensor_bytes_reduction": 0.0,
    ...     "peak_op": "aten.mm.default"}]}).splitlines()[-1])
    full model                                  1.0        2.0        3.0     0.0%  aten.mm.default
    """
    lines = [f"peak_tensor_bytes of one CFG step: {report['arch']} UNet, {report['size']}px, batch {report['batch']} "
             f"(UNet batch {report['cfg_batch']}), {report['dtype']}, {report['attention']} attention; fake tensors, not VRAM",
             f"{'configuration':<36}{'weights':>11}{'activ.':>11}{'peak':>11}{'saved':>9}  peak at   (MiB)"]
    for r in report["rows"]:
        red = r.get("peak_tensor_bytes_reduction")
        lines.append(f"{r['config']:<36}{r['weights_bytes'] / 2**20:>11.1f}{r['peak_tensor_bytes_activations'] / 2**20:>11.1f}"
                     f"{r['peak_tensor_bytes'] / 2**20:>11.1f}{'' if red is None else f'{red:.1%}':>9}  {r.get('peak_op')}")
    return "\n".join(lines)
