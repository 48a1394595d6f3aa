"""The reference text-to-image model: architecture, tokenizer, and loading the committed weights.

A diffusers ``UNet2DConditionModel`` in pixel space, conditioned by a small
transformers ``CLIPTextModel``.  The 32x32 RGB image enters space-to-depth
(``pixel_unshuffle`` by 2: 16x16 with 12 channels, a lossless rearrangement)
plus two coordinate channels; cross-attention runs at 16x16, 8x8 and 4x4
(mid block), 4 heads per attention module, 56 heads in all.  The tokenizer is word-level over
the caption grammar's vocabulary (``reference.captions.vocabulary``), built
with the ``tokenizers`` library at run time, so nothing is downloaded.

diffusers and transformers are imported here only: the node pack never
imports this package (they are the ``[demo]`` extra).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..errors import FragmentError
from .captions import SPECIAL_TOKENS, vocabulary, words

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = WEIGHTS_DIR / "reference.safetensors"
MAX_TOKENS = 32
TEXT_DIM = 128

PATCH = 2  # space-to-depth factor: the UNet sees 16x16 cells of 2x2 pixels
UNET_CONFIG: dict[str, Any] = {
    # Space-to-depth drops the 32x32 level, a third of the training FLOPs on CPU (measured 17.2 -> 11.5 ms
    # per sample), which buys a third more training steps in the same hour.
    "sample_size": 32 // PATCH,
    # 2x2 RGB patches plus two coordinate channels (CoordConv): where a cell is, so "top left" binds to a place
    "in_channels": 3 * PATCH * PATCH + 2,
    "out_channels": 3 * PATCH * PATCH,
    "block_out_channels": (32, 64, 128),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": TEXT_DIM,
    # diffusers' UNet2DConditionModel reads attention_head_dim as the NUMBER of heads (a known naming quirk)
    "attention_head_dim": 4,
    "norm_num_groups": 16,
    # the pooled prompt also enters the time embedding: background, colours and shapes are global facts
    "addition_embed_type": "text",
    "addition_embed_type_num_heads": 4,
}
TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": TEXT_DIM,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": MAX_TOKENS,
}
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
    "clip_sample": False,
}


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError as exc:  # the pack itself never needs them
        raise FragmentError(
            f"reference model: {module} is not installed; install the demo extra with "
            "`pip install prompt-fragments[demo]` (README command 1 does this)") from exc


class WordTokenizer:
    """Word-level tokenizer over the grammar's vocabulary, with <bos>/<eos> and <pad> to ``MAX_TOKENS``.

    Unknown words map to ``<unk>`` rather than failing, so any prompt can be encoded.

    >>> tok = WordTokenizer()
    >>> ids = tok(["a red circle"])
    >>> ids.shape, tok.decode(ids[0])
    (torch.Size([1, 32]), '<bos> a red circle <eos>')
    """

    def __init__(self, vocab: Sequence[str] | None = None, max_length: int = MAX_TOKENS) -> None:
        self.vocab = list(vocab or vocabulary())
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.pad, self.bos, self.eos, self.unk = (self.index[t] for t in SPECIAL_TOKENS)
        self.max_length = max_length

    def encode(self, text: str) -> list[int]:
        ids = [self.index.get(w, self.unk) for w in words(text)][: self.max_length - 2]
        ids = [self.bos, *ids, self.eos]
        return ids + [self.pad] * (self.max_length - len(ids))

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.encode(t) for t in texts], dtype=torch.long)

    def unknown_words(self, text: str) -> list[str]:
        return [w for w in words(text) if w not in self.index]

    def decode(self, ids: torch.Tensor) -> str:
        return " ".join(self.vocab[i] for i in ids.tolist() if i != self.pad)


def with_coordinates(x: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` pixels -> ``[N, 5, H, W]``: the UNet's input, with x and y in -1..1 as two more channels.

    >>> with_coordinates(torch.zeros(1, 3, 2, 2))[0, 3:].tolist()
    [[[-1.0, 1.0], [-1.0, 1.0]], [[-1.0, -1.0], [1.0, 1.0]]]
    """
    n, _, h, w = x.shape
    ys = torch.linspace(-1, 1, h, dtype=x.dtype, device=x.device).view(1, 1, h, 1).expand(n, 1, h, w)
    xs = torch.linspace(-1, 1, w, dtype=x.dtype, device=x.device).view(1, 1, 1, w).expand(n, 1, h, w)
    return torch.cat([x, xs, ys], dim=1)


def unet_input(x: torch.Tensor) -> torch.Tensor:
    """``[N, 3, 32, 32]`` pixels -> the UNet's ``[N, 14, 16, 16]`` input: 2x2 patches as channels, plus coordinates.

    >>> unet_input(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 14, 16, 16])
    """
    return with_coordinates(pack_pixels(x))


def pack_pixels(x: torch.Tensor) -> torch.Tensor:
    """``[N, 3, 32, 32]`` pixels -> ``[N, 12, 16, 16]``: the UNet's layout, 2x2 patches as channels (``unet_output``'s inverse).

    >>> pack_pixels(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 12, 16, 16])
    """
    return torch.nn.functional.pixel_unshuffle(x, PATCH)


def unet_output(sample: torch.Tensor) -> torch.Tensor:
    """The UNet's ``[N, 12, 16, 16]`` output back to ``[N, 3, 32, 32]`` pixels (inverse of the space-to-depth)."""
    return torch.nn.functional.pixel_shuffle(sample, PATCH)


def predict(unet: nn.Module, x: torch.Tensor, t: torch.Tensor | int, context: torch.Tensor) -> torch.Tensor:
    """The model's v-prediction for pixels ``x`` at timestep ``t``: what training and sampling both call.

    >>> # predict(model.unet, torch.randn(2, 3, 32, 32), 500, model.encode(["a red circle"] * 2)).shape
    >>> # torch.Size([2, 3, 32, 32])
    """
    return unet_output(unet(unet_input(x), t, context).sample)


def build_unet() -> nn.Module:
    diffusers = _require("diffusers")
    return diffusers.UNet2DConditionModel(**UNET_CONFIG)


def build_text_encoder(vocab_size: int) -> nn.Module:
    transformers = _require("transformers")
    tok = WordTokenizer()
    config = transformers.CLIPTextConfig(
        vocab_size=vocab_size, pad_token_id=tok.pad, bos_token_id=tok.bos, eos_token_id=tok.eos, **TEXT_CONFIG)
    return transformers.CLIPTextModel(config)


def build_scheduler(kind: str = "ddim") -> Any:
    diffusers = _require("diffusers")
    if kind == "ddim":  # trailing spacing: the first step starts at t=999, pure noise, as in training
        return diffusers.DDIMScheduler(**SCHEDULER_CONFIG, timestep_spacing="trailing")
    return diffusers.DDPMScheduler(**SCHEDULER_CONFIG)


@dataclass
class ReferenceModel:
    """The trained model's parts; ``unet`` is what the fragment pipeline profiles and prunes."""

    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: WordTokenizer
    info: dict[str, Any]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> ``[N, 32, 128]`` context (the text encoder's last hidden state)."""
        ids = self.tokenizer(prompts)
        return self.text_encoder(input_ids=ids).last_hidden_state


def build_reference() -> ReferenceModel:
    """Untrained parts with the reference architecture (training starts from this)."""
    tok = WordTokenizer()
    return ReferenceModel(build_unet(), build_text_encoder(len(tok.vocab)), tok, {})


def state_dict_for_saving(model: ReferenceModel) -> dict[str, torch.Tensor]:
    tensors = {f"unet.{k}": v for k, v in model.unet.state_dict().items()}
    tensors.update({f"text_encoder.{k}": v for k, v in model.text_encoder.state_dict().items()})
    return {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous() for k, v in tensors.items()}


def save_reference(model: ReferenceModel, path: str | Path, info: dict[str, Any]) -> Path:
    """Write fp16 weights plus metadata (vocabulary, configs, training info) to one safetensors file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"vocab": json.dumps(model.tokenizer.vocab), "info": json.dumps(info, sort_keys=True),
                "unet_config": json.dumps(UNET_CONFIG), "text_config": json.dumps(TEXT_CONFIG),
                "scheduler_config": json.dumps(SCHEDULER_CONFIG)}
    tmp = path.with_suffix(".tmp")
    save_file(state_dict_for_saving(model), str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def load_reference(path: str | Path | None = None, dtype: torch.dtype = torch.float32) -> ReferenceModel:
    """Load the committed reference model (or the file at ``path``) in eval mode.

    >>> model = load_reference()  # doctest: +SKIP
    >>> model.encode(["a red circle in the center"]).shape  # doctest: +SKIP
    torch.Size([1, 32, 128])
    """
    from safetensors import safe_open

    path = Path(path) if path is not None else WEIGHTS_FILE
    if not path.is_file():
        raise FragmentError(f"reference model: weights not found at {path}; train them with "
                            "`python tools/train_reference.py --out reference/weights/reference.safetensors`")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    vocab = json.loads(metadata.get("vocab", "null")) or vocabulary()
    tok = WordTokenizer(vocab)
    unet, text = build_unet(), build_text_encoder(len(vocab))
    for prefix, module in (("unet.", unet), ("text_encoder.", text)):
        if dtype != torch.float32:  # before loading, so the stored fp16 values are cast into the module's dtype
            module.to(dtype)
        sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            missing, unexpected = module.load_state_dict(sub, strict=False)
        except RuntimeError as exc:  # shapes differ: weights of another architecture (say, before a retraining)
            first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
            raise FragmentError(f"reference model: {path} does not match the architecture ({prefix[:-1]}: {first})") from None
        if missing or unexpected:
            raise FragmentError(f"reference model: {path} does not match the architecture "
                                f"({prefix[:-1]}: missing {missing[:3]}, unexpected {unexpected[:3]})")
    info = json.loads(metadata.get("info", "{}"))
    return ReferenceModel(unet.eval(), text.eval(), tok, info)
