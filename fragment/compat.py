"""What else in a graph conflicts with a fragment, decided from plain data before anything is patched.

* LoRA and other weight patches name weights by key
  (``diffusion_model.<module path>.to_q.weight``).  A patch on a weight the
  fragment slices would be dropped silently by ComfyUI (shape mismatch), so
  the conflict is reported up front.  The pack's policy is to refuse and ask
  for the LoRA to be merged into the checkpoint before profiling: the
  fragment's kept heads were chosen on the un-LoRA'd model, and merging after
  selection would keep heads chosen for a different model.
* IPAdapter, InstantID and PuLID replace attn2 with their own attention that
  uses full-width keys and values; with fewer heads in attn2 that cannot work.
* A batch sampled with other settings than the calibration judged (another
  sampler, scheduler, step count, CFG or denoise) runs a fragment whose quality on that
  run was never measured: not refused, since it may well hold, but said.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from ..errors import FragmentError
from .build import lever_weight_keys


def sliced_weight_keys(fragment_manifest: Mapping[str, Any], prefix: str = "") -> set[str]:
    """Every weight/bias key the fragment replaces with a smaller, folded or quantized tensor (all its levers).

    >>> m = {"pruning": {"modules": {"mid.attn1": {}}}, "compression": {"low_rank": [{"layer": "mid.ff"}]}}
    >>> sorted(sliced_weight_keys(m, "diffusion_model."))[:3]
    ['diffusion_model.mid.attn1.to_k.bias', 'diffusion_model.mid.attn1.to_k.weight', 'diffusion_model.mid.attn1.to_out.0.bias']
    """
    return lever_weight_keys(fragment_manifest, prefix)


def conflicting_patch_keys(patch_keys: Iterable[str], fragment_manifest: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The weight-patch keys (e.g. from a LoRA) that target weights the fragment slices.

    >>> m = {"pruning": {"modules": {"mid.attn1": {}}}, "compression": {}}
    >>> conflicting_patch_keys(["mid.attn1.to_q.weight", "mid.ff.net.2.weight"], m)
    ['mid.attn1.to_q.weight']
    """
    sliced = sliced_weight_keys(fragment_manifest, prefix)
    return sorted(k for k in patch_keys if k in sliced)


def check_weight_patches(patch_keys: Iterable[str], fragment_manifest: Mapping[str, Any], prefix: str = "") -> None:
    """Raise a clear :class:`FragmentError` when weight patches would be silently dropped."""
    conflicts = conflicting_patch_keys(patch_keys, fragment_manifest, prefix)
    if conflicts:
        shown = ", ".join(conflicts[:3]) + (f" and {len(conflicts) - 3} more" if len(conflicts) > 3 else "")
        raise FragmentError(
            f"fragment {fragment_manifest.get('name', '?')!r}: {len(conflicts)} LoRA/weight patches target weights the "
            f"fragment prunes ({shown}); ComfyUI would drop them silently. Merge the LoRA into the checkpoint "
            "(e.g. LoraLoader then CheckpointSave) and profile that checkpoint, or apply the fragment without the LoRA."
        )


def check_attention_replacements(transformer_options: Mapping[str, Any], fragment_manifest: Mapping[str, Any]) -> None:
    """Refuse attn2 replacement patches (IPAdapter, InstantID, PuLID) when the fragment prunes any attn2.

    >>> check_attention_replacements({"patches_replace": {"attn2": {("input", 4, 0): object()}}},
    ...     {"name": "dog", "pruning": {"modules": {"input_blocks.4.1.transformer_blocks.0.attn2": {"kind": "cross"}}}})
    Traceback (most recent call last):
    ...
    prompt_fragments.errors.FragmentError: fragment 'dog': the model carries 1 attn2 replacement patch(es) (IPAdapter, InstantID, PuLID or similar), which need full-width cross-attention; this fragment prunes 1 cross-attention module(s). Apply the fragment without them, or use a fragment built with cross-attention heads kept.
    """
    replaced = (transformer_options.get("patches_replace") or {}).get("attn2") or {}
    pruned_cross = [p for p, e in fragment_manifest["pruning"]["modules"].items() if e.get("kind") == "cross" or p.endswith("attn2")]
    if replaced and pruned_cross:
        raise FragmentError(
            f"fragment {fragment_manifest.get('name', '?')!r}: the model carries {len(replaced)} attn2 replacement "
            "patch(es) (IPAdapter, InstantID, PuLID or similar), which need full-width cross-attention; this fragment "
            f"prunes {len(pruned_cross)} cross-attention module(s). Apply the fragment without them, or use a fragment "
            "built with cross-attention heads kept."
        )


#: The sampler settings a calibration judges with (``quality.sampler`` in the manifest); the judge renders at
#: denoise 1 from an empty latent, so a batch at a lower denoise runs what it never judged either.
SAMPLER_SETTINGS = ("sampler_name", "scheduler", "steps", "cfg", "denoise")
_NUMERIC = ("steps", "cfg", "denoise")
_SHOWN = 40  # characters of a value from a shared manifest that reach a report


def sampler_mismatch(judged: Mapping[str, Any] | None, used: Mapping[str, Any]) -> str | None:
    """What differs between the sampler settings a fragment was judged with and those of this run; ``None`` when
    nothing differs or the fragment records none (made before they were recorded, or never judged).

    >>> sampler_mismatch({"sampler_name": "euler", "scheduler": "normal", "steps": 20, "cfg": 7.0},
    ...                  {"sampler_name": "dpmpp_2m_sde", "scheduler": "karras", "steps": 20, "cfg": 7})
    'judged with sampler_name euler, scheduler normal; this run has dpmpp_2m_sde, karras'
    >>> sampler_mismatch(None, {"sampler_name": "euler"}) is None
    True
    """
    if not isinstance(judged, Mapping):
        return None
    differ = []
    for name in SAMPLER_SETTINGS:
        if name not in judged or name not in used:
            continue
        a, b = judged[name], used[name]
        if not same_setting(a, b, numeric=name in _NUMERIC):
            differ.append((name, a, b))
    if not differ:
        return None
    return (f"judged with {', '.join(f'{n} {_show(a)}' for n, a, _ in differ)}; "
            f"this run has {', '.join(_show(b) for _, _, b in differ)}")


def same_setting(a: Any, b: Any, *, numeric: bool) -> bool:
    """Whether two values of one sampler setting agree: numbers to a float's rounding (20 and 20.0 are one step
    count), anything else as text; a value that is no finite-sized number (a shared manifest's) just differs.

    >>> same_setting(7, 7.0000000001, numeric=True), same_setting("twenty", 20, numeric=True)
    (True, False)
    >>> same_setting("euler", "euler", numeric=False)
    True
    """
    if numeric:
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
        except (TypeError, ValueError, OverflowError):
            return False
    return str(a) == str(b)


def _show(value: Any) -> str:
    text = format(value, "g") if isinstance(value, float) else str(value) if isinstance(value, (int, str)) else repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN - 3] + "..."
