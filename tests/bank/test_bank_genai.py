"""``bank-export``: the bank's bases inside onnxruntime-genai graphs, cores in the adapter files, tokens as PEFT's."""

from __future__ import annotations

import json

import pytest

from loracompress.bank.io import read_bank
from loracompress.export.genai_bank import BankExportOptions, core_input, export_bank_genai
from loracompress_cli.app import main
from tests.export.test_export_genai import PROMPTS, genai_llama, needs_genai, peft_adapter
from tests.tiny import tiny_tokenizer


@pytest.mark.slow  # two to four minutes: onnxruntime-genai's builder runs once per cluster
@needs_genai
@pytest.mark.parametrize("clusters", ["1", "2"])
def test_bank_graph_generates_peft_tokens_for_every_adapter_and_the_base(tmp_path, clusters):
    import onnxruntime as ort

    base = genai_llama()
    base.save_pretrained(str(tmp_path / "base"))
    tiny_tokenizer("llama").save_pretrained(str(tmp_path / "base"))
    sources = [peft_adapter(base, tmp_path / f"t{i}", r=4, seed=10 + i) for i in range(3)]
    bank = tmp_path / "bank"
    assert main(["bank", *map(str, sources), "--budget", "0.5", "--clusters", clusters, "-o", str(bank)]) == 0
    report = export_bank_genai(bank, tmp_path / "onnx", BankExportOptions(base_model=str(tmp_path / "base"),
                                                                           prompts=PROMPTS))
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
