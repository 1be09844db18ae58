"""The one seed-mixing rule: every random stream is seeded by a tuple of integers, never by arithmetic.

Image i of a sample set, the data order of epoch e, the noise of training step s on rank r: each is
`derive_seed(...)` of its own key tuple, so streams never collide and do not depend on batch size, process
count or restart point. A tag as the first key keeps the kinds of stream apart.
"""

from __future__ import annotations

import numpy as np

IMAGE, DATA_ORDER, TRAIN_STEP, AUGMENT = 0, 1, 2, 3  # stream tags


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from non-negative integer keys (numpy's SeedSequence hash: well mixed, no collisions)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> 1)
