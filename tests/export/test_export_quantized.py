"""Exports that merge read the base's weights too: a quantized base is dequantized first (bitsandbytes by
transformers, FP8 on load on a machine without a GPU) or refused by name; no merge adds ΔW to non-float weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from loracompress.core.reader import load_adapter
from loracompress.errors import LoraCompressError
from loracompress_cli.app import main
from tests.quantized import qlora, quantized_folder
from tests.tiny import make_adapter, sample_inputs


def test_export_refuses_a_gptq_base_by_name(tmp_path, capsys):
    src, base = make_adapter("llama", tmp_path / "a", r=4)
    folder = quantized_folder(tmp_path, base, "gptq", {"quant_method": "gptq", "bits": 4, "group_size": 128})
    out = tmp_path / "x"
    assert main(["export", str(src), "-f", "onnx", "--engine", "ort", "--base-model", str(folder), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "GPTQ-quantized" in err and "--base-model ORIGINAL" in err and "damaged" not in err, err
    assert not out.exists()


def test_merge_into_refuses_non_float_weights(tmp_path):
    """FP8 values without their scales are not the weights: adding ΔW to them loses the adapter."""
    from loracompress.merging.inplace import merge_cast, merge_into

    src, base = make_adapter("llama", tmp_path / "a", r=4)
    layer = base.model.layers[0].self_attn.q_proj
    layer.weight = torch.nn.Parameter(layer.weight.data.to(torch.float8_e4m3fn), requires_grad=False)
    adapter = load_adapter(src)
    for merge in (lambda: merge_into(base, adapter), lambda: merge_cast(base, adapter, torch.float32)):
        with pytest.raises(LoraCompressError, match="float8_e4m3fn.*quantized"):
            merge()


@pytest.mark.slow
def test_onnx_merged_export_of_a_4bit_base_matches_peft_on_the_4bit_model(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from peft import PeftModel

    src, base, q = qlora(tmp_path)
    out = tmp_path / "onnx"
    assert main(["export", str(src), "-f", "onnx", "--engine", "ort", "--base-model", str(tmp_path / "base4"),
                 "-o", str(out)]) == 0
    assert json.loads((out / "export_report.json").read_text())["max_abs_diff"] <= 1e-4
    inputs = sample_inputs("llama", batch=2, seq=12, seed=5)
    with torch.no_grad():
        ref = PeftModel.from_pretrained(q, str(src)).eval()(**inputs).logits.float().numpy()
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {k: v.numpy() for k, v in inputs.items()})[0]
    assert float(np.abs(got - ref).max()) <= 1e-4


def test_export_from_a_gguf_base(tmp_path, capsys):
    """Regression: a .gguf base (dequantized by transformers on load, but still marked quantized) was refused as
    "gguf-quantized ... transformers kept its quantized layers on load (a GPU is visible)" by every ONNX export."""
    from loracompress_cli.app import main
    from tests.tiny import make_adapter, save_tiny_gguf

    save_tiny_gguf(tmp_path / "tiny.gguf")
    src, _ = make_adapter("llama", tmp_path / "a", r=4)
    out = tmp_path / "o"
    capsys.readouterr()
    rc = main(["export", str(src), "--base-model", str(tmp_path / "tiny.gguf"), "--format", "onnx", "--engine", "ort",
               "-o", str(out), "--json"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert (out / "model.onnx").is_file() and report["max_abs_diff"] <= report["tolerance"]
