"""``--keep-best`` as a guarantee: every candidate scored on the same held-out data, never worse than the cut."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from loracompress.core.adapter import load_adapter
from loracompress.core.budget import Budget
from loracompress.cuts.svd import compress_svd
from loracompress.pipelines.calibrate import selection_key
from loracompress.pipelines.inputs import MIN_HELD_OUT, held_out_fraction
from loracompress.pipelines.prune import prune
from tests.calibration.test_engine import calib_files, options


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return calib_files(tmp_path_factory.mktemp("keep_best"), "bert")


def test_keep_best_refuses_a_calibrated_result_worse_than_the_cut_on_held_out_agreement(files, tmp_path):
    """Task loss on the fixture's random labels, no distillation, a large step: the calibrated student
    agrees with the original less often than the cut does on the held-out data, so the cut is written
    (bit for bit), the report names the winner, and its margin over the plain cut is not negative."""
    drift = dict(steps=12, lr=3e-2, kd_weight=0.0, task_weight=1.0, evaluate=True, eval_data=str(files["held"]))
    report = prune(files["adapter"], tmp_path / "kept", options(files, "prilora", **drift))
    info = report["settings"]["keep_best"]
    cands = info["candidates"]
    assert info["measure"] == "agreement, then kl" and set(cands) == {"prilora", "svd", "svd-aware"}
    assert info["kept"] in ("svd", "svd-aware"), info
    assert cands["prilora"]["agreement"] < cands[info["kept"]]["agreement"], info  # refused on agreement
    assert cands[info["kept"]]["agreement"] >= cands["svd"]["agreement"]
    assert info["margin_over_svd_cut"]["agreement"] >= 0.0
    runner = info["runner_up"]
    assert info["margin_over_runner_up"]["agreement"] == pytest.approx(
        cands[info["kept"]]["agreement"] - cands[runner]["agreement"])
    assert report["method"] == "svd" and report["quality"]["agreement"] == cands[info["kept"]]["agreement"]
    assert info["held_out_samples"] == report["settings"]["held_out_samples"] == 48
    if info["kept"] == "svd":
        cut = compress_svd(load_adapter(files["adapter"]), Budget("params", report["budget"]["target_params"])).adapter
        written = load_adapter(tmp_path / "kept")
        for path, m in cut.modules.items():
            torch.testing.assert_close(written.modules[path].delta(), m.delta(), rtol=0, atol=0)


def test_agreement_decides_before_kl_for_classifiers_and_kl_alone_for_lms():
    closer_top1 = {"agreement": 0.90, "kl": 0.50}
    lower_kl = {"agreement": 0.80, "kl": 0.10}
    assert selection_key(closer_top1, "cls") > selection_key(lower_kl, "cls")
    assert selection_key(lower_kl, "lm") > selection_key(closer_top1, "lm")
    same_top1 = {"agreement": 0.90, "kl": 0.40}
    assert selection_key(same_top1, "cls") > selection_key(closer_top1, "cls")  # then KL


@pytest.mark.parametrize(("n", "method", "keep", "expected"), [
    (1000, "increlora", True, MIN_HELD_OUT / 1000),  # 200 held out, not 100
    (5000, "increlora", True, 0.1),  # --eval-fraction already holds out more
    (96, "increlora", True, 0.25),  # small data: a quarter
    (1000, "increlora", False, 0.1),  # no comparison, no reason to hold out more
    (1000, "dylora", True, 0.1),  # keep-best never swaps a DyLoRA result
])
def test_keep_best_holds_out_enough_samples_to_compare(n, method, keep, expected):
    opts = SimpleNamespace(eval_fraction=0.1, keep_best=keep, method=method)
    assert held_out_fraction(opts, n) == pytest.approx(expected)
