"""gitcache: a caching proxy that serves ready-to-use Git clones as tar.zst snapshots."""

__version__ = "0.1.0"
