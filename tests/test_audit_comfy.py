"""Tier 2: BatchGenerator's running audit (issue #26 item 4) and its ``rendered`` input, inside a real ComfyUI.

On a random-weight SD1.5 checkpoint: a fragment from FragmentExtractor is
audited (the audited rows are the full model's, the others the fragment's,
the shared model is left alone); a fragment whose patch is planted to break
the output fails the audit and the rest of the batch runs on the full model,
with a WARNING report.  ``rendered`` is checked on a toy MODEL.
"""
from __future__ import annotations

import re
import sys
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from test_node_messages import ToyBase

STEPS = 2
AUDITED = re.compile(r"audited (\d+) of (\d+): (\d+) passed")


@pytest.fixture(scope="module")
def sd15(comfyui, comfyui_pack, sd15_checkpoint) -> SimpleNamespace:
    """A profiled run, a fragment (30 % of heads pruned) loaded onto the base, and the prompt."""
    nodes, mapping = comfyui.nodes, comfyui_pack.NODE_CLASS_MAPPINGS
    with torch.inference_mode():
        model, clip, _vae, profile = mapping["ProfilerModelLoader"]().load(sd15_checkpoint, 2, 32, "accumulate")
        positive = nodes.CLIPTextEncode().encode(clip, "A dog on a jet ski")[0]
        negative = nodes.CLIPTextEncode().encode(clip, "blurry")[0]
        latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        sampled = nodes.KSampler().sample(model, 1, STEPS, 7.0, "euler", "normal", positive, negative, latent)[0]
        (levers,) = mapping["FragmentManualLevers"]().levers(ratio=0.3, keep_unstable_heads=False)
        handle, _status, _latents = mapping["FragmentExtractor"]().extract(
            profile, sampled, "audit_test", calibrate="off", overwrite=True, levers=levers)["result"]
        # The full model without the profiling hooks, from the same checkpoint load (a second load would double memory).
        base = sys.modules[mapping["FragmentLoader"].__module__].without_profiling(model.clone())
        fragment_model, _ = mapping["FragmentLoader"]().apply(model, "(none)", "raise", fragment=handle)
    return SimpleNamespace(nodes=nodes, mapping=mapping, base=base, fragment_model=fragment_model, positive=positive,
                           negative=negative, latent=latent)


def batch(env: SimpleNamespace, model: Any, seed: int, count: int, **optional: Any) -> dict[str, Any]:
    cls = env.mapping["BatchGenerator"]
    with torch.inference_mode():
        return getattr(cls(), cls.FUNCTION)(model=model, positive=env.positive, negative=env.negative,
                                            latent_image=env.latent, seed=seed, count=count, batch_size=count,
                                            steps=STEPS, cfg=7.0, sampler_name="euler", scheduler="normal",
                                            denoise=1.0, **optional)


class Broken(torch.nn.Module):
    """A planted degradation: a module with fixed large noise added to its output."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(*args, **kwargs)
        noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
        return out + 100.0 * noise.to(out.device, out.dtype)


def test_audit_delivers_full_model_rows_and_reports_on_the_node(sd15) -> None:
    out = batch(sd15, sd15.fragment_model, 20, 4, audit_every=2)
    text = out["ui"]["text"][0]
    match = AUDITED.search(text)
    assert match and match.group(1, 2) == ("2", "4"), text  # images 1 and 3 (indices 0 and 2)
    assert "full-model images delivered: 2" in text and "warning" not in out["ui"]
    (result,) = out["result"]
    plain = batch(sd15, sd15.fragment_model, 20, 4, audit_every=0)["result"][0]["samples"]  # no audit: all the fragment's
    with torch.inference_mode():
        for i, seed in enumerate(range(20, 24)):
            if i in (0, 2):
                full = sd15.nodes.KSampler().sample(sd15.base, seed, STEPS, 7.0, "euler", "normal", sd15.positive,
                                                    sd15.negative, sd15.latent)[0]["samples"]
                torch.testing.assert_close(result["samples"][i:i + 1], full, rtol=1e-4, atol=1e-4)
            else:
                torch.testing.assert_close(result["samples"][i], plain[i], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain[0], result["samples"][0], rtol=1e-4, atol=1e-4)  # the fragment is not the full model


def test_planted_degradation_fails_the_audit_and_the_rest_runs_on_the_full_model(sd15) -> None:
    module = sys.modules[sd15.mapping["BatchGenerator"].__module__]
    marker = sd15.fragment_model.model_options[module.FRAGMENT_PATCHES]
    # The fragment, with one more module of its own: the UNet's output convolution, broken.  (Broken attention
    # modules are not enough on this random checkpoint: noise added to all 31 the fragment replaced moved the
    # latent by under 1 %, inside the gate's limit.)
    key = "diffusion_model.out.2"
    broken = sd15.fragment_model.clone()
    import comfy.utils

    broken.add_object_patch(key, Broken(comfy.utils.get_attr(broken.model, key)))
    broken.model_options[module.FRAGMENT_PATCHES] = {**marker, "keys": sorted([*marker["keys"], key])}
    shared_before = dict(sd15.fragment_model.object_patches)
    out = batch(sd15, broken, 30, 4, audit_every=1)
    text = out["ui"]["text"][0]
    assert text.startswith("WARNING: ") and out["ui"]["warning"] == [text]
    assert "audit failed at image 3 (fragment): rest on the full model" in text, text
    assert AUDITED.search(text).group(1, 3) == ("3", "0")
    (result,) = out["result"]
    # Images 1-3 audited, image 4 after the switch: all four are the full model's (BatchGenerator on the base
    # model equals KSampler per seed: test_nodes.py).
    full = batch(sd15, sd15.base, 30, 4)["result"][0]["samples"]
    torch.testing.assert_close(result["samples"], full, rtol=1e-4, atol=1e-4)
    assert sd15.fragment_model.object_patches == shared_before and key not in sd15.fragment_model.object_patches  # nothing mutated


def test_audit_on_the_full_model_says_it_is_off(sd15) -> None:
    text = batch(sd15, sd15.base, 40, 1, audit_every=2)["ui"]["text"][0]
    assert "audit off: the MODEL carries no fragment" in text and not text.startswith("WARNING")


# --------------------------------------------------------------------------- rendered, on a toy MODEL


@pytest.fixture(scope="module")
def toy(comfyui, comfyui_pack) -> SimpleNamespace:
    import comfy.model_patcher

    toy_model = ToyBase()
    toy_model.memory_required = lambda input_shape, **_: 1024.0
    base = comfy.model_patcher.ModelPatcher(toy_model, torch.device("cpu"), torch.device("cpu"))
    return SimpleNamespace(cls=comfyui_pack.NODE_CLASS_MAPPINGS["BatchGenerator"], base=base)


def test_rendered_seeds_are_not_rendered_again_and_keep_their_places(toy, monkeypatch: pytest.MonkeyPatch) -> None:
    import comfy.sample

    sampled: list[int] = []

    def sample(model: Any, noise: torch.Tensor, *args: Any, seed: int = 0, **kwargs: Any) -> torch.Tensor:
        sampled.append(noise.shape[0])
        return noise

    monkeypatch.setattr(comfy.sample, "sample", sample)
    given = torch.full((2, 4, 8, 8), 7.0)
    rendered = {"samples": given, "fragment_seeds": [12, 99]}  # 99 is no seed of this batch: ignored
    out = getattr(toy.cls(), toy.cls.FUNCTION)(
        model=toy.base, positive=[], negative=[], latent_image={"samples": torch.zeros(1, 4, 8, 8)}, seed=10, count=4,
        batch_size=4, steps=1, cfg=7.0, sampler_name="euler", scheduler="normal", denoise=1.0, rendered=rendered)
    samples = out["result"][0]["samples"]
    assert samples.shape == (4, 4, 8, 8) and sampled == [3]
    torch.testing.assert_close(samples[2], given[0])
    assert not torch.equal(samples[1], given[0])
    text = out["ui"]["text"][0]
    assert "1 rows from rendered (not rendered again)" in text and "full-model images delivered: 1" in text


def test_rendered_of_the_wrong_form_is_refused_with_what_to_do(toy) -> None:
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    for rendered, expected in (({"samples": torch.zeros(2, 4, 8, 8), "fragment_seeds": [1]}, "1 seeds for 2 rows"),
                               ({"samples": torch.zeros(1, 4, 4, 4), "fragment_seeds": [1]}, "rows of shape")):
        with pytest.raises(Exception, match=f"BatchGenerator rendered: .*{expected}") as info:
            toy.cls().generate(toy.base, [], [], latent, 1, 2, 2, 1, 7.0, "euler", "normal", 1.0, rendered=rendered)
        assert type(info.value).__name__ == "FragmentError"
