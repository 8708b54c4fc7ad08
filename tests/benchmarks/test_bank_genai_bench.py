"""benchmarks/bank_genai.py on two tiny adapters: the check's rows from bank-export's report, and tokens/s rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.export.test_export_genai import genai_llama, needs_genai, peft_adapter
from tests.tiny import tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bank_genai  # noqa: E402


@pytest.mark.slow  # about two minutes: onnxruntime-genai's builder runs three times
@needs_genai
def test_check_and_speed_rows_on_two_tiny_adapters(tmp_path):
    base = genai_llama()
    base.save_pretrained(str(tmp_path / "base"))
    tiny_tokenizer("llama").save_pretrained(str(tmp_path / "base"))
    adapters = [str(peft_adapter(base, tmp_path / f"t{i}", r=4, seed=10 + i)) for i in range(2)]
    results = tmp_path / "genai.json"
    common = ["--adapters", *adapters, "--base-model", str(tmp_path / "base"), "--budget", "1/2", "--clusters", "1",
              "--results", str(results)]

    bank_genai.main(["check", *common])
    check = json.loads(results.read_text())["check"]["1/2, clusters 1"]
    rows = {r["adapter"]: r for r in check["adapters"]}
    assert set(rows) == {"t0", "t1", "(none active: the base) on cluster-0"}
    assert all(r["tokens_identical"] == "3/3" and r["passed"] and r["first_step_max_abs_diff"] <= 1e-3
               for r in rows.values())
    assert check["failure"] is None and rows["t0"]["adapter_bytes"] > 0
    assert rows["t0"]["differs_from_base"] + rows["t1"]["differs_from_base"] > 0  # the cores act

    bank_genai.main(["speed", *common, "--new-tokens", "3", "--rounds", "2", "--work", str(tmp_path / "work")])
    speed = json.loads(results.read_text())["speed"]["1/2, clusters 1"]
    assert "check" in json.loads(results.read_text())  # the other measurement is kept
    assert [(r["round"], r["side"]) for r in speed["rows"]] == [
        (0, "bank"), (0, "separate"), (0, "none active (separate graph)"),
        (1, "none active (separate graph)"), (1, "separate"), (1, "bank")]
    for r in speed["rows"]:  # every sequence runs to exactly --new-tokens: the same work on each side
        assert r["tokens"] == r["generations"] * 3 and r["tokens_per_s"] > 0
    sides = speed["sides"]
    assert sides["bank"]["params"] // 2 == sides["separate"]["params_each"] >= sides["separate"]["params"] // 2
    assert sides["bank"]["adapter_bytes"] < sides["separate"]["adapter_bytes"]
    assert len(sides["bank"]["adapter_bytes_each"]) == 2 and sides["bank"]["graph_bytes"] > 0

    text = "\n".join(bank_genai.section(results))
    assert "| t0 | 0 |" in text and "Ratio bank / separate" in text and "Not measured" not in text
    assert text.count("### Bank budget 1/2") == 2  # the check's entry and the speed entry

    bank_genai.main(["speed", *common, "--new-tokens", "2", "--rounds", "1", "--work", str(tmp_path / "work"),
                     "--reuse"])  # measures the graphs left in --work: no bank, no export
    again = json.loads(results.read_text())["speed"]["1/2, clusters 1"]
    assert again["setup_reused"] and again["sides"] == sides and len(again["rows"]) == 3
