"""Parameter budgets and the one allocator that meets them.

A budget is what the user types (``0.5``, ``50%``, ``1.2M``, ``300k``, ``4MB``, ``4MiB``,
``rank=8``); :meth:`Budget.resolve` turns it into a **parameter count** for a given adapter.
One rank component of a module costs ``in + out`` parameters, so ranks are never the currency:
a rank of ``gate_proj`` in Llama-7B costs 15,104 parameters, a rank of ``q_proj`` 8,192.

:func:`allocate` is the single place that turns per-component scores into per-module ranks
under a budget; every method meets its budget through it.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from loracompress.core.units import COUNT_UNITS, human, parse_size
from loracompress.core.validate import require_int, require_type
from loracompress.errors import LoraCompressError

KINDS = ("fraction", "params", "bytes", "rank")
_HELP = "use a fraction (0.5), a percentage (50%), a parameter count (1.2M, 300k), a size (4MB, 4MiB) or rank=8"


@dataclass(frozen=True)
class Budget:
    """A parsed budget. ``kind`` is one of ``fraction``, ``params``, ``bytes``, ``rank``."""

    kind: str
    value: float
    text: str = ""

    def __post_init__(self) -> None:  # a Budget built directly must be one parse could have made
        if self.kind not in KINDS:
            raise LoraCompressError(f"Budget kind {self.kind!r} is not one of {', '.join(KINDS)}; use Budget.parse('0.5')")
        require_type("Budget value", self.value, numbers.Real, "a number")
        if not (math.isfinite(self.value) and self.value > 0):
            raise LoraCompressError(f"Budget value must be a positive finite number (got {self.value})")

    @classmethod
    def parse(cls, text: str | float) -> Budget:
        require_type("a budget", text, (str, int, float), "text or a number (0.5, 50%, 1.2M, 4MB, rank=8)")
        raw = str(text).strip()
        s = raw.lower().replace("_", "").replace(",", "")
        if not s:
            raise LoraCompressError(f"empty budget; {_HELP}")
        if m := re.fullmatch(r"rank\s*=\s*(\d+)", s):
            r = int(m[1])
            if r < 1:
                raise LoraCompressError(f"budget {raw!r}: rank must be at least 1; {_HELP}")
            return cls("rank", r, raw)
        if m := re.fullmatch(r"([0-9.e+-]+)\s*%", s):
            pct = _number(m[1], raw)
            _check_fraction(pct / 100, raw)
            return cls("fraction", pct / 100, raw)
        if (n := parse_size(s)) is not None:  # a number and a byte unit (core/units.py)
            if not math.isfinite(n):
                raise LoraCompressError(f"budget {raw!r} is not a finite number; {_HELP}")
            if n <= 0:
                raise LoraCompressError(f"budget {raw!r} must be positive; {_HELP}")
            return cls("bytes", n, raw)
        if m := re.fullmatch(r"([0-9.e+-]+)\s*([kmg]?)", s):
            x = _number(m[1], raw)
            if m[2] == "" and x >= 1:
                if x == 1:
                    return cls("fraction", 1.0, raw)
                if x < 1000:  # "2" is far more likely a mistaken "2x" than a 2-parameter budget
                    raise LoraCompressError(
                        f"budget {raw!r} is ambiguous: a fraction must be in (0, 1]; for a parameter count add a suffix (e.g. {raw}k)"
                    )
                return cls("params", x, raw)  # a bare number above 1000 is a parameter count
            if m[2] == "":
                _check_fraction(x, raw)
                return cls("fraction", x, raw)
            n = x * COUNT_UNITS[m[2]]
            if n <= 0:
                raise LoraCompressError(f"budget {raw!r} must be positive; {_HELP}")
            return cls("params", n, raw)
        raise LoraCompressError(f"cannot parse budget {raw!r}; {_HELP}")

    def resolve(self, costs: Sequence[int], ranks: Sequence[int], itemsize: int,
                reference: int | None = None) -> int:
        """The budget as a parameter count for modules of the given per-rank ``costs`` and ``ranks``.

        A fraction is of ``reference`` parameters when given (the original adapter a compressed one came
        from), else of the adapter's own. Raises when the budget is more than the adapter has, or
        rounds to zero.
        """
        total = int(sum(c * r for c, r in zip(costs, ranks)))
        if self.kind == "fraction" and reference is not None:
            target = self.parameters(reference, itemsize)
            # An adapter compressed to this very fraction holds a little less (allocation keeps whole ranks, so
            # it stops short by less than one rank of a module): within one rank of the largest module, the
            # budget is the adapter as it is (a DyLoRA run at 0.5 holds 0.4995 and truncates at 0.5).
            grain = max((c for c, r in zip(costs, ranks) if r > 0), default=0)
            if total < target <= total + grain:
                target = total
            if target > total:
                raise LoraCompressError(
                    f"budget {self.text!r} of the original adapter ({human(reference)} parameters) is "
                    f"{human(target)} parameters, more than this adapter has ({human(total)}); give a fraction of "
                    f"at most {total / reference:.4g}"
                )
        elif self.kind != "rank":
            target = self.parameters(total, itemsize)
        else:  # rank: the parameters of uniform rank r (capped by each module's current rank)
            top = max(ranks, default=0)
            if self.value > top:
                raise LoraCompressError(
                    f"budget {self.text!r} is above the adapter's largest rank ({top}), so nothing would be cut; "
                    f"give rank={top} or less"
                )
            target = int(sum(c * min(int(self.value), r) for c, r in zip(costs, ranks)))
        if target <= 0:
            raise LoraCompressError(f"budget {self.text!r} rounds to zero parameters; give a larger budget")
        if target > total and self.kind != "fraction":
            raise LoraCompressError(
                f"budget {self.text!r} ({human(target)} parameters) is more than the adapter has "
                f"({human(total)}); give a smaller budget"
            )
        smallest = min((c for c, r in zip(costs, ranks) if r > 0), default=0)
        if target < smallest:
            raise LoraCompressError(
                f"budget {self.text!r} ({human(target)} parameters) cannot hold even one rank of the smallest "
                f"module ({human(smallest)}); give a larger budget"
            )
        return min(target, total)

    def parameters(self, of: int, itemsize: int) -> int:
        """The budget as a parameter count: a fraction of ``of`` parameters, a count, or bytes at ``itemsize`` each."""
        if self.kind == "fraction":
            return math.floor(self.value * of)
        if self.kind == "params":
            return int(self.value)
        if self.kind == "bytes":
            return int(self.value // itemsize)
        raise ValueError("a rank budget is not a parameter count")


def _number(s: str, raw: str) -> float:
    try:
        x = float(s)
    except ValueError:
        raise LoraCompressError(f"cannot parse budget {raw!r}; {_HELP}") from None
    if not math.isfinite(x):
        raise LoraCompressError(f"budget {raw!r} is not a finite number; {_HELP}")
    return x


def _check_fraction(x: float, raw: str) -> None:
    if not 0 < x <= 1:
        raise LoraCompressError(f"budget {raw!r} must be a fraction in (0, 1] of the adapter's parameters; {_HELP}")


# --------------------------------------------------------------------------- allocation


def allocate(
    values: Mapping[str, Sequence[float] | np.ndarray],
    costs: Mapping[str, int],
    target: int,
    min_rank: int | Mapping[str, int] = 0,
    max_rank: int | Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Choose how many leading components each module keeps, within ``target`` parameters.

    Args:
        values: per module, the value of each component in the order it would be kept (for
            SVD: ``σ²`` descending). Only a prefix of each module can be kept.
        costs: per module, the parameters one component costs (``in + out``).
        target: the parameter budget; never exceeded.
        min_rank / max_rank: bounds per module (an int for all, or a mapping).

    Components are taken greedily by value per parameter. The greedy choice is compared with
    the best *uniform* rank that fits and the better of the two is returned, so the result is
    never worse than uniform truncation of the same size, by construction.
    """
    require_type("allocate(values)", values, Mapping, "a mapping of module -> component values")
    require_type("allocate(costs)", costs, Mapping, "a mapping of module -> parameters per component")
    require_int("allocate(target)", target, 0)
    names = list(values)
    if missing := [n for n in names if n not in costs]:
        raise LoraCompressError(f"allocate: no cost for {missing[0]!r}; give costs for every module of values")
    vals = {n: np.asarray(values[n], dtype=np.float64) for n in names}
    lo = {n: min(_bound(min_rank, n, 0), len(vals[n])) for n in names}
    hi = {n: min(_bound(max_rank, n, len(vals[n])), len(vals[n])) for n in names}
    for n in names:
        if lo[n] > hi[n]:
            raise LoraCompressError(f"minimum rank {lo[n]} is above the maximum rank {hi[n]} allowed for {n}; lower the minimum rank")
    floor_cost = sum(lo[n] * costs[n] for n in names)
    if floor_cost > target:
        raise LoraCompressError(
            f"the minimum rank needs {human(floor_cost)} parameters but the budget is {human(target)}; lower the minimum rank or raise the budget"
        )
    ranks = dict(lo)
    spent = floor_cost
    # Candidates beyond the floor, best value-per-parameter first. Within one module SVD values
    # are descending, so its candidates come out in order; a prefix is kept by construction, and
    # the running-minimum below enforces it for any order of values.
    cand: list[tuple[float, str, int]] = []
    for n in names:
        ratio = vals[n] / max(costs[n], 1)
        ratio = np.minimum.accumulate(ratio) if len(ratio) else ratio
        cand.extend((float(ratio[i]), n, i) for i in range(lo[n], hi[n]))
    cand.sort(key=lambda t: (-t[0], t[2]))
    blocked: set[str] = set()
    for _, n, i in cand:
        if n in blocked or i != ranks[n]:
            continue
        if spent + costs[n] > target:
            blocked.add(n)  # a later, cheaper module may still fit
            continue
        ranks[n] += 1
        spent += costs[n]
    _swap_into_leftover(vals, costs, target, ranks, lo, hi)
    uniform = _best_uniform(vals, costs, target, lo, hi)
    if uniform is not None and _value(vals, uniform) > _value(vals, ranks) + 1e-12:
        return uniform
    return ranks


def _swap_into_leftover(
    vals: Mapping[str, np.ndarray], costs: Mapping[str, int], target: int, ranks: dict[str, int],
    lo: Mapping[str, int], hi: Mapping[str, int], max_swaps: int = 10_000,
) -> None:
    """Trade a cheap module's last component for a dearer module's next one while that fits and gains value.

    The greedy pass stops when no next component fits in what is left, which on models with few,
    very different modules can leave a few percent of the budget unused. Each swap spends strictly
    more of the budget and keeps strictly more value, so the loop ends; prefixes stay prefixes.
    """
    names = [n for n in ranks if hi[n] > lo[n]]
    if len(names) < 2:
        return
    cost = np.array([costs[n] for n in names], dtype=np.int64)
    for _ in range(max_swaps):
        left = target - sum(ranks[n] * costs[n] for n in ranks)
        r = np.array([ranks[n] for n in names])
        can_add = r < np.array([hi[n] for n in names])
        can_drop = r > np.array([lo[n] for n in names])
        nxt = np.array([vals[n][ranks[n]] if ranks[n] < hi[n] else -np.inf for n in names])
        last = np.array([vals[n][ranks[n] - 1] if ranks[n] > lo[n] else np.inf for n in names])
        extra = cost[:, None] - cost[None, :]  # [add b, drop a]: parameters the swap adds
        ok = can_add[:, None] & can_drop[None, :] & (extra > 0) & (extra <= left) & ~np.eye(len(names), dtype=bool)
        gain = np.where(ok, nxt[:, None] - last[None, :], -np.inf)
        b, a = np.unravel_index(int(np.argmax(gain)), gain.shape)
        if not gain[b, a] > 0:
            return
        ranks[names[b]] += 1
        ranks[names[a]] -= 1


def _bound(bound: int | Mapping[str, int] | None, name: str, default: int) -> int:
    if bound is None:
        return default
    if isinstance(bound, Mapping):
        return int(bound.get(name, default))
    return int(bound)


def _value(vals: Mapping[str, np.ndarray], ranks: Mapping[str, int]) -> float:
    return float(sum(vals[n][: ranks[n]].sum() for n in ranks))


def _best_uniform(
    vals: Mapping[str, np.ndarray], costs: Mapping[str, int], target: int, lo: Mapping[str, int], hi: Mapping[str, int]
) -> dict[str, int] | None:
    best = None
    for k in range(0, max(hi.values(), default=0) + 1):
        ranks = {n: min(max(k, lo[n]), hi[n]) for n in vals}
        if sum(ranks[n] * costs[n] for n in vals) > target:
            break
        best = ranks
    return best
