"""Where a Stable Diffusion UNet's parameters are, from the architecture alone.

Why this exists: pruning attention *heads* looks like the obvious way to
shrink a UNet, but the heads only own the attention projections
(``to_q``, ``to_k``, ``to_v``, ``to_out.0``). In SD1.5 those are about 11%
of the UNet's parameters and in SDXL about 37%; the feed-forward layers,
convolutions, norms and embeddings own the rest. Even removing *every*
head would leave most of the weights in place: heads alone cannot reach a
25% cut in VRAM on SD1.5 at all, and on SDXL only by removing about two
thirds of all heads (before counting the text encoders, VAE and
activations, which heads do not touch). This module measures that split so the claim rests on
numbers rather than intuition.

The UNet is built with ``torch.device("meta")``: shapes only, no weights,
no memory, no download. Each parameter is counted in exactly one category:

* ``attn1_qkvo``: self-attention ``to_q``, ``to_k``, ``to_v``, ``to_out.0``
* ``attn2_q``: cross-attention ``to_q``
* ``attn2_kv``: cross-attention ``to_k`` and ``to_v``
* ``attn2_out``: cross-attention ``to_out.0``
* ``feed_forward``: ``ff.net.0.proj`` and ``ff.net.2``
* ``conv``: every ``nn.Conv2d``
* ``other``: everything else (norms, time/text embeddings, ``proj_in``/``proj_out``)

Attention modules are found structurally (diffusers' ``Attention`` carries
``is_cross_attention``), never by hard-coded block ids.
"""
from __future__ import annotations

import logging
from typing import Any

from ..errors import FragmentError

log = logging.getLogger(__name__)

CATEGORIES: tuple[str, ...] = (
    "attn1_qkvo",
    "attn2_q",
    "attn2_kv",
    "attn2_out",
    "feed_forward",
    "conv",
    "other",
)

# runwayml/stable-diffusion-v1-5, unet/config.json
SD15_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": (320, 640, 1280, 1280),
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
}

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
SDXL_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": (5, 10, 20),
    "block_out_channels": (320, 640, 1280),
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": (1, 2, 10),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "upcast_attention": False,
    "use_linear_projection": True,
}

UNET_CONFIGS: dict[str, dict[str, Any]] = {"sd15": SD15_UNET_CONFIG, "sdxl": SDXL_UNET_CONFIG}


def build_meta_unet(arch: str) -> Any:
    """Build the UNet for ``arch`` on the meta device (no weights allocated)."""
    if arch not in UNET_CONFIGS:
        raise FragmentError(
            f"anatomy: unknown arch {arch!r}; expected one of {', '.join(sorted(UNET_CONFIGS))}"
        )
    try:
        import torch
        from diffusers import UNet2DConditionModel
    except ImportError as exc:
        raise FragmentError(
            "anatomy: needs diffusers and torch, which are not installed; install the [demo] extra "
            "(pip install prompt-fragments[demo]) or pip install diffusers"
        ) from exc
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CONFIGS[arch].items()}
    log.debug("building %s UNet on the meta device", arch)
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def _categorize(unet: Any) -> tuple[dict[int, str], dict[str, int], dict[str, int]]:
    """Map ``id(param)`` to a category; also count attention modules and heads."""
    from diffusers.models.attention import FeedForward
    from torch import nn

    owner: dict[int, str] = {}
    modules = {"self": 0, "cross": 0}
    heads = {"self": 0, "cross": 0}

    def claim(module: nn.Module, category: str) -> None:
        for p in module.parameters(recurse=True):
            owner.setdefault(id(p), category)

    for _name, module in unet.named_modules():
        if hasattr(module, "is_cross_attention") and hasattr(module, "to_q"):
            kind = "cross" if module.is_cross_attention else "self"
            modules[kind] += 1
            heads[kind] += int(module.heads)
            if kind == "self":
                for sub in (module.to_q, module.to_k, module.to_v, module.to_out[0]):
                    claim(sub, "attn1_qkvo")
            else:
                claim(module.to_q, "attn2_q")
                claim(module.to_k, "attn2_kv")
                claim(module.to_v, "attn2_kv")
                claim(module.to_out[0], "attn2_out")
        elif isinstance(module, FeedForward):
            claim(module.net[0].proj, "feed_forward")
            claim(module.net[2], "feed_forward")
        elif isinstance(module, nn.Conv2d):
            claim(module, "conv")
    return owner, modules, heads


def compute_anatomy(arch: str) -> dict[str, Any]:
    """Count the UNet's parameters per category, from the architecture alone.

    Builds the UNet on the meta device, so it needs no weights, no GPU and
    no network, only ``diffusers`` and ``torch``.

    >>> r = compute_anatomy("sd15")  # doctest: +SKIP
    >>> round(r["categories"]["feed_forward"]["percent"], 1)  # doctest: +SKIP
    17.3

    Raises :class:`FragmentError` for an unknown ``arch`` (expected ``sd15``
    or ``sdxl``) or when diffusers is not installed.
    """
    unet = build_meta_unet(arch)
    owner, modules, heads = _categorize(unet)
    counts = dict.fromkeys(CATEGORIES, 0)
    for p in unet.parameters():
        counts[owner.get(id(p), "other")] += p.numel()
    total = sum(counts.values())
    if total == 0:
        raise FragmentError(f"anatomy: the {arch} UNet has no parameters")
    categories = {
        name: {"params": n, "fraction": n / total, "percent": round(100.0 * n / total, 2)}
        for name, n in counts.items()
    }
    log.debug("%s: %d parameters, %s attention modules", arch, total, modules)
    return {
        "arch": arch,
        "total_params": total,
        "categories": categories,
        "attention_modules": modules,
        "heads": heads,
    }


def format_anatomy_table(result: dict[str, Any]) -> str:
    """Render a :func:`compute_anatomy` result as a fixed-width table.

    >>> r = {"arch": "x", "total_params": 4, "attention_modules": {"self": 1, "cross": 1},
    ...      "heads": {"self": 8, "cross": 8},
    ...      "categories": {"conv": {"params": 4, "fraction": 1.0, "percent": 100.0}}}
    >>> print(format_anatomy_table(r).splitlines()[2])
    conv                         4         0.0   100.00%
    """
    lines = [
        f"UNet anatomy: {result['arch']}  ({result['total_params'] / 1e6:,.1f}M parameters)",
        f"{'category':<14}{'params':>16}{'millions':>12}{'percent':>10}",
    ]
    for name, cat in result["categories"].items():
        lines.append(
            f"{name:<14}{cat['params']:>16,}{cat['params'] / 1e6:>12.1f}{cat['percent']:>9.2f}%"
        )
    lines.append("-" * 52)
    lines.append(f"{'total':<14}{result['total_params']:>16,}{result['total_params'] / 1e6:>12.1f}{100.0:>9.2f}%")
    mods, heads = result["attention_modules"], result["heads"]
    lines.append(
        f"attention modules: {mods['self']} self ({heads['self']} heads), "
        f"{mods['cross']} cross ({heads['cross']} heads)"
    )
    return "\n".join(lines)
