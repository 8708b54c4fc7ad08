"""Fractional budgets refer to the original adapter when a compressed one records it (issue 17, item 4)."""

from __future__ import annotations

import json

import pytest

from loracompress.core.adapter import ORIGINAL_PARAMS_KEY
from loracompress.core.budget import Budget
from loracompress.core.reader import load_adapter
from loracompress.core.records import COMPRESSION_REPORT
from loracompress.cuts.nested import truncate_adapter
from loracompress.errors import LoraCompressError
from loracompress.pipelines.prune import PruneOptions, prune
from loracompress_cli.app import main
from tests.calibration.test_engine import calib_files, options


@pytest.fixture(scope="module")
def dylora_quarter(tmp_path_factory):
    """A DyLoRA output trained at 1/4 of a real PEFT adapter (as ``prune --method dylora`` writes it)."""
    root = tmp_path_factory.mktemp("budget_ref")
    files = calib_files(root / "files", "bert", r=8)
    prune(files["adapter"], root / "dyl", options(files, "dylora", budget="0.25", steps=6))
    return {"src": files["adapter"], "dyl": root / "dyl", "root": root}


def test_every_output_records_the_original_parameter_count(dylora_quarter, tmp_path):
    original = load_adapter(dylora_quarter["src"])
    dyl = load_adapter(dylora_quarter["dyl"])
    assert dyl.original_params == original.num_params and original.original_params is None
    prune(dylora_quarter["src"], tmp_path / "svd", PruneOptions(budget="0.5"))
    assert load_adapter(tmp_path / "svd").metadata[ORIGINAL_PARAMS_KEY] == str(original.num_params)
    # a cut of a cut keeps the very original's count, not its input's
    assert main(["truncate", str(dylora_quarter["dyl"]), "--budget", "0.125", "-o", str(tmp_path / "cut")]) == 0
    assert load_adapter(tmp_path / "cut").original_params == original.num_params


def test_truncating_a_dylora_output_to_a_fraction_means_that_fraction_of_the_original(dylora_quarter, tmp_path, capsys):
    """Trained at 1/4, cut at 0.0625: 1/16 of the original (a quarter of the DyLoRA output), not 1/64."""
    total = load_adapter(dylora_quarter["src"]).num_params
    assert main(["truncate", str(dylora_quarter["dyl"]), "--budget", "0.0625", "-o", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    assert "fractions are of the original adapter" in out, out
    report = json.loads((tmp_path / "q" / COMPRESSION_REPORT).read_text())
    assert report["budget"]["target_params"] == int(0.0625 * total)
    cut = load_adapter(tmp_path / "q")
    assert cut.num_params <= int(0.0625 * total) and cut.num_params > int(0.0625 * total / 4)
    ref = report["settings"]["budget_reference"]
    assert ref["of"] == "original" and ref["params"] == total
    assert ref["fraction_of_original"] == pytest.approx(cut.num_params / total)


def test_absolute_counts_stay_absolute_and_a_fraction_above_the_input_is_a_user_error(dylora_quarter):
    dyl = load_adapter(dylora_quarter["dyl"])
    cut = truncate_adapter(dyl, Budget.parse(str(dyl.num_params // 2)) if dyl.num_params // 2 >= 1000
                           else Budget("params", dyl.num_params // 2))
    assert cut.target_params == dyl.num_params // 2
    with pytest.raises(LoraCompressError, match="of the original adapter"):
        truncate_adapter(dyl, Budget.parse("0.5"))  # 1/2 of the original: twice what the 1/4 output has


def test_without_a_recorded_original_a_fraction_is_of_the_input(dylora_quarter, tmp_path, capsys):
    original = load_adapter(dylora_quarter["src"])
    cut = truncate_adapter(original, Budget.parse("0.25"))
    assert cut.target_params == int(0.25 * original.num_params)
    assert main(["truncate", str(dylora_quarter["src"]), "--budget", "0.25", "-o", str(tmp_path / "c")]) == 0
    assert "it records no original" in capsys.readouterr().out
