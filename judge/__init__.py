"""The judge: is a fragment's output close enough to the full model's?  One package, used by the demo, ``bench/`` and ``nodes/``.

- ``limits``: the one limit checker (max/min bounds, the rule for missing values);
- ``thresholds``: reading and checking ``thresholds.yaml``;
- ``gate``: the quality gate (its limits, which of them a judge can measure, failures and slack);
- ``image_similarity`` (SSIM, LPIPS, pHash; LPIPS weights via ``lpips_weights``) and ``latent_distance``: the metrics;
- ``fragment_judge``: render with a fragment and compare (any host that runs a diffusers-style UNet);
- ``reference_target``: the reference model judged by the gate (demo, bench, CI);
- ``comfy``: the judge inside ComfyUI (imports ComfyUI: only ``nodes/`` imports it).

Imports no ComfyUI, no demo, bench, nodes or cli (``tests/test_layout.py``).
"""
