"""Write one report folder: ``reports/<YYYY-MM-DD_HHMM>/`` (seed 003 "Report File Layout").

::

    profiling_raw.json + .safetensors   the profile (profiling.dataset.save_profile)
    head_importance.json                per-module head scores and the kept heads
    fragment_manifest.json              the fragment's manifest as measured here
    metrics_summary.json                H1–H5 with measured values and PASS/WARN/FAIL/MISSING
    regression_diff.json                against the previous report (or null)
    plots/latency.png, quality_tradeoff.png, head_heatmap.png
    images/full_NNN.png, fragment_NNN.png
    index.html                          all of the above on one page

A run that misses any metric a hypothesis needs is INVALID and stored with
``"verified": false``; ``resolve_report("latest-valid")`` never picks it
as a baseline.
"""
from __future__ import annotations

import html
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .hypotheses import evaluate_hypotheses, memory_figure, memory_judged_on, missing_metrics, run_status
from .plots import heatmap_plot, image_pairs, latency_plot, lever_curves_plot, quality_tradeoff_plot
from .regression import SUMMARY, read_summary, regression_diff, resolve_report

log = logging.getLogger(__name__)


def new_run_dir(base: str | os.PathLike, when: float | None = None) -> Path:
    """Create ``base/<YYYY-MM-DD_HHMM>`` (``_2``, ``_3``… when that minute is taken) and return it.

    >>> import tempfile; d = tempfile.mkdtemp()
    >>> a, b = new_run_dir(d, 0), new_run_dir(d, 0)
    >>> a.name, b.name
    ('1970-01-01_0000', '1970-01-01_0000_2')
    """
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d_%H%M", time.gmtime(time.time() if when is None else when))
    for n in range(1, 1000):
        path = base / (stamp if n == 1 else f"{stamp}_{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{base}: no free run folder for {stamp}")


def head_importance(scores: Mapping[str, torch.Tensor], kept: Mapping[str, Sequence[int]] | None) -> dict[str, Any]:
    """Plain-data head scores per module, with kept and removed heads when a plan is given.

    >>> head_importance({"a": torch.tensor([0.5, 2.0])}, {"a": [1]})["modules"]["a"]
    {'scores': [0.5, 2.0], 'kept': [1], 'removed': [0]}
    """
    modules = {}
    for path, s in scores.items():
        values = [float(v) for v in s.detach().float().flatten()]
        entry: dict[str, Any] = {"scores": values}
        if kept is not None and path in kept:
            entry["kept"] = sorted(int(i) for i in kept[path])
            entry["removed"] = [h for h in range(len(values)) if h not in set(entry["kept"])]
        modules[path] = entry
    return {"modules": modules}


def build_summary(run_id: str, metrics: Mapping[str, Any], thresholds: Mapping[str, Any], *,
                  manifest: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None,
                  notes: Sequence[str] = ()) -> dict[str, Any]:
    """The ``metrics_summary.json`` document: run status, verified flag, H1–H5, the flat metrics and notes.

    >>> s = build_summary("r1", {"break_even_variants": 4.0}, {"hypotheses": {"H5": {"break_even_max_variants": 10}}})
    >>> s["status"], s["verified"], s["hypotheses"]["H5"]["status"]
    ('PASS', True, 'PASS')
    >>> build_summary("r2", {"peak_tensor_reduction": 0.3}, {"hypotheses": {}})["h2_memory"]["judged_on"]
    'H2 judged on peak_tensor_bytes (CPU, live tensors incl. activations), not VRAM'
    """
    hyps = evaluate_hypotheses(metrics, thresholds)
    status = run_status(hyps)
    missing = missing_metrics(hyps)
    summary: dict[str, Any] = {
        "run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "status": status,
        "verified": status != "INVALID",
        "missing": missing,
        "base_model_hash": (manifest or {}).get("base_model", {}).get("sha256"),
        "fragment_hash": (manifest or {}).get("integrity", {}).get("manifest_sha256"),
        "hypotheses": hyps,
        "metrics": dict(metrics),
    }
    source, value = memory_figure(metrics)
    summary["h2_memory"] = {"source": source, "reduction": value, "judged_on": memory_judged_on(source)}
    summary.update(extra or {})
    summary["notes"] = list(notes) + [summary["h2_memory"]["judged_on"] + "."] + ([f"INVALID: not measured: {', '.join(missing)}"] if missing else [])
    return summary


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str))


def write_report(
    base: str | os.PathLike,
    *,
    metrics: Mapping[str, Any],
    thresholds: Mapping[str, Any],
    manifest: Mapping[str, Any] | None = None,
    profile: Any = None,
    scores: Mapping[str, torch.Tensor] | None = None,
    kept: Mapping[str, Sequence[int]] | None = None,
    full_images: Any = None,
    fragment_images: Any = None,
    quality_curve: Sequence[Mapping[str, Any]] = (),
    extra: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    compare: str | None = "latest",
) -> Path:
    """Write a complete report folder under ``base`` and return it; ``compare`` picks the baseline.

    >>> write_report("reports", metrics=m, thresholds=load_thresholds("thresholds.yaml"))  # doctest: +SKIP
    PosixPath('reports/2025-08-10_1500')
    """
    run = new_run_dir(base)
    (run / "plots").mkdir()
    files: dict[str, str] = {}
    if profile is not None:
        from ..profiling.dataset import save_profile

        save_profile(profile, run / "profiling_raw")
        files["profiling_raw"] = "profiling_raw.json"
    if scores is not None:
        _write_json(run / "head_importance.json", head_importance(scores, kept))
        heatmap_plot(scores, kept, run / "plots" / "head_heatmap.png")
        files["head_importance"] = "head_importance.json"
    if manifest is not None:
        _write_json(run / "fragment_manifest.json", manifest)
        files["fragment_manifest"] = "fragment_manifest.json"
    if (extra or {}).get("lever_curves"):
        lever_curves_plot(extra["lever_curves"], run / "plots" / "lever_curves.png")
        files["lever_curves"] = "plots/lever_curves.png"
    summary = build_summary(run.name, metrics, thresholds, manifest=manifest, extra=extra, notes=notes)
    summary["files"] = files
    _write_json(run / SUMMARY, summary)
    baseline = None
    if compare:
        try:
            baseline_dir = resolve_report(compare, base, before=run)
            baseline = read_summary(baseline_dir)
        except Exception as exc:  # first run, or no valid baseline yet: the diff says so
            log.info("no baseline for %s: %s", run.name, exc)
    diff = regression_diff(summary, baseline, thresholds)
    _write_json(run / "regression_diff.json", diff)
    latency_plot(metrics, run / "plots" / "latency.png")
    quality_tradeoff_plot(quality_curve, run / "plots" / "quality_tradeoff.png")
    pairs = image_pairs(full_images, fragment_images, run / "images") if full_images is not None and fragment_images is not None else []
    (run / "index.html").write_text(render_html(summary, diff, pairs, extra or {}))
    log.info("report %s: %s", run, summary["status"])
    return run


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape("—" if value is None else str(value))


def render_html(summary: Mapping[str, Any], diff: Mapping[str, Any], pairs: Sequence[Mapping[str, str]],
                extra: Mapping[str, Any]) -> str:
    """A self-contained page (relative image paths only, no scripts, no network).

    >>> "<h1>" in render_html({"run_id": "r", "status": "PASS", "hypotheses": {}, "metrics": {}}, {}, [], {})
    True
    """
    colour = {"PASS": "#2e7d32", "WARN": "#ef6c00", "FAIL": "#c62828", "MISSING": "#757575", "INVALID": "#757575"}
    e = html.escape
    rows = []
    for name, rec in summary.get("hypotheses", {}).items():
        checks = "<br>".join(f"{e(k)} = {_fmt(rec.get(k))} ({c['kind']} {_fmt(c['limit'])}): "
                             f"<b style='color:{colour[c['status']]}'>{c['status']}</b>" for k, c in rec["checks"].items())
        rows.append(f"<tr><td>{e(name)}</td><td style='color:{colour[rec['status']]}'><b>{rec['status']}</b></td><td>{checks}</td></tr>")
    metric_rows = "".join(f"<tr><td>{e(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in summary.get("metrics", {}).items())
    regress = "".join(f"<li>{e(r['metric'])}: {_fmt(r['baseline'])} → {_fmt(r['current'])} ({e(r['rule'])} {_fmt(r['limit'])})</li>"
                      for r in diff.get("regressions", []))
    grid = "".join(
        f"<tr><td>{i}</td><td><img src='{e(p['full'])}' alt='full {i}'></td><td><img src='{e(p['fragment'])}' alt='fragment {i}'></td></tr>"
        for i, p in enumerate(pairs))
    notes = "".join(f"<li>{e(str(n))}</li>" for n in summary.get("notes", []))
    status = summary.get("status", "INVALID")
    image_kind = e(str(extra.get("image_kind", "images")))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Prompt Fragments report {e(str(summary.get('run_id')))}</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top;font-size:13px}}img{{image-rendering:pixelated;max-width:100%}}
.plots img{{margin:4px;border:1px solid #ddd}}</style></head><body>
<h1>Report {e(str(summary.get('run_id')))}: <span style="color:{colour.get(status, '#000')}">{e(status)}</span></h1>
<p>verified: <b>{e(str(summary.get('verified')))}</b>; baseline: {e(str(diff.get('baseline')))};
regressions: {len(diff.get('regressions', []))}</p>
<h2>Notes</h2><ul>{notes}</ul>
{f'<h2>Regressions</h2><ul>{regress}</ul>' if regress else ''}
<h2>Hypotheses</h2><table><tr><th>H</th><th>status</th><th>checks</th></tr>{''.join(rows)}</table>
<h2>Plots</h2><div class="plots"><img src="plots/latency.png" alt="latency"><img src="plots/quality_tradeoff.png" alt="quality vs pruning ratio">
{'<img src="plots/head_heatmap.png" alt="head heatmap">' if summary.get('files', {}).get('head_importance') else ''}
{'<img src="plots/lever_curves.png" alt="quality vs bytes saved per lever">' if summary.get('files', {}).get('lever_curves') else ''}</div>
<h2>Full model vs fragment ({image_kind})</h2><table><tr><th>#</th><th>full</th><th>fragment</th></tr>{grid}</table>
<h2>Measured values</h2><table>{metric_rows}</table>
</body></html>
"""
