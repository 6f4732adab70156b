"""How much each randomised test does: in `make test` a share, in the thorough suite all of it (`TRAIND_THOROUGH=1`,
set by `make test-thorough`, which runs every property test again: `pytest -m fuzz`)."""

from __future__ import annotations

import os

THOROUGH = os.environ.get("TRAIND_THOROUGH") == "1"


def examples(n: int) -> int:
    """A property test's hypothesis examples: n in the thorough suite, a quarter of them (at least 20) in make test."""
    return n if THOROUGH else max(20, n // 4)
