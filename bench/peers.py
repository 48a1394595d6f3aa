"""The peer benchmark (issue #17): the fragment against the tools a user would pick instead, at equal quality.

On the batch bench's run (same model, prompt, sampler, steps, size, seeds and
judge), each peer renders the same variant seeds with its own published code,
unchanged, and is judged against the same stock images:

* DeepCache (``DeepCache.DeepCacheSDHelper``) at several cache intervals and branches;
* ToMe (``tomesd.apply_patch``) at a few merge ratios;
* CFG truncation alone (the project's ``cfg_cutoff``) at the calibration's cut-offs;
* EasyCache and LazyCache: ComfyUI's run-time skip rules, re-implemented from their description for the
  reference model (``bench.cache_rules``), at ComfyUI's default ``reuse_threshold`` and four others;
* the calibrated fragment, lever by lever (``bench.batch``'s ladder rows);
* DeepCache on a memory-only fragment (the fragment's byte levers, no schedule).

Every row has every key of ``ROW_KEYS``; a peer that cannot run is a row with
``error`` set, never a missing row.  The peers cost nothing to set up, so
their amortized ratio is their raw one; the fragment pays for profiling,
building and calibration (``metrics.performance.amortized_costs`` at 32 images).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from ..fragment.calibration import CFG_CUTOFFS, Budget, Candidate, lever_ladder
from ..fragment.extract import calibrated_fragment, candidate_fragment
from ..fragment.levers import stage
from ..fragment.schedule.apply import apply_schedule
from ..judge.fragment_judge import prepared_render
from ..metrics.performance import amortized_costs, synchronize
from .batch import BatchRun, BenchConfig, BenchTarget, run_batch, timed, timing_seeds
from .cache_rules import CACHE_THRESHOLDS, REFERENCE_CACHE_THRESHOLDS, EasyCacheUNet, LazyCacheUNet
from .paired import paired_timing
from .weights import resident_bytes

log = logging.getLogger(__name__)

ROW_KEYS = ("section", "method", "setting", "label", "s_per_image", "speedup", "setup_s", "amortized_ratio_32",
            "resident_unet_bytes", "quality", "passes_gate", "error", "note", "paired_speedup", "paired_range")
REFERENCE_METHODS = ("stock", "deepcache", "tome", "cfg_truncation", "easycache", "lazycache", "fragment",
                     "deepcache+memory_fragment")
EXTERNAL_PEERS = ("deepcache", "tome", "cfg_truncation", "easycache", "lazycache", "tome_patch_model")
# three more prompts of the reference grammar (reference/captions.py) for the across-prompts target
EXTRA_PROMPTS = ("a green square in the center on a black background",
                 "a yellow triangle in the top right on a gray background",
                 "a purple circle in the bottom left and an orange square in the top right on a black background")
COMFY_NOTE = "random weights have no image quality: timing and latent distance only"


@dataclass(frozen=True)
class PeerConfig:
    """The peer settings the bench tries (each one is a row)."""

    deepcache_intervals: tuple[int, ...] = (2, 3, 5)
    # 0: DeepCache's default (caches all but the outermost layers); 2 on a layers_per_block=1 UNet caches below
    # the first level, as the fragment's step reuse does at shallow=1; 3 keeps one more up layer computed
    deepcache_branches: tuple[int, ...] = (0, 2, 3)
    tome_ratios: tuple[float, ...] = (0.3, 0.5)
    cfg_cutoffs: tuple[float, ...] = tuple(CFG_CUTOFFS)
    stack_intervals: tuple[int, ...] = (2, 3)
    cache_thresholds: tuple[float, ...] = REFERENCE_CACHE_THRESHOLDS  # EasyCache's and LazyCache's reuse_threshold


def peer_row(section: str, method: str, setting: str, **values: Any) -> dict[str, Any]:
    """A row with every key of ``ROW_KEYS`` (``None`` where not given; ``quality`` an empty dict).

    >>> row = peer_row("reference", "tome", "ratio 0.5", error="tomesd missing")
    >>> sorted(row) == sorted(ROW_KEYS), row["label"], row["passes_gate"]
    (True, 'tome ratio 0.5', None)
    """
    unknown = set(values) - set(ROW_KEYS)
    if unknown:
        raise KeyError(f"bench.peers row: unknown keys {sorted(unknown)}; expected some of {ROW_KEYS}")
    row: dict[str, Any] = {key: None for key in ROW_KEYS}
    row.update(section=section, method=method, setting=setting, label=f"{method} {setting}", quality={})
    row.update(values)
    return row


class _DeepCachePipe:
    """What ``DeepCacheSDHelper`` reads from a diffusers pipeline: ``.unet`` and ``.scheduler.timesteps``."""

    def __init__(self, unet: nn.Module, timesteps: torch.Tensor) -> None:
        self.unet = unet
        self.scheduler = type("Timesteps", (), {"timesteps": timesteps})()


def deepcache_branch_note(unet: nn.Module, branch: int) -> tuple[str | None, str]:
    """``(error, note)`` for DeepCache's ``cache_branch_id`` on ``unet``: which block and layer it caches from.

    DeepCache numbers branches ``3 * block + layer`` (SD1.5: 4 blocks of 3 layers); on a UNet with fewer
    blocks or layers some ids name nothing.

    >>> u = type("U", (), {"down_blocks": [type("B", (), {"resnets": [0], "downsamplers": [0]})()] * 3})()
    >>> deepcache_branch_note(u, 2)[0] is None, deepcache_branch_note(u, 9)[0] is not None
    (True, True)
    """
    block, layer = branch // 3, branch % 3
    blocks = list(unet.down_blocks)
    if block >= len(blocks):
        return (f"DeepCache cache_branch_id {branch} is block {block}, layer {layer}: this UNet has "
                f"{len(blocks)} down blocks, so it maps to no block (only the mid block would be cached)"), ""
    b = blocks[block]
    layers = len(getattr(b, "resnets", [])) + (1 if getattr(b, "downsamplers", None) else 0)
    if layer >= layers:
        return None, (f"block {block} has {layers} layers: layer {layer} caches from block {block + 1}'s "
                      f"input, block {block} runs whole")
    return None, f"caches from down block {block}, layer {layer}"


def _peer_rows_guarded(section: str, method: str, settings: Sequence[tuple[str, Callable[[], dict[str, Any]]]]
                       ) -> list[dict[str, Any]]:
    rows = []
    for setting, make in settings:
        try:
            rows.append(peer_row(section, method, setting, **make()))
            log.info("peer %s %s: %.2fx, gate %s", method, setting, rows[-1]["speedup"] or 0.0, rows[-1]["passes_gate"])
        except Exception as exc:  # a peer that fails is a row with its error, never a missing row
            log.warning("peer %s %s failed: %s", method, setting, exc)
            rows.append(peer_row(section, method, setting, error=f"{type(exc).__name__}: {exc}"))
    return rows


def _judged(target: BenchTarget, stock: Any, images: Any, seconds: float, count: int, stock_s_per_image: float,
            model: nn.Module) -> dict[str, Any]:
    ok, quality = target.judge(stock, images)
    s = seconds / count
    return {"s_per_image": s, "speedup": stock_s_per_image / s if s > 0 else None, "quality": quality,
            "passes_gate": bool(ok), "resident_unet_bytes": resident_bytes(model)}


def run_deepcache(target: BenchTarget, unet: nn.Module, seeds: Sequence[int], interval: int, branch: int) -> tuple[Any, float]:
    """``target.run(unet, seeds)`` under ``DeepCacheSDHelper`` (interval, branch), unchanged; images and seconds.

    >>> images, seconds = run_deepcache(target, target.unet, [0, 1], 3, 0)  # doctest: +SKIP
    """
    try:
        from DeepCache import DeepCacheSDHelper
    except ImportError as exc:
        raise ImportError("DeepCache is not installed; run `pip install DeepCache --no-deps`") from exc
    from ..reference.model import build_scheduler

    scheduler = build_scheduler("ddim")
    scheduler.set_timesteps(target.steps)  # the sampler's own timesteps: DeepCache finds each call's step index in them
    helper = DeepCacheSDHelper(pipe=_DeepCachePipe(unet, scheduler.timesteps))
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    device = next(unet.parameters()).device
    helper.enable()
    try:
        return timed(lambda: target.run(unet, list(seeds)), device)
    finally:
        helper.disable()  # restores every forward it wrapped, shared modules included ...
        # ... as instance attributes bound to each module: take them off, so the UNet is exactly as it was
        for module in unet.modules():
            patched = module.__dict__.get("forward")
            if getattr(patched, "__self__", None) is module and getattr(patched, "__func__", None) is type(module).forward:
                del module.__dict__["forward"]


def run_tome(target: BenchTarget, unet: nn.Module, seeds: Sequence[int], ratio: float) -> tuple[Any, float]:
    """``target.run`` with ``tomesd.apply_patch(unet, ratio=ratio)``, removed afterwards; images and seconds."""
    try:
        import tomesd
    except ImportError as exc:
        raise ImportError("tomesd is not installed; run `pip install tomesd --no-deps`") from exc
    device = next(unet.parameters()).device
    tomesd.apply_patch(unet, ratio=ratio)
    try:
        return timed(lambda: target.run(unet, list(seeds)), device)
    finally:
        tomesd.remove_patch(unet)


def add_paired(rows: Sequence[dict[str, Any]], makers: Mapping[str, Callable[[], Callable[[], Any]]],
               stock: Callable[[], Any], units: int, **timing: Any) -> None:
    """Set ``paired_speedup`` (the median) and ``paired_range`` on each row without an error whose label has a
    maker: ``makers[label]()`` builds that row's render of the timing seeds, then ``bench.paired.paired_timing`` times
    it against ``stock`` (the full model on the same seeds) in ``units`` units of its own, so each ratio is taken
    between two renders next to each other.  ``timing`` goes to ``paired_timing`` (``sync``, ``clock``).  A row
    whose paired timing fails keeps ``None`` (a warning says why): its one-run figures stand.

    >>> rows = [peer_row("reference", "tome", "ratio 0.5"), peer_row("reference", "tome", "ratio 0.9", error="x")]
    >>> add_paired(rows, {"tome ratio 0.5": lambda: lambda: None, "tome ratio 0.9": lambda: lambda: None},
    ...            lambda: None, 3, clock=iter(range(100)).__next__)
    >>> rows[0]["paired_speedup"], rows[0]["paired_range"], rows[1]["paired_speedup"]
    (1.0, [1.0, 1.0], None)
    """
    for row in rows:
        make = makers.get(row["label"])
        if make is None or row["error"] is not None:
            continue
        try:
            t = paired_timing({"stock": stock, "method": make()}, units, **timing)
        except Exception as exc:  # a row's extra figure failing must not lose the rows already measured
            log.warning("paired timing of %s failed: %s", row["label"], exc)
            continue
        row.update(paired_speedup=t["median"]["method"], paired_range=t["range"]["method"])


def _setup_s(report: Mapping[str, Any]) -> float:
    t = report["timing_s"]
    return float(t["profile"] + t["build"] + t["calibrate"])


def _amortized_32(report: Mapping[str, Any], s_per_image: float | None, extra_setup_s: float = 0.0) -> float | None:
    if s_per_image is None:
        return None
    t = report["timing_s"]
    costs = amortized_costs(stock_s_per_image=report["rows"][0]["s_per_image"], fragment_s_per_image=s_per_image,
                            profile_s=t["profile"], profiled_images=report["profile_seeds"], build_s=t["build"],
                            calibrate_s=t["calibrate"] + extra_setup_s, ns=(32,))
    return costs["rows"][0]["amortized_ratio"]


def memory_fragment(target: BenchTarget, run: BatchRun, config: BenchConfig) -> tuple[Any, Candidate, float, str]:
    """The chosen fragment's byte levers without its schedule; calibrated for ``memory`` when it has none.

    Returns ``(fragment, candidate, extra calibration seconds, note)``.
    """
    unet = target.unet
    if run.chosen is not None:
        # every schedule lever off (step reuse, CFG cut-off, cross-attention cache): what is left saves bytes
        candidate = run.chosen.with_levers(**{cls.name: cls.off for cls in stage("schedule")})
        if not candidate.is_full_model:
            fragment = candidate_fragment(run.evidence, unet, candidate, base=run.base, name="memory")
            return fragment, candidate, 0.0, "the chosen fragment's byte levers, no schedule lever"
    started = time.perf_counter()
    fragment, cal = calibrated_fragment(
        run.evidence, unet, run.judge_fragment, base=run.base, name="memory", calibration_seeds=run.profile_seeds,
        holdout_seeds=run.holdout_seeds, goal="memory", budget=Budget(images=config.budget_images))
    extra = time.perf_counter() - started
    if fragment is None:
        raise RuntimeError(f"no memory-only fragment: the chosen fragment has no byte lever and a memory "
                           f"calibration passed nothing ({cal.reason})")
    return fragment, cal.chosen, extra, "the chosen fragment has no byte lever: calibrated again for goal memory (counted in set-up)"


def reference_rows(target: BenchTarget, report: Mapping[str, Any], run: BatchRun, config: BenchConfig,
                   peers: PeerConfig = PeerConfig(), *, skip: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every reference-section row on the batch run ``(report, run)``; ``skip`` names methods not run (each still a row).

    Each row's ``speedup`` is one timed run of the batch against the batch's one stock timing; with
    ``config.paired_units`` each row without an error also gets ``paired_speedup`` and ``paired_range`` from paired
    units against stock on ``config.paired_seeds`` batch seeds (``add_paired``), which a changing load cannot fool.

    >>> report, run = run_batch(target, config)  # doctest: +SKIP
    >>> {row["method"] for row in reference_rows(target, report, run, config)} == set(REFERENCE_METHODS)  # doctest: +SKIP
    True
    """
    unet, variants, stock = target.unet, run.variants, run.stock
    seeds = timing_seeds(run.rendered, run.profile_seeds + run.holdout_seeds, config.paired_seeds)
    makers: dict[str, Callable[[], Callable[[], Any]]] = {}  # row label -> builds that row's render of ``seeds``
    stock_row = report["rows"][0]
    stock_s = stock_row["s_per_image"]
    n = len(variants)
    judged = lambda images, seconds, model=unet: _judged(target, stock, images, seconds, n, stock_s, model)  # noqa: E731
    rows = [peer_row("reference", "stock", "full model", s_per_image=stock_s, speedup=1.0, setup_s=0.0,
                     amortized_ratio_32=1.0, resident_unet_bytes=stock_row["resident_unet_bytes"], passes_gate=None,
                     note="the reference every row is judged against")]

    def skipped(method: str, settings: Sequence[str]) -> list[dict[str, Any]]:
        return [peer_row("reference", method, s, error="not run (skipped by the caller)") for s in settings]

    def peer(method: str, settings: Sequence[tuple[str, Callable[[], dict[str, Any]], Callable[[], Any]]]) -> None:
        """Each setting: its name, its row (a batch run, judged) and its render of the paired ``seeds``."""
        if method in skip:
            rows.extend(skipped(method, [s for s, _, _ in settings]))
            return
        for setting, _, render_seeds in settings:  # the label is the row's (``peer_row``), so the two cannot drift
            makers[f"{method} {setting}"] = lambda render_seeds=render_seeds: render_seeds
        for row in _peer_rows_guarded("reference", method, [(s, row) for s, row, _ in settings]):
            if row["error"] is None:
                row.update(setup_s=0.0, amortized_ratio_32=row["speedup"])
            rows.append(row)

    def deepcache(interval: int, branch: int) -> Callable[[], dict[str, Any]]:
        def make() -> dict[str, Any]:
            error, note = deepcache_branch_note(unet, branch)
            if error:
                raise ValueError(error)
            return {**judged(*run_deepcache(target, unet, variants, interval, branch)), "note": note}
        return make

    peer("deepcache", [(f"interval {i}, branch {b}", deepcache(i, b),
                        lambda i=i, b=b: run_deepcache(target, unet, seeds, i, b))
                       for b in peers.deepcache_branches for i in peers.deepcache_intervals])
    peer("tome", [(f"ratio {r:g}", lambda r=r: judged(*run_tome(target, unet, variants, r)),
                   lambda r=r: run_tome(target, unet, seeds, r)) for r in peers.tome_ratios])
    device = next(unet.parameters()).device
    peer("cfg_truncation", [(f"CFG off below t={c:g}",
                             lambda c=c: judged(*timed(lambda: target.run(unet, variants, cfg_cutoff=c), device)),
                             lambda c=c: target.run(unet, seeds, cfg_cutoff=c))
                            for c in peers.cfg_cutoffs])

    def cached(method: str, threshold: float) -> Callable[[], nn.Module]:
        from ..reference.model import SCHEDULER_CONFIG, build_scheduler, pack_pixels, unet_output

        space = (unet_output, pack_pixels)  # the rules measure every 8th pixel of the image, not of the UNet's patches
        if method == "easycache":
            return lambda: EasyCacheUNet(unet, threshold, space=space)
        return lambda: LazyCacheUNet(unet, threshold, build_scheduler("ddim").alphas_cumprod, target.guidance,
                                     prediction=SCHEDULER_CONFIG["prediction_type"], space=space)

    def cache_row(wrap: Callable[[], nn.Module]) -> Callable[[], dict[str, Any]]:
        def make() -> dict[str, Any]:
            model = wrap()
            values = judged(*timed(lambda: target.run(model, variants), device), model)
            rule = model.rule
            values["note"] = (f"skipped {rule.skipped / max(rule.runs, 1):.1f} of {target.steps} steps per sub-batch "
                              f"({rule.runs} sub-batches of up to {getattr(target, 'batch_size', len(variants))}); "
                              "re-implemented rule (bench.cache_rules)")
            return values
        return make

    # one decision covers a sub-batch: the paired units' 4 seeds may skip other steps than the batch did, so
    # each row's note also says what they skipped
    paired_rules: dict[str, Any] = {}
    for method in ("easycache", "lazycache"):
        settings = []
        for th in peers.cache_thresholds:
            setting = f"reuse_threshold {th:g}" + (" (default)" if th == CACHE_THRESHOLDS[0] else "")
            paired = cached(method, th)()
            paired_rules[f"{method} {setting}"] = paired.rule
            settings.append((setting, cache_row(cached(method, th)), lambda m=paired: target.run(m, seeds)))
        peer(method, settings)

    def fragment_render(candidate: Candidate) -> Callable[[], Callable[[], Any]]:
        # built before its units: the figure is the renders', as in bench batch
        return lambda: prepared_render(unet, candidate_fragment(run.evidence, unet, candidate, base=run.base,
                                                                name="paired"), seeds, target.run)

    for label, candidate in lever_ladder(run.chosen) if run.chosen is not None else []:
        makers[f"fragment {label}"] = fragment_render(candidate)

    setup = _setup_s(report)
    for ladder in report["rows"][1:]:
        q = dict(ladder["quality"] or {})
        ok = q.pop("passes_gate", None)
        rows.append(peer_row("reference", "fragment", ladder["label"], s_per_image=ladder["s_per_image"],
                             speedup=ladder["speedup"], setup_s=setup,
                             amortized_ratio_32=_amortized_32(report, ladder["s_per_image"]),
                             resident_unet_bytes=ladder.get("resident_unet_bytes"), quality=q, passes_gate=ok))
    if len(report["rows"]) == 1:
        rows.append(peer_row("reference", "fragment", "calibrated", error="calibration chose the full model: "
                             f"{report['calibration'].get('reason')}"))
    rows.extend(_stack_rows(target, report, run, config, peers, rows, skip, seeds, makers))
    if config.paired_units and seeds:
        rows[0].update(paired_speedup=1.0, paired_range=[1.0, 1.0])
        add_paired(rows, makers, lambda: target.run(unet, seeds), config.paired_units, sync=lambda: synchronize(device))
    for row in rows:
        rule = paired_rules.get(row["label"])
        if rule is not None and rule.runs and row["note"]:
            row["note"] += (f"; the paired units ({len(seeds)} seeds) skipped {rule.skipped / rule.runs:.1f} steps "
                            "per sub-batch")
    return rows


def _stack_rows(target: BenchTarget, report: Mapping[str, Any], run: BatchRun, config: BenchConfig, peers: PeerConfig,
                rows: Sequence[Mapping[str, Any]], skip: Sequence[str], seeds: Sequence[int],
                makers: dict[str, Callable[[], Callable[[], Any]]]) -> list[dict[str, Any]]:
    method = "deepcache+memory_fragment"
    passing = [r for r in rows if r["method"] == "deepcache" and r["passes_gate"]]
    # the branch of the fastest DeepCache setting that passed alone; 2 (the fragment's own depth) if none did
    branch = max(passing, key=lambda r: r["speedup"])["setting"].split("branch ")[1] if passing else "2"
    settings = ["memory fragment alone"] + [f"interval {i}, branch {branch}" for i in peers.stack_intervals]
    if method in skip:
        return [peer_row("reference", method, s, error="not run (skipped by the caller)") for s in settings]
    try:
        fragment, candidate, extra_s, note = memory_fragment(target, run, config)
        small, _state = apply_schedule(target.unet, fragment)
    except Exception as exc:
        log.warning("memory-only fragment failed: %s", exc)
        return [peer_row("reference", method, s, error=f"no memory-only fragment: {type(exc).__name__}: {exc}")
                for s in settings]
    stock_s, n, device = report["rows"][0]["s_per_image"], len(run.variants), next(small.parameters()).device
    setup = _setup_s(report) + extra_s

    def finish(values: dict[str, Any]) -> dict[str, Any]:
        return {**values, "setup_s": setup, "amortized_ratio_32": _amortized_32(report, values["s_per_image"], extra_s),
                "note": f"{candidate.label}: {note}"}

    runs = [(settings[0], lambda: finish(_judged(target, run.stock, *timed(lambda: target.run(small, run.variants), device),
                                                 n, stock_s, small)))]
    makers[f"{method} {settings[0]}"] = lambda: lambda: target.run(small, list(seeds))
    for i, setting in zip(peers.stack_intervals, settings[1:]):
        runs.append((setting, lambda i=i: finish(_judged(
            target, run.stock, *run_deepcache(target, small, run.variants, i, int(branch)), n, stock_s, small))))
        makers[f"{method} {setting}"] = lambda i=i: lambda: run_deepcache(target, small, seeds, i, int(branch))
    return _peer_rows_guarded("reference", method, runs)


def comfy_rows(comfyui_path: str | None, **kwargs: Any) -> list[dict[str, Any]]:
    """The ComfyUI section (``bench.comfy_peers.comfy_peer_rows``); a failure is one error row, not an absent section.

    >>> comfy_rows(None)[0]["error"]
    'not run: no ComfyUI path (--comfyui or COMFYUI_PATH)'
    """
    if not comfyui_path:
        return [peer_row("comfyui", "comfyui", "all", error="not run: no ComfyUI path (--comfyui or COMFYUI_PATH)",
                         note=COMFY_NOTE)]
    try:
        from .comfy_peers import comfy_peer_rows

        rows = comfy_peer_rows(comfyui_path, **kwargs)
    except Exception as exc:
        log.warning("ComfyUI peer bench failed: %s", exc)
        return [peer_row("comfyui", "comfyui", "all", error=f"{type(exc).__name__}: {exc}", note=COMFY_NOTE)]
    return [{**{k: None for k in ROW_KEYS}, **row} for row in rows]


def best_passing(rows: Sequence[Mapping[str, Any]], key: str = "speedup") -> dict[str, Mapping[str, Any]]:
    """Per method, the row with the highest ``key`` among those that pass the gate.

    >>> rows = [peer_row("reference", "tome", "a", speedup=1.2, passes_gate=True),
    ...         peer_row("reference", "tome", "b", speedup=1.5, passes_gate=False)]
    >>> best_passing(rows)["tome"]["setting"]
    'a'
    """
    best: dict[str, Mapping[str, Any]] = {}
    for row in rows:
        if row.get("passes_gate") and row.get(key) is not None:
            if row["method"] not in best or row[key] > best[row["method"]][key]:
                best[row["method"]] = row
    return best


def headline(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Speed at equal quality: each method's fastest passing setting (raw and amortized), who beats the fragment, the targets.

    >>> rows = [peer_row("reference", "fragment", "f", speedup=2.0, amortized_ratio_32=1.2, passes_gate=True),
    ...         peer_row("reference", "deepcache", "d", speedup=1.5, amortized_ratio_32=1.5, passes_gate=True)]
    >>> h = headline(rows); h["beats_fragment"], h["targets"]["raw_1_5x_fastest_peer"]
    (['deepcache d beats the fragment amortized at 32 variants: 1.50x vs 1.20x'], False)
    """
    rows = [r for r in rows if r["section"] == "reference"]
    raw, amortized = best_passing(rows, "speedup"), best_passing(rows, "amortized_ratio_32")
    frag_raw, frag_am = raw.get("fragment"), amortized.get("fragment")
    sentences = []
    for method in REFERENCE_METHODS[1:]:
        if method == "fragment":
            continue
        for kind, best, frag, key in (("raw", raw, frag_raw, "speedup"),
                                      ("amortized at 32 variants", amortized, frag_am, "amortized_ratio_32")):
            row = best.get(method)
            if row is not None and (frag is None or row[key] > frag[key]):
                than = f"{row[key]:.2f}x vs {frag[key]:.2f}x" if frag else "the fragment has no passing setting"
                sentences.append(f"{method} {row['setting']} beats the fragment {kind}: {than}")
    peers_raw = [raw[m] for m in EXTERNAL_PEERS if m in raw]
    peers_am = [amortized[m] for m in EXTERNAL_PEERS if m in amortized]
    fastest_raw = max(peers_raw, key=lambda r: r["speedup"], default=None)
    fastest_am = max(peers_am, key=lambda r: r["amortized_ratio_32"], default=None)
    # paired units (the same seeds back to back, rotated, against stock) rank too: one timed batch per row moves
    # with the load (a setting read 1.92x raw in one run and 1.59x paired in the same run)
    paired = best_passing(rows, "paired_speedup")
    frag_paired = paired.get("fragment")
    fastest_paired = max((paired[m] for m in EXTERNAL_PEERS if m in paired), key=lambda r: r["paired_speedup"],
                         default=None)
    stock = next((r for r in rows if r["method"] == "stock"), None)
    frag_bytes = frag_raw["resident_unet_bytes"] if frag_raw else None
    return {
        "fastest_passing": {m: {"setting": r["setting"], "speedup": r["speedup"]} for m, r in raw.items()},
        "fastest_passing_amortized": {m: {"setting": r["setting"], "amortized_ratio_32": r["amortized_ratio_32"]}
                                      for m, r in amortized.items()},
        "beats_fragment": sentences,
        "fastest_peer": None if fastest_raw is None else {"method": fastest_raw["method"], "setting": fastest_raw["setting"],
                                                          "speedup": fastest_raw["speedup"]},
        "fragment_over_fastest_peer": (frag_raw["speedup"] / fastest_raw["speedup"]
                                       if frag_raw and fastest_raw else None),
        "fastest_passing_paired": {m: {"setting": r["setting"], "paired_speedup": r["paired_speedup"]}
                                   for m, r in paired.items()},
        "fastest_peer_paired": None if fastest_paired is None else {
            "method": fastest_paired["method"], "setting": fastest_paired["setting"],
            "paired_speedup": fastest_paired["paired_speedup"]},
        "fragment_over_fastest_peer_paired": (frag_paired["paired_speedup"] / fastest_paired["paired_speedup"]
                                              if frag_paired and fastest_paired else None),
        "targets": {
            "paired_1_3x_fastest_peer": bool(frag_paired and (fastest_paired is None or frag_paired["paired_speedup"]
                                                               >= 1.3 * fastest_paired["paired_speedup"])),
            # issue #27's target (the fastest passing peer, EasyCache's and LazyCache's rules included), then #17's
            "raw_1_3x_fastest_peer": bool(frag_raw and (fastest_raw is None or frag_raw["speedup"] >= 1.3 * fastest_raw["speedup"])),
            "raw_1_5x_fastest_peer": bool(frag_raw and (fastest_raw is None or frag_raw["speedup"] >= 1.5 * fastest_raw["speedup"])),
            "amortized_ahead_of_fastest_peer": bool(frag_am and (fastest_am is None or frag_am["amortized_ratio_32"]
                                                                 > fastest_am["amortized_ratio_32"])),
            "fragment_bytes": frag_bytes, "stock_bytes": stock["resident_unet_bytes"] if stock else None,
        },
    }


def bench_peers(target: BenchTarget, config: BenchConfig = BenchConfig(), peers: PeerConfig = PeerConfig(), *,
                comfyui: str | None = None, comfy_kwargs: Mapping[str, Any] | None = None,
                skip: Sequence[str] = ()) -> dict[str, Any]:
    """The batch bench on ``target``, then every peer on the same run; a JSON-ready report (``format_peer_report``).

    >>> report = bench_peers(ReferenceTarget(DEFAULT_PROMPT, limits=gate, steps=4), BenchConfig(variants=16))  # doctest: +SKIP
    >>> all(set(row) == set(ROW_KEYS) for row in report["rows"])  # doctest: +SKIP
    True
    """
    batch, run = run_batch(target, config)
    rows = reference_rows(target, batch, run, config, peers, skip=skip)
    if comfyui is not None:
        rows += comfy_rows(comfyui, **dict(comfy_kwargs or {}))
    limits = getattr(target, "limits", {}) or {}
    return {"target": target.describe(), "device": batch["device"], "variants": batch["variants"], "steps": batch["steps"],
            "peer_config": dataclasses.asdict(peers), "lpips_limit": limits.get("lpips_max"), "rows": rows,
            "headline": headline(rows), "batch": batch}


def prompts_headline(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per prompt: the fragment's fastest passing raw speed-up, the fastest passing peer's, their ratio, and the
    1.3x (#27) and 1.5x (#17) targets.

    >>> h = {"fastest_passing": {"fragment": {"speedup": 3.0}}, "fastest_peer": {"method": "tome", "setting": "r",
    ...      "speedup": 1.5}, "fragment_over_fastest_peer": 2.0,
    ...      "targets": {"raw_1_3x_fastest_peer": True, "raw_1_5x_fastest_peer": True}}
    >>> s = prompts_headline([{"target": {"prompt": "p"}, "headline": h}])
    >>> s["all_prompts_raw_1_3x"], s["prompts"][0]["ratio"]
    (True, 2.0)
    """
    out = []
    for report in reports:
        h = report["headline"]
        frag = h["fastest_passing"].get("fragment")
        out.append({"prompt": report["target"].get("prompt"), "fragment_speedup": frag["speedup"] if frag else None,
                    "fastest_peer": h["fastest_peer"], "ratio": h.get("fragment_over_fastest_peer"),
                    "raw_1_3x": h["targets"]["raw_1_3x_fastest_peer"], "raw_1_5x": h["targets"]["raw_1_5x_fastest_peer"],
                    "fastest_peer_paired": h.get("fastest_peer_paired"),
                    "paired_ratio": h.get("fragment_over_fastest_peer_paired"),
                    "paired_1_3x": bool(h["targets"].get("paired_1_3x_fastest_peer"))})
    return {"prompts": out, "all_prompts_raw_1_3x": all(p["raw_1_3x"] for p in out),
            "all_prompts_raw_1_5x": all(p["raw_1_5x"] for p in out),
            "all_prompts_paired_1_3x": all(p["paired_1_3x"] for p in out)}


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_peer_report(report: Mapping[str, Any]) -> str:
    """The peer table (one line per row), then the headline.

    >>> r = {"target": {"name": "reference", "prompt": "p"}, "device": "cpu", "variants": 2, "steps": 4, "rows": [
    ...     peer_row("reference", "stock", "full model", s_per_image=1.0, speedup=1.0, setup_s=0.0, amortized_ratio_32=1.0,
    ...              resident_unet_bytes=10, paired_speedup=1.0)],
    ...     "headline": headline([])}
    >>> print(format_peer_report(r).splitlines()[3])
    reference  stock full model                                          1.000   1.00x   1.00x    0.0   1.00       10      -      -      -  -
    """
    lines = [f"peer bench: {report['target']['name']} on {report['device']}, {report['variants']} variants x "
             f"{report['steps']} steps, prompt {report['target'].get('prompt')!r}",
             "raw: one timed run of the batch per row against one of stock (CPU timings move a few % run to run, more "
             "on a busy machine); paired: the median ratio of paired units against stock on the same seeds",
             f"{'section':<11}{'method / setting':<56}{'s/img':>7}{'raw':>8}{'paired':>8}{'set-up':>7}{'am.32':>7}{'UNet MB':>9}"
             f"{'SSIM':>7}{'LPIPS':>7}{'adh.d':>7}  gate"]
    comfy_noted = False
    for row in report["rows"]:
        if row["section"] == "comfyui" and not comfy_noted:
            lines.append(f"-- ComfyUI: {COMFY_NOTE}")
            comfy_noted = True
        q = row.get("quality") or {}
        mb = None if row["resident_unet_bytes"] is None else row["resident_unet_bytes"] / 2**20
        gate = "ERROR " + row["error"] if row["error"] else {True: "pass", False: "FAIL", None: "-"}[row["passes_gate"]]
        if row["passes_gate"] is False and q.get("gate_failures"):
            gate += " (" + "; ".join(q["gate_failures"]) + ")"
        if q.get("latent_rel_error") is not None:  # the ComfyUI rows' only quality figure
            gate += f" (latent error {q['latent_rel_error']:.4f}, limit {q.get('latent_rel_error_max')})"
        name = f"{row['method']} {row['setting']}"[:55]
        lines.append(f"{row['section']:<11}{name:<56}{_num(row['s_per_image'], '.3f'):>7}"
                     f"{_num(row['speedup'], '.2f') + ('x' if row['speedup'] is not None else ''):>8}"
                     f"{_num(row.get('paired_speedup'), '.2f') + ('x' if row.get('paired_speedup') is not None else ''):>8}"
                     f"{_num(row['setup_s'], '.1f'):>7}{_num(row['amortized_ratio_32'], '.2f'):>7}"
                     f"{_num(mb, '.2f') if mb is None or mb >= 0.01 else str(row['resident_unet_bytes']):>9}"
                     f"{_num(q.get('ssim_mean'), '.3f'):>7}{_num(q.get('lpips_mean'), '.3f'):>7}"
                     f"{_num(q.get('adherence_delta'), '.3f'):>7}  {gate}")
    h = report["headline"]
    lines.append("headline (fastest setting that passes the gate, raw / amortized at 32 variants):")
    for method, best in h["fastest_passing"].items():
        am = h["fastest_passing_amortized"].get(method)
        lines.append(f"  {method:<28}{best['speedup']:.2f}x ({best['setting']})"
                     + (f" / {am['amortized_ratio_32']:.2f}x ({am['setting']})" if am else ""))
    for sentence in h["beats_fragment"]:
        lines.append(f"  {sentence}")
    for method, best in h.get("fastest_passing_paired", {}).items():
        lines.append(f"  paired: {method:<20}{best['paired_speedup']:.2f}x ({best['setting']})")
    t = h["targets"]
    paired_ratio = h.get("fragment_over_fastest_peer_paired")
    lines.append(f"targets (paired, ranks): fragment / fastest passing peer "
                 f"{'-' if paired_ratio is None else format(paired_ratio, '.2f')}: >= 1.3x "
                 f"{t.get('paired_1_3x_fastest_peer')}")
    ratio = h.get("fragment_over_fastest_peer")
    lines.append(f"targets: fragment raw / fastest passing peer {'-' if ratio is None else format(ratio, '.2f')}: "
                 f">= 1.3x {t['raw_1_3x_fastest_peer']}, >= 1.5x {t['raw_1_5x_fastest_peer']}; amortized ahead of "
                 f"it: {t['amortized_ahead_of_fastest_peer']}; resident UNet bytes fragment {t['fragment_bytes']} vs "
                 f"stock {t['stock_bytes']} (every caching peer keeps stock's)")
    return "\n".join(lines)


def format_prompts_headline(summary: Mapping[str, Any]) -> str:
    """One line per prompt: fragment vs the fastest passing peer (raw), their ratio, and the 1.3x target (#27).

    >>> print(format_prompts_headline({"prompts": [{"prompt": "p", "fragment_speedup": None, "fastest_peer": None,
    ...                                              "ratio": None, "raw_1_3x": False}], "all_prompts_raw_1_3x": False}))
    per prompt (raw speed at the gate):
      'p': fragment -, fastest peer none passed, ratio -: target 1.3x False
    all prompts meet the 1.3x target: False
    """
    lines = ["per prompt (raw speed at the gate):"]
    for p in summary["prompts"]:
        peer = p["fastest_peer"]
        peer_text = "none passed" if peer is None else f"{peer['method']} {peer['setting']} {peer['speedup']:.2f}x"
        frag = "-" if p["fragment_speedup"] is None else f"{p['fragment_speedup']:.2f}x"
        ratio = "-" if p.get("ratio") is None else f"{p['ratio']:.2f}"
        lines.append(f"  {p['prompt']!r}: fragment {frag}, fastest peer {peer_text}, ratio {ratio}: "
                     f"target 1.3x {p['raw_1_3x']}")
        if p.get("paired_ratio") is not None:
            peer = p["fastest_peer_paired"]
            lines.append(f"    paired: fastest peer {peer['method']} {peer['setting']} {peer['paired_speedup']:.2f}x, "
                         f"ratio {p['paired_ratio']:.2f}: target 1.3x {p['paired_1_3x']}")
    lines.append(f"all prompts meet the 1.3x target: {summary['all_prompts_raw_1_3x']}"
                 + (f" raw, {summary['all_prompts_paired_1_3x']} paired" if "all_prompts_paired_1_3x" in summary else ""))
    return "\n".join(lines)


def write_peer_report(reports: Sequence[Mapping[str, Any]], folder: str | Path) -> list[Path]:
    """``peers.json`` (every report, and the per-prompt headline when several) and one LPIPS/speed-up plot per prompt.

    >>> import tempfile; r = {"target": {"prompt": "p"}, "rows": [], "lpips_limit": 0.035, "headline": None}
    >>> [p.name for p in write_peer_report([r], tempfile.mkdtemp())]
    ['peers.json', 'peers.png']
    """
    from ..metrics.plots import peer_tradeoff_plot

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"reports": list(reports)}
    if len(reports) > 1:
        data["per_prompt"] = prompts_headline(reports)
    out = [folder / "peers.json"]
    out[0].write_text(json.dumps(data, indent=2, default=str))
    for i, report in enumerate(reports):
        name = "peers.png" if len(reports) == 1 else f"peers_prompt{i}.png"
        out.append(peer_tradeoff_plot(report["rows"], report.get("lpips_limit"), folder / name))
    return out
