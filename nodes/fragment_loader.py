"""FragmentLoader: put a fragment onto a MODEL as object patches on a clone.

The shared model is never changed: the pruned modules are installed with
``clone().add_object_patch`` and ComfyUI puts the originals back when it
unpatches.  The clone's size is corrected to the bytes really resident, so
ComfyUI's memory planner sees the smaller model.

A fragment with a run-time schedule (issue #8) also gets the schedule's
object patches and wrappers (``schedule_patch.install_schedule``), unless
``schedule`` is off.

LoRA patches on weights the fragment prunes are refused with a clear error
(merge the LoRA into the checkpoint before profiling instead); attn2
replacement patches (IPAdapter, InstantID, PuLID) are refused when the
fragment prunes cross-attention.
"""
from __future__ import annotations

import logging
from typing import Any

from ..errors import BaseModelMismatchError, FragmentError
from ..fragment.library.auto_mode import FALLBACK, auto_select, load_or_fallback
from ..fragment.library.fingerprint import pool_conditioning
from ..fragment.format.manifest import Fragment
from ..fragment.format.store import manifest_identity
from ..fragment.library.audit_outcome import audit_confirmed
from ..fragment.patching import PatchPlan, base_sha256, plan_patches
from ..fragment.schedule.apply import fragment_schedule, schedule_replacements
from ..fragment.schedule.state import Schedule, ScheduleState
from ..judge.comfy import ComfyModels
from ..metrics.costs import extraction_costs
from .comfy_versions import unload_clones
from .folders import (
    CATEGORY, NONE, FragmentHandle, fragment_choices, fragment_path, fragments_dir, tip, unpatched_originals
)
from .node_text import with_text
from .profiler_loader import without_profiling
from .schedule_patch import describe_schedule, install_schedule

log = logging.getLogger(__name__)
PREFIX = "diffusion_model."
AUTO = "(auto)"
#: model_options key naming the object patches a fragment put on a clone, and the base's size: BatchGenerator's
#: audit takes exactly those off a clone to render the full model (model_options survive every clone).
FRAGMENT_PATCHES = "prompt_fragments_fragment_patches"


class FragmentLoader:
    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", tip("The base model the fragment was extracted from.")),
                "fragment_name": ([AUTO] + fragment_choices(), tip("A fragment manifest from models/fragments; (auto) picks the cached fragment nearest to the positive prompt; (none) uses the fragment input.")),
                "on_mismatch": (["fallback", "raise"], tip("Wrong base model, or an unreadable or corrupt fragment: fallback returns the full model with a WARNING status (a corrupt fragment is moved to .library/quarantine, and the status says how to restore it); raise stops the queue and moves nothing.")),
            },
            "optional": {
                "fragment": ("FRAGMENT", tip("A fragment straight from FragmentExtractor (takes precedence over fragment_name).")),
                "positive": ("CONDITIONING", tip("For (auto): the prompt whose nearest cached fragment is used.")),
                "threshold": ("FLOAT", tip("For (auto): least cosine similarity between prompt embeddings that counts as a hit.", default=0.9, min=0.0, max=1.0, step=0.01)),
                "schedule": (["as stored", "off"], tip("The fragment's run-time schedule (head sets per noise level, deep-block reuse on calibrated steps, CFG truncation, cross-attention cache): as stored, or off for the plain fragment.")),
            },
        }

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("MODEL", "status")
    FUNCTION = "run"
    CATEGORY = CATEGORY
    DESCRIPTION = "Applies a fragment to a model: pruned attention heads, verified against the base model."

    def run(self, **inputs: Any) -> dict[str, Any]:
        """The node's entry point: ``apply``'s (MODEL, status), with the status on the node (a fallback as a warning)."""
        result = self.apply(**inputs)
        return with_text(result, result[1])

    def apply(self, model: Any, fragment_name: str, on_mismatch: str, fragment: FragmentHandle | None = None,
              positive: Any = None, threshold: float = 0.9, schedule: str = "as stored") -> tuple:
        # A loaded clone (say this node's output from the last queue) has its object patches on the shared
        # modules; unload it so the base is read as it is (ComfyUI's get_key_patches does the same).
        unload_clones(model)
        originals = unpatched_originals(model)
        prefix_status = ""
        digest: str | None = None
        source = None  # the manifest file the fragment was read from: BatchGenerator's audit keeps its verdict there
        if fragment is not None:
            frag, source = fragment.fragment, fragment.manifest_path
        elif fragment_name == AUTO:
            if positive is None:
                raise FragmentError("FragmentLoader (auto): expected the positive CONDITIONING input, found none; "
                                    "connect the prompt's positive CONDITIONING, or choose a fragment_name")
            digest = base_sha256(model.model.diffusion_model, originals)
            outcome = auto_select(fragments_dir(), digest, pool_conditioning(positive), threshold=threshold,
                                  on_error=on_mismatch)
            if outcome.fragment is None:
                status = warned(outcome.status)
                log.warning("FragmentLoader: %s", status)
                return (without_profiling(model.clone()), status)
            frag, prefix_status = outcome.fragment, outcome.status + "; "
            source = outcome.lookup.manifest_path if outcome.lookup is not None else None
        elif fragment_name and fragment_name != NONE:
            path = fragment_path(fragment_name)
            # fallback: a corrupt file is quarantined and the full model used, so one bad download never stops a
            # queue; raise: it raises and nothing moves (the user asked to stop, not to have files moved).
            outcome = load_or_fallback(path.parent, path, on_error=on_mismatch)
            if outcome.fragment is None:
                status = warned(outcome.status)
                log.warning("FragmentLoader: %s", status)
                return (without_profiling(model.clone()), status)
            frag, source = outcome.fragment, path
        else:
            raise FragmentError("FragmentLoader: expected a fragment_name or a connected fragment input, found neither; "
                                "choose a fragment in fragment_name, or connect FragmentExtractor's FRAGMENT output")
        try:
            patched, plan, plan_schedule = fragment_model(model, frag, originals=originals, digest=digest,
                                                          schedule=schedule != "off", source=source)
        except BaseModelMismatchError as exc:
            if on_mismatch == "raise":
                raise
            status = warned(f"{FALLBACK}: {exc}")
            log.warning("FragmentLoader: %s", status)
            return (without_profiling(model.clone()), status)
        status = prefix_status + (f"applied fragment {frag.name!r}: {len(plan.replacements)} modules replaced, "
                  f"{plan.bytes_saved / 2**20:.1f} MiB fewer weights")
        if not plan_schedule.empty:
            status += "; " + (describe_schedule(plan_schedule) if schedule != "off" else "schedule off")
        confirmation = confirmation_of(frag)
        if confirmation == "in_batch":
            status += ("; picked untried (extracted with confirm: in batch): BatchGenerator's running audit confirms it "
                       "on the batch's first images")
        elif confirmation == "audited":
            status += "; picked untried, confirmed since by a batch's running audit (quality.audits)"
        log.info("FragmentLoader: %s", status)
        return (patched, status)


def warned(status: str) -> str:
    """``status`` with a WARNING marker when the full model is used in place of a fragment that was asked for.

    A miss in auto mode is the cache working, not a warning; a fallback (wrong base, corrupt or unreadable file) is.

    >>> warned("FALLBACK to the full model: x"), warned("MISS (full model): library is empty")
    ('WARNING: FALLBACK to the full model: x', 'MISS (full model): library is empty')
    """
    return f"WARNING: {status}" if status.startswith(FALLBACK) else status


def fragment_model(model: Any, frag: Fragment, *, originals: dict[str, Any] | None = None, digest: str | None = None,
                   schedule: bool = True, source: Any = None) -> tuple[Any, PatchPlan, Schedule]:
    """A clone of ``model`` with ``frag`` applied as object patches (and its schedule, unless ``schedule`` is off).

    The one way the pack puts a fragment on a ComfyUI MODEL: FragmentLoader and the
    extractor's judge both call it.  The clone never profiles, its size is the bytes
    really resident, and the shared model is left alone.  ``digest`` (``base_sha256``)
    skips re-hashing the base; raises ``BaseModelMismatchError`` for another base.
    ``source``: the manifest file ``frag`` was read from (None: not from a file), where
    BatchGenerator's running audit keeps its verdict.

    >>> patched, plan, plan_schedule = fragment_model(model, fragment, digest=digest)  # doctest: +SKIP
    >>> patched is not model, plan_schedule.empty  # doctest: +SKIP
    (True, True)
    """
    originals = unpatched_originals(model) if originals is None else originals
    plan = plan_patches(
        model.model.diffusion_model,
        frag,
        originals=originals,
        base_digest=digest,
        weight_patch_keys=model.patches.keys(),
        transformer_options=model.model_options.get("transformer_options", {}),
        key_prefix=PREFIX,
    )
    # A fragment model is never profiled: statistics must describe the full model only.
    patched = without_profiling(model.clone())
    replacements, plan_schedule = plan.replacements, fragment_schedule(frag)
    scheduled = bool(schedule and not plan_schedule.empty)
    if scheduled:
        state = ScheduleState.for_schedule(plan_schedule)
        diffusion_model = model.model.diffusion_model
        replacements = schedule_replacements(diffusion_model, frag, plan.replacements, plan_schedule, state,
                                             reuse_on=diffusion_model)
        sampling = model.object_patches.get("model_sampling", model.model.model_sampling)  # as a sampling node set it
        install_schedule(patched, state, sampling, plan_schedule.cfg_cutoff, whole_step=plan_schedule.whole_step)
    for path, module in replacements.items():
        patched.add_object_patch(PREFIX + path, module)
    # what the calibration judged with; nothing when the MODEL runs as the full model (no lever, or a fallback's
    # empty fragment), whose images no sampler can make differ from stock's
    judged = (frag.manifest.get("quality") or {}).get("sampler") if replacements or scheduled else None
    refinement = refinement_of(frag)
    patched.model_options[FRAGMENT_PATCHES] = {"keys": sorted(PREFIX + p for p in replacements),
                                               "size": model.model_size(),
                                               "judged_sampler": dict(judged) if isinstance(judged, dict) else None,
                                               "levers": bool(replacements or scheduled),
                                               # a stored schedule left off: the MODEL is not the fragment as picked
                                               "schedule_off": bool(not plan_schedule.empty and not scheduled),
                                               "confirmation": confirmation_of(frag),
                                               "chosen": refinement.get("chosen"),
                                               "base_sha256": (frag.manifest.get("base_model") or {}).get("sha256"),
                                               "manifest": str(source) if source is not None else None,
                                               "identity": manifest_identity(frag.manifest),
                                               # what the extraction cost: BatchGenerator's report counts it
                                               "extraction": extraction_costs(frag.manifest.get("performance"))}
    patched.size = max(1, model.model_size() - plan.bytes_saved)
    return patched, plan, plan_schedule


def refinement_of(frag: Fragment) -> dict[str, Any]:
    """The manifest's ``quality.refinement`` (how the calibration chose), or ``{}`` when it has none."""
    refinement = (frag.manifest.get("quality") or {}).get("refinement")
    return dict(refinement) if isinstance(refinement, dict) else {}


def confirmation_of(frag: Fragment) -> str | None:
    """How the fragment's pick was confirmed: the calibration's status (``passed``, ``fallback_full_model``), or for
    an untried pick (``in_batch``) ``audited`` once an earlier batch's running audit confirmed it
    (``audit_confirmed``), so later batches need no lead of audits."""
    status = refinement_of(frag).get("status")
    if status == "in_batch" and audit_confirmed(frag.manifest.get("quality")):
        return "audited"
    return status if isinstance(status, str) else None


def _judged_fragment_model(model: Any, frag: Fragment, originals: dict[str, Any] | None, digest: str | None) -> Any:
    return fragment_model(model, frag, originals=originals, digest=digest)[0]


def _unprofiled_clone(model: Any) -> Any:
    return without_profiling(model.clone())


#: How FragmentExtractor's judge (``judge.comfy.ComfyJudge``) gets its models: the full model unprofiled, and a
#: fragment put on exactly as FragmentLoader puts it, so judging never adds to the profile or patches the shared model.
JUDGE_MODELS = ComfyModels(full=_unprofiled_clone, with_fragment=_judged_fragment_model, release=unload_clones)
