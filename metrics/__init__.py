"""Metrics: the quality block (CLIP, adherence; SSIM, LPIPS and pHash come from ``judge``), performance (latency,
throughput, break-even), GPU memory, H1–H5 judgement, reports and the regression gate.  Imports no ComfyUI."""
