"""AdaLoRA: triplet importance, the cubic schedule in parameters, budgets met exactly."""

from __future__ import annotations

import pytest

from loracompress.calibration.methods.adalora import AdaLoRA
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
    setup_calibration,
    target_params,
)
from tests.calibration.test_engine import calib_files


def test_cubic_schedule_reaches_its_target(tmp_path):
    calib = setup_calibration("llama", tmp_path)
    target = target_params(calib.original, "0.25")
    total = calib.original.num_params
    method = AdaLoRA(t_init=0.1, t_final=0.2, interval=2)
    active_after_step = []
    ranks = drive(method, calib, target, steps=30, data=batches("llama", 4, seed=1),
                  on_step=lambda _s: active_after_step.append(
                      sum(int((layer.mask != 0).sum()) * calib.original.modules[p].cost
                          for p, layer in calib.layers.items())))

    steps, budgets, active = zip(*method.history)
    assert budgets[0] == total and budgets[-1] == target
    assert list(budgets) == sorted(budgets, reverse=True)  # only ever shrinks
    assert all(a <= b for a, b in zip(active, budgets))  # every mask fits its budget
    # cubic: it falls fastest at first, so halfway through it is below the straight line
    mid = (method.t_i + method.end) // 2
    line = total + (target - total) * (mid - method.t_i) / (method.end - method.t_i)
    assert method.budget_at(mid) < line
    # the mask is fixed for the last t_final of the run, at the target
    assert steps[-1] == method.end and active_after_step[-1] == active[-1]
    assert set(active_after_step[method.end - 1:]) == {active[-1]}
    assert nothing_else_fits(calib.original, ranks, target) and active[-1] >= 0.98 * target


def test_prunes_the_modules_the_loss_does_not_need(tmp_path):
    calib = setup_calibration("llama", tmp_path)
    first = [p for p in calib.layers if p.startswith("model.layers.0.")]
    target = target_params(calib.original, "0.25")
    ranks = drive(AdaLoRA(interval=1), calib, target, steps=20, data=batches("llama", 4, seed=1),
                  loss_fn=local_loss(first))
    assert nothing_else_fits(calib.original, ranks, target)
    cost = {p: m.cost for p, m in calib.original.modules.items()}
    outside = sum(k * cost[p] for p, k in ranks.items() if p not in first)
    assert outside < max(cost.values())  # at most the last scraps no first-block component fits in
    # σ² alone (the training-free cut) keeps plenty outside the first block
    svd = compress_svd(calib.original, Budget.parse("0.25")).ranks_after
    assert any(svd[p] for p in ranks if p not in first)


def test_output_loads_in_peft_and_beats_svd_cut(tmp_path):
    calib = setup_calibration("bert", tmp_path)
    target = target_params(calib.original, "0.25")
    ranks = drive(AdaLoRA(), calib, target, steps=30, data=batches("bert", 6, seed=1))
    kl, kl_svd = check_output(calib, ranks, "0.25", tmp_path / "out")
    assert kl < kl_svd


def test_smaller_initial_budget_starts_from_the_svd_cut(tmp_path):
    calib = setup_calibration("llama", tmp_path)
    target = target_params(calib.original, "0.125")
    method = AdaLoRA(init_budget=0.5)
    ranks = drive(method, calib, target, steps=3, data=batches("llama", 2, seed=1))
    step, budget, active = method.history[0]
    assert (step, budget) == (0, calib.original.num_params // 2) and active <= budget
    svd_half = compress_svd(calib.original, Budget.parse("0.5")).adapter.num_params
    assert active == svd_half  # no gradient yet: the σ² order decides, as the svd cut does
    assert nothing_else_fits(calib.original, ranks, target)


@pytest.mark.parametrize("settings", [{"t_init": 0.7, "t_final": 0.5}, {"interval": 0}, {"init_budget": 0.0},
                                      {"beta1": 1.0}, {"orth_reg": -0.1}])
def test_bad_settings_are_user_errors(settings):
    with pytest.raises(LoraCompressError, match="adalora"):
        AdaLoRA(**settings)


def test_through_the_engine_with_exact_resume(engine_files, tmp_path):
    report, _, kl, kl_svd = engine_check(engine_files, "adalora", tmp_path, interval=2)
    assert report["settings"]["final_mask_at_step"] == 13 and report["settings"]["interval"] == 2
    assert kl < 0.5 * kl_svd


@pytest.fixture(scope="module")
def engine_files(tmp_path_factory):
    """A tiny BERT base folder, a real PEFT adapter on it and calibration data, for runs through the engine."""
    return calib_files(tmp_path_factory.mktemp("engine"), "bert")
