"""The export registry: a format is one module (here: one defined in this test module) that registers its
options type; ``export --help`` lists it, ``export --format NAME`` runs it and prints its report's lines."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from loracompress.core.outputs import atomic_output_dir, check_output_path
from loracompress.core.reader import load_adapter
from loracompress.errors import LoraCompressError
from loracompress.export import (
    REPORT_NAME,
    ExportFormat,
    ExportOptions,
    ExportReport,
    export,
    formats,
    register_format,
)
from loracompress.export.onnx import OnnxOptions
from loracompress.export.targets import PeftOptions, UniformOptions
from loracompress_cli.app import main
from tests.tiny import make_adapter


def make_adapter_dir(path: Path) -> Path:
    return make_adapter("llama", path, r=4)[0]


@dataclass(kw_only=True)
class ToyOptions(ExportOptions):
    dtype: str | None = None


class ToyReport(ExportReport):
    def lines(self) -> list[str]:
        return [f"toy: {self['modules']} modules listed", f"wrote {self['output']} (and {REPORT_NAME})"]


def _toy(sources: Sequence[Path], output: Path, options: ToyOptions) -> ToyReport:
    adapter = load_adapter(sources[0])
    out = check_output_path(output, force=options.force, inputs=list(sources))
    report = ToyReport(format="toy", output=str(out), modules=len(adapter.modules), dtype=options.dtype)
    with atomic_output_dir(out, force=options.force, inputs=list(sources)) as tmp:
        (tmp / "modules.txt").write_text("\n".join(adapter.modules) + "\n")
        (tmp / REPORT_NAME).write_text(json.dumps(report))
    return report


register_format(ExportFormat("toy", "a test format: the module names, one per line", ToyOptions, _toy))


def test_the_builtin_formats_and_the_toy_are_registered_by_options_type():
    known = formats()
    assert {"onnx", "peft", "vllm", "uniform", "gguf"} < set(known) and known["toy"].options is ToyOptions
    assert known["onnx"].options is OnnxOptions and known["onnx"].many and not known["gguf"].many
    with pytest.raises(ValueError, match="already selects"):
        register_format(ExportFormat("toy2", "", ToyOptions, _toy))


def test_a_toy_format_appears_in_help_runs_and_writes_its_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["export", "--help"]) == 0
    assert "toy: a test format" in " ".join(capsys.readouterr().out.replace("│", " ").split())  # rich's box, unwrapped
    src = make_adapter_dir(tmp_path / "a")
    out = tmp_path / "out"
    assert main(["export", str(src), "--format", "toy", "--dtype", "fp16", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    modules = len(load_adapter(src).modules)
    assert f"toy: {modules} modules listed" in printed and REPORT_NAME in printed
    assert json.loads((out / REPORT_NAME).read_text()) == {"format": "toy", "output": str(out), "modules": modules, "dtype": "fp16"}
    assert len((out / "modules.txt").read_text().split()) == modules


def test_export_picks_the_format_by_the_options_type(tmp_path: Path):
    src = make_adapter_dir(tmp_path / "a")
    report = export([src], tmp_path / "u", UniformOptions())
    assert report["target"] == "uniform" and report.lines()[-1].startswith(f"wrote {tmp_path / 'u'}")
    assert export([src], tmp_path / "p", PeftOptions())["target"] == "peft"
    with pytest.raises(LoraCompressError, match="takes one adapter folder"):
        export([src, src], tmp_path / "x", PeftOptions())
    with pytest.raises(LoraCompressError, match="selects no export format"):
        export([src], tmp_path / "y", ExportOptions())


def test_onnx_device_is_checked_by_the_library(tmp_path: Path):
    with pytest.raises(LoraCompressError, match="unknown --device 'tpu'"):
        export([make_adapter_dir(tmp_path / "a")], tmp_path / "o", OnnxOptions(device="tpu"))
