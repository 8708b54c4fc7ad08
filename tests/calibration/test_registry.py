"""The method registry: a method is one class (here: one defined in this test module), and the CLI's
``--method`` help, ``-O`` checking and docs/methods.md all come from the methods themselves."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from loracompress.calibration.methods import registry
from loracompress.calibration.methods.base import Method, MethodSettings
from loracompress.core.budget import allocate
from loracompress.core.reader import load_adapter
from loracompress.errors import LoraCompressError
from loracompress_cli.app import main
from tests.calibration.test_engine import calib_files

REPO = Path(__file__).resolve().parents[2]


@dataclass
class KeepSettings(MethodSettings):
    """floor: at least this many leading components per module survive."""

    floor: int = 0

    def __post_init__(self) -> None:
        if self.floor < 0:
            raise LoraCompressError(f"toykeep floor must be >= 0 (got {self.floor})")


class ToyKeep(Method):
    """Keep each module's leading components by energy under the budget; count the hook calls."""

    name = "toykeep"
    summary = "a test method: the budget's leading components, no pruning during training"
    Settings = KeepSettings
    calls: dict[str, int] = {}

    def after_step(self, step: int) -> None:
        ToyKeep.calls["after_step"] = ToyKeep.calls.get("after_step", 0) + 1

    def finalize(self) -> dict[str, int]:
        ctx = self.context  # the run's context; an error before setup()
        values = {p: [float(x) for x in layer.B.detach().norm(dim=0) * layer.A.detach().norm(dim=1)]
                  for p, layer in ctx.layers.items()}
        return allocate(values, {p: ctx.cost(p) for p in ctx.layers}, ctx.target_params, min_rank=self.config.floor)


def test_a_method_defined_in_a_test_module_is_registered():
    assert registry.available()["toykeep"] is ToyKeep
    assert {"prilora", "lorpa", "increlora", "dylora", "adalora"} <= set(registry.available())
    method = registry.get_method("toykeep", floor=1.0)  # a whole-number float for an int setting
    assert isinstance(method, ToyKeep) and method.config.floor == 1 and method.describe() == {"method": "toykeep", "floor": 1}


def test_settings_are_checked_against_the_dataclass():
    with pytest.raises(LoraCompressError, match="toykeep has no setting 'flor'; known: floor"):
        registry.get_method("toykeep", flor=1)
    with pytest.raises(LoraCompressError, match="must be a whole number"):
        registry.get_method("toykeep", floor="many")
    with pytest.raises(LoraCompressError, match="floor must be >= 0"):
        registry.get_method("toykeep", floor=-1)
    with pytest.raises(LoraCompressError, match="unknown method 'nope'.*toykeep"):
        registry.get_method("nope")


def test_the_toy_method_is_in_prune_help_and_runs_through_the_cli(tmp_path, capsys):
    assert main(["prune", "--help"]) == 0
    assert "toykeep" in " ".join(capsys.readouterr().out.split())
    files = calib_files(tmp_path / "f")
    out = tmp_path / "out"
    ToyKeep.calls.clear()
    code = main(["prune", str(files["adapter"]), "--budget", "0.25", "--method", "toykeep", "-O", "floor=1",
                 "--base-model", str(files["base"]), "--data", str(files["data"]), "--steps", "3",
                 "--batch-size", "8", "--seq-len", "32", "--device", "cpu", "--no-eval", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert ToyKeep.calls["after_step"] == 3
    report = json.loads((out / "compression_report.json").read_text())
    assert report["method"] == "toykeep" and report["settings"]["floor"] == 1
    small = load_adapter(out)
    assert 0 < small.num_params <= 0.25 * load_adapter(files["adapter"]).num_params
    assert all(m.rank >= 1 for m in small.modules.values())  # the floor held


def test_docs_methods_table_is_generated_from_the_methods():
    text = (REPO / "docs" / "methods.md").read_text(encoding="utf-8")
    start, end = registry.TABLE_MARKERS
    table = text[text.index(start) + len(start):text.index(end)].strip("\n") + "\n"
    shipped = {name: cls for name, cls in registry.available().items() if cls.__module__.startswith("loracompress.")}
    expected = registry.methods_table(shipped)
    assert table == expected, "docs/methods.md is stale: python -m loracompress.calibration.methods.registry"


def test_svd_is_a_registered_training_free_method_whose_setting_is_checked():
    from loracompress.calibration.methods.svd import Svd

    assert registry.available()["svd"] is Svd and not Svd.trains and not Svd.needs_data
    assert registry.get_method("svd", damping=0.5).config.damping == 0.5
    with pytest.raises(LoraCompressError, match="finite number >= 0"):
        registry.get_method("svd", damping=-1)
    assert "svd" in registry.help_line() and "`svd`" in registry.methods_table()


class ToyNested(ToyKeep):
    """A nested method: keep-best must leave its output alone and hold out no extra data for it."""

    name = "toynested"
    nested = True


def test_capabilities_not_names_decide_keep_best_and_held_out_sizing():
    from types import SimpleNamespace

    from loracompress.pipelines.inputs import held_out_fraction

    assert ToyKeep.keeps_best() and not ToyNested.keeps_best() and not registry.method_class("dylora").keeps_best()
    opts = SimpleNamespace(eval_fraction=0.1, keep_best=True)
    assert held_out_fraction(SimpleNamespace(**vars(opts), method="toykeep"), 1000) == 0.2  # 200 of 1000
    assert held_out_fraction(SimpleNamespace(**vars(opts), method="toynested"), 1000) == 0.1
    assert held_out_fraction(SimpleNamespace(**vars(opts), method="svd"), 1000) == 0.1


@pytest.mark.parametrize("name", ["adalora", "dylora", "increlora", "lorpa", "prilora", "toykeep"])
def test_a_method_used_before_setup_says_so(name):
    """One guard on the base class (``Method.context``), the same error from every method's hooks."""
    method = registry.get_method(name)
    with pytest.raises(RuntimeError, match=f"^{name}: setup\\(\\) was not called$"):
        method.finalize()
    with pytest.raises(RuntimeError, match="setup\\(\\) was not called"):
        _ = method.context
