"""The bank's budget: what it costs, what the user's budget resolves to, and the ranks that meet it.

A module of a cluster at rank R costs ``R·(in + out)`` for its shared bases plus ``n·R²`` for the cores
of the cluster's ``n`` adapters, so a rank's price grows with R (the single-adapter
:func:`loracompress.core.budget.allocate` prices every rank the same and does not apply). Ranks are
bought greedily by captured energy per parameter, in chunks of one or more ranks of a module, so a
module whose next rank gains little but whose following ones gain much is not stopped early.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from loracompress.core.budget import Budget
from loracompress.errors import LoraCompressError


@dataclass(frozen=True)
class Slot:
    """One module of one cluster: its price and the energy each rank adds (R = 1 … r_max)."""

    cluster: int
    module: str
    in_out: int
    members: int
    gains: np.ndarray

    @property
    def r_max(self) -> int:
        return len(self.gains)

    def cost(self, rank: int | np.ndarray) -> int | np.ndarray:
        return rank * self.in_out + self.members * rank * rank


def bank_cost(slots: Sequence[Slot], ranks: Sequence[int]) -> int:
    return int(sum(s.cost(r) for s, r in zip(slots, ranks)))


def smallest_rank_cost(slots: Sequence[Slot]) -> int:
    """The least a bank can hold: one rank of its cheapest module (every other module at rank 0, dropped)."""
    return int(min((s.cost(1) for s in slots if s.r_max > 0), default=0))


def resolve_target(budget: Budget, original_params: int, itemsize: int) -> int:
    """The budget as a parameter count for the whole bank; a fraction is of the originals' total."""
    target = budget.parameters(original_params, itemsize)  # a rank budget has none: see uniform_ranks
    if target <= 0:
        raise LoraCompressError(f"budget {budget.text!r} rounds to zero parameters; give a larger budget")
    return target


def check_floor(slots: Sequence[Slot], target: int, budget: Budget, original_params: int) -> None:
    floor = smallest_rank_cost(slots)
    if target < floor:
        raise LoraCompressError(
            f"budget {budget.text!r} ({target:,} parameters) is below the bank's own minimum: shared bases and cores of "
            f"one rank of the smallest module cost {floor:,}; give at least {floor:,} parameters "
            f"(a fraction of {floor / original_params:.3g} of the originals)"
        )


def uniform_ranks(slots: Sequence[Slot], rank: int) -> list[int]:
    """``rank=K``: R = K in every module (or its r_max when smaller)."""
    return [min(rank, s.r_max) for s in slots]


def allocate_bank(slots: Sequence[Slot], target: int) -> list[int]:
    """Ranks per slot within ``target`` parameters; a module no rank is worth its price keeps rank 0 (dropped).

    A lazy max-heap of each slot's best affordable chunk (value per parameter): the budget left only
    shrinks, so a stale key can only be too high, and is recomputed when it reaches the top.
    """
    if target >= bank_cost(slots, [s.r_max for s in slots]):
        return [s.r_max for s in slots]  # everything fits: exact reconstruction, nothing to choose
    ranks = [0] * len(slots)
    spent = 0

    def best(i: int) -> tuple[float, int] | None:
        s, r = slots[i], ranks[i]
        if r >= s.r_max:
            return None
        steps = np.arange(r + 1, s.r_max + 1)
        gain = np.cumsum(s.gains[r:])
        cost = s.cost(steps) - s.cost(r)
        ratio = np.where(cost <= target - spent, gain / cost, -np.inf)
        j = int(np.argmax(ratio))
        return (float(ratio[j]), j + 1) if ratio[j] > 0 else None

    heap = [(-b[0], i) for i in range(len(slots)) if (b := best(i)) is not None]
    heapq.heapify(heap)
    while heap:
        key, i = heapq.heappop(heap)
        b = best(i)
        if b is None:
            continue
        if b[0] < -key * (1 - 1e-12):  # the budget left no longer buys that chunk: requeue at its new value
            heapq.heappush(heap, (-b[0], i))
            continue
        spent += int(slots[i].cost(ranks[i] + b[1]) - slots[i].cost(ranks[i]))
        ranks[i] += b[1]
        if (nxt := best(i)) is not None:
            heapq.heappush(heap, (-nxt[0], i))
    return ranks
