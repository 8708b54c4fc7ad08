"""``export BANK --format bank-genai`` (alias ``bank-export``): the bank's bases inside onnxruntime-genai graphs,
cores in the adapter files, tokens as PEFT's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loracompress.bank.io import read_bank
from loracompress.export import REPORT_NAME, format_named
from loracompress.export.genai_bank import BankExportOptions, BankGenaiReport, core_input, export_bank_genai
from loracompress_cli.app import main
from tests.export.test_export_genai import PROMPTS, genai_llama, needs_genai, peft_adapter
from tests.tiny import tiny_tokenizer


def tiny_bank(root: Path, clusters: str = "1") -> tuple[Path, Path]:
    """A bank of three rank-4 adapters of a tiny Llama that onnxruntime-genai builds; (bank, base) folders."""
    base = genai_llama()
    base.save_pretrained(str(root / "base"))
    tiny_tokenizer("llama").save_pretrained(str(root / "base"))
    sources = [peft_adapter(base, root / f"t{i}", r=4, seed=10 + i) for i in range(3)]
    assert main(["bank", *map(str, sources), "--budget", "0.5", "--clusters", clusters, "-o", str(root / "bank")]) == 0
    return root / "bank", root / "base"


@pytest.mark.slow  # two to four minutes: onnxruntime-genai's builder runs once per cluster
@needs_genai
@pytest.mark.parametrize("clusters", ["1", "2"])
def test_bank_graph_generates_peft_tokens_for_every_adapter_and_the_base(tmp_path, clusters):
    import onnxruntime as ort

    bank, base = tiny_bank(tmp_path, clusters)
    report = export_bank_genai(bank, tmp_path / "onnx", BankExportOptions(base_model=str(base), prompts=PROMPTS))
    bf = read_bank(bank)
    assert len(report["clusters"]) == int(clusters)
    assert report["tokens_identical"] == f"{3 * (3 + int(clusters))}/{3 * (3 + int(clusters))}"  # adapters + base per graph
    for entry in report["clusters"]:
        for f in entry["adapters"]:
            params = ort.AdapterFormat.read_adapter(str(tmp_path / "onnx" / f["file"])).get_parameters()
            i = next(k for k, m in enumerate(bf.members) if m.name == f["adapter"])
            # only the cores: R×R per module
            assert {n: tuple(v.shape()) for n, v in params.items()} == {
                core_input(p): (r, r) for p, r in entry["ranks"].items()}
            assert f["values"] == sum(bf.bank.rank(bf.bank.clusters[i], p) ** 2 for p in entry["ranks"])
    assert json.loads((tmp_path / "onnx" / "export_report.json").read_text())["mode"] == "bank"


def test_bank_genai_is_an_export_format_and_bank_export_its_alias(tmp_path, capsys, monkeypatch):
    """``export --format bank-genai`` and the ``bank-export`` alias reach the one library path with the same options."""
    import loracompress.export.genai_bank as genai_bank

    assert main(["export", "--help"]) == 0
    assert "bank-genai: a bank folder" in " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert format_named("bank-genai").options is BankExportOptions
    calls = []

    def fake(bank_dir, output, options):
        calls.append((str(bank_dir), str(output), options))
        return BankGenaiReport(clusters=[], tokens_identical="0/0", output=str(output))

    monkeypatch.setattr(genai_bank, "export_bank_genai", fake)
    flags = ["--base-model", str(tmp_path / "base"), "--tolerance", "0.002", "-o", str(tmp_path / "o")]
    assert main(["export", str(tmp_path / "bank"), "--format", "bank-genai", *flags]) == 0
    via_export = capsys.readouterr().out
    assert main(["bank-export", str(tmp_path / "bank"), *flags]) == 0
    assert capsys.readouterr().out == via_export and f"wrote {tmp_path / 'o'} (and {REPORT_NAME})" in via_export
    assert calls[0] == calls[1] and calls[0][2].tolerance == 0.002 and calls[0][2].base_model == str(tmp_path / "base")


@needs_genai
def test_export_format_bank_genai_runs_on_a_tiny_bank(tmp_path, capsys):
    bank, base = tiny_bank(tmp_path)
    capsys.readouterr()
    assert main(["export", str(bank), "--format", "bank-genai", "--base-model", str(base), "-o", str(tmp_path / "onnx"),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "bank" and len(report["clusters"]) == 1
    n = report["tokens_identical"].split("/")[1]
    assert report["tokens_identical"] == f"{n}/{n}" and int(n) > 0
    assert json.loads((tmp_path / "onnx" / REPORT_NAME).read_text())["clusters"] == report["clusters"]
