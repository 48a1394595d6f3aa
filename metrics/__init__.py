"""Metrics: quality (CLIP, LPIPS, SSIM, pHash, adherence), performance (latency, throughput,
break-even), GPU memory, H1–H5 judgement, reports and the regression gate.  Imports no ComfyUI."""
