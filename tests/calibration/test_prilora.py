"""PRILoRA (depth-linear ranks, A pruned by |A_ij|·x̄_j, gradual structured cut) on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch

from loracompress.calibration.engine import module_depths, svd_student
from loracompress.calibration.methods.base import CalibContext
from loracompress.calibration.methods.prilora import PriLoRA, depth_of_modules, linear_ranks
from loracompress.calibration.methods.registry import get_method
from loracompress.core.reader import load_adapter
from loracompress.errors import LoraCompressError
from loracompress.runtime.layers import attach, use_mode
from tests.calibration.test_engine import calib_files, check_beats_svd, check_method_output, tiny_bert_run
from tests.tiny import make_adapter


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return {kind: calib_files(tmp_path_factory.mktemp(kind), kind) for kind in ("bert", "llama")}


def attached(kind: str, tmp_path, budget: float = 0.25):
    """A tiny model with the SVD-ordered student attached, and a context for driving hooks by hand."""
    src, base = make_adapter(kind, tmp_path / "a", r=8)
    adapter = load_adapter(src)
    model = copy.deepcopy(base)
    layers = attach(model, svd_student(adapter), teacher=adapter, trainable=True)
    depth, n = module_depths(list(layers))
    ctx = CalibContext(layers=layers, target_params=int(adapter.num_params * budget), total_steps=20,
                       depth=depth, num_layers=n)
    return model, layers, ctx


# --------------------------------------------------------------------------- ranks


def test_linear_ranks_meet_the_target_and_grow_with_depth():
    weights = {"l0": 1.0, "l1": 2.0, "l2": 3.0}
    costs = {"l0": 100, "l1": 100, "l2": 100}
    rho = linear_ranks(weights, costs, {"l0": 8, "l1": 8, "l2": 8}, 1200)
    assert sum(costs[p] * rho[p] for p in rho) == pytest.approx(1200)
    assert rho["l0"] == pytest.approx(2.0) and rho["l2"] == pytest.approx(6.0)
    capped = linear_ranks(weights, costs, {"l0": 8, "l1": 8, "l2": 4}, 1200)  # l2 capped: the rest grow
    assert capped["l2"] == 4 and sum(costs[p] * capped[p] for p in capped) == pytest.approx(1200)


@pytest.mark.parametrize("kind", ["llama", "bert"])
@pytest.mark.parametrize("budget", [0.25, 0.05])
def test_each_block_gets_its_depth_linear_share_within_the_budget(kind, budget, tmp_path):
    _, layers, ctx = attached(kind, tmp_path, budget)
    method = PriLoRA(rank_ratio=3.0)
    method.setup(ctx)
    ranks = method.ranks
    spent = sum(ranks[p] * ctx.cost(p) for p in ranks)
    assert ctx.target_params - min(ctx.cost(p) for p in ranks) < spent <= ctx.target_params
    depth = depth_of_modules(ctx)
    L = ctx.num_layers
    weights = {p: 1 + 2 * depth[p] / (L - 1) for p in ranks}
    rho = linear_ranks(weights, {p: ctx.cost(p) for p in ranks}, {p: 8 for p in ranks}, ctx.target_params)
    blocks = sorted(set(depth.values()))
    share = {b: sum(ctx.cost(p) * rho[p] for p in ranks if depth[p] == b) for b in blocks}
    used = {b: sum(ctx.cost(p) * ranks[p] for p in ranks if depth[p] == b) for b in blocks}
    biggest = max(ctx.cost(p) for p in ranks)
    assert all(used[b] > share[b] - biggest for b in blocks), (used, share)
    assert share[blocks[-1]] > share[blocks[0]] and used[blocks[-1]] > used[blocks[0]]
    uniform = PriLoRA(rank_ratio=1.0)
    uniform.setup(ctx)
    flat = {b: sum(ctx.cost(p) * uniform.ranks[p] for p in ranks if depth[p] == b) for b in blocks}
    if kind == "llama":  # equal blocks: equal shares, up to one rank of the biggest module and the leftover
        assert max(flat.values()) - min(flat.values()) <= 2 * biggest


# --------------------------------------------------------------------------- statistics and element pruning


def test_input_norm_ema_follows_student_inputs_only(tmp_path):
    model, layers, ctx = attached("bert", tmp_path)
    method = PriLoRA(beta=0.5)
    method.setup(ctx)
    path = next(iter(layers))
    seen: list[torch.Tensor] = []
    handle = layers[path].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    ids = [torch.randint(4, 90, (2, 7)) for _ in range(2)]
    for x in ids:
        model(input_ids=x)
    rms = [s.reshape(-1, s.shape[-1]).pow(2).mean(0).sqrt() for s in seen]
    torch.testing.assert_close(method.ema[path], 0.5 * rms[0] + 0.5 * rms[1])
    before = method.ema[path].clone()
    with use_mode(layers, "teacher"):
        model(input_ids=ids[0])  # the teacher's forward is not the student's input statistics
    with torch.no_grad():
        model(input_ids=ids[1])  # nor is evaluation
    torch.testing.assert_close(method.ema[path], before)
    handle.remove()


def test_element_pruning_zeroes_the_lowest_input_weighted_magnitudes_per_row(tmp_path):
    _, layers, ctx = attached("bert", tmp_path)
    method = PriLoRA(fraction=0.25)
    method.setup(ctx)
    path, layer = next(iter(layers.items()))
    x_bar = torch.rand(layer.A.shape[1]) + 0.1
    method.ema = {p: torch.ones(lay.A.shape[1]) for p, lay in layers.items()}
    method.ema[path] = x_bar
    A = layer.A.detach().clone()
    method._prune_elements()
    S = A.abs() * x_bar
    k = int(A.shape[1] * 0.25)
    for i in range(A.shape[0]):
        lowest = torch.argsort(S[i])[:k]
        zeroed = (layer.A[i] == 0).nonzero().flatten()
        assert set(zeroed.tolist()) == set(lowest.tolist())
    # A second event prunes a quarter of what is left, never counting zeros again.
    method._prune_elements()
    assert int((layer.A[0] == 0).sum()) == k + int((A.shape[1] - k) * 0.25)


# --------------------------------------------------------------------------- through the engine


class Watched(PriLoRA):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.active: list[dict[str, int]] = []

    def after_step(self, step):
        super().after_step(step)
        self.active.append({p: layer.active_rank for p, layer in self.ctx.layers.items()})


def test_structured_cut_is_gradual_and_reaches_the_ranks_at_cut_end():
    method = Watched(cut_end=0.5, interval=2)
    result, adapter, _ = tiny_bert_run(method, steps=16)
    paths = list(method.ranks)
    totals = [sum(a[p] for p in paths) for a in method.active]
    assert all(a >= b for a, b in zip(totals, totals[1:]))  # only ever shrinks
    assert totals[0] > sum(method.ranks.values())  # not cut at once
    assert method.active[method.cut_step] == method.ranks  # final at cut_end (step 7 of 16)
    assert method.cut_step == 7
    assert all(a == method.ranks for a in method.active[method.cut_step:])
    assert result.ranks == method.ranks


@pytest.mark.parametrize(("kind", "budget"), [("bert", "0.25"), ("llama", "0.25"), ("llama", "0.1")])
def test_meets_the_budget_exactly_and_stock_peft_loads_it(files, tmp_path, kind, budget):
    report = check_method_output(files, tmp_path, kind, "prilora", budget)
    assert report["settings"]["fraction"] == 0.1


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_lowers_held_out_kl_compared_with_the_svd_cut(files, tmp_path, kind):
    check_beats_svd(files[kind], tmp_path, kind, "prilora")


def test_settings_are_checked():
    with pytest.raises(LoraCompressError, match="no setting 'ratio'"):
        get_method("prilora", ratio=2)
    for bad in ({"rank_ratio": 0.5}, {"fraction": 1.0}, {"interval": 0}, {"beta": 1.0}, {"cut_end": 0}):
        with pytest.raises(LoraCompressError, match=next(iter(bad))):
            PriLoRA(**bad)
