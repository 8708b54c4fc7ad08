"""DyLoRA: nested-budget training; every leading cut works, better than cutting an ordinary adapter."""

from __future__ import annotations

import json

import pytest
import torch

from loracompress.calibration.methods.base import Method
from loracompress.calibration.methods.components import component_energy, keep_leading
from loracompress.calibration.methods.dylora import DyLoRA
from loracompress.core.adapter import NESTED_RANGE_KEY as RANGE_KEY
from loracompress.core.adapter import NESTED_VALUES_KEY as VALUES_KEY
from loracompress.core.adapter import ORDER_KEY
from loracompress.core.budget import Budget, allocate
from loracompress.core.reader import load_adapter
from loracompress.core.writer import save_adapter
from loracompress.cuts.nested import truncate_adapter
from loracompress.cuts.svd import decompose, truncated_adapter
from loracompress.errors import LoraCompressError
from tests.calibration.method_loop import (
    batches,
    check_output,
    drive,
    engine_check,
    held_out_kl,
    output_adapter,
    setup_calibration,
    target_params,
)
from tests.calibration.test_engine import calib_files, check_peft_loads
from tests.calibration.test_engine import held_out_kl as engine_kl
from tests.tiny import tiny_bert_cls


class FixedCut(Method):
    """Ordinary calibration: the SVD cut at the budget, then plain training of the survivors."""

    name = "fixed-cut"

    def setup(self, ctx):
        super().setup(ctx)
        values = {p: component_energy(layer).numpy() for p, layer in ctx.layers.items()}
        self.ranks = allocate(values, {p: ctx.cost(p) for p in ctx.layers}, ctx.target_params)
        for p, layer in ctx.layers.items():
            keep_leading(layer, self.ranks[p])

    def finalize(self):
        return dict(self.ranks)


def test_every_prefix_beats_the_cut_of_an_ordinary_adapter(tmp_path):
    train, test = batches("gpt2", 8, seed=1), batches("gpt2", 4, seed=2)
    calib = setup_calibration("gpt2", tmp_path)
    top = target_params(calib.original, "0.5")
    method = DyLoRA(mode="full", b_min=1 / 8)
    dylora = output_adapter(calib, drive(method, calib, top, steps=40, data=train), method.metadata())
    # the same budget, data and steps, trained the ordinary way (no nesting)
    plain_run = setup_calibration("gpt2", tmp_path / "plain")
    plain = output_adapter(plain_run, drive(FixedCut(), plain_run, top, steps=40, data=train))

    svd_original, svd_plain = decompose(calib.original), decompose(plain)
    total = calib.original.num_params
    for fraction in (0.5, 0.25, 0.125, 0.0625):
        cut = truncate_adapter(dylora, Budget("params", min(int(fraction * total), dylora.num_params)))
        kl = held_out_kl(calib, cut.adapter, test)
        assert kl < held_out_kl(calib, truncated_adapter(calib.original, svd_original, cut.ranks), test), fraction
        if fraction < 0.5:  # below the size it was trained at, the ordinary adapter's cut is worse
            assert kl < held_out_kl(calib, truncated_adapter(plain, svd_plain, cut.ranks), test), fraction


@pytest.mark.parametrize("mode", ["full", "frozen"])
def test_each_step_trains_exactly_the_sampled_prefix(tmp_path, mode):
    calib = setup_calibration("llama", tmp_path)
    method = DyLoRA(mode=mode, b_min=1 / 4)
    before = {p: (layer.A.detach().clone(), layer.B.detach().clone()) for p, layer in calib.layers.items()}
    changed_somewhere = []

    def check(step: int) -> None:
        for p, layer in calib.layers.items():
            k = method._step_ranks[p]
            trained = set(range(k)) if mode == "full" else ({k - 1} if k else set())
            A0, B0 = before[p]
            moved = {i for i in range(layer.rank)
                     if not (torch.equal(A0[i], layer.A[i].detach()) and torch.equal(B0[:, i], layer.B[:, i].detach()))}
            assert moved <= trained, (step, p, moved, trained)
            changed_somewhere.append(bool(moved))
            before[p] = (layer.A.detach().clone(), layer.B.detach().clone())

    drive(method, calib, target_params(calib.original, "0.5"), steps=6, data=batches("llama", 2, seed=1),
          on_step=check)
    assert any(changed_somewhere)


def test_output_is_marked_nested_meets_the_budget_and_loads_in_peft(tmp_path):
    calib = setup_calibration("llama", tmp_path)
    target = target_params(calib.original, "0.25")
    method = DyLoRA()
    ranks = drive(method, calib, target, steps=4, data=batches("llama", 2, seed=1))
    check_output(calib, ranks, "0.25", tmp_path / "out", method.metadata())

    saved = load_adapter(tmp_path / "out")
    assert saved.metadata[ORDER_KEY] == "dylora"
    values = json.loads(saved.metadata[VALUES_KEY])
    assert {p: len(v) for p, v in values.items()} == {p: k for p, k in ranks.items() if k}
    assert json.loads(saved.metadata[RANGE_KEY]) == {"min_params": target // 16, "max_params": target}
    # the leading components kept, in order: the saved factors are the layers' first rows
    for p, m in saved.modules.items():
        torch.testing.assert_close(m.delta(), calib.layers[p].delta().detach(), rtol=1e-5, atol=1e-6)


def test_same_seed_same_draws_and_resume_continues_them(tmp_path):
    calib = setup_calibration("bert", tmp_path)
    target = target_params(calib.original, "0.5")
    data = batches("bert", 2, seed=1)
    first = DyLoRA(b_min=0.1)
    drive(first, calib, target, steps=3, data=data, seed=7)
    draws = [first.sample_budget() for _ in range(5)]
    again = DyLoRA(b_min=0.1)
    drive(again, setup_calibration("bert", tmp_path / "again"), target, steps=3, data=data, seed=7)
    resumed = DyLoRA(b_min=0.1)
    resumed.setup(again.ctx)
    resumed.load_state_dict(json.loads(json.dumps(again.state_dict())))  # JSON, as the engine stores it
    assert [resumed.sample_budget() for _ in range(5)] == draws
    assert all(first.low <= b <= target for b in draws)


def test_a_quarter_of_the_steps_train_the_output_cut(tmp_path):
    calib = setup_calibration("bert", tmp_path)
    target = target_params(calib.original, "0.5")
    method = DyLoRA(b_min=0.1)
    drive(method, calib, target, steps=1, data=batches("bert", 1, seed=1))
    draws = [method.sample_budget() for _ in range(800)]
    assert 0.2 < draws.count(target) / len(draws) < 0.3
    assert min(draws) < 0.2 * target  # the rest spread down to b_min


@pytest.mark.parametrize("settings", [{"mode": "half"}, {"b_min": 0.0}, {"b_min": 1.5}, {"sampling": "beta"}, {"top": 1.0}])
def test_bad_settings_are_user_errors(settings):
    with pytest.raises(LoraCompressError, match="dylora"):
        DyLoRA(**settings)


def test_through_the_engine_then_truncate(engine_files, tmp_path):
    _, out, kl, kl_svd = engine_check(engine_files, "dylora", tmp_path, b_min=0.25)
    assert load_adapter(out).metadata[ORDER_KEY] == "dylora"  # the engine kept the nested order
    assert kl < kl_svd

    from loracompress_cli.app import main

    # trained at 1/4: fractions are of the original (recorded in the output), so these are half and a quarter of it
    assert main(["truncate", str(out), "--budgets", "0.125,0.0625", "-o", str(tmp_path / "cuts")]) == 0
    original = load_adapter(engine_files["adapter"])
    svds = decompose(original)
    for name in ("0.125", "0.0625"):
        cut = load_adapter(tmp_path / "cuts" / name)
        check_peft_loads(tmp_path / "cuts" / name, tiny_bert_cls())
        ranks = {p: cut.modules[p].rank if p in cut.modules else 0 for p in original.modules}
        save_adapter(truncated_adapter(original, svds, ranks), tmp_path / f"svd-{name}")
        assert engine_kl(engine_files, tmp_path / "cuts" / name) < engine_kl(engine_files, tmp_path / f"svd-{name}")


@pytest.fixture(scope="module")
def engine_files(tmp_path_factory):
    """A tiny BERT base folder, a real PEFT adapter on it and calibration data, for runs through the engine."""
    return calib_files(tmp_path_factory.mktemp("engine"), "bert")
