"""The seeded split of one data set into calibration and held-out samples."""

from __future__ import annotations

import random

from loracompress.errors import LoraCompressError
from loracompress.runtime.data.examples import Example, Examples


def check_eval_fraction(fraction: float) -> None:
    """The share of ``--data`` held out: above 0 and below 1 (0 would hold out nothing, 1 everything)."""
    if not 0.0 < fraction < 1.0:
        raise LoraCompressError(
            f"--eval-fraction must be above 0 and below 1 (got {fraction:g}); to skip the held-out evaluation "
            "pass --no-eval, or give held-out data with --eval-data"
        )


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Split into (calibration, held-out) with a seeded shuffle; both keep the file order."""
    check_eval_fraction(fraction)
    n = len(examples)
    k = max(1, round(n * fraction))
    if n < 2 or k >= n:
        raise LoraCompressError(
            f"{n} sample(s) are too few to hold out {fraction:.0%} for evaluation; pass more data or --eval-data"
        )
    held = set(random.Random(seed).sample(range(n), k))
    train = [e for i, e in enumerate(examples) if i not in held]
    test = [e for i, e in enumerate(examples) if i in held]
    if isinstance(examples, Examples):
        return examples.derive(train), examples.derive(test)
    return train, test
