"""Cache tiers behind one small async protocol (see :mod:`gitcache.cache.base`)."""
