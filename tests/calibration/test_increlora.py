"""IncreLoRA: start small, grow where the gradient signal is, meet the budget exactly."""

from __future__ import annotations

import pytest
import torch

from loracompress.calibration.methods.increlora import IncreLoRA
from loracompress.calibration.methods.registry import get_method
from loracompress.core.budget import Budget
from loracompress.cuts.svd import compress_svd
from loracompress.errors import LoraCompressError
from tests.calibration.method_loop import (
    batches,
    check_output,
    drive,
    engine_check,
    local_loss,
    nothing_else_fits,
    output_adapter,
    setup_calibration,
    target_params,
)
from tests.calibration.test_engine import calib_files


def test_grows_where_the_gradient_signal_is(tmp_path):
    # Only the first block's outputs enter the loss: no other module gets any gradient.
    calib = setup_calibration("llama", tmp_path)
    first = [p for p in calib.layers if p.startswith("model.layers.0.")]
    target = target_params(calib.original, "0.25")
    method = IncreLoRA()
    ranks = drive(method, calib, target, steps=24, data=batches("llama", 4, seed=1), loss_fn=local_loss(first))

    assert nothing_else_fits(calib.original, ranks, target)
    cost = {p: m.cost for p, m in calib.original.modules.items()}
    grown = {p: (ranks[p] - method.start_ranks[p]) * cost[p] for p in ranks}
    assert all(g >= 0 for g in grown.values())
    assert sum(grown.values()) > 0.4 * target  # half the budget was left to grow into
    outside = sum(g for p, g in grown.items() if p not in first)
    assert outside < max(cost.values())  # at most the last scraps no first-block component fits in
    # The SVD allocation of the same budget would have spread it over every block.
    svd_ranks = compress_svd(calib.original, Budget.parse("0.25")).ranks_after
    assert sum(svd_ranks[p] * cost[p] for p in ranks if p not in first) > 0.4 * target


def test_budget_met_peft_loads_and_beats_svd_cut(tmp_path):
    calib = setup_calibration("gpt2", tmp_path)
    target = target_params(calib.original, "0.25")
    ranks = drive(IncreLoRA(), calib, target, steps=30, data=batches("gpt2", 6, seed=1))
    kl, kl_svd = check_output(calib, ranks, "0.25", tmp_path / "out")
    assert kl < kl_svd
    assert sum(calib.original.modules[p].cost * k for p, k in ranks.items()) >= 0.98 * target


def test_new_components_warm_up_and_reserve_keeps_its_size(tmp_path):
    calib = setup_calibration("llama", tmp_path)
    target = target_params(calib.original, "0.25")
    method = IncreLoRA(warmup=4, reserve_mask=1e-3)
    masks, reserve_sizes = [], []

    def watch(step: int) -> None:
        masks.append({p: layer.mask.clone() for p, layer in calib.layers.items()})
        reserve_sizes.append({(p, i): float(calib.layers[p].A[i].detach().norm() * calib.layers[p].B[:, i].detach().norm())
                              for p, norms in method._reserve_norms.items() for i in norms})

    drive(method, calib, target, steps=20, data=batches("llama", 4, seed=1), on_step=watch)
    ramps = 0
    for p in calib.layers:
        for i in range(method.start_ranks[p], method.active[p]):
            series = [float(m[p][i]) for m in masks]
            on = [v for v in series if v > 1e-3 + 1e-9]
            if not on:
                continue  # added in the last round, after the last step watched
            ramps += 1
            assert series == sorted(series)  # only ever ramps up
            assert 0 < on[0] < 1 and len([v for v in on if v < 1]) <= 3  # warm-up of 4 steps
    assert ramps > 0
    # A reserve component is trained ahead at its checkpoint size (direction only).
    for before, after in zip(reserve_sizes, reserve_sizes[1:]):
        for key in before.keys() & after.keys():
            assert after[key] == pytest.approx(before[key], rel=1e-4)


def test_too_few_steps_still_meet_the_budget(tmp_path):
    calib = setup_calibration("bert", tmp_path)
    target = target_params(calib.original, "0.3")
    ranks = drive(get_method("increlora"), calib, target, steps=2, data=batches("bert", 2, seed=1))
    assert nothing_else_fits(calib.original, ranks, target)
    out = output_adapter(calib, ranks)
    assert torch.isfinite(torch.cat([m.A.flatten() for m in out.modules.values()])).all()


def test_growth_late_in_a_short_run_still_switches_fully_on(tmp_path):
    # Growth ends at the last step but one: the ramps are shortened so every grown component is fully on.
    calib = setup_calibration("llama", tmp_path)
    target = target_params(calib.original, "0.25")
    method = IncreLoRA(t_init=0.5, grow_until=0.9, rounds=1, warmup=50)
    ranks = drive(method, calib, target, steps=10, data=batches("llama", 2, seed=1))
    grown = [(p, i) for p in ranks for i in range(method.start_ranks[p], ranks[p])]
    assert grown
    for p, i in grown:  # nothing folded in at the reserve's tiny mask
        layer = calib.layers[p]
        assert float(layer.A[i].detach().norm() * layer.B[:, i].detach().norm()) > 0.5 * float(method.prior[p][i]) ** 0.5


@pytest.mark.parametrize("settings", [{"init_fraction": 2.0}, {"t_init": 0.8, "grow_until": 0.5},
                                      {"rounds": 0}, {"reserve_mask": 0.0}, {"warmup": 0}, {"orth_reg": -1.0}])
def test_bad_settings_are_user_errors(settings):
    with pytest.raises(LoraCompressError, match="increlora"):
        IncreLoRA(**settings)


def test_through_the_engine_with_exact_resume(engine_files, tmp_path):
    report, _, kl, kl_svd = engine_check(engine_files, "increlora", tmp_path)
    assert report["settings"]["growth_steps"][-1] <= 12  # grow_until 0.7 of 16 steps
    assert kl < 0.5 * kl_svd


@pytest.fixture(scope="module")
def engine_files(tmp_path_factory):
    """A tiny BERT base folder, a real PEFT adapter on it and calibration data, for runs through the engine."""
    return calib_files(tmp_path_factory.mktemp("engine"), "bert")
