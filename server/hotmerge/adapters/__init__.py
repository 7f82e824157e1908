"""Adapters on the server: the adapter root that ids name folders in (``root``), PEFT files
checked before reading (``files``), the store that keeps them resident on the device (``store``),
and the byte-budgeted LRU both caches use (``pinned_lru``)."""
