"""Metrics: quality and performance measurements (filled by later issues)."""
