"""Weight-bytes benchmark: build a real fragment on a random-weight full-size UNet and count resident bytes.

Not a formula: the UNet is diffusers' ``UNet2DConditionModel`` built from the
SD1.5/SDXL configs in ``profiling/anatomy.py`` (on the meta device, then
materialised in fp16 with seeded random weights), the fragment is built with
the same ``build_fragment`` users run, applied with ``apply_fragment``, and the
bytes are those of every distinct tensor the fragment model holds (shared
base weights once, folded K/V tables and the folded context rows included).

Selection is by cheap data-free scores (weight norms; quantization error for
precision tiers): this measures bytes, not quality, so running the full-size
UNet to profile it would only cost time.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch
import torch.nn as nn

from ..errors import FragmentError
from ..fragment.build import apply_fragment, build_fragment, describe_base
from ..fragment.extract import plan_levers
from ..fragment.settings import ExtractionSettings, lever_settings
from ..fragment.surgery.feed_forward import FeedForwardLever
from ..fragment.surgery.kv_fold import FoldedProjection
from ..profiling.anatomy import UNET_CONFIGS, build_meta_unet
from ..profiling.evidence import ProfileEvidence
from ..profiling.discovery import iter_attention, out_linear

log = logging.getLogger(__name__)

# SDXL-shaped but small (two levels, 2 transformer layers, text_time embedding): for CI and CPU runs in seconds.
TINY_UNET_CONFIG: dict[str, Any] = {
    "block_out_channels": (32, 64), "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "layers_per_block": 1, "norm_num_groups": 32,
    "cross_attention_dim": 48, "attention_head_dim": (4, 8), "transformer_layers_per_block": (1, 2),
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8, "sample_size": 16,
}
ARCHS = ("sd15", "sdxl", "tiny")
CONTEXT_TOKENS = 77


@dataclass(frozen=True)
class WeightsConfig:
    """Extraction settings plus the low-bit lever (``low_bit_ratio`` of the quantizable Linear and Conv2d
    parameters in ``low_bit_bits``-bit groups of ``low_bit_group``), labelled the bench table's way.

    >>> WeightsConfig(lever_settings(heads=0.3), low_bit_ratio=1.0).label
    'heads 30% + int4 100%'
    """

    settings: ExtractionSettings
    low_bit_ratio: float = 0.0
    low_bit_bits: int = 4
    low_bit_group: int = 64

    @property
    def label(self) -> str:
        return self.extraction_settings().label

    def extraction_settings(self) -> ExtractionSettings:
        """The settings with the low-bit fields set: what ``plan_levers`` reads."""
        if not self.low_bit_ratio:
            return self.settings
        return dataclasses.replace(self.settings, levers={**self.settings.levers, "low_bit": self.low_bit_ratio},
                                   low_bit_bits=self.low_bit_bits, low_bit_group=self.low_bit_group)

    def to_dict(self) -> dict[str, Any]:
        return self.extraction_settings().to_dict()


Config = Union[ExtractionSettings, WeightsConfig]


def as_weights_config(config: Config) -> WeightsConfig:
    """Plain settings as a :class:`WeightsConfig` without the low-bit lever.

    >>> as_weights_config(lever_settings(ff=0.3)).low_bit_ratio
    0.0
    """
    return config if isinstance(config, WeightsConfig) else WeightsConfig(config)


def unet_config(arch: str) -> dict[str, Any]:
    """The diffusers config for ``arch`` (``sd15``/``sdxl`` from anatomy, ``tiny`` for tests).

    >>> unet_config("tiny")["cross_attention_dim"]
    48
    """
    if arch == "tiny":
        return {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_UNET_CONFIG.items()}
    if arch not in UNET_CONFIGS:
        raise FragmentError(f"bench: unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CONFIGS[arch].items()}


def build_random_unet(arch: str, *, dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
    """A full-size (or ``tiny``) UNet with seeded N(0, 0.02) weights, built without an fp32 detour.

    >>> build_random_unet("tiny").dtype
    torch.float16
    """
    if arch == "tiny":
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            unet = UNet2DConditionModel(**unet_config("tiny"))
    else:
        unet = build_meta_unet(arch)  # the anatomy configs, shapes only
    quiet = logging.getLogger("diffusers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # diffusers warns about casting with .to(); there is nothing to keep in fp32 here
    try:
        unet = unet.to(dtype=dtype).to_empty(device=device)
    finally:
        quiet.setLevel(level)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():  # our own freshly allocated tensors: filling them in place is safe
        for t in list(unet.parameters()) + list(unet.buffers()):
            t.normal_(0.0, 0.02, generator=g)
    return unet.eval().requires_grad_(False)


def head_weight_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """Data-free head score: ``||W_q rows of h|| * ||W_out columns of h||``, divided by the module mean.

    Dividing by the module mean (as ``score_heads`` does) keeps a global ranking
    from removing only the smallest heads: norms grow with a head's size.

    >>> scores = head_weight_scores(build_random_unet("tiny"))
    >>> len(scores) > 0 and all(s.ndim == 1 for s in scores.values())
    True
    """
    out: dict[str, torch.Tensor] = {}
    for path, module in iter_attention(model):
        h = int(module.heads)
        q = module.to_q.weight.detach().to(torch.float32).reshape(h, -1).norm(dim=1)
        o = out_linear(module, path).weight.detach().to(torch.float32)
        o = o.reshape(o.shape[0], h, -1).permute(1, 0, 2).reshape(h, -1).norm(dim=1)
        s = q * o
        out[path] = (s / s.mean().clamp_min(1e-30)).cpu()
    return out


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor ``model`` holds (shared storage counted once), folded context rows included.

    >>> resident_bytes(nn.Linear(2, 3))  # 6 weights + 3 biases, float32
    36
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += list({id(m.contexts): m.contexts.rows for m in model.modules() if isinstance(m, FoldedProjection)}.values())
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def random_context(model: nn.Module, rows: int = 2, tokens: int = CONTEXT_TOKENS, seed: int = 1) -> torch.Tensor:
    """A ``[rows, tokens, cross_attention_dim]`` stand-in for (cond, uncond) in the model's dtype.

    >>> random_context(build_random_unet("tiny")).shape
    torch.Size([2, 77, 48])
    """
    p = next(model.parameters())
    g = torch.Generator().manual_seed(seed)
    dim = int(model.config.cross_attention_dim)
    return torch.randn(rows, tokens, dim, generator=g).to(device=p.device, dtype=p.dtype)


def measure(model: nn.Module, config: Config, *, arch: str, before: int | None = None) -> dict[str, Any]:
    """Build the fragment ``config`` describes on ``model``, apply it, and count bytes before and after.

    The low-bit lever has no activation statistics here (random weights, nothing profiled): it is
    round to nearest ranked by weight error, which stores the same bytes as the activation-aware one
    up to its per-input-channel scales (float32, one per input channel of each scaled layer).

    >>> r = measure(build_random_unet("tiny"), lever_settings(heads=0.3, kv_fold=True, ff=0.3), arch="tiny")
    >>> r["bytes_after"] < r["bytes_before"]
    True
    """
    started = time.perf_counter()
    wc = as_weights_config(config)
    config = wc.extraction_settings()
    before = resident_bytes(model) if before is None else before
    evidence = ProfileEvidence.from_scores(head_weight_scores(model),
                                           kv_context=random_context(model) if config.on("kv_fold") else None)
    levers = plan_levers(evidence, config, model=model, name=f"bench-{arch}")
    fragment = build_fragment(model, levers, base=describe_base(model, f"random-{arch}", sha256="random-weights", hash_kind="none"),
                              name=f"bench-{arch}")
    selection = levers[0].selection
    ff = next((lv.selection for lv in levers if isinstance(lv, FeedForwardLever)), None)
    small = apply_fragment(model, fragment)
    after = resident_bytes(small)
    quant = fragment.manifest["compression"].get("precision", {})
    low = fragment.manifest["compression"].get("low_bit", {})
    result = {
        "config": wc.label, "levers": wc.to_dict(),
        "bytes_before": before, "bytes_after": after,
        "reduction_pct": round(100.0 * (before - after) / before, 2),
        "heads_removed": selection.removed_heads, "heads_total": selection.total_heads,
        "ff_channels_removed": ff.removed_heads if ff else 0, "ff_channels_total": ff.total_heads if ff else 0,
        "kv_folded_modules": len(fragment.manifest["compression"].get("kv_fold", {}).get("modules", {})),
        "quantized_layers": len(quant.get("layers", {})), "quantized_params": quant.get("params_quantized", 0),
        "low_bit_layers": len(low.get("layers", {})), "low_bit_params": low.get("params_quantized", 0),
        "fragment_tensor_bytes": sum(t.numel() * t.element_size() for t in fragment.tensors.values()),
        "seconds": round(time.perf_counter() - started, 2),
    }
    del small, fragment
    return result


def sweep_configs(heads: float, kv_fold: bool, ff: float, precision: str | None, precision_ratio: float,
                  low_bit_ratio: float = 0.0, low_bit_bits: int = 4, low_bit_group: int = 64) -> list[Config]:
    """Each requested lever alone, the structural ones together when a weight format is asked too, then all (last).

    With both precision and the low-bit lever, also the structural levers with each format alone: low bits
    instead of fp8 and next to it (precision then stores what the low-bit lever left).

    >>> [c.label for c in sweep_configs(0.3, True, 0.3, None, 1.0)]
    ['heads 30%', 'kv-fold', 'ff 30%', 'heads 30% + kv-fold + ff 30%']
    >>> [c.label for c in sweep_configs(0.3, False, 0.0, "fp8", 1.0, 1.0)][-3:]
    ['heads 30% + fp8 100%', 'heads 30% + int4 100%', 'heads 30% + int4 100% + fp8 100%']
    """
    low = {"low_bit_bits": low_bit_bits, "low_bit_group": low_bit_group}
    alone: list[Config] = []
    if heads:
        alone.append(lever_settings(heads=heads))
    if kv_fold:
        alone.append(lever_settings(kv_fold=True))
    if ff:
        alone.append(lever_settings(ff=ff))
    if precision:
        alone.append(lever_settings(precision=precision, precision_ratio=precision_ratio))
    if low_bit_ratio:
        alone.append(WeightsConfig(lever_settings(), low_bit_ratio, **low))
    combined = WeightsConfig(lever_settings(heads, kv_fold, ff, precision, precision_ratio), low_bit_ratio, **low)
    if len(alone) <= 1:
        return [combined if low_bit_ratio else combined.settings]
    structural = lever_settings(heads, kv_fold, ff)
    formats = int(bool(precision)) + int(bool(low_bit_ratio))
    extra: list[Config] = [structural] if formats and len(alone) > 1 + formats else []
    if precision and low_bit_ratio:
        extra += [lever_settings(heads, kv_fold, ff, precision, precision_ratio), WeightsConfig(structural, low_bit_ratio, **low)]
    # With a weight format on, also the structural levers together: what pruning alone gives before quantizing.
    return alone + extra + [combined if low_bit_ratio else combined.settings]


def bench_weights(arch: str, configs: Sequence[Config], *, seed: int = 0) -> dict[str, Any]:
    """Build ``arch`` once in fp16 and measure every config on it.

    >>> r = bench_weights("tiny", [lever_settings(heads=0.3)])
    >>> r["arch"], r["results"][0]["config"]
    ('tiny', 'heads 30%')
    """
    started = time.perf_counter()
    model = build_random_unet(arch, seed=seed)
    built = time.perf_counter() - started
    before = resident_bytes(model)
    params = sum(p.numel() for p in model.parameters())
    log.info("bench: %s built in %.1f s (%d params, %.2f GB fp16)", arch, built, params, before / 1e9)
    results = [measure(model, c, arch=arch, before=before) for c in configs]
    return {"arch": arch, "dtype": "float16", "params": params, "bytes_before": before, "build_seconds": round(built, 2), "results": results}


def format_bench_table(report: dict[str, Any]) -> str:
    """Fixed-width table of a :func:`bench_weights` report.

    >>> print(format_bench_table({"arch": "x", "params": 1, "bytes_before": 2**30, "results": [
    ...     {"config": "ff 30%", "bytes_after": 2**29, "reduction_pct": 50.0}]}).splitlines()[-1])
    ff 30%                                         1024.0      512.0    50.00%
    """
    width = max([40] + [len(r["config"]) + 2 for r in report["results"]])
    lines = [f"weight bytes: {report['arch']} UNet, {report['params'] / 1e6:,.0f}M params, fp16",
             f"{'configuration':<{width}}{'MiB before':>13}{'MiB after':>11}{'saved':>10}"]
    for r in report["results"]:
        lines.append(f"{r['config']:<{width}}{report['bytes_before'] / 2**20:>13.1f}{r['bytes_after'] / 2**20:>11.1f}{r['reduction_pct']:>9.2f}%")
    return "\n".join(lines)
