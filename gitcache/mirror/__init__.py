"""Bare mirrors of upstream repositories: cloning, fetching, locking, and the git runner."""
