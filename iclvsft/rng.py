"""Named, per-item random streams.

Every random choice in the project comes from ``item_rng(seed, *keys)``: a fresh ``random.Random``
seeded by a string built from a named seed and the item's coordinates (task, pool, split, index).
``random.Random`` hashes string seeds with SHA-512 (seed version 2), so the stream does not depend
on PYTHONHASHSEED, the platform or the order in which items are generated. The global RNG is never
used.
"""
from __future__ import annotations

import random


def item_rng(seed: int, *keys: object) -> random.Random:
    """A private RNG for one item, e.g. ``item_rng(data_seed, "expression", "train", "pattern", 17)``."""
    return random.Random(":".join([str(int(seed)), *map(str, keys)]))
