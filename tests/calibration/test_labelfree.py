"""Calibration on classification data without labels: block-output distillation and pseudo-labels."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from loracompress.calibration.engine import EngineConfig, hidden_state_loss
from loracompress.errors import LoraCompressError
from loracompress.pipelines.calibrate import (
    LABEL_FREE,
    LABEL_FREE_MAX_STEPS,
    LABELLED,
    data_defaults,
    data_settings,
)
from loracompress.pipelines.prune import prune
from tests.calibration.test_engine import calib_files, options


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("labelfree")
    files = calib_files(root, "bert")
    plain = root / "unlabelled.jsonl"
    with open(files["data"], encoding="utf-8") as src, open(plain, "w", encoding="utf-8") as dst:
        for line in src:
            dst.write(json.dumps({"text": json.loads(line)["text"]}) + "\n")
    return {**files, "data": plain}


def test_hidden_state_loss_is_zero_at_the_teacher_and_one_at_the_base():
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(2, 5, 8, generator=g) for _ in range(4)]
    teacher = [b + 0.1 * torch.randn(2, 5, 8, generator=g) for b in base]
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0  # padding does not count
    scales = []
    for t, b in zip(teacher[1:], base[1:]):
        d = (t - b).pow(2).sum(-1)
        scales.append(float((d * mask).sum() / mask.sum()))
    assert float(hidden_state_loss(teacher, teacher, mask, scales)) == 0.0
    assert float(hidden_state_loss(base, teacher, mask, scales)) == pytest.approx(1.0, rel=1e-5)
    far = [b.clone() for b in base]
    far[2][1, 4] += 1e3  # a padded position: ignored
    assert float(hidden_state_loss(far, teacher, mask, scales)) == pytest.approx(1.0, rel=1e-5)


def test_without_labels_the_teacher_top1_can_stand_in_for_them(unlabelled, tmp_path):
    with pytest.raises(LoraCompressError, match="no labels"):
        prune(unlabelled["adapter"], tmp_path / "a", options(unlabelled, "increlora", steps=3, kd_weight=0.0,
                                                             pseudo_labels=False, hidden_weight=0.0))
    report = prune(unlabelled["adapter"], tmp_path / "b", options(unlabelled, "increlora", steps=3, kd_weight=0.0,
                                                                  pseudo_labels=True, hidden_weight=0.0))
    assert report["settings"]["engine"]["pseudo_labels"] is True
    assert report["settings"]["run"]["final_loss"] > 0


def test_block_output_distillation_trains_on_unlabelled_data(unlabelled, tmp_path):
    report = prune(unlabelled["adapter"], tmp_path / "h", options(unlabelled, "increlora", steps=4, kd_weight=0.0,
                                                                  hidden_weight=1.0, pseudo_labels=False))
    run = report["settings"]["run"]
    assert report["settings"]["engine"]["hidden_weight"] == 1.0
    assert 0 < run["final_loss"] < run["first_loss"] * 10  # a finite loss that the run moved


_FREE = {**LABEL_FREE, "steps": 60, "epochs": None}  # 6 epochs of 10 batches
_LABELLED = {**LABELLED, "steps": None, "epochs": None}  # the engine sizes it


@pytest.mark.parametrize(("labelled", "task", "given", "expected"), [
    (True, "cls", {}, _LABELLED),  # labels: the engine's defaults
    (False, "cls", {}, _FREE),  # no labels: chosen automatically
    (False, "lm", {}, _LABELLED),  # a causal LM has its next tokens: not label-free
    (False, "cls", {"hidden_weight": 0.0, "lr": 1e-4}, {**_FREE, "hidden_weight": 0.0, "lr": 1e-4}),  # the user wins
    (False, "cls", {"steps": 7}, {**_FREE, "steps": 7}),  # --steps sizes the run
    (False, "cls", {"epochs": 2.0}, {**_FREE, "steps": None, "epochs": 2.0}),
    (False, "cls", {"batches": 500}, {**_FREE, "steps": LABEL_FREE_MAX_STEPS}),  # 6 epochs, capped
    (True, "cls", {"pseudo_labels": True}, {**_LABELLED, "pseudo_labels": True}),
])
def test_label_free_settings_are_chosen_when_the_data_has_no_labels(labelled, task, given, expected):
    batches = given.pop("batches", 10)
    opts = SimpleNamespace(**{"hidden_weight": None, "pseudo_labels": None, "token_dropout": None, "lr": None, "steps": None, "epochs": None,
                              **given})
    data = SimpleNamespace(labelled=labelled, task=task, train=[{}] * batches)
    assert data_settings(opts, data) == expected
    # what calibrate() fills in after reading the data: never a setting the options gave
    sized = "steps" in given or "epochs" in given
    assert not set(data_defaults(opts, data)) & {k for k in given if k not in ("steps", "epochs")}
    assert "steps" not in data_defaults(opts, data) or not sized


def test_prune_plans_the_engine_settings_once_and_refuses_bad_ones_before_any_model_loads(unlabelled, tmp_path,
                                                                                          monkeypatch):
    """The plan holds the settings the options give, checked; calibrate() adds only what the data decides."""
    import loracompress.pipelines.calibrate as calibrate_module

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(calibrate_module, "load_base", no_model)
    for bad, flag in (({"steps": 0}, "--steps"), ({"lr": -1.0}, "--lr"), ({"epochs": 0.0, "steps": None}, "--epochs"),
                      ({"token_dropout": 1.5}, "--token-dropout")):
        with pytest.raises(LoraCompressError, match=flag):
            prune(unlabelled["adapter"], tmp_path / "bad", options(unlabelled, "increlora", **bad))
    plans = []
    monkeypatch.setattr(calibrate_module, "calibrate", lambda plan, **kw: plans.append(plan) or {})
    prune(unlabelled["adapter"], tmp_path / "p", options(unlabelled, "increlora", steps=None, epochs=2.0, lr=5e-4))
    assert len(plans) == 1 and (plans[0].engine.epochs, plans[0].engine.steps, plans[0].engine.lr) == (2.0, None, 5e-4)
    assert plans[0].engine.token_dropout == 0.0  # left to the data: filled in once it is read


def test_prune_on_unlabelled_data_trains_longer_and_faster_unless_told(unlabelled, tmp_path):
    """The label-free defaults reach the engine (and its report); what the user gives wins."""
    auto = prune(unlabelled["adapter"], tmp_path / "auto", options(unlabelled, "increlora", steps=None, lr=None, keep_best=False))
    engine = auto["settings"]["engine"]
    batches = math.ceil(auto["settings"]["samples"] / auto["settings"]["batch_size"])
    assert engine["lr"] == LABEL_FREE["lr"] and engine.get("epochs") is None
    assert engine["token_dropout"] == LABEL_FREE["token_dropout"] > 0 and auto["settings"]["run"]["teacher_cache_mb"] is None
    assert engine["steps"] == min(LABEL_FREE_MAX_STEPS, math.ceil(LABEL_FREE["epochs"] * batches)), (engine, batches)
    told = prune(unlabelled["adapter"], tmp_path / "told",
                 options(unlabelled, "increlora", steps=2, lr=5e-4, keep_best=False))
    engine = told["settings"]["engine"]
    assert (engine["lr"], engine.get("epochs"), engine["steps"]) == (5e-4, None, 2)


def test_a_negative_hidden_weight_is_a_user_error():
    with pytest.raises(LoraCompressError, match="--hidden-weight"):
        EngineConfig(hidden_weight=-1.0)


def test_token_deletion_keeps_the_ends_and_the_order_and_shrinks_the_mask():
    from loracompress.calibration.engine.augment import delete_tokens

    ids = torch.tensor([[101, 5, 6, 7, 8, 9, 102, 0, 0], [101, 11, 12, 102, 0, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
             "labels": torch.tensor([3, 4])}
    seen = set()
    for seed in range(40):
        out = delete_tokens(batch, 0.5, torch.Generator().manual_seed(seed))
        assert torch.equal(out["labels"], batch["labels"]) and out["input_ids"].shape == ids.shape
        for r in range(2):
            n = int(out["attention_mask"][r].sum())
            kept = out["input_ids"][r, :n].tolist()
            assert out["attention_mask"][r, n:].sum() == 0
            original = ids[r][mask[r].bool()].tolist()
            assert kept[0] == 101 and kept[-1] == 102  # the ends survive
            it = iter(original)
            assert all(t in it for t in kept)  # a subsequence: order kept, nothing invented
            seen.add((r, tuple(kept)))
    assert len(seen) > 10  # fresh views, not one
    same = delete_tokens(batch, 0.0, torch.Generator().manual_seed(0))
    assert all(torch.equal(same[k], batch[k]) for k in batch)
    assert torch.equal(delete_tokens(batch, 0.5, torch.Generator().manual_seed(7))["input_ids"],
                       delete_tokens(batch, 0.5, torch.Generator().manual_seed(7))["input_ids"])


def test_calibration_on_fresh_views_runs_the_teacher_every_step_and_is_reproducible(unlabelled, tmp_path):
    views = dict(steps=30, token_dropout=0.2, keep_best=False, teacher_cache_mb=1024.0)
    a = prune(unlabelled["adapter"], tmp_path / "a", options(unlabelled, "increlora", **views))
    prune(unlabelled["adapter"], tmp_path / "b", options(unlabelled, "increlora", **views))
    plain = prune(unlabelled["adapter"], tmp_path / "c", options(unlabelled, "increlora", **{**views, "token_dropout": 0.0}))
    assert a["settings"]["engine"]["token_dropout"] == 0.2
    assert a["settings"]["run"]["teacher_cache_mb"] is None  # a new view each step: nothing to cache
    assert plain["settings"]["run"]["teacher_cache_mb"] is not None
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == (tmp_path / "b" / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() != (tmp_path / "c" / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("bad", [-0.1, 1.0, float("nan")])
def test_a_token_dropout_outside_zero_to_one_is_a_user_error(bad):
    with pytest.raises(LoraCompressError, match="--token-dropout"):
        EngineConfig(token_dropout=bad)
