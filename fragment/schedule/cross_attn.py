"""Cross-attention caching after convergence (T-GATE's idea, re-implemented): below a timestep, attn2 replays.

Cross-attention output converges early in sampling (T-GATE, Zhang et al. 2024;
``profiling.cross_attn_change`` measures it per prompt).  Below the schedule's
``cross_attn_cache`` timestep every cross-attention module returns, per sample,
its output from the last call it computed (the same call slot of an earlier
step: cond and uncond keep their own), so its query projection, the attention
over the text tokens and its output projection are not computed.  The K/V fold
already removes ``to_k``/``to_v``; this removes the rest.

The replaying module is a same-class copy of what sits at the path (the
fragment's pruned or folded copy when there is one, with any replacement
inside the module folded into it, since no patch may sit inside another): it
shares every Parameter, keeps every state-dict key, and never changes the
module it copies.  With ``state.attn_enabled`` off it is that module, output
for output.  Only outputs computed above the gate are kept, each with the text
context it attended to: a run that starts below the gate (img2img, a second
sampler pass) computes as the plain fragment, and a prompt switch mid-run
computes again.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn

from ...profiling.cross_attn_change import cross_attention_paths
from ..surgery.tree import fresh_copy, install, module_at, replace_modules
from .state import ScheduleState


class _CrossAttnReplay:
    """Put in front of a cross-attention module's own class: while ``attn_state.attn_replaying`` it returns its
    stored output instead of computing."""

    attn_key: str
    attn_state: ScheduleState

    def forward(self, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        # diffusers passes the text as encoder_hidden_states, ComfyUI as context; both as the 2nd positional
        context = kwargs.get("context", kwargs.get("encoder_hidden_states", args[0] if args else None))
        context = context if isinstance(context, torch.Tensor) else None
        state = self.attn_state
        if state.attn_replaying:
            cached = state.attn_replay(self.attn_key, hidden_states.shape, context)
            if cached is not None:
                return cached
        out = super().forward(hidden_states, *args, **kwargs)  # type: ignore[misc]
        state.attn_store(self.attn_key, out, context)
        return out


_REPLAY_CLASSES: dict[type, type] = {}


def cross_attn_replay(inner: nn.Module, key: str, state: ScheduleState) -> nn.Module:
    """``inner`` (a cross-attention module) that replays below ``state.attn_gate``: same class, same Parameters.

    The result is a ``fresh_copy`` of ``inner`` whose class also derives from ``inner``'s, so its state-dict
    keys stay ``...attn2.to_q.weight``: a LoRA on cross-attention still finds them (a wrapper module would
    rename them to ``...attn2.inner.to_q.weight``, and ComfyUI would drop the patch silently), and attention
    discovery sees one module, not two.  A cached output replays only when it has the incoming hidden states'
    shape (cross-attention maps ``[B, N, C]`` to ``[B, N, C]``) and was computed for the same context.

    >>> state = ScheduleState(); state.attn_gate = 500.0
    >>> lin = nn.Linear(2, 2); attn = cross_attn_replay(lin, "a", state)
    >>> state.begin_call(999.0, (1, 2)); first = attn(torch.ones(1, 2))
    >>> state.begin_call(400.0, (1, 2)); bool(torch.equal(attn(torch.zeros(1, 2)), first))
    True
    >>> isinstance(attn, nn.Linear), attn.weight is lin.weight, list(attn.state_dict())
    (True, True, ['weight', 'bias'])
    """
    cls = type(inner)
    if cls not in _REPLAY_CLASSES:
        _REPLAY_CLASSES[cls] = type(f"CrossAttnReplay{cls.__name__}", (_CrossAttnReplay, cls), {"__module__": __name__})
    new = fresh_copy(inner)
    new.__class__ = _REPLAY_CLASSES[cls]
    new.attn_key = key
    new.attn_state = state
    return new


def is_cross_attn_replay(module: nn.Module) -> bool:
    return isinstance(module, _CrossAttnReplay)


def cross_attn_replacements(model: nn.Module, replacements: Mapping[str, nn.Module],
                            state: ScheduleState) -> dict[str, nn.Module]:
    """``replacements`` with every cross-attention module of ``model`` made to replay (:func:`cross_attn_replay`).

    A module already replaced (pruned heads, folded K/V) replays as replaced; replacements inside a
    cross-attention module (a low-rank or low-bit ``to_q``) are folded into its copy first, and a replaced
    parent gets the replaying module inside its own copy, so no patch sits inside another.

    >>> # patches = cross_attn_replacements(unet, plan.replacements, state)
    """
    out = dict(replacements)
    for path in cross_attention_paths(model):
        inner = {p[len(path) + 1:]: out.pop(p) for p in list(out) if p.startswith(path + ".")}
        module = module_at(model, out, path)
        if inner:
            module = replace_modules(module, inner)
        out.pop(path, None)
        install(out, {path: cross_attn_replay(module, path, state)})
    return out
