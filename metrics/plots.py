"""The report's PNG figures: latency, quality against pruning ratio, head heatmap, image grids.

matplotlib (``[metrics]`` extra) draws the charts with its non-interactive
Agg backend, so no display is needed.  The heatmap and image tiles are
written with Pillow from tensors, which the core already has.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..errors import FragmentError

log = logging.getLogger(__name__)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never open a window, never need a display
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise FragmentError("report plots need matplotlib; run `pip install prompt-fragments[metrics]`") from exc
    return plt


def save_image(image: Any, path: str | os.PathLike, *, min_side: int = 0) -> Path:
    """Write one IMAGE ``[H, W, 3]`` (0..1) as PNG, upscaled by whole pixels to at least ``min_side``.

    >>> import tempfile; p = save_image(torch.zeros(4, 4, 3), tempfile.mkdtemp() + "/x.png", min_side=16)
    >>> __import__("PIL.Image").Image.open(p).size
    (16, 16)
    """
    from PIL import Image

    t = torch.as_tensor(image).detach().float().cpu()
    if t.dim() == 4:
        t = t[0]
    arr = (t.clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    side = min(img.size)
    if min_side and side < min_side:
        factor = -(-min_side // side)
        img = img.resize((img.size[0] * factor, img.size[1] * factor), Image.NEAREST)  # crisp pixels, no blur
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def latency_plot(performance: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Bar chart of per-image latency (ms), full model vs fragment."""
    plt = _pyplot()
    labels = ["full", "fragment"]
    values = [performance.get("latency_full_ms") or 0.0, performance.get("latency_fragment_ms") or 0.0]
    fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
    bars = ax.bar(labels, values, color=["#4c72b0", "#dd8452"])
    for bar, v in zip(bars, values):
        ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    speed = performance.get("batch_speedup")
    ax.set_title(f"latency per image (ms){f', speedup {speed:.2f}x' if speed else ''}", fontsize=9)
    ax.set_ylabel("ms")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def loss_curve_plot(steps: Sequence[int], losses: Sequence[float], path: str | os.PathLike, title: str) -> Path:
    """Training loss against step, log scale (the reference model's card shows it)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot(list(steps), list(losses), color="#4c72b0", linewidth=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def lever_curves_plot(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike) -> Path:
    """Per lever: adherence drop and 1 - SSIM against the fraction of weight bytes saved."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=100)
    for lever, points in curves.items():
        pts = sorted(points, key=lambda r: r["bytes_saved"])
        xs = [p["bytes_saved"] for p in pts]
        for ax, key, f in ((axes[0], "adherence_delta", lambda v: v), (axes[1], "ssim_mean", lambda v: 1 - v)):
            ys = [f(p[key]) if p.get(key) is not None else np.nan for p in pts]
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1, label=lever)
    for ax, title in zip(axes, ("adherence drop", "1 - SSIM vs full model")):
        ax.set_xlabel("weight bytes saved")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def quality_tradeoff_plot(curve: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Quality metrics (LPIPS, 1 - SSIM, CLIP drop) against the fraction of heads removed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    pts = sorted(curve, key=lambda r: r.get("ratio", 0.0))
    xs = [p.get("ratio", 0.0) for p in pts]
    for key, label, f in (("lpips_mean", "LPIPS", lambda v: v), ("ssim_mean", "1 - SSIM", lambda v: 1 - v),
                          ("clip_drop_rel", "CLIP drop (rel.)", lambda v: v), ("adherence_delta", "adherence drop", lambda v: v)):
        ys = [f(p[key]) if p.get(key) is not None else np.nan for p in pts]
        if not all(np.isnan(ys)):
            ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("fraction of heads removed")
    ax.set_ylabel("distance to full model (lower is better)")
    ax.set_title("quality vs pruning ratio", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def heatmap_plot(scores: Mapping[str, torch.Tensor], kept: Mapping[str, Sequence[int]] | None, path: str | os.PathLike) -> Path:
    """The head-importance heatmap of ``profiling.heatmap`` as a PNG (rows: modules, columns: heads)."""
    from ..profiling.heatmap import head_heatmap

    return save_image(head_heatmap(scores, kept=kept, cell=12)[0], path)


def image_pairs(full: Any, fragment: Any, folder: str | os.PathLike, *, limit: int = 8, min_side: int = 128) -> list[dict[str, str]]:
    """Save up to ``limit`` full/fragment pairs as PNGs; return their file names relative to ``folder``'s parent.

    >>> import tempfile; d = Path(tempfile.mkdtemp()) / "images"
    >>> image_pairs(torch.zeros(1, 8, 8, 3), torch.ones(1, 8, 8, 3), d, min_side=8)
    [{'full': 'images/full_000.png', 'fragment': 'images/fragment_000.png'}]
    """
    folder = Path(folder)
    full_t, frag_t = torch.as_tensor(full), torch.as_tensor(fragment)
    pairs = []
    for i in range(min(limit, full_t.shape[0], frag_t.shape[0])):
        a = save_image(full_t[i], folder / f"full_{i:03d}.png", min_side=min_side)
        b = save_image(frag_t[i], folder / f"fragment_{i:03d}.png", min_side=min_side)
        pairs.append({"full": f"{folder.name}/{a.name}", "fragment": f"{folder.name}/{b.name}"})
    return pairs


def peer_tradeoff_plot(rows: Sequence[Mapping[str, Any]], lpips_limit: float | None, path: str | os.PathLike) -> Path:
    """LPIPS to stock against speed-up, one point per measured row, coloured by method; the gate's LPIPS limit dashed.

    Rows without an LPIPS value (errors, the stock row, judges without LPIPS) are left out of the axes but
    counted in the title, so a sparse plot says why it is sparse.

    >>> import tempfile; p = peer_tradeoff_plot([{"method": "tome", "speedup": 1.1, "quality": {"lpips_mean": 0.02}}],
    ...                                          0.035, tempfile.mkdtemp() + "/peers.png")
    >>> p.exists()
    True
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=100)
    methods: dict[str, list[tuple[float, float]]] = {}
    unplotted = 0
    for row in rows:
        lp = (row.get("quality") or {}).get("lpips_mean")
        if row.get("speedup") is None or lp is None:
            unplotted += 1
            continue
        methods.setdefault(row["method"], []).append((row["speedup"], lp))
    markers = "osD^v<>PX*"
    for i, (method, pts) in enumerate(methods.items()):
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=method, marker=markers[i % len(markers)], s=28)
    if lpips_limit is not None:
        ax.axhline(lpips_limit, color="#c44e52", linestyle="--", linewidth=1, label=f"gate LPIPS {lpips_limit:g}")
    ax.axvline(1.0, color="#999999", linewidth=0.8)
    ax.set_xlabel("speed-up vs stock (raw, same seeds)")
    ax.set_ylabel("LPIPS to stock (lower is better)")
    ax.set_title(f"peers at equal quality{f' ({unplotted} row(s) without LPIPS not drawn)' if unplotted else ''}", fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
