"""The calibration's judge inside ComfyUI: render seeds with a candidate fragment, compare with the full model.

``ComfyJudge`` is the ComfyUI twin of ``judge.fragment_judge.fragment_judge``: the
``judge_fragment(fragment, seeds)`` callable that
``fragment.extract.calibrated_fragment`` takes.  It renders on clones of the
profiled ModelPatcher with the fragment put on exactly as FragmentLoader puts it
and with the profiling hooks off (the node pack passes those ways in as
``ComfyModels``: ``nodes.fragment_loader.JUDGE_MODELS``), so judging never adds
to the profile and never changes the shared model.

The full model's output for the profiled seed is the profiled sampler's LATENT
(the extractor's ``trigger``); held-out seeds are rendered with the full model
once, on first use, so their cost lands in the calibration's time.  With a VAE
the judge decodes and measures SSIM (and LPIPS when its weights are there);
without one it measures the latents' mean relative L2 error, a proxy, and says so.

This module imports ComfyUI (``comfy.sample``): only ``nodes/`` imports it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import comfy.sample
import torch

from ..defaults import DEFAULT_THRESHOLDS
from ..errors import FragmentError
from ..fragment.calibration import Judgement
from ..fragment.format.manifest import Fragment
from .gate import gate_failures, gate_slack, image_tails, measurable_limits
from .image_similarity import ssim
from .latent_distance import latent_rel_error
from .thresholds import load_thresholds

log = logging.getLogger(__name__)
#: The latent judge's name (no VAE connected), which BatchGenerator's running audit also is: its verdicts go into the
#: prior under this name, so a latent-judged calibration on the same model configuration starts from them.
LATENT_JUDGE = "latent_rel_error of the final latents vs the full model's same-seed latents (judged in latent space: no VAE)"

# Samplers that call the model twice per step (heun's last step once): their profiled calls are not their steps.
# Re-rendering the profiled run on another device order (GPU kernels) moves a latent by far less than this;
# another seed or sampler setting moves it by about 1 (two independent latents of equal norm: 1.4).
REFERENCE_TOLERANCE = 0.02
TWO_CALLS_PER_STEP = frozenset({"heun", "heunpp2", "dpm_2", "dpm_2_ancestral", "dpmpp_sde", "dpmpp_sde_gpu",
                                "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp"})


@dataclass(frozen=True)
class SamplerSettings:
    """What the profiled KSampler ran with: the judge renders every candidate with the same settings.

    >>> SamplerSettings(seed=1, steps=20, cfg=7.0, sampler_name="euler", scheduler="normal").steps
    20
    """

    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str


def check_steps(settings: SamplerSettings, profiled_calls: int | None, where: str = "FragmentExtractor") -> None:
    """Raise when ``settings.steps`` cannot be the profiled run's step count (``profiled_calls``: model calls of one run).

    A schedule and a reference made for other steps would judge the wrong run.

    >>> check_steps(SamplerSettings(1, 4, 7.0, "euler", "normal"), 4)
    >>> try:
    ...     check_steps(SamplerSettings(1, 20, 7.0, "euler", "normal"), 4)
    ... except FragmentError as exc:
    ...     print(exc)
    FragmentExtractor: steps is 20, but the profiled sampler run made 4 model calls (euler: 4 steps); profile again with on_requeue reset (a profile's step statistics come from its first run, so its runs must share one step count), or set calibrate to off
    """
    if not profiled_calls:
        return
    steps = settings.steps
    expected = {2 * steps - 1, 2 * steps} if settings.sampler_name in TWO_CALLS_PER_STEP else {steps}
    if profiled_calls not in expected:
        per_step = 2 if settings.sampler_name in TWO_CALLS_PER_STEP else 1
        raise FragmentError(
            f"{where}: steps is {steps}, but the profiled sampler run made {profiled_calls} model calls "
            f"({settings.sampler_name}: {-(-profiled_calls // per_step)} steps); profile again with on_requeue reset "
            "(a profile's step statistics come from its first run, so its runs must share one step count), or set "
            "calibrate to off")


def render(patcher: Any, settings: SamplerSettings, positive: Any, negative: Any, latent: Mapping[str, Any],
           seed: int) -> torch.Tensor:
    """One sampler run of ``patcher`` for ``seed``, as ``nodes.common_ksampler`` runs KSampler (denoise 1, no preview).

    ``latent`` is the profiled sampler's input shape: an empty latent batch, so every image of the batch
    gets the noise KSampler gives it for this seed.

    >>> render(patcher, SamplerSettings(1, 4, 7.0, "euler", "normal"), pos, neg, {"samples": zeros}, 1).shape  # doctest: +SKIP
    torch.Size([1, 4, 8, 8])
    """
    latent_image = latent["samples"]
    fix = getattr(comfy.sample, "fix_empty_latent_channels", None)  # 0.3.x; the 2024 runtime has no such step
    if fix is not None:
        latent_image = fix(patcher, latent_image)
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    samples = comfy.sample.sample(patcher, noise, settings.steps, settings.cfg, settings.sampler_name, settings.scheduler,
                                  positive, negative, latent_image, denoise=1.0, disable_pbar=True, seed=seed)
    return samples.detach().float().cpu()


def judge_limits(vae: bool, lpips: bool, path: str | Path | None = None) -> dict[str, float]:
    """The ``quality_gate`` limits this judge can measure: SSIM (and LPIPS) on images, else the latent proxy.

    Adherence needs the reference model's analyzer, which ComfyUI's prompts have not, so its limit is
    always dropped; an image judge drops the latent proxy, a latent judge the image limits.

    >>> sorted(judge_limits(vae=True, lpips=False))
    ['ssim_min', 'variants']
    >>> sorted(judge_limits(vae=False, lpips=False))
    ['latent_rel_error_max', 'variants']
    """
    limits = load_thresholds(DEFAULT_THRESHOLDS if path is None else path)["quality_gate"]
    unmeasured = ["adherence_delta"] + (["latent_rel_error"] if vae else ["ssim_mean", "lpips_mean"])
    if vae and not lpips:
        unmeasured.append("lpips_mean")
    return measurable_limits(limits, unmeasured)


@dataclass(frozen=True)
class ComfyModels:
    """The node pack's ways to get the models the judge renders with (passed in: the judge imports no node module).

    ``full(patcher)``: an unprofiled clone of the full model; ``with_fragment(patcher, fragment, originals, digest)``:
    a clone with ``fragment`` put on as FragmentLoader puts it, never profiling; ``release(patcher)``: unload the
    clones ComfyUI keeps loaded, so the shared modules carry no object patch.

    >>> models = ComfyModels(full=lambda p: p, with_fragment=lambda p, f, originals, digest: p, release=lambda p: None)
    >>> models.full("patcher")
    'patcher'
    """

    full: Callable[[Any], Any]
    with_fragment: Callable[[Any, Fragment, "dict[str, Any] | None", "str | None"], Any]
    release: Callable[[Any], None]


class ComfyJudge:
    """``judge(fragment, seeds) -> Judgement`` on a clone of the profiled MODEL; see the module docstring.

    >>> judge = ComfyJudge(profile.patcher, settings, positive, negative, trigger, models=JUDGE_MODELS, vae=vae,  # doctest: +SKIP
    ...                    digest=digest)
    >>> judge(fragment, [settings.seed]).metrics["ssim_mean"]  # doctest: +SKIP
    0.97
    """

    def __init__(self, patcher: Any, settings: SamplerSettings, positive: Any, negative: Any, trigger: Mapping[str, Any],
                 *, models: ComfyModels, vae: Any = None, digest: str | None = None, originals: dict[str, Any] | None = None,
                 lpips: Callable[[Any, Any], list[float]] | None = None, limits: Mapping[str, float] | None = None) -> None:
        if positive is None or negative is None:
            raise FragmentError("FragmentExtractor: calibration needs the positive and negative CONDITIONING inputs "
                                "(the profiled prompt), found none; connect the profiled KSampler's positive and "
                                "negative, or set calibrate to off")
        self.patcher, self.settings, self.positive, self.negative = patcher, settings, positive, negative
        self.models = models
        self.vae, self.digest, self.originals = vae, digest, originals
        self.lpips = lpips if vae is not None else None
        self.limits = dict(limits) if limits is not None else judge_limits(vae is not None, self.lpips is not None)
        samples = trigger["samples"]
        # The profiled run started from an empty latent (txt2img): the same shape, all zeros, and its batch indices.
        self.latent = {"samples": torch.zeros_like(samples)}
        if "batch_index" in trigger:
            self.latent["batch_index"] = trigger["batch_index"]
        self.references: dict[int, torch.Tensor] = {settings.seed: samples.detach().float().cpu()}
        self.decoded: dict[int, torch.Tensor] = {}
        self.reference_seconds: float | None = None  # the reference check's render: one full-model (stock) run

    @property
    def unit_s(self) -> float | None:
        """Seconds of one stock image (``u``), from the reference check's full-model render (None before it ran)."""
        if self.reference_seconds is None or self.reference_seconds <= 0:
            return None
        return self.reference_seconds / self.batch

    @property
    def batch(self) -> int:
        """Images one seed renders (the latent batch)."""
        return int(self.latent["samples"].shape[0])

    @property
    def name(self) -> str:
        if self.vae is None:
            return LATENT_JUDGE
        return ("SSIM" + (" + LPIPS" if self.lpips is not None else "") +
                " of the decoded images vs the full model's same-seed images (quality_gate of thresholds.yaml)")

    def _run(self, patcher: Any, seed: int) -> torch.Tensor:
        try:
            return render(patcher, self.settings, self.positive, self.negative, self.latent, seed)
        finally:
            # ComfyUI may keep the clone loaded, its object patches on the shared modules: put the originals
            # back, so the next candidate is built from (and the profile keeps describing) the full model.
            self.models.release(self.patcher)

    def reference(self, seed: int) -> torch.Tensor:
        """The full model's latents for ``seed``: the profiled run's, or rendered once, unprofiled."""
        if seed not in self.references:
            self.references[seed] = self._run(self.models.full(self.patcher), seed)
        return self.references[seed]

    def check_reference(self, tolerance: float = REFERENCE_TOLERANCE) -> float:
        """Render the full model for the profiled seed and raise unless it reproduces the ``trigger`` LATENT.

        A seed, cfg, sampler or scheduler other than the profiled KSampler's (or a non-empty
        input latent, or denoise below 1) would make every comparison wrong; one render finds out.
        Returns the relative error found (0 on a deterministic device); the render's seconds are ``unit_s``.
        """
        seed = self.settings.seed
        started = time.perf_counter()
        rendered = self._run(self.models.full(self.patcher), seed)
        self.reference_seconds = time.perf_counter() - started
        error = latent_rel_error(self.references[seed], rendered)
        if error > tolerance:
            raise FragmentError(
                f"FragmentExtractor: the trigger LATENT is not the full model's output for seed {seed}, "
                f"{self.settings.steps} steps, cfg {self.settings.cfg:g}, {self.settings.sampler_name}/{self.settings.scheduler} "
                f"(relative error {error:.3g}); connect the profiled KSampler's LATENT output to trigger, and leave the "
                "seed, steps, cfg, sampler_name and scheduler overrides unconnected (the profiled run's are used; "
                "calibration needs an empty input latent and denoise 1), or set calibrate to off")
        return error

    def _images(self, samples: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(samples).float().clamp(0, 1).cpu()

    def measure(self, reference: torch.Tensor, samples: torch.Tensor, reference_images: torch.Tensor | None = None) -> dict[str, Any]:
        """The judged metrics of ``samples`` against ``reference`` (latents), gate verdict and slack included."""
        if self.vae is None:
            metrics: dict[str, Any] = {"latent_rel_error": latent_rel_error(reference, samples), "space": "latent"}
        else:
            full = self._images(reference) if reference_images is None else reference_images
            images = self._images(samples)
            scores = [min(1.0, v) for v in ssim(full, images)]  # float rounding puts identical images at 1.000001
            metrics = {"ssim_mean": sum(scores) / len(scores), "ssim_min": min(scores), "space": "image"}
            distances = None
            if self.lpips is not None:
                distances = self.lpips(full, images)
                metrics["lpips_mean"] = sum(distances) / len(distances)
            # the per-image tails beside the means (issue #26 item 5), as the reference judge reports them
            tails = image_tails(scores, distances, self.limits.get("ssim_min"))
            metrics.update({k: v for k, v in tails.items() if v is not None})
        failures = gate_failures(metrics, self.limits)
        return {**metrics, "gate_failures": failures, "gate_slack": gate_slack(metrics, self.limits)}

    def __call__(self, fragment: Fragment, seeds: Sequence[int]) -> Judgement:
        references = [self.reference(s) for s in seeds]  # first: a held-out reference renders on the full model
        patched = self.models.with_fragment(self.patcher, fragment, self.originals, self.digest)
        outputs = [self._run(patched, s) for s in seeds]
        if self.vae is not None:
            decoded = []
            for s, ref in zip(seeds, references):
                if s not in self.decoded:  # a reference is decoded once for every try that compares with it
                    self.decoded[s] = self._images(ref)
                decoded.append(self.decoded[s])
            metrics = self.measure(torch.cat(references), torch.cat(outputs), torch.cat(decoded))
        else:
            metrics = self.measure(torch.cat(references), torch.cat(outputs))
        failures = list(metrics["gate_failures"])
        return Judgement(not failures, metrics, failures, metrics["gate_slack"])
