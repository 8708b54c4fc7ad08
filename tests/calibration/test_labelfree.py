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
from loracompress.pipelines.calibrate import LABEL_FREE, LABEL_FREE_MAX_STEPS, LABELLED, data_settings
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
    opts = SimpleNamespace(**{"hidden_weight": None, "pseudo_labels": None, "lr": None, "steps": None, "epochs": None,
                              **given})
    data = SimpleNamespace(labelled=labelled, task=task, train=[{}] * batches)
    assert data_settings(opts, data) == expected


def test_prune_on_unlabelled_data_trains_longer_and_faster_unless_told(unlabelled, tmp_path):
    """The label-free defaults reach the engine (and its report); what the user gives wins."""
    auto = prune(unlabelled["adapter"], tmp_path / "auto", options(unlabelled, "increlora", steps=None, lr=None, keep_best=False))
    engine = auto["settings"]["engine"]
    batches = math.ceil(auto["settings"]["samples"] / auto["settings"]["batch_size"])
    assert engine["lr"] == LABEL_FREE["lr"] and engine.get("epochs") is None
    assert engine["steps"] == min(LABEL_FREE_MAX_STEPS, math.ceil(LABEL_FREE["epochs"] * batches)), (engine, batches)
    told = prune(unlabelled["adapter"], tmp_path / "told",
                 options(unlabelled, "increlora", steps=2, lr=5e-4, keep_best=False))
    engine = told["settings"]["engine"]
    assert (engine["lr"], engine.get("epochs"), engine["steps"]) == (5e-4, None, 2)


def test_a_negative_hidden_weight_is_a_user_error():
    with pytest.raises(LoraCompressError, match="--hidden-weight"):
        EngineConfig(hidden_weight=-1.0)
