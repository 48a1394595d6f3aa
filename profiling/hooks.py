"""The install/remove lifecycle shared by every profiler that works through forward hooks."""
from __future__ import annotations

import torch


class HookContext:
    """Context manager base: ``_install`` registers hooks into ``self._handles``; all are removed on exit.

    If installing fails half-way, what was installed is removed before the error propagates,
    so a model never keeps stray hooks.

    >>> class One(HookContext):
    ...     def __init__(self, m): super().__init__(); self.m = m
    ...     def _install(self): self._handles.append(self.m.register_forward_hook(lambda *a: None))
    >>> lin = torch.nn.Linear(1, 1)
    >>> with One(lin): print(len(lin._forward_hooks))
    1
    >>> len(lin._forward_hooks)
    0
    """

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _install(self) -> None:  # pragma: no cover - subclasses say what they hook
        raise TypeError(f"{type(self).__name__} must define _install()")

    def _on_remove(self) -> None:
        """Drop per-call scratch state; called after the hooks are gone."""

    def __enter__(self):
        try:
            self._install()
        except Exception:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this profiler installed (safe to call twice)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._on_remove()
