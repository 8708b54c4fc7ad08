"""LoRPA (lottery-ticket rank pruning) through the real engine on tiny models."""

from __future__ import annotations

import pytest
import torch

from loracompress.calibration.methods.components import component_magnitude
from loracompress.calibration.methods.lorpa import LoRPA
from loracompress.calibration.methods.registry import get_method
from loracompress.errors import LoraCompressError
from tests.calibration.test_engine import calib_files, check_beats_svd, check_method_output, tiny_bert_run


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return {kind: calib_files(tmp_path_factory.mktemp(kind), kind) for kind in ("bert", "llama")}


@pytest.mark.parametrize(("kind", "rounds", "budget"), [("bert", 1, "0.25"), ("llama", 2, "0.25"), ("llama", 1, "0.1")])
def test_meets_the_budget_exactly_and_stock_peft_loads_it(files, tmp_path, kind, rounds, budget):
    report = check_method_output(files, tmp_path, kind, "lorpa", budget, rounds=rounds)
    assert report["settings"]["rounds"] == rounds


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_lowers_held_out_kl_compared_with_the_svd_cut(files, tmp_path, kind):
    check_beats_svd(files[kind], tmp_path, kind, "lorpa")


class Watched(LoRPA):
    """LoRPA that records what each pruning round left behind."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.after_round: list[dict] = []
        self.lrs: dict[int, float] = {}

    def after_step(self, step):
        self.lrs[step] = self.ctx.optimizer.param_groups[0]["lr"]
        super().after_step(step)
        if step in self.prune_at:
            ctx = self.ctx
            self.after_round.append({
                "step": step,
                "params": sum(layer.active_rank * ctx.cost(p) for p, layer in ctx.layers.items()),
                "rewound": all(
                    torch.equal(layer.A[layer.mask != 0], self.rewind_to[p][0][layer.mask != 0])
                    and torch.equal(layer.B[:, layer.mask != 0], self.rewind_to[p][1][:, layer.mask != 0])
                    for p, layer in ctx.layers.items()
                ),
                "pruned_zero": all(float(layer.A.detach()[layer.mask == 0].abs().sum()) == 0.0 for layer in ctx.layers.values()),
                "optimizer_state": len(ctx.optimizer.state),
            })


def test_rounds_prune_geometrically_rewind_survivors_and_restart_the_schedule():
    method = Watched(rounds=3)
    result, adapter, _ = tiny_bert_run(method, steps=16, warmup=0.25)
    full, target = adapter.num_params, int(adapter.num_params * 0.25)
    assert [r["step"] for r in method.after_round] == [3, 7, 11]
    params = [r["params"] for r in method.after_round]
    assert full > params[0] > params[1] > params[2] and params[2] <= target
    # Round k targets full·(target/full)^(k/3): the first two rounds land at or under their targets.
    for k, kept in enumerate(params[:2], start=1):
        assert kept <= full * (target / full) ** (k / 3)
    assert all(r["rewound"] and r["pruned_zero"] for r in method.after_round)
    assert all(r["optimizer_state"] == 0 for r in method.after_round)
    # Each phase restarts the schedule: warm-up low, not the tail of the previous decay.
    assert method.lrs[3] < method.lrs[4] < method.lrs[5]
    assert sum(result.ranks[p] * adapter.modules[p].cost for p in result.ranks) == params[2]


def test_the_rewind_point_is_the_checkpoint_in_svd_order():
    method = Watched(rounds=1)
    tiny_bert_run(method, steps=4)
    for p, (A, B) in method.rewind_to.items():
        energy = (B.norm(dim=0) * A.norm(dim=1)) ** 2
        assert torch.all(energy[:-1] >= energy[1:] - 1e-6), p  # SVD order: σ² descending


def test_product_score_is_the_sum_of_absolute_products():
    method = Watched(rounds=1, score="products")
    tiny_bert_run(method, steps=2)
    layer = next(iter(method.ctx.layers.values()))
    expected = torch.stack([(layer.B[:, i:i + 1] @ layer.A[i:i + 1]).abs().sum() for i in range(layer.rank)]) ** 2
    torch.testing.assert_close(component_magnitude(layer, "products"), expected.detach())


def test_settings_are_checked():
    with pytest.raises(LoraCompressError, match="no setting 'round'"):
        get_method("lorpa", round=2)
    with pytest.raises(LoraCompressError, match="rounds"):
        LoRPA(rounds=0)
    with pytest.raises(LoraCompressError, match="score"):
        LoRPA(score="taylor")
    with pytest.raises(LoraCompressError, match="at least 4 steps"):
        tiny_bert_run(LoRPA(rounds=3), steps=3)
