"""Weight formats side by side at equal bytes on the reference model: same layers, same seeds, same judge.

Each row stores the same set of layers (every Linear and Conv2d of the UNet,
or its Linears only) in one format and samples the same held-out seeds as
the full model:

- ``fp8`` and ``int8``: today's precision tiers (``fragment.surgery.precision``,
  per-output-channel scale), applied to convolutions through their flattened
  ``[out, in * kh * kw]`` weight;
- ``Q8_0`` and ``Q4_0``: GGUF blocks made by the ``gguf`` package's own numpy
  quantizers, kept packed and dequantized in torch in ``forward``
  (``bench.gguf_weights``);
- ``int4``: group-wise round-to-nearest (``fragment.surgery.low_bit`` with no
  channel scale) and ``int4-aw``, the activation-aware variant: a per-input-channel
  scale chosen by ``awq_channel_scale`` from the prompt's own activations,
  recorded on the profile seeds (never the seeds judged).

Bytes are those the quantized model holds (``bench.weights.resident_bytes``:
every distinct parameter and buffer, packed payloads as they are stored); bits per
weight count the quantized layers' weight storage (scales included, biases not)
over their weight count, so rows at equal bytes line up.  Quality is the
reference target's judge (``judge.reference_target``: the quality gate of
``thresholds.yaml``) against the full model's same-seed images; seconds per
image are wall-clock on whatever else the machine was running.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import FragmentError, where
from ..fragment.surgery import precision
from ..profiling.activation_stats import ActivationStats
from .gguf_weights import GGUFLayer, Q4_0, Q8_0
from .weights import resident_bytes

log = logging.getLogger(__name__)

ALL = "all"  # every Linear and Conv2d
LINEAR = "linear"  # Linears only
SCOPES = (ALL, LINEAR)
FORMATS = ("fp8", "int8", Q8_0, Q4_0, "int4", "int4-aw")
DEFAULT_GROUPS = (32, 64, 128)  # 5.0, 4.5 (= GGUF Q4_0) and 4.25 bits per weight


@dataclass(frozen=True)
class QuantRow:
    """One format on one scope; ``group`` is the int4 group size (``None`` for the others).

    >>> QuantRow("int4-aw", "all", 64).label
    'int4-aw g64'
    """

    fmt: str
    scope: str = ALL
    group: int | None = None

    @property
    def label(self) -> str:
        return self.fmt + (f" g{self.group}" if self.group else "")

    @property
    def needs_activations(self) -> bool:
        return self.fmt == "int4-aw"


def default_rows(formats: Sequence[str] = FORMATS, scopes: Sequence[str] = SCOPES,
                 groups: Sequence[int] = DEFAULT_GROUPS) -> list[QuantRow]:
    """Every format on every scope, the int4 ones once per group size.

    >>> [r.label for r in default_rows(["Q4_0", "int4"], ["all"], [32, 64])]
    ['Q4_0', 'int4 g32', 'int4 g64']
    """
    rows = []
    for scope in scopes:
        if scope not in SCOPES:
            raise FragmentError(f"bench quant: expected scope 'all' or 'linear', found {scope!r}")
        for fmt in formats:
            if fmt not in FORMATS:
                raise FragmentError(f"bench quant: expected a format among {', '.join(FORMATS)}, found {fmt!r}")
            if fmt.startswith("int4"):
                rows += [QuantRow(fmt, scope, g) for g in groups]
            else:
                rows.append(QuantRow(fmt, scope))
    return rows


def quantizable_layers(model: nn.Module, scope: str = ALL) -> dict[str, nn.Module]:
    """The Linears (and with ``scope="all"`` the zero-padded, ungrouped Conv2ds) of ``model``, by path.

    >>> sorted(quantizable_layers(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2)), "all"))
    ['0', '2']
    """
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, nn.Linear) or (scope == ALL and isinstance(m, nn.Conv2d) and m.padding_mode == "zeros"
                                        and isinstance(m.padding, tuple) and m.groups == 1):
            out[path] = m
    return out


class TierConv(nn.Module):
    """A Conv2d in a precision tier: ``precision.quantize_weight`` of its flattened weight, dequantized in ``forward``.

    >>> conv = TierConv.from_conv(nn.Conv2d(2, 3, 3, padding=1), "int8")
    >>> conv(torch.ones(1, 2, 4, 4)).shape, conv.weight.dtype
    (torch.Size([1, 3, 4, 4]), torch.int8)
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...], bias: torch.Tensor | None,
                 conv: dict[str, Any]) -> None:
        super().__init__()
        # a buffer, not a Parameter: samplers take the model's dtype from its first parameter (conv_in's weight)
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.shape, self.conv = tuple(shape), conv

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, fmt: str) -> "TierConv":
        q, scale = precision.quantize_weight(conv.weight.reshape(conv.weight.shape[0], -1), fmt)
        return cls(q, scale, tuple(conv.weight.shape), conv.bias,
                   {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation, "groups": conv.groups})

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D401 - nn.Module API
        w = precision.dequantize(self.weight, self.weight_scale, x.dtype).reshape(self.shape)
        return F.conv2d(x, w, None if self.bias is None else self.bias.to(x.dtype), **self.conv)


def tier_layer(module: nn.Module, fmt: str, path: str) -> nn.Module:
    """``module`` in the ``fp8``/``int8`` tier: the fragment's own quantized Linear, or a :class:`TierConv`."""
    if isinstance(module, nn.Linear):
        q, scale = precision.quantize_weight(module.weight, fmt)
        return precision.quantized_linear(module, q, scale, path)
    if isinstance(module, nn.Conv2d):
        return TierConv.from_conv(module, fmt)
    raise FragmentError(where(path, f"expected an nn.Linear or nn.Conv2d to quantize, found {type(module).__name__}"))


LayerActivations = Mapping[str, Mapping[str, torch.Tensor]]  # path -> {"abs_mean": [in], "inputs": [N, in*kh*kw]}


def low_bit_layer(module: nn.Module, *, group: int, stats: Mapping[str, torch.Tensor] | None, path: str,
                  grid: int = 20) -> nn.Module:
    """``module`` in int4 groups (``fragment.surgery.low_bit``): round to nearest, or AWQ-scaled from ``stats``."""
    from ..fragment.surgery import low_bit

    scale = None
    if stats is not None:
        scale = low_bit.awq_channel_scale(module.weight, stats["abs_mean"], stats.get("inputs"), bits=4, group=group, grid=grid)
        if bool((scale == 1).all()):
            scale = None  # alpha = 0 won: plain round to nearest, nothing to store
    return low_bit.low_bit_module(module, low_bit.quantize_groups(module.weight, bits=4, group=group, channel_scale=scale), path)


def weight_as_buffer(module: nn.Module) -> nn.Module:
    """Move a stored-code ``weight`` (int8, fp8, uint8) from the parameters to the buffers, in place.

    The reference sampler (like many hosts) takes the model's dtype from its first parameter, which
    is ``conv_in.weight``: once that holds integer codes the noise would be cast to them.  As a buffer
    it is still ``module.weight``, still resident, still counted.
    """
    w = module._parameters.get("weight")
    if w is not None and (not w.dtype.is_floating_point or w.element_size() == 1):
        del module._parameters["weight"]
        module._buffers["weight"] = w.data
    return module


def replaced(model: nn.Module, modules: Mapping[str, nn.Module]) -> nn.Module:
    """A deep copy of ``model`` with the modules at the given paths swapped in (``model`` itself is untouched)."""
    new = copy.deepcopy(model)
    for path, module in modules.items():
        parent, _, name = path.rpartition(".")
        setattr(new.get_submodule(parent) if parent else new, name, module)
    return new


def quantized_model(model: nn.Module, row: QuantRow, activations: LayerActivations | None = None,
                    grid: int = 20) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``model`` with ``row``'s layers stored in ``row.fmt``, and what was stored (layers, weights, bits).

    >>> small, info = quantized_model(nn.Sequential(nn.Linear(64, 8)), QuantRow("Q8_0", "linear"))
    >>> info["layers"], info["bits_per_weight"]
    (1, 8.5)
    """
    layers = quantizable_layers(model, row.scope)
    if row.needs_activations and activations is None:
        raise FragmentError(f"bench quant: {row.label} needs the prompt's activation statistics, found none")
    new: dict[str, nn.Module] = {}
    for path, module in layers.items():
        if row.fmt in precision.STORAGE_DTYPES:
            new[path] = tier_layer(module, row.fmt, path)
        elif row.fmt in (Q8_0, Q4_0):
            new[path] = GGUFLayer.from_module(module, row.fmt, path)
        else:
            act = activations.get(path) if activations is not None and row.needs_activations else None
            if row.needs_activations and act is None:
                raise FragmentError(where(path, "expected activation statistics for the activation-aware int4 row; "
                                          "the layer never ran on the profile seeds"))
            new[path] = low_bit_layer(module, group=row.group or 64, stats=act, path=path, grid=grid)
        weight_as_buffer(new[path])
    weights = sum(m.weight.numel() for m in layers.values())
    stored = sum(resident_bytes(m) - (0 if m.bias is None else m.bias.numel() * m.bias.element_size()) for m in new.values())
    info = {"layers": len(layers), "params_quantized": weights, "weight_bytes": stored,
            "bits_per_weight": round(8.0 * stored / max(weights, 1), 3)}
    return replaced(model, new), info


Run = Callable[[nn.Module, Sequence[int]], Any]
Judge = Callable[[Any, Any], "tuple[bool, dict[str, Any]]"]


def timed(run: Run, unet: nn.Module, seeds: Sequence[int]) -> tuple[Any, float]:
    started = time.perf_counter()
    with torch.no_grad():
        images = run(unet, list(seeds))
    return images, (time.perf_counter() - started) / max(len(seeds), 1)


def bench_quant(unet: nn.Module, run: Run, judge: Judge, *, rows: Sequence[QuantRow], seeds: Sequence[int],
                profile_seeds: Sequence[int], grid: int = 20) -> dict[str, Any]:
    """Every row's model on ``seeds`` against the full model's images of the same seeds; sorted by bytes.

    ``run(unet, seeds)`` samples images; ``judge(full, images)`` returns ``(passed, metrics)`` with
    ``ssim_mean``, ``lpips_mean``, ``adherence_delta`` and ``gate_failures`` (``ReferenceTarget.judge``).
    The activation-aware rows weigh channels by the mean |input| recorded on ``profile_seeds``; ``grid`` is
    ``awq_channel_scale``'s number of exponent steps.

    >>> report = bench_quant(target.unet, target.run, target.judge, rows=default_rows(), seeds=range(100, 132),
    ...                      profile_seeds=range(4))  # doctest: +SKIP
    """
    if set(seeds) & set(profile_seeds):
        log.warning("bench quant: profile seeds %s are also judged; the activation-aware rows see their own test images",
                    sorted(set(seeds) & set(profile_seeds)))
    full_bytes = resident_bytes(unet)
    full_images, full_seconds = timed(run, unet, seeds)
    activations: dict[str, dict[str, torch.Tensor]] | None = None
    profile_seconds = None
    if any(r.needs_activations for r in rows):
        started = time.perf_counter()
        # the lever's own profiler, so the activation-aware rows see exactly what a fragment's profile sees
        with ActivationStats(unet) as rec, torch.no_grad():
            run(unet, list(profile_seeds))
        activations = rec.stats()
        profile_seconds = round(time.perf_counter() - started, 2)
    ok, base = judge(full_images, full_images)
    results = [{"format": "full (fp32)", "scope": "-", "group": None, "layers": 0, "params_quantized": 0,
                "bits_per_weight": 8.0 * next(unet.parameters()).element_size(), "bytes": full_bytes, "bytes_saved": 0,
                "saved_pct": 0.0, "ssim_mean": base["ssim_mean"], "lpips_mean": base["lpips_mean"],
                "adherence": base["adherence"], "adherence_delta": base["adherence_delta"],
                "seconds_per_image": round(full_seconds, 4), "build_seconds": 0.0, "passed": bool(ok),
                "gate_failures": list(base.get("gate_failures", []))}]
    for row in rows:
        started = time.perf_counter()
        small, info = quantized_model(unet, row, activations, grid)
        built = time.perf_counter() - started
        images, seconds = timed(run, small, seeds)
        passed, metrics = judge(full_images, images)
        size = resident_bytes(small)
        results.append({
            "format": row.label, "scope": row.scope, "group": row.group, **info, "bytes": size,
            "bytes_saved": full_bytes - size, "saved_pct": round(100.0 * (full_bytes - size) / full_bytes, 2),
            "ssim_mean": metrics["ssim_mean"], "lpips_mean": metrics["lpips_mean"], "adherence": metrics["adherence"],
            "adherence_delta": metrics["adherence_delta"], "seconds_per_image": round(seconds, 4),
            "build_seconds": round(built, 2), "passed": bool(passed), "gate_failures": list(metrics.get("gate_failures", [])),
        })
        log.info("bench quant: %s (%s): %s", row.label, row.scope, results[-1])
        del small
    results.sort(key=lambda r: (r["scope"] != "-", r["scope"], -r["bytes"], r["format"]))
    return {"full_bytes": full_bytes, "params": sum(p.numel() for p in unet.parameters()), "seeds": list(seeds),
            "profile_seeds": list(profile_seeds), "profile_seconds": profile_seconds, "results": results,
            "comparisons": equal_bytes_comparisons(results)}


def equal_bytes_comparisons(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """For each activation-aware int4 row: the GGUF Q4_0 row of its scope, and whether it wins on LPIPS at ≤ its bytes.

    >>> equal_bytes_comparisons([{"format": "Q4_0", "scope": "all", "bytes": 10, "lpips_mean": 0.2},
    ...                          {"format": "int4-aw g32", "scope": "all", "bytes": 10, "lpips_mean": 0.1}])[0]["better"]
    True
    """
    out = []
    for r in results:
        if not r["format"].startswith("int4-aw"):
            continue
        q4 = next((q for q in results if q["format"] == Q4_0 and q["scope"] == r["scope"]), None)
        if q4 is None:
            continue
        lp, lq = r.get("lpips_mean"), q4.get("lpips_mean")
        better = None if lp is None or lq is None else bool(r["bytes"] <= q4["bytes"] and lp < lq)
        out.append({"int4": r["format"], "scope": r["scope"], "int4_bytes": r["bytes"], "q4_0_bytes": q4["bytes"],
                    "int4_lpips": lp, "q4_0_lpips": lq, "equal_or_fewer_bytes": r["bytes"] <= q4["bytes"], "better": better})
    return out


def _num(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_quant_table(report: Mapping[str, Any]) -> str:
    """Fixed-width table of a :func:`bench_quant` report, rows grouped by scope and sorted by bytes.

    >>> print(format_quant_table({"full_bytes": 2**20, "params": 1, "seeds": [0], "comparisons": [], "results": [
    ...     {"format": "Q4_0", "scope": "all", "bits_per_weight": 4.5, "bytes": 2**19, "saved_pct": 50.0,
    ...      "ssim_mean": 0.9, "lpips_mean": None, "adherence_delta": 0.0, "seconds_per_image": 0.1, "passed": True}]}
    ... ).splitlines()[-1])
    Q4_0           all       4.50     0.50    50.0%   0.9000       -    0.000    0.100  pass
    """
    lines = [f"weight formats at equal bytes: reference UNet, {report['params'] / 1e6:.2f}M params, "
             f"{len(report['seeds'])} judged seeds; bits/weight = quantized layers' weight storage (scales included)",
             f"{'format':<15}{'scope':<7}{'bits/w':>7}{'MiB':>9}{'saved':>9}{'SSIM':>9}{'LPIPS':>8}{'adh.drop':>9}{'s/img':>9}  gate"]
    for r in report["results"]:
        lines.append(f"{r['format']:<15}{r['scope']:<7}{r['bits_per_weight']:>7.2f}{r['bytes'] / 2**20:>9.2f}"
                     f"{r['saved_pct']:>8.1f}%{_num(r['ssim_mean'], '.4f'):>9}{_num(r['lpips_mean'], '.4f'):>8}"
                     f"{_num(r['adherence_delta'], '.3f'):>9}{r['seconds_per_image']:>9.3f}  {'pass' if r['passed'] else 'FAIL'}")
    for c in report.get("comparisons", []):
        verdict = "n/a (no LPIPS)" if c["better"] is None else ("yes" if c["better"] else "no")
        lines.append(f"{c['int4']} vs Q4_0 ({c['scope']}): {c['int4_bytes'] / 2**20:.3f} vs {c['q4_0_bytes'] / 2**20:.3f} MiB, "
                     f"LPIPS {_num(c['int4_lpips'], '.4f')} vs {_num(c['q4_0_lpips'], '.4f')}: better at <= bytes: {verdict}")
    return "\n".join(lines)


def bench_reference_quant(*, prompt: str | None = None, seeds: int = 32, profile_seeds: int = 4, steps: int = 25,
                          formats: Sequence[str] = FORMATS, scopes: Sequence[str] = SCOPES,
                          groups: Sequence[int] = DEFAULT_GROUPS, weights: str | None = None, thresholds: str | None = None,
                          lpips_weights: str | None = None, lpips: bool = True,
                          lpips_scorer: Callable[[Any, Any], Sequence[float]] | None = None, grid: int = 20) -> dict[str, Any]:
    """:func:`bench_quant` on the reference model: judged seeds ``100 ..``, profile seeds ``0 ..``, the demo's prompt.

    ``lpips_scorer`` replaces the offline LPIPS model (tests pass a cheap stand-in).

    >>> report = bench_reference_quant(seeds=2, profile_seeds=1, steps=2, formats=["Q4_0"], scopes=["linear"])  # doctest: +SKIP
    """
    from ..defaults import DEFAULT_PROMPT, DEFAULT_THRESHOLDS, optional_lpips
    from ..judge.reference_target import ReferenceTarget
    from ..judge.thresholds import load_thresholds
    from ..reference.model import load_reference

    limits = load_thresholds(thresholds or DEFAULT_THRESHOLDS)["quality_gate"]
    note = "given scorer" if lpips_scorer is not None else "off (--no-lpips)"
    if lpips_scorer is None and lpips:
        lpips_scorer, note = optional_lpips(lpips_weights)
    target = ReferenceTarget(prompt or DEFAULT_PROMPT, limits=limits, steps=steps, model=load_reference(weights), lpips=lpips_scorer)
    with torch.no_grad():
        target.run(target.unet, [0])  # warm-up: the first call's one-off costs would land on the full model's time
    report = bench_quant(target.unet, target.run, target.judge, rows=default_rows(formats, scopes, groups),
                         seeds=range(100, 100 + seeds), profile_seeds=range(profile_seeds), grid=grid)
    return {"target": target.describe(), "steps": steps, "awq_grid": grid, "lpips": note, "torch_threads": torch.get_num_threads(), **report}
