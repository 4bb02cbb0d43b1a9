"""Sparse decode attention: one query token per sequence over a per-GQA-group union of key blocks."""
