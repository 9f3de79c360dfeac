"""Merge engine: pure tensor methods, checkpoint I/O and the in-place Merger."""
