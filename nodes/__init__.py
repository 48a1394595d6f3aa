"""The ComfyUI nodes (V1 API: INPUT_TYPES / RETURN_TYPES / FUNCTION), imported only inside ComfyUI."""
from __future__ import annotations

from .folders import register_fragments_folder
from .batch_generator import BatchGenerator
from .fragment_extractor import FragmentExtractor
from .fragment_loader import FragmentLoader
from .manual_levers import FragmentManualLevers
from .profiler_loader import ProfilerModelLoader
from .status_text import FragmentStatus
from .usage_visualizer import UsageVisualizer

register_fragments_folder()

NODE_CLASS_MAPPINGS = {
    "ProfilerModelLoader": ProfilerModelLoader,
    "FragmentExtractor": FragmentExtractor,
    "FragmentManualLevers": FragmentManualLevers,
    "FragmentLoader": FragmentLoader,
    "BatchGenerator": BatchGenerator,
    "UsageVisualizer": UsageVisualizer,
    "FragmentStatus": FragmentStatus,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "ProfilerModelLoader": "Profiler Model Loader",
    "FragmentExtractor": "Fragment Extractor",
    "FragmentManualLevers": "Fragment Manual Levers",
    "FragmentLoader": "Fragment Loader",
    "BatchGenerator": "Batch Generator (many seeds)",
    "UsageVisualizer": "Head Usage Heatmap",
    "FragmentStatus": "Fragment Status",
}
