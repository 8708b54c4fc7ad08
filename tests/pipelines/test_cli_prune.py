"""``loracompress prune`` (training-free) and ``inspect`` through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from loracompress.core.reader import load_adapter
from loracompress_cli.app import main
from tests.tiny import make_adapter, peft_deltas


@pytest.mark.parametrize(
    ("kind", "kw"),
    [("llama", {"rank_pattern": {"q_proj": 4}, "use_rslora": True}), ("bert", {}), ("gpt2", {"dtype": torch.bfloat16})],
)
def test_prune_output_loads_in_peft_with_our_deltas(tmp_path, capsys, kind, kw):
    src, base = make_adapter(kind, tmp_path / "a", **kw)
    out = tmp_path / "small"
    assert main(["prune", str(src), "--budget", "0.5", "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    ours = load_adapter(out)
    assert ours.dtype == load_adapter(src).dtype  # input's dtype by default
    peft = peft_deltas(out, base)
    assert set(peft) == set(ours.modules)
    for path, m in ours.modules.items():
        rel = (peft[path] - m.delta()).abs().max() / m.delta().abs().max()
        assert rel <= 1e-5
    report = json.loads((out / "compression_report.json").read_text())
    assert report["params_after"] <= report["budget"]["target_params"] <= report["params_before"] // 2
    assert report["params_after"] == ours.num_params
    assert {r["module"] for r in report["modules"]} == set(load_adapter(src).modules)
    assert 0 < report["retained_energy"] < 1
    assert "Compressed LoRA adapter" in (out / "README.md").read_text()
    if kind == "bert":  # the classifier head rides along unchanged
        assert set(ours.extra_tensors) == set(load_adapter(src).extra_tensors)


def test_prune_dtype_and_json(tmp_path, capsys):
    src, _ = make_adapter("llama", tmp_path / "a")
    assert main(["prune", str(src), "-b", "rank=2", "-o", str(tmp_path / "o"), "--dtype", "fp16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dtype_after"] == "fp16" and report["max_rank_after"] <= 8
    assert load_adapter(tmp_path / "o").dtype == torch.float16


def test_prune_select_only(tmp_path):
    src, _ = make_adapter("llama", tmp_path / "a")
    assert main(["prune", str(src), "--select", "energy:0.9", "-o", str(tmp_path / "o")]) == 0
    report = json.loads((tmp_path / "o" / "compression_report.json").read_text())
    assert all(r["retained_energy"] >= 0.9 - 1e-9 for r in report["modules"])


def test_existing_output_needs_force(tmp_path, capsys):
    src, _ = make_adapter("llama", tmp_path / "a")
    out = tmp_path / "o"
    assert main(["prune", str(src), "-b", "0.5", "-o", str(out)]) == 0
    before = (out / "adapter_model.safetensors").read_bytes()
    assert main(["prune", str(src), "-b", "0.25", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--force" in err and len(err.strip().splitlines()) == 1
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert main(["prune", str(src), "-b", "0.25", "-o", str(out), "--force"]) == 0
    assert (out / "adapter_model.safetensors").read_bytes() != before
    assert not list(tmp_path.glob(".o.*"))  # no temporary or old siblings left behind


def test_same_input_same_bytes(tmp_path):
    src, _ = make_adapter("llama", tmp_path / "a")
    main(["prune", str(src), "-b", "0.3", "-o", str(tmp_path / "x")])
    main(["prune", str(src), "-b", "0.3", "-o", str(tmp_path / "y")])
    assert (tmp_path / "x/adapter_model.safetensors").read_bytes() == (tmp_path / "y/adapter_model.safetensors").read_bytes()


def test_inspect_table_and_json(tmp_path, capsys):
    src, _ = make_adapter("bert", tmp_path / "a")
    assert main(["inspect", str(src)]) == 0
    out = capsys.readouterr().out
    assert "bert.encoder.layer.0.attention.self.query" in out and "total" in out
    assert main(["inspect", str(src), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params"] == load_adapter(src).num_params
    assert all(1 <= m["rank90"] <= m["rank99"] <= m["rank"] for m in data["modules"])
    assert data["extra_tensors"]


def test_python_m_entry_point_and_user_error_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "loracompress", "prune", str(tmp_path / "missing"), "-b", "0.5"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith("error:") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([sys.executable, "-m", "loracompress", "--debug", "prune", str(tmp_path / "missing"), "-b", "0.5"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" in r.stderr
