"""Snapshots: tar assembly straight from a mirror, zstd, and the shared generation."""
