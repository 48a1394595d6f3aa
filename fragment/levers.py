"""The levers beyond heads, as fragment records: K/V folding, feed-forward channels, precision tiers (issue #7).

``store.py`` builds, checks and applies fragments; this module holds what
each extra lever adds to a fragment, in both directions:

* build: from the model (with the head-pruned copies already made) to
  safetensors entries and a manifest ``compression`` block;
* apply: from those records back to replacement modules, composed with the
  head-pruned copies (fold after pruning: only kept heads' K/V are stored;
  quantize last: the quantized weight is the cut one);
* check: which tensors a manifest promises, with dtype and shape.

Tensor keys::

    kv_fold.context            [rows, tokens, context_dim]  distinct context rows (cond, uncond)
    kv_fold.<attn2>.k / .v     [rows, tokens, kept width]    stored projections
    ff.<ff block>.kept         int64 [kept]                  original hidden channel indices
    quant.<linear>.weight      float8_e4m3fn / int8 [out, in]
    quant.<linear>.scale       float32 [out or 1, 1]
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Mapping

import torch
import torch.nn as nn

from ..profiling.ff_profiler import ff_site
from .errors import BaseModelMismatchError, IntegrityError
from .ff_pruning import prune_feed_forward
from .kv_fold import FoldedContexts, build_kv_tables, cross_attention_paths, fold_attention, unique_rows
from .precision import (
    PER_CHANNEL, STORAGE_DTYPES, quantize_weight, quantized_linear, relative_error, retained_linears,
    select_precision_layers,
)
from .pruning import replace_modules
from .selection import Selection, validate_plan

log = logging.getLogger(__name__)

KV_CONTEXT_KEY = "kv_fold.context"


def kv_keys(path: str) -> tuple[str, str]:
    return f"kv_fold.{path}.k", f"kv_fold.{path}.v"


def ff_key(path: str) -> str:
    return f"ff.{path}.kept"


def quant_keys(layer: str) -> tuple[str, str]:
    return f"quant.{layer}.weight", f"quant.{layer}.scale"


def _current(model: nn.Module, replacements: Mapping[str, nn.Module], path: str) -> nn.Module:
    """The module at ``path`` after ``replacements`` (which may hold it or one of its parents)."""
    for root, module in replacements.items():
        if path == root:
            return module
        if path.startswith(root + "."):
            return module.get_submodule(path[len(root) + 1 :])
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise BaseModelMismatchError(f"{path}: no such module in {type(model).__name__}") from None


def _install(replacements: dict[str, nn.Module], path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path``: inside an existing replacement when one owns it, so no patch sits in another."""
    owner = next((p for p in replacements if path.startswith(p + ".")), None)
    if owner is None:
        replacements[path] = module
    else:
        replacements[owner] = replace_modules(replacements[owner], {path[len(owner) + 1 :]: module})


# -- build -------------------------------------------------------------------------------------------------

def build_kv_fold(
    model: nn.Module, replacements: dict[str, nn.Module], context: torch.Tensor, *, keep_weights: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Fold every attn2 for ``context`` (``[B, T, C]``, cond and uncond rows); updates ``replacements``.

    >>> tensors, block = build_kv_fold(unet, replacements, torch.cat([cond, uncond]))  # doctest: +SKIP
    >>> block["rows"], block["weights_dropped"]  # doctest: +SKIP
    (2, True)
    """
    contexts = FoldedContexts(unique_rows(context.detach()))
    rows_tokens = contexts.rows.shape[0] * contexts.tokens
    if rows_tokens >= contexts.dim:  # tables [rows*tokens, width] vs weights [context_dim, width]
        log.warning("kv_fold: %d rows x %d tokens >= context dim %d: the stored K/V are larger than the weights they "
                    "replace (folding then saves compute, not bytes)", contexts.rows.shape[0], contexts.tokens, contexts.dim)
    paths = cross_attention_paths(model)
    current = {p: _current(model, replacements, p) for p in paths}
    tables = build_kv_tables(current, contexts)
    tensors: dict[str, torch.Tensor] = {KV_CONTEXT_KEY: contexts.rows.contiguous()}
    modules: dict[str, Any] = {}
    for path in paths:
        k, v = tables[path]
        tensors[kv_keys(path)[0]], tensors[kv_keys(path)[1]] = k.contiguous(), v.contiguous()
        replacements[path] = fold_attention(current[path], k, v, contexts, keep_weights=keep_weights, path=path)
        modules[path] = {"width": int(k.shape[-1]), "heads": int(current[path].heads)}
    block = {
        "rows": int(contexts.rows.shape[0]), "tokens": contexts.tokens, "context_dim": contexts.dim,
        "row_sha256": contexts.fingerprints, "context_dtype": str(contexts.rows.dtype).replace("torch.", ""),
        "weights_dropped": not keep_weights, "modules": modules,
    }
    return tensors, block


def build_ff(
    model: nn.Module, replacements: dict[str, nn.Module], selection: Selection, info: Mapping[str, Any] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Cut feed-forward channels per ``selection`` (kept original indices); updates ``replacements``.

    >>> tensors, block = build_ff(unet, reps, select_ff_channels(scores, ratio=0.3))  # doctest: +SKIP
    """
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, Any] = {}
    for path, kept in selection.pruned_only().items():
        module = model.get_submodule(path)
        site = ff_site(path, module)
        if site is None:
            raise BaseModelMismatchError(f"{path}: expected a feed-forward block (net[0] projection, net[-1] Linear), found {type(module).__name__}")
        replacements[path] = prune_feed_forward(module, site, kept)
        tensors[ff_key(path)] = torch.tensor(kept, dtype=torch.int64)
        modules[path] = {"hidden": site.hidden, "gated": site.gated, "in_proj": site.in_proj, "out_proj": site.out_proj, "kept": list(kept)}
    total = sum(selection.heads.values())
    removed = selection.removed_heads
    block = {
        "selection": dict(selection.params), "score": dict(info or {}),
        "channels_total": total, "channels_removed": removed, "modules": modules,
    }
    return tensors, block


def build_precision(
    model: nn.Module, replacements: dict[str, nn.Module], *, fmt: str, ratio: float,
    granularity: str = PER_CHANNEL, exclude: tuple[str, ...] = (), scores: Mapping[str, float] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Quantize the least sensitive retained Linears (``ratio`` of their parameters); updates ``replacements``.

    ``exclude`` lists path prefixes left alone (low-rank layers).  Linears kept
    only as a K/V fold fallback are never quantized: they are not resident work.

    >>> tensors, block = build_precision(unet, reps, fmt="fp8", ratio=1.0)  # doctest: +SKIP
    """
    current = replace_modules(model, replacements) if replacements else model
    linears = {
        p: m for p, m in retained_linears(current).items()
        if not p.endswith(".fallback") and not any(p == e or p.startswith(e + ".") for e in exclude)
    }
    errors = {p: relative_error(m.weight, fmt, granularity) for p, m in linears.items()}
    chosen = select_precision_layers(linears, fmt=fmt, ratio=ratio, granularity=granularity, scores=scores or errors)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    grouped: dict[str, dict[str, nn.Module]] = defaultdict(dict)
    for path in chosen:
        lin = linears[path]
        q, scale = quantize_weight(lin.weight, fmt, granularity)
        wk, sk = quant_keys(path)
        tensors[wk], tensors[sk] = q, scale
        _group(grouped, replacements, path, quantized_linear(lin, q, scale, path))
        layers[path] = {"dtype": str(STORAGE_DTYPES[fmt]).replace("torch.", ""), "rel_error": round(errors[path], 6)}
    _install_grouped(replacements, grouped)
    n_total = sum(m.weight.numel() for m in linears.values())
    n_quant = sum(linears[p].weight.numel() for p in chosen)
    block = {
        "applied": bool(chosen), "format": fmt, "storage_dtype": str(STORAGE_DTYPES[fmt]).replace("torch.", ""),
        "granularity": granularity, "ratio": ratio, "params_quantized": n_quant, "params_linear": n_total,
        "score": "given" if scores else "quantization_error", "layers": layers,
    }
    return tensors, block


def _group(grouped: dict[str, dict[str, nn.Module]], replacements: Mapping[str, nn.Module], path: str, module: nn.Module) -> None:
    owner = next((p for p in replacements if path.startswith(p + ".")), "")
    grouped[owner][path[len(owner) + 1 :] if owner else path] = module


def _install_grouped(replacements: dict[str, nn.Module], grouped: Mapping[str, Mapping[str, nn.Module]]) -> None:
    # One shallow copy per owning replacement, not one per quantized Linear inside it.
    for owner, subs in grouped.items():
        if owner:
            replacements[owner] = replace_modules(replacements[owner], subs)
        else:
            replacements.update(subs)


# -- apply -------------------------------------------------------------------------------------------------

def apply_kv_and_ff(
    model: nn.Module, manifest: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], replacements: dict[str, nn.Module],
) -> None:
    """Add folded attn2 copies and cut feed-forward blocks to ``replacements`` (after head pruning).

    >>> apply_kv_and_ff(unet, frag.manifest, frag.tensors, reps)  # doctest: +SKIP
    """
    compression = manifest["compression"]
    kv = compression.get("kv_fold")
    if kv:
        contexts = FoldedContexts(tensors[KV_CONTEXT_KEY])
        for path, entry in kv["modules"].items():
            attn = _current(model, replacements, path)
            to_k = getattr(attn, "to_k", None)
            if not isinstance(to_k, nn.Linear) or to_k.out_features != entry["width"]:
                found = to_k.out_features if isinstance(to_k, nn.Linear) else type(to_k).__name__
                raise BaseModelMismatchError(f"{path}: expected an attn2 with to_k width {entry['width']} to fold, found {found}")
            w = to_k.weight
            k, v = (tensors[key].to(device=w.device, dtype=w.dtype) for key in kv_keys(path))
            replacements[path] = fold_attention(attn, k, v, contexts, keep_weights=not kv["weights_dropped"], path=path)
    ff = compression.get("ff_channels")
    if ff:
        for path, entry in ff["modules"].items():
            try:
                module = model.get_submodule(path)
            except AttributeError:
                raise BaseModelMismatchError(f"{path}: fragment cuts a feed-forward block the model does not have") from None
            site = ff_site(path, module)
            if site is None or (site.hidden, site.gated) != (entry["hidden"], entry["gated"]):
                found = "no feed-forward layout" if site is None else f"hidden {site.hidden}, gated {site.gated}"
                raise BaseModelMismatchError(f"{path}: expected a feed-forward block with hidden {entry['hidden']}, gated {entry['gated']}, found {found}")
            replacements[path] = prune_feed_forward(module, site, [int(i) for i in tensors[ff_key(path)]])


def apply_precision(
    model: nn.Module, manifest: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], replacements: dict[str, nn.Module],
) -> None:
    """Swap in quantized Linears for every layer of the precision map (last: they hold the cut weights).

    >>> apply_precision(unet, frag.manifest, frag.tensors, reps)  # doctest: +SKIP
    """
    quant = manifest["compression"].get("quantization") or {}
    if not quant.get("applied"):
        return
    grouped: dict[str, dict[str, nn.Module]] = defaultdict(dict)
    for layer in quant["layers"]:
        lin = _current(model, replacements, layer)
        if not isinstance(lin, nn.Linear):
            raise BaseModelMismatchError(f"{layer}: expected an nn.Linear to take quantized weights, found {type(lin).__name__}")
        wk, sk = quant_keys(layer)
        _group(grouped, replacements, layer, quantized_linear(lin, tensors[wk], tensors[sk], layer))
    _install_grouped(replacements, grouped)


# -- check -------------------------------------------------------------------------------------------------

def check_lever_tensors(manifest: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], source: str) -> set[str]:
    """Check every tensor the lever blocks promise (dtype, shape, agreement with the manifest); return their keys.

    >>> check_lever_tensors({"compression": {}}, {}, "x.safetensors")
    set()
    """
    keys: set[str] = set()
    compression = manifest["compression"]

    def get(key: str, what: str) -> torch.Tensor:
        t = tensors.get(key)
        if t is None:
            raise IntegrityError(f"{source}: missing tensor {key!r} for {what}")
        keys.add(key)
        return t

    kv = compression.get("kv_fold")
    if kv:
        ctx = get(KV_CONTEXT_KEY, "the folded context")
        expected = [kv["rows"], kv["tokens"], kv["context_dim"]]
        if list(ctx.shape) != expected or not ctx.is_floating_point():
            raise IntegrityError(f"{source}: {KV_CONTEXT_KEY}: expected a float tensor {expected}, found {ctx.dtype} {list(ctx.shape)}")
        for path, entry in kv["modules"].items():
            for key in kv_keys(path):
                t = get(key, f"folded attn2 {path}")
                if list(t.shape) != [kv["rows"], kv["tokens"], entry["width"]] or not t.is_floating_point():
                    raise IntegrityError(f"{source}: {key}: expected a float tensor {[kv['rows'], kv['tokens'], entry['width']]}, found {t.dtype} {list(t.shape)}")
    ff = compression.get("ff_channels")
    if ff:
        for path, entry in ff["modules"].items():
            t = get(ff_key(path), f"feed-forward block {path}")
            if t.dtype != torch.int64 or t.ndim != 1:
                raise IntegrityError(f"{source}: {ff_key(path)}: expected a 1-D int64 tensor, found {t.dtype} with shape {list(t.shape)}")
            validate_plan({path: t.tolist()}, {path: entry["hidden"]}, source=source)
            if t.tolist() != entry["kept"]:
                raise IntegrityError(f"{source}: {path}: manifest keeps {len(entry['kept'])} feed-forward channels, tensors file keeps {t.numel()} different ones")
    quant = compression.get("quantization") or {}
    if quant.get("applied"):
        for layer, entry in quant["layers"].items():
            wk, sk = quant_keys(layer)
            w, s = get(wk, f"quantized layer {layer}"), get(sk, f"quantized layer {layer}")
            if str(w.dtype).replace("torch.", "") != entry["dtype"] or w.ndim != 2:
                raise IntegrityError(f"{source}: {wk}: expected a 2-D {entry['dtype']} tensor, found {w.dtype} {list(w.shape)}")
            if s.dtype != torch.float32 or s.ndim != 2 or s.shape[1] != 1 or s.shape[0] not in (1, w.shape[0]):
                raise IntegrityError(f"{source}: {sk}: expected float32 [{w.shape[0]} or 1, 1], found {s.dtype} {list(s.shape)}")
    return keys


def lever_weight_keys(manifest: Mapping[str, Any], prefix: str = "") -> set[str]:
    """Weight keys a LoRA must not patch because the levers drop, cut or quantize them.

    >>> sorted(lever_weight_keys({"compression": {"ff_channels": {"modules": {"b.ff": {"in_proj": "net.0.proj", "out_proj": "net.2"}}}}}))[:2]
    ['b.ff.net.0.proj.bias', 'b.ff.net.0.proj.weight']
    """
    compression = manifest["compression"]
    keys: set[str] = set()
    for path in (compression.get("kv_fold") or {}).get("modules", {}):
        keys.update(f"{prefix}{path}.{n}.{w}" for n in ("to_k", "to_v") for w in ("weight", "bias"))
    for path, entry in (compression.get("ff_channels") or {}).get("modules", {}).items():
        keys.update(f"{prefix}{path}.{entry[r]}.{w}" for r in ("in_proj", "out_proj") for w in ("weight", "bias"))
    for layer in (compression.get("quantization") or {}).get("layers", {}):
        keys.add(f"{prefix}{layer}.weight")
    return keys
