"""The in-ComfyUI half of the peer bench (issue #17): stock KSampler, EasyCache, LazyCache, ToMe and the fragment.

Everything runs in this process, in the ComfyUI at ``comfyui_path`` (booted
headless on CPU by ``bench/comfyui_boot.py``; one process holds one ComfyUI),
on one SD1.5 checkpoint -- by default the random-weight one the tests use,
built once into the test cache (``bench/random_checkpoint.py``).  Every row
samples the same seeds, one image at a time, with the same sampler, steps,
size and cfg:

* ``stock``: the ``KSampler`` node; its latents are the reference;
* ``easycache`` / ``lazycache``: ComfyUI's core nodes (0.3.x, V3 API) at their
  default ``reuse_threshold`` and two others, then ``KSampler``;
* ``tome_patch_model``: ``TomePatchModel``, then ``KSampler``;
* ``fragment``: built for the prompt by the pack's own ``ProfilerModelLoader``,
  ``KSampler`` and ``FragmentExtractor`` (calibrated against the full model,
  judged on latents, on a profile seed that is not one of the bench seeds),
  then run through ``FragmentLoader`` and ``BatchGenerator``; its build time is
  its ``setup_s``.

The weights are random, so the only quality measured is the final latents'
distance to stock's same-seed latents (``latent_rel_error``) against
``quality_gate.latent_rel_error_max``; the rows say so.  A peer this ComfyUI
lacks (EasyCache before 2025) or one that fails is a row with ``error`` set.
ComfyUI is imported only inside the functions, so this module imports without it.
"""
from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import FragmentError
from .cache_rules import CACHE_THRESHOLDS

log = logging.getLogger(__name__)

SECTION = "comfyui"
NOTE = "random weights: timing and latent distance only, no image quality"
ROW_KEYS = ("section", "method", "setting", "label", "s_per_image", "speedup", "setup_s", "amortized_ratio_32",
            "resident_unet_bytes", "quality", "passes_gate", "error", "note")
AMORTIZED_VARIANTS = 32
COMFY_PROMPT = "A dog on a jet ski"  # this bench's SD1.5 prompt; the reference model's is defaults.DEFAULT_PROMPT
DEFAULT_NEGATIVE = "blurry"
REPO_ROOT = Path(__file__).resolve().parent.parent


def empty_row(method: str, setting: str, label: str, *, note: str = NOTE) -> dict[str, Any]:
    """A row with every key of the schema, nothing measured yet.

    >>> row = empty_row("stock", "KSampler", "stock KSampler")
    >>> sorted(row) == sorted(ROW_KEYS), row["error"], row["quality"]
    (True, None, {})
    """
    row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
    row.update(section=SECTION, method=method, setting=setting, label=label, quality={}, note=note)
    return row


def finish_row(row: dict[str, Any], *, s_per_image: float, stock_s: float, setup_s: float, resident_bytes: int | None,
               error: float, gate: float) -> dict[str, Any]:
    """Fill the measured fields: speed-up vs stock, amortized over 32 images with ``setup_s`` counted, the gate.

    >>> r = finish_row(empty_row("x", "s", "l"), s_per_image=1.0, stock_s=2.0, setup_s=32.0, resident_bytes=10,
    ...                error=0.05, gate=0.1)
    >>> r["speedup"], r["amortized_ratio_32"], r["passes_gate"]
    (2.0, 1.0, True)
    """
    row.update(s_per_image=s_per_image, speedup=stock_s / s_per_image if s_per_image > 0 else None, setup_s=setup_s,
               amortized_ratio_32=(stock_s * AMORTIZED_VARIANTS) / (setup_s + AMORTIZED_VARIANTS * s_per_image),
               resident_unet_bytes=resident_bytes, passes_gate=error <= gate,
               quality={"latent_rel_error": error, "latent_rel_error_max": gate})
    return row


def comfy_peer_rows(comfyui_path: str, *, size: int = 8, steps: int = 4, seeds: Sequence[int] = (0, 1),
                    checkpoint: str | os.PathLike | None = None, cfg: float = 7.0, sampler_name: str = "euler",
                    scheduler: str = "normal", prompt: str = COMFY_PROMPT, negative: str = DEFAULT_NEGATIVE,
                    cache_thresholds: Sequence[float] = CACHE_THRESHOLDS, tome_ratio: float = 0.3,
                    fragment_goal: str = "speed", budget_images: int = 8, profile_seed: int = 1000,
                    base_dir: str | os.PathLike | None = None, warmup: bool = True, calibrate: bool = True,
                    fixed_heads: float = 0.3, fixed_step_reuse: float = 0.3) -> list[dict[str, Any]]:
    """The ComfyUI rows of the peer bench, measured in the ComfyUI at ``comfyui_path`` (booted here if needed).

    ``size`` is the latent size (pixels / 8); ``checkpoint`` a checkpoint file or a name in the booted
    ComfyUI's ``checkpoints`` folder (default: the random-weight SD1.5, built once into the test cache).
    ``base_dir`` holds ComfyUI's folders when this call boots it (default: a new temporary folder);
    a ComfyUI already booted from ``comfyui_path`` keeps its folders.  The fragment is calibrated on
    ``profile_seed`` (and the next seed), never on the bench seeds.  With ``calibrate=False`` it is
    extracted unjudged at ``fixed_heads`` (share of heads removed) and ``fixed_step_reuse`` (share of
    steps reusing deep features): a quicker setup whose row is still held to the gate.

    The fragment is built first and its profiled copy of the checkpoint freed before the base copy
    loads, so one full UNet copy is resident while the rows run (RAM is tight on CI machines).
    Timing: every row first runs one untimed 1-step image (ComfyUI loads and patches the model; ``warmup``), then
    the rows take turns seed by seed, so a load change on a shared machine hits all rows alike;
    ``s_per_image`` is the median over the seeds.

    >>> rows = comfy_peer_rows("/opt/ComfyUI-0.3.64", size=8, steps=2, seeds=[0])  # doctest: +SKIP
    >>> [r["method"] for r in rows]  # doctest: +SKIP
    ['stock', 'easycache', 'easycache', 'easycache', 'lazycache', 'lazycache', 'lazycache', 'tome_patch_model', 'fragment']
    """
    from ..defaults import DEFAULT_THRESHOLDS
    from ..judge.latent_distance import latent_rel_error
    from ..judge.thresholds import load_thresholds

    if not seeds:
        raise FragmentError("bench/comfy_peers.py: seeds: expected at least one seed, found none")
    if size < 1 or steps < 1:
        raise FragmentError(f"bench/comfy_peers.py: size and steps must be >= 1, found size={size}, steps={steps}")
    gate = float(load_thresholds(DEFAULT_THRESHOLDS)["quality_gate"]["latent_rel_error_max"])
    runtime = _runtime(Path(comfyui_path), base_dir)
    mapping = _pack_nodes(runtime)
    ckpt_name = _install_checkpoint(runtime, checkpoint)
    note = f"{NOTE}; ComfyUI {comfyui_version(runtime.root)}, {runtime.model_management.get_torch_device()}"
    bench = _Bench(runtime, ckpt_name, size=size, steps=steps, cfg=cfg, sampler_name=sampler_name,
                   scheduler=scheduler, prompt=prompt, negative=negative)
    try:
        fragment = bench.fragment_build(mapping, note, goal=fragment_goal, budget_images=budget_images,
                                        profile_seed=profile_seed, calibrate=calibrate, fixed_heads=fixed_heads,
                                        fixed_step_reuse=fixed_step_reuse)
        bench.load_base()
        runs = [bench.stock_run(note)]
        for node, method in (("EasyCache", "easycache"), ("LazyCache", "lazycache")):
            for threshold in cache_thresholds:
                setting = f"reuse_threshold={threshold:g}" + (" (default)" if threshold == CACHE_THRESHOLDS[0] else "")
                runs.append(bench.peer_run(node, method, setting, f"{node} {setting}", note,
                                           reuse_threshold=float(threshold), start_percent=0.15, end_percent=0.95,
                                           verbose=False))
        runs.append(bench.peer_run("TomePatchModel", "tome_patch_model", f"ratio={tome_ratio:g}",
                                   f"TomePatchModel ratio={tome_ratio:g}", note, ratio=float(tome_ratio)))
        runs.append(bench.fragment_run(fragment, mapping))
        bench.measure(runs, [int(s) for s in seeds], warmup=warmup)
    finally:
        bench.close()
    stock = runs[0]
    if stock.row["error"] is not None:
        raise FragmentError(f"bench/comfy_peers.py: the stock KSampler failed, so nothing can be compared: "
                            f"{stock.row['error']}")
    stock_s = statistics.median(stock.seconds)
    reference = torch.cat(stock.latents)
    for run in runs:
        if run.row["error"] is None:
            finish_row(run.row, s_per_image=statistics.median(run.seconds), stock_s=stock_s, setup_s=run.setup_s,
                       resident_bytes=run.resident_bytes, error=latent_rel_error(reference, torch.cat(run.latents)),
                       gate=gate)
            run.row["quality"].update(run.extra_quality)
    return [run.row for run in runs]


def comfyui_version(root: Path) -> str:
    """``__version__`` from the checkout's ``comfyui_version.py`` (ComfyUI 0.3.x), else ``"unknown (pre-0.3)"``.

    >>> comfyui_version(Path("/nonexistent"))
    'unknown (pre-0.3)'
    """
    path = Path(root) / "comfyui_version.py"
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.startswith("__version__"):
                return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown (pre-0.3)"


def model_bytes(patcher: Any) -> int:
    """The bytes ComfyUI counts as the MODEL's resident weights (FragmentLoader's clone: corrected to what it keeps).

    >>> class P:
    ...     def model_size(self): return 1234
    >>> model_bytes(P())
    1234
    """
    return int(patcher.model_size())


def _runtime(root: Path, base_dir: str | os.PathLike | None) -> Any:
    from .comfyui_boot import boot_comfyui, booted_runtime

    booted = booted_runtime()
    if booted is not None and booted.root != root.resolve():
        raise FragmentError(f"bench/comfy_peers.py: this process already runs the ComfyUI at {booted.root}; "
                            f"cannot also import the one at {root} (run the bench in a fresh process)")
    if booted is not None and base_dir is None:
        return booted
    folder = Path(base_dir) if base_dir is not None else Path(tempfile.mkdtemp(prefix="pf-comfy-peers-"))
    try:
        return boot_comfyui(root, folder)
    except FragmentError:
        raise
    except Exception as exc:
        raise FragmentError(f"bench/comfy_peers.py: expected a ComfyUI checkout that boots at {root}; "
                            f"found {type(exc).__name__}: {exc}") from exc


def _pack_nodes(runtime: Any) -> dict[str, type]:
    """The pack's node classes, as the booted ComfyUI registered them (loading the pack when it is not there yet)."""
    from .comfyui_boot import load_pack_as_custom_node

    mapping = runtime.nodes.NODE_CLASS_MAPPINGS
    needed = ("ProfilerModelLoader", "FragmentExtractor", "FragmentManualLevers", "FragmentLoader", "BatchGenerator")
    if not all(name in mapping for name in needed):
        load_pack_as_custom_node(REPO_ROOT, runtime.custom_nodes_dir)
    return {name: mapping[name] for name in needed}


def _install_checkpoint(runtime: Any, checkpoint: str | os.PathLike | None) -> str:
    """The ``ckpt_name`` to load: a name already in ``checkpoints``, or a file linked in there (default: random SD1.5)."""
    from .random_checkpoint import build_random_checkpoint, default_cache_dir

    folder_paths = runtime.folder_paths
    if checkpoint is not None and str(checkpoint) in folder_paths.get_filename_list("checkpoints"):
        return str(checkpoint)
    source = Path(checkpoint) if checkpoint is not None else build_random_checkpoint("sd15", default_cache_dir())
    if not source.is_file():
        raise FragmentError(f"bench/comfy_peers.py: checkpoint: expected a checkpoint file or a name in "
                            f"{runtime.model_dir('checkpoints')}, found {str(checkpoint)!r}")
    target = runtime.model_dir("checkpoints") / source.name
    if not target.exists():
        target.symlink_to(source.resolve())
    folder_paths.filename_list_cache.clear()
    return source.name


@dataclass
class _Run:
    """One row while it is measured: how to sample one seed, and what it gave."""

    row: dict[str, Any]
    sample: Callable[[int, int], torch.Tensor] | None = None  # (seed, steps) -> latents; None: an error row
    setup_s: float = 0.0
    resident_bytes: int | None = None
    seconds: list[float] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list)
    extra_quality: dict[str, Any] = field(default_factory=dict)
    handle: Any = None  # the fragment row: FragmentExtractor's FRAGMENT output and status
    status: str = ""


class _Bench:
    """One checkpoint, prompt and sampler setting; builds every row's MODEL and times them on the same seeds."""

    def __init__(self, runtime: Any, ckpt_name: str, *, size: int, steps: int, cfg: float, sampler_name: str,
                 scheduler: str, prompt: str, negative: str) -> None:
        self.runtime, self.nodes, self.ckpt_name = runtime, runtime.nodes, ckpt_name
        self.steps, self.cfg = steps, cfg
        self.sampler_name, self.scheduler = sampler_name, scheduler
        self.prompt, self.negative_prompt = prompt, negative
        self.latent = self.nodes.EmptyLatentImage().generate(size * 8, size * 8, 1)[0]
        self.model: Any = None
        self.positive: Any = None
        self.negative: Any = None
        self.fragment_files: list[Path] = []

    def load_base(self) -> None:
        """The checkpoint every row samples; loaded after the fragment is built, so two copies are never held."""
        with torch.inference_mode():
            self.model, clip, _vae = self.nodes.CheckpointLoaderSimple().load_checkpoint(self.ckpt_name)[:3]
            self.positive = self.nodes.CLIPTextEncode().encode(clip, self.prompt)[0]
            self.negative = self.nodes.CLIPTextEncode().encode(clip, self.negative_prompt)[0]

    def ksampler(self, model: Any) -> Callable[[int, int], torch.Tensor]:
        def sample(seed: int, steps: int) -> torch.Tensor:
            out = self.nodes.KSampler().sample(model, seed, steps, self.cfg, self.sampler_name, self.scheduler,
                                               self.positive, self.negative, self.latent)[0]
            return out["samples"].float().cpu()

        return sample

    def stock_run(self, note: str) -> _Run:
        return _Run(empty_row("stock", "KSampler", "stock KSampler", note=note), self.ksampler(self.model),
                    resident_bytes=model_bytes(self.model))

    def peer_run(self, node: str, method: str, setting: str, label: str, note: str, **inputs: Any) -> _Run:
        """A core node applied to the MODEL, then KSampler; an error row when this ComfyUI lacks the node or it fails."""
        from .comfyui_boot import call_node

        run = _Run(empty_row(method, setting, label, note=note))
        if node not in self.nodes.NODE_CLASS_MAPPINGS:
            where = f"the ComfyUI at {self.runtime.root} (version {comfyui_version(self.runtime.root)})"
            run.row["error"] = (f"{node}: not a node of {where}; it is a core node of newer ComfyUI "
                                "(comfy_extras/nodes_easycache.py, e.g. 0.3.64)" if "Cache" in node
                                else f"{node}: not a node of {where}")
            return run
        try:
            with torch.inference_mode():
                (patched,) = call_node(self.runtime, node, model=self.model, **inputs)
        except Exception as exc:  # a peer that fails is reported, never dropped
            log.exception("peer %s failed", label)
            run.row["error"] = f"{type(exc).__name__}: {exc}"
            return run
        run.sample, run.resident_bytes = self.ksampler(patched), model_bytes(patched)
        return run

    def fragment_build(self, mapping: dict[str, type], note: str, *, goal: str, budget_images: int,
                       profile_seed: int, calibrate: bool = True, fixed_heads: float = 0.3,
                       fixed_step_reuse: float = 0.3) -> _Run:
        """Profile the prompt and extract a calibrated fragment: the fragment row's setup (before ``load_base``)."""
        from .comfyui_boot import free_comfy_memory

        setting = (f"goal={goal}, calibrated" if calibrate
                   else f"fixed heads={fixed_heads:g}, step_reuse={fixed_step_reuse:g}, not calibrated")
        run = _Run(empty_row("fragment", setting, f"FragmentLoader + BatchGenerator ({setting})", note=note))
        try:
            started = time.perf_counter()
            run.handle, run.status = self.build_fragment(mapping, goal=goal, budget_images=budget_images,
                                                         seed=profile_seed, calibrate=calibrate, heads=fixed_heads,
                                                         step_reuse=fixed_step_reuse)
            run.setup_s = time.perf_counter() - started
        except Exception as exc:  # reported, never dropped
            log.exception("building the fragment failed")
            run.row["error"] = f"{type(exc).__name__}: {exc}"
        free_comfy_memory()  # the profiled copy of the checkpoint goes before the base copy comes
        return run

    def fragment_run(self, run: _Run, mapping: dict[str, type]) -> _Run:
        """The built fragment through FragmentLoader on the base MODEL, sampled by BatchGenerator."""
        if run.row["error"] is not None:
            return run
        handle, status = run.handle, run.status
        try:
            with torch.inference_mode():
                patched, _loaded = mapping["FragmentLoader"]().apply(self.model, "(none)", "raise", fragment=handle)
        except Exception as exc:  # reported, never dropped
            log.exception("fragment row failed")
            run.row["error"] = f"{type(exc).__name__}: {exc}"
            return run
        generator = mapping["BatchGenerator"]()

        def sample(seed: int, steps: int) -> torch.Tensor:
            # timing the fragment: no running audit (its audited rows would be the full model's)
            (out,) = generator.generate(patched, self.positive, self.negative, self.latent, seed, 1, 1, steps, self.cfg,
                                        self.sampler_name, self.scheduler, 1.0, audit_every=0)
            return out["samples"].float().cpu()

        run.sample, run.resident_bytes = sample, model_bytes(patched)
        run.extra_quality["extractor_status"] = status  # what the calibration chose, in the extractor's words
        return run

    def build_fragment(self, mapping: dict[str, type], *, goal: str, budget_images: int, seed: int,
                       calibrate: bool = True, heads: float = 0.3, step_reuse: float = 0.3) -> tuple[Any, str]:
        """ProfilerModelLoader -> KSampler (the profiled run) -> FragmentExtractor, calibrated on latents (no VAE)
        or, with ``calibrate`` off, at the fixed ``heads`` and ``step_reuse``."""
        name = f"peer_bench_{os.getpid()}_{int(time.time() * 1000)}"
        with torch.inference_mode():
            model, clip, _vae, profile = mapping["ProfilerModelLoader"]().load(self.ckpt_name, 2, 32, "reset")
            positive = self.nodes.CLIPTextEncode().encode(clip, self.prompt)[0]
            negative = self.nodes.CLIPTextEncode().encode(clip, self.negative_prompt)[0]
            sampled = self.nodes.KSampler().sample(model, seed, self.steps, self.cfg, self.sampler_name, self.scheduler,
                                                   positive, negative, self.latent)[0]
            (levers,) = mapping["FragmentManualLevers"]().levers(
                ratio=heads, keep_unstable_heads=False, step_reuse=step_reuse if self.steps >= 3 else 0.0)
            # The sampler settings come from the profiled run; budget_images replaces the batch-derived budget.
            out = mapping["FragmentExtractor"]().extract(
                profile, sampled, name, calibrate="on" if calibrate else "off", goal=goal, overwrite=True,
                positive=positive, negative=negative, levers=levers, budget_images=budget_images, holdout_seeds=1,
                confirm="judge")  # the peer table's fragment is the judged one, as before the in-batch default
        handle, status = out["result"][:2]
        self.fragment_files.append(Path(handle.manifest_path))
        return handle, status

    def measure(self, runs: list[_Run], seeds: list[int], *, warmup: bool = True) -> None:
        """One untimed 1-step image per row, then the rows in turn for each seed; a row that raises becomes an error row."""
        live = [r for r in runs if r.sample is not None]
        with torch.inference_mode():
            for phase in (("warm-up",) if warmup else ()) + tuple(seeds):
                for run in list(live):
                    try:
                        started = time.perf_counter()
                        out = run.sample(seeds[0], 1) if phase == "warm-up" else run.sample(int(phase), self.steps)
                        elapsed = time.perf_counter() - started
                    except Exception as exc:  # reported, never dropped
                        log.exception("%s failed", run.row["label"])
                        run.row["error"] = f"{type(exc).__name__}: {exc}"
                        live.remove(run)
                        continue
                    if phase != "warm-up":
                        run.seconds.append(elapsed)
                        run.latents.append(out)
                        log.info("%s seed %s: %.2f s", run.row["label"], phase, elapsed)

    def close(self) -> None:
        """Take the bench's fragments out of the (auto) index, where they would win later lookups, and free memory."""
        from ..fragment.library.index import forget
        from .comfyui_boot import free_comfy_memory

        for path in self.fragment_files:
            try:
                forget(path.parent, path.stem)
            except Exception:  # cleanup must not hide the bench's own result
                log.warning("could not forget %s from the (auto) index", path, exc_info=True)
        free_comfy_memory()
