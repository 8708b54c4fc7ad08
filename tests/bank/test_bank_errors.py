"""Inputs a bank refuses: exit 2, one line naming the fix, nothing written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from loracompress_cli.app import main
from tests.bank.helpers import adapters_of_one_base, rewrite
from tests.robustness.hostile import assert_user_error, stray_temps, tree
from tests.tiny import make_adapter


@pytest.fixture
def two(tmp_path: Path) -> list[Path]:
    return adapters_of_one_base(tmp_path / "in", 2)[0]


def _refused(capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], *fix: str) -> None:
    before = tree(tmp_path)
    code = main([str(a) for a in args])
    assert_user_error(code, capsys.readouterr().err, *fix)
    assert tree(tmp_path) == before and stray_temps(tmp_path) == []


def test_adapters_of_different_base_models(tmp_path, capsys, two):
    rewrite(two[0], base_model_name_or_path="org/model-a")
    rewrite(two[1], base_model_name_or_path="org/model-b")
    _refused(capsys, tmp_path, ["bank", *two, "-b", "0.5", "-o", tmp_path / "out"], "one base model", "org/model-b")


def test_adapters_whose_shapes_differ(tmp_path, capsys, two):
    tensors = load_file(str(two[1] / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("layers.0.mlp.down_proj.lora_A.weight"))
    tensors[key] = tensors[key][:, :40]  # in 80 -> 40: a layer of another model
    rewrite(two[1], tensors)
    _refused(capsys, tmp_path, ["bank", *two, "-b", "0.5", "-o", tmp_path / "out"], "down_proj", "different base models")


def test_adapters_with_different_target_modules(tmp_path, capsys, two):
    other, _ = make_adapter("llama", tmp_path / "in" / "fewer", r=4, lora_seed=5, layers_to_transform=[0, 1])
    _refused(capsys, tmp_path, ["bank", two[0], other, "-b", "0.5", "-o", tmp_path / "out"], "same target modules")


def test_mixed_fan_in_fan_out(tmp_path, capsys, two):
    rewrite(two[1], fan_in_fan_out=True)
    _refused(capsys, tmp_path, ["bank", *two, "-b", "0.5", "-o", tmp_path / "out"], "fan_in_fan_out")


def test_one_adapter_alone(tmp_path, capsys, two):
    _refused(capsys, tmp_path, ["bank", two[0], "-b", "0.5", "-o", tmp_path / "out"], "at least two", "prune")


def test_a_budget_below_the_bases_own_cost(tmp_path, capsys, two):
    _refused(capsys, tmp_path, ["bank", *two, "-b", "0.001", "-o", tmp_path / "out"], "below the bank's own minimum",
             "give at least")


def test_duplicate_folder_names(tmp_path, capsys, two):
    copy = tmp_path / "in" / "elsewhere" / two[0].name
    shutil.copytree(two[0], copy)
    _refused(capsys, tmp_path, ["bank", two[0], copy, "-b", "0.5", "-o", tmp_path / "out"], "both named", "rename")


def test_bad_clusters_and_an_output_inside_an_input(tmp_path, capsys, two):
    _refused(capsys, tmp_path, ["bank", *two, "-b", "0.5", "--clusters", "3", "-o", tmp_path / "out"], "--clusters")
    _refused(capsys, tmp_path, ["bank", *two, "-b", "0.5", "--clusters", "two", "-o", tmp_path / "out"], "auto")
    _refused(capsys, tmp_path, ["bank", *two, "-b", "0.5", "-o", two[0] / "bank"], "overlaps the input")


def test_adding_refuses_a_stranger_a_taken_name_and_a_changed_original(tmp_path, capsys, two):
    bank = tmp_path / "bank"
    assert main(["bank", str(two[0]), str(two[1]), "-b", "0.5", "-o", str(bank)]) == 0
    capsys.readouterr()
    gpt2, _ = make_adapter("gpt2", tmp_path / "in" / "gpt2", r=4)
    _refused(capsys, tmp_path, ["bank-add", bank, gpt2, "-o", tmp_path / "out"], "fan_in_fan_out")
    _refused(capsys, tmp_path, ["bank-add", bank, two[0], "-o", tmp_path / "out"], "already holds", "rename")
    third, _ = make_adapter("llama", tmp_path / "in" / "third", r=4, lora_seed=9)
    rewrite(two[1], load_file(str(two[0] / "adapter_model.safetensors")))  # an original changed since
    _refused(capsys, tmp_path, ["bank-add", bank, third, "--refit", "-o", tmp_path / "out"], "changed", "sha256")
    _refused(capsys, tmp_path, ["bank-add", tmp_path / "in", third, "-o", tmp_path / "out"], "bank.json")
    assert main(["bank-add", str(bank), str(third), "-o", str(tmp_path / "out")]) == 0  # without --refit: fine
    assert main(["bank", str(two[0]), str(third), "-b", "0.5", "-o", str(bank), "--force"]) == 0  # a bank is replaceable
