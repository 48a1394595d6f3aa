"""CLIP text-image similarity with open_clip: cosine of the normalised image and text embeddings.

Weights come from, in this order of preference:

- ``model="local-dir:/path"``: a folder with ``open_clip_config.json`` and a
  weights file (open_clip's own layout);
- ``pretrained="/path/to/weights.safetensors"`` (or ``.bin``/``.pt``) with a
  built-in architecture name such as ``ViT-B-32``;
- ``pretrained="<tag>"`` (e.g. ``laion2b_s34b_b79k``): open_clip's normal
  download, for users with a network (``allow_download=True``).

Nothing else: a CLIP score from random weights would look like a number and
mean nothing, so missing weights raise a :class:`FragmentError` naming the
option to set.  Tests build a tiny random tower explicitly with
:func:`random_clip`, whose scores only exercise the code path.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import FragmentError
from ..judge.image_similarity import as_batch

log = logging.getLogger(__name__)

_WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors", "pytorch_model.bin")
# CLIP's own input normalisation (ImageNet-like statistics from the CLIP paper).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipModel:
    """A loaded CLIP model with its tokenizer, input size and where its weights came from."""

    model: nn.Module
    tokenizer: Any
    image_size: int
    weights: str  # a path, a tag, or "random (test only)"


def _open_clip():
    try:
        import open_clip
    except ImportError as exc:
        raise FragmentError("CLIP score needs open_clip_torch; run `pip install prompt-fragments[metrics]`") from exc
    return open_clip


def _image_size(model: nn.Module, default: int = 224) -> int:
    size = getattr(getattr(model, "visual", None), "image_size", default)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def load_clip(
    model: str = "ViT-B-32", *, pretrained: str | os.PathLike | None = None, allow_download: bool = False,
    device: str | torch.device = "cpu",
) -> ClipModel:
    """Load a CLIP model for scoring from local weights (or a tag download when ``allow_download``).

    >>> load_clip("ViT-B-32")
    Traceback (most recent call last):
    ...
    prompt_fragments.errors.FragmentError: CLIP weights: none given for model 'ViT-B-32'; set the CLIP option pretrained= to a local weights file, or model='local-dir:DIR' (a folder with open_clip_config.json and weights), or pretrained=<tag> with allow_download=True where there is a network
    """
    open_clip = _open_clip()
    if model.startswith("local-dir:"):
        folder = Path(model[len("local-dir:"):])
        if not (folder / "open_clip_config.json").is_file():
            raise FragmentError(f"CLIP option model={model!r}: expected {folder / 'open_clip_config.json'}, found nothing")
        if not any((folder / n).is_file() for n in _WEIGHT_NAMES):
            # open_clip would only warn and go on with random weights.
            raise FragmentError(f"CLIP option model={model!r}: expected a weights file ({', '.join(_WEIGHT_NAMES)}) in {folder}, found none")
        weights = str(folder)
        net = open_clip.create_model(model, device=device)
    elif pretrained is None:
        raise FragmentError(
            f"CLIP weights: none given for model {model!r}; set the CLIP option pretrained= to a local weights file, "
            "or model='local-dir:DIR' (a folder with open_clip_config.json and weights), "
            "or pretrained=<tag> with allow_download=True where there is a network"
        )
    elif Path(pretrained).is_file():
        weights = str(pretrained)
        net = open_clip.create_model(model, pretrained=weights, device=device)
    elif not allow_download:
        raise FragmentError(
            f"CLIP option pretrained={str(pretrained)!r}: expected a local weights file, found none; "
            "a tag is downloaded only with allow_download=True"
        )
    else:
        weights = str(pretrained)
        try:
            net = open_clip.create_model(model, pretrained=weights, device=device)
        except Exception as exc:  # no network, unknown tag, hub errors
            raise FragmentError(
                f"CLIP option pretrained={weights!r} for model {model!r}: download failed ({exc}); "
                "offline, set pretrained= to a local weights file"
            ) from exc
    return ClipModel(model=net.eval(), tokenizer=open_clip.get_tokenizer(model), image_size=_image_size(net), weights=weights)


def random_clip(seed: int = 0, width: int = 32) -> ClipModel:
    """A tiny open_clip CLIP with seeded random weights: for tests and demos only, its scores mean nothing.

    >>> clip = random_clip()
    >>> clip.weights, clip.image_size
    ('random (test only)', 32)
    """
    open_clip = _open_clip()
    torch.manual_seed(seed)
    vision = {"image_size": 32, "layers": 1, "width": width, "patch_size": 8, "head_width": 16}
    text = {"context_length": 77, "vocab_size": 49408, "width": width, "heads": 2, "layers": 1}
    net = open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()
    return ClipModel(model=net, tokenizer=open_clip.get_tokenizer("ViT-B-32"), image_size=32, weights="random (test only)")


def preprocess(images: Any, size: int) -> torch.Tensor:
    """IMAGE ``[N, H, W, 3]`` 0..1 -> CLIP input ``[N, 3, size, size]``: resize short side, centre crop, normalise.

    >>> tuple(preprocess(torch.rand(2, 40, 60, 3), 32).shape)
    (2, 3, 32, 32)
    """
    x = as_batch(images).permute(0, 3, 1, 2)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False).clamp(0, 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[:, :, top:top + size, left:left + size]
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def clip_similarity(clip: ClipModel, images: Any, captions: str | Sequence[str], batch: int = 16) -> list[float]:
    """Cosine similarity of each image with its caption (one caption for all, or one per image).

    >>> clip = random_clip()
    >>> s = clip_similarity(clip, torch.rand(2, 32, 32, 3), "a dog on a jet ski")
    >>> len(s), all(-1.0 <= v <= 1.0 for v in s)
    (2, True)
    """
    imgs = as_batch(images)
    texts = [captions] * imgs.shape[0] if isinstance(captions, str) else list(captions)
    if len(texts) != imgs.shape[0]:
        raise FragmentError(f"CLIP captions: expected 1 or {imgs.shape[0]} captions, found {len(texts)}")
    device = next(clip.model.parameters()).device
    out: list[float] = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            pixels = preprocess(imgs[i:i + batch], clip.image_size).to(device)
            tokens = clip.tokenizer(texts[i:i + batch]).to(device)
            img_emb = F.normalize(clip.model.encode_image(pixels).float(), dim=-1)
            txt_emb = F.normalize(clip.model.encode_text(tokens).float(), dim=-1)
            out.extend(float(v) for v in (img_emb * txt_emb).sum(-1))
    return out


def clip_scorer(clip: ClipModel):
    """Bind a loaded model into a ``(images, captions) -> similarities`` callable named ``clip``.

    >>> clip_scorer(random_clip()).__name__
    'clip'
    """
    def score(images: Any, captions: str | Sequence[str]) -> list[float]:
        return clip_similarity(clip, images, captions)

    score.__name__ = "clip"
    return score
