"""Sample order for training: seeded shuffle, or LLaVA's length grouping by modality.

Pure functions over lengths; the trainer cuts the returned order into global steps, so
the order is the same whatever the number of processes.
"""
from __future__ import annotations

import random


def shuffled_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(f"bunny-order/{seed}/{epoch}").shuffle(order)
    return order


def modality_length_grouped_order(lengths: list[int], has_image: list[bool], batch_size: int,
                                  seed: int, epoch: int, megabatch: int = 50) -> list[int]:
    """Indices such that each run of `batch_size` holds one modality (image or text-only)
    and similar lengths, so padding is small; the runs themselves come in random order.

    Within a modality: shuffle, cut into megabatches of `batch_size * megabatch` samples,
    sort each by length (longest first), cut into batches. A modality's last partial
    batch is kept (mixed batches are allowed, just rarer).
    """
    if len(lengths) != len(has_image):
        raise ValueError("lengths and has_image differ in length")
    rng = random.Random(f"bunny-grouped/{seed}/{epoch}")
    batches: list[list[int]] = []
    for flag in (True, False):
        idx = [i for i, h in enumerate(has_image) if h == flag]
        rng.shuffle(idx)
        size = batch_size * megabatch
        for start in range(0, len(idx), size):
            mega = sorted(idx[start:start + size], key=lambda i: -lengths[i])
            batches += [mega[k:k + batch_size] for k in range(0, len(mega), batch_size)]
    rng.shuffle(batches)
    return [i for b in batches for i in b]
