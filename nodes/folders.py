"""The ``fragments`` models folder and the handles that travel between the nodes."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import folder_paths

from ..errors import FragmentError
from ..fragment.format.manifest import Fragment
from ..profiling.session import ProfileSession

FOLDER = "fragments"
CATEGORY = "fragments"
NONE = "(none)"


def register_fragments_folder() -> None:
    """Add ``models/fragments`` (extendable through extra_model_paths.yaml) listing manifests only.

    A folder added by name alone matches every extension, so the extension
    set is narrowed to ``.json`` after the paths are known.
    """
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER, default)
    paths = folder_paths.folder_names_and_paths[FOLDER][0]
    if default not in paths:
        paths.insert(0, default)
    folder_paths.folder_names_and_paths[FOLDER] = (paths, {".json"})


def fragments_dir() -> Path:
    """Where new fragments are written: the first registered fragments folder."""
    return Path(folder_paths.get_folder_paths(FOLDER)[0])


def fragment_choices() -> list[str]:
    return [NONE] + sorted(folder_paths.get_filename_list(FOLDER))


def fragment_path(name: str) -> Path:
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        folders = folder_paths.get_folder_paths(FOLDER)
        raise FragmentError(f"{name}: no such fragment in the fragments folders {folders}; choose another fragment_name, "
                            f"or put its .json and .safetensors back in {folders[0]} (FragmentLoader moves a corrupt "
                            f"fragment to {Path(folders[0]) / '.library' / 'quarantine'})")
    return Path(path)


@dataclass
class ProfileHandle:
    """FRAGMENT_PROFILE: the live session plus what the extractor needs to name the base model."""

    session: ProfileSession
    checkpoint: str
    patcher: Any  # the profiled ModelPatcher clone; its model's diffusion_model is what the session measures
    runs: list[Any] = field(default_factory=list)  # profiler_loader.RecordedRun of each sampler run, oldest first

    @property
    def diffusion_model(self) -> Any:
        return self.patcher.model.diffusion_model


@dataclass
class FragmentHandle:
    """FRAGMENT: a verified fragment and where it lives on disk."""

    fragment: Fragment
    manifest_path: Path


def tip(text: str, **options: Any) -> dict[str, Any]:
    """Input options with a tooltip (ignored by ComfyUI versions that predate tooltips)."""
    return {**options, "tooltip": text}


def unpatched_originals(patcher: Any, prefix: str = "diffusion_model.") -> dict[str, Any]:
    """Original tensors of weights ComfyUI has patched in place (LoRA merged while loaded), keyed like
    the diffusion model's state dict.  Clones share ``backup``, so any clone of the model will do.
    """
    backup = getattr(patcher, "backup", None) or {}
    # Older ComfyUI stores tensors, newer a (weight, inplace_update) named tuple.
    return {k[len(prefix):]: getattr(v, "weight", v) for k, v in backup.items() if k.startswith(prefix)}
