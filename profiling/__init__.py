"""Profiling: find attention modules and measure what each head contributes."""
