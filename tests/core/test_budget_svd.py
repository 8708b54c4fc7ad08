"""Budgets, the global allocation and the exact truncation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loracompress.core.adapter import Adapter, LoraModule
from loracompress.core.budget import Budget, allocate
from loracompress.core.linalg import effective_rank, lowrank_svd
from loracompress.core.units import parse_size
from loracompress.cuts.svd import Selector, compress_svd, decompose
from loracompress.errors import LoraCompressError


def synthetic_adapter(seed: int = 0, shapes=((64, 32), (96, 48), (48, 160), (32, 32)), rank: int = 8) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for i, (out, inp) in enumerate(shapes):
        decay = torch.rand(1, generator=g).item() * 0.8 + 0.1
        spectrum = torch.tensor([decay**k for k in range(rank)]) * (1 + 3 * torch.rand(1, generator=g).item())
        A = torch.randn(rank, inp, generator=g)
        B = torch.randn(out, rank, generator=g) * spectrum
        modules[f"layers.{i}.proj"] = LoraModule(A=A, B=B, scale=0.5 + i)
    return Adapter(modules=modules, config={"peft_type": "LORA", "r": rank, "lora_alpha": rank})


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [("0.5", "fraction", 0.5), ("50%", "fraction", 0.5), ("1.2M", "params", 1.2e6), ("300k", "params", 3e5),
     ("4MB", "bytes", 4e6), ("4MiB", "bytes", 4 * 2**20), ("rank=8", "rank", 8), ("1", "fraction", 1.0),
     ("12500", "params", 12500), ("1e6", "params", 1e6)],
)
def test_budget_parse(text, kind, value):
    b = Budget.parse(text)
    assert (b.kind, b.value) == (kind, value)


@pytest.mark.parametrize("text", ["0", "-1", "2", "abc", "", "nan", "inf", "150%", "rank=0", "-3MB", "1.5"])
def test_budget_parse_rejects_nonsense(text):
    with pytest.raises(LoraCompressError):
        Budget.parse(text)


@pytest.mark.parametrize(("text", "bare", "size"), [
    ("4MB", False, 4e6), ("4 mib", False, 4 * 2**20), ("1.5GiB", False, 1.5 * 2**30), ("2TB", False, 2e12),
    ("100kb", False, 1e5), ("512B", False, 512), ("-3MB", False, -3e6),  # the caller refuses a size <= 0
    ("2G", False, None), ("4096", False, None), ("2G", True, 2e9), ("4096", True, 4096), (" 2 gb ", True, 2e9),
    ("2ki", True, None), ("big", True, None), ("1.2.3mb", False, None), ("", True, None),
])
def test_one_size_parser_serves_budgets_and_shard_sizes(text, bare, size):
    """``--budget 4MB`` and ``merge --max-shard-size 2GB`` read sizes with the one unit table (core/units.py)."""
    assert parse_size(text, bare=bare) == size
    if size is not None and size > 0 and not bare:
        assert Budget.parse(text) == Budget("bytes", size, text)


def test_budget_resolve_rejects_more_than_adapter():
    with pytest.raises(LoraCompressError, match="more than the adapter"):
        Budget.parse("10GB").resolve([100, 200], [8, 8], 2)
    assert Budget.parse("rank=4").resolve([100, 200], [8, 2], 2) == 4 * 100 + 2 * 200
    assert Budget.parse("4kB").resolve([100, 200], [8, 8], 2) == 2000


def test_svd_is_exact_and_matches_dense():
    g = torch.Generator().manual_seed(1)
    B, A = torch.randn(70, 6, generator=g), torch.randn(6, 40, generator=g)
    svd = lowrank_svd(B, A, 0.3)
    dense = 0.3 * B.double() @ A.double()
    assert torch.allclose(svd.U @ torch.diag(svd.S) @ svd.Vh, dense, atol=1e-10)
    assert torch.allclose(svd.S, torch.linalg.svdvals(dense)[:6], atol=1e-10)
    # factors(k) are balanced and reproduce the best rank-k approximation
    A2, B2 = svd.factors(3, torch.float64)
    assert torch.allclose(B2 @ A2, svd.U[:, :3] @ torch.diag(svd.S[:3]) @ svd.Vh[:3], atol=1e-10)
    assert torch.allclose(A2.norm(dim=1), B2.norm(dim=0), atol=1e-10)


@pytest.mark.parametrize("budget", ["0.5", "0.25", "0.1", "0.05", "30000", "rank=3", "40kB"])
def test_budget_never_exceeded_and_mostly_used(budget):
    big = synthetic_adapter(shapes=((256, 128), (384, 192), (192, 640), (128, 128)) * 4, rank=16)
    result = compress_svd(big, Budget.parse(budget))
    target = result.target_params
    assert result.adapter.num_params <= target
    assert result.adapter.num_params >= 0.98 * target
    # and in general the leftover is smaller than one more component of any module that could grow
    small = synthetic_adapter()
    res = compress_svd(small, Budget.parse(budget if Budget.parse(budget).kind == "fraction" else "0.2"))
    left = res.target_params - res.adapter.num_params
    growable = [m.cost for p, m in small.modules.items() if res.ranks_after[p] < m.rank]
    assert left >= 0 and (not growable or left < min(growable))


def test_truncation_error_equals_discarded_tail():
    """Eckart–Young: ||ΔW - ΔW_k||_F² equals the discarded Σσ² for every module."""
    adapter = synthetic_adapter()
    result = compress_svd(adapter, Budget.parse("0.3"))
    svds = decompose(adapter)
    for path, m in adapter.modules.items():
        k = result.ranks_after[path]
        approx = result.adapter.modules[path].delta().double() if k > 0 else torch.zeros(m.out_features, m.in_features)
        err = ((m.delta().double() - approx) ** 2).sum()
        tail = svds[path].energy[k:].sum()
        assert torch.isclose(err, tail.to(err.dtype), rtol=1e-4, atol=1e-6), path


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), frac=st.floats(0.05, 0.95))
def test_global_allocation_never_worse_than_uniform(seed, frac):
    adapter = synthetic_adapter(seed)
    svds = decompose(adapter)
    costs = {p: m.cost for p, m in adapter.modules.items()}
    energy = {p: s.energy.numpy() for p, s in svds.items()}
    total = sum(c * 8 for c in costs.values())
    target = int(frac * total)
    ranks = allocate(energy, costs, target)
    assert sum(ranks[p] * costs[p] for p in ranks) <= target
    kept = sum(energy[p][: ranks[p]].sum() for p in ranks)
    for k in range(0, 9):
        if sum(k * c for c in costs.values()) <= target:
            uniform = sum(energy[p][:k].sum() for p in ranks)
            assert kept >= uniform - 1e-9


def test_leftover_budget_goes_to_a_dearer_module_by_a_swap():
    """Greedy by value per parameter takes a, a, a (30 of 45) and then b (25) no longer fits: 15 left over.
    Giving up one of a's components for b's spends 45 and keeps 20 instead of 15."""
    assert allocate({"a": [5.0, 5.0, 5.0], "b": [10.0]}, {"a": 10, "b": 25}, 45) == {"a": 2, "b": 1}
    # no swap that loses value: b's 100 stays, a's 5 cannot be added
    assert allocate({"a": [5.0, 4.9], "b": [100.0]}, {"a": 10, "b": 30}, 35) == {"a": 0, "b": 1}


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), target=st.integers(10, 400))
def test_allocation_is_optimal_on_small_problems(seed, target):
    """Against exhaustive search over every prefix choice: within the budget, and never more than one
    component's value below the optimum (the greedy knapsack bound, which the swaps only improve on)."""
    rng = np.random.default_rng(seed)
    costs = {n: int(rng.integers(5, 60)) for n in "abc"}
    vals = {n: np.sort(rng.random(3))[::-1] * rng.integers(1, 10) for n in "abc"}
    ranks = allocate(vals, costs, target)
    assert sum(ranks[n] * costs[n] for n in ranks) <= target
    kept = sum(vals[n][: ranks[n]].sum() for n in ranks)
    best = max(
        (sum(vals[n][:k].sum() for n, k in zip("abc", ks)), ks)
        for ks in itertools.product(range(4), repeat=3)
        if sum(k * costs[n] for n, k in zip("abc", ks)) <= target
    )
    assert kept >= best[0] - max(v.max() for v in vals.values()) - 1e-9


def test_allocate_respects_bounds():
    vals = {"a": np.array([10.0, 5, 1]), "b": np.array([0.1, 0.05, 0.01])}
    ranks = allocate(vals, {"a": 10, "b": 10}, 40, min_rank=1, max_rank=2)
    assert ranks == {"a": 2, "b": 2}
    with pytest.raises(LoraCompressError, match="minimum rank"):
        allocate(vals, {"a": 10, "b": 10}, 15, min_rank=1)


@pytest.mark.parametrize(("text", "expected"), [("energy:0.9", None), ("fro:0.9", None), ("ratio:4", None)])
def test_selectors_follow_their_definitions(text, expected):
    adapter = synthetic_adapter()
    sel = Selector.parse(text)
    result = compress_svd(adapter, None, select=sel)
    for path, svd in decompose(adapter).items():
        k = result.ranks_after[path]
        S = svd.S
        if sel.kind == "energy":
            assert k == effective_rank(svd.energy, 0.9)
            assert svd.energy[:k].sum() >= 0.9 * svd.energy.sum() - 1e-9
        elif sel.kind == "fro":
            assert svd.energy[:k].sum().sqrt() >= 0.9 * svd.energy.sum().sqrt() - 1e-9
            assert k == 1 or svd.energy[: k - 1].sum().sqrt() < 0.9 * svd.energy.sum().sqrt()
        else:
            assert bool((S[:k] >= S[0] / 4).all()) and (k == len(S) or S[k] < S[0] / 4)


@pytest.mark.parametrize("text", ["energy:0", "energy:1.5", "fro", "ratio:0.5", "foo:1"])
def test_selector_rejects_nonsense(text):
    with pytest.raises(LoraCompressError):
        Selector.parse(text)


def test_selector_and_budget_combine_as_caps():
    adapter = synthetic_adapter()
    capped = compress_svd(adapter, Budget.parse("0.9"), select=Selector.parse("energy:0.8"))
    sel_only = compress_svd(adapter, None, select=Selector.parse("energy:0.8"))
    for p in adapter.modules:
        assert capped.ranks_after[p] <= sel_only.ranks_after[p]
