"""Fragments: pruning plans, pruned module copies, and their on-disk format."""
