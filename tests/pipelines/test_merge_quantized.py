"""``merge`` into quantized bases: block FP8 dequantized, bitsandbytes 4-bit (QLoRA) merged into dequant(W4),
packed formats refused by name. Every merged model is compared with stock PEFT on the dequantized base."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from loracompress.errors import LoraCompressError
from loracompress_cli.app import main
from tests.quantized import bnb4_config, dequantize_fp8, qlora, quantize_fp8, quantized_folder, save_fp8_base
from tests.tiny import LLAMA_TARGETS, make_adapter, sample_inputs


def _logits(model: torch.nn.Module, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()


def _peft_logits(base: torch.nn.Module, adapter_dir, inputs) -> torch.Tensor:
    from peft import PeftModel

    return _logits(PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval(), inputs)


def _written_logits(folder, inputs) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return _logits(AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval(), inputs)


def _merge(adapter, base, out, **kw):
    from loracompress.pipelines.merge import MergeOptions, merge_adapter

    return merge_adapter(adapter, out, MergeOptions(base_model=str(base), **kw))


def _tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


# --------------------------------------------------------------------------- block FP8


@pytest.mark.parametrize("verify", ["modules", "full"])
def test_merge_into_a_block_fp8_base_matches_peft_on_the_dequantized_base(tmp_path, verify):
    """The merge adds ΔW to fp8 · scale_inv (not to the raw FP8 values), writes bf16 (the base's float dtype)
    without scales or quantization_config, and equals PEFT on the dequantized base plus the adapter."""
    src, base = make_adapter("llama", tmp_path / "a", r=8)
    dequantized = save_fp8_base(base, tmp_path / "fp8")
    reference_base = copy.deepcopy(base)
    reference_base.load_state_dict(dequantized)
    inputs = sample_inputs("llama", batch=2, seq=12, seed=3)
    ref = _peft_logits(reference_base, src, inputs)
    effect = (ref - _logits(reference_base, inputs)).abs().max()
    assert effect > 0.05  # the adapter matters: losing it cannot pass below

    report = _merge(src, tmp_path / "fp8", tmp_path / "m", verify=verify)
    written = _tensors(tmp_path / "m")
    assert not [k for k in written if "scale" in k]
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    got = _written_logits(tmp_path / "m", inputs)
    assert (got - ref).abs().max() < 0.02 * effect  # bf16 rounding, against an adapter effect of `effect`
    assert report["streamed"] and report["dtype"] == "bf16" and report["into"] == "dequantized"
    assert report["base_quantization"]["format"] == "fp8"
    assert report["base_quantization"]["weights"] == 3 * len(LLAMA_TARGETS)

    # --dtype fp32 is honoured: fp32 weights, equal to PEFT within fp32 arithmetic.
    report = _merge(src, tmp_path / "fp8", tmp_path / "m32", dtype="fp32", verify=verify)
    assert report["dtype"] == "fp32"
    assert {t.dtype for t in _tensors(tmp_path / "m32").values()} == {torch.float32}
    assert (_written_logits(tmp_path / "m32", inputs) - ref).abs().max() < 1e-4


def test_fp8_dequantize_matches_a_block_by_block_reference():
    from loracompress.runtime.quantized import fp8_dequantize

    w = torch.randn(300, 200)
    for block in [(128, 128), (64, 32)]:
        q, s = quantize_fp8(w, block)
        assert torch.equal(fp8_dequantize(q, s, block), dequantize_fp8(q, s, block))
    with pytest.raises(LoraCompressError, match="not one per"):
        fp8_dequantize(q, s[:, :1], (64, 32))
    q, s = quantize_fp8(w[:256], (128, 100))  # no weight_block_size in the config: a grid that divides the weight
    assert torch.equal(fp8_dequantize(q, s, None), dequantize_fp8(q, s, (128, 100)))
    with pytest.raises(LoraCompressError, match="weight_block_size"):
        fp8_dequantize(*quantize_fp8(torch.randn(301, 200), (128, 128)), None)


# --------------------------------------------------------------------------- refused by name


@pytest.mark.parametrize(("config", "tensors", "named"), [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, None, "GPTQ-quantized"),
    ({"quant_method": "awq", "bits": 4, "version": "gemm"}, None, "AWQ-quantized"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, None, "compressed-tensors"),
    (None, {"model.layers.0.self_attn.q_proj.qweight": torch.zeros(6, 48, dtype=torch.int32),
            "model.layers.0.self_attn.q_proj.qzeros": torch.zeros(1, 6, dtype=torch.int32),
            "model.layers.0.self_attn.q_proj.scales": torch.zeros(1, 48)}, "GPTQ- or AWQ-quantized"),
])
def test_packed_quantized_bases_are_refused_by_name(tmp_path, capsys, config, tensors, named):
    src, base = make_adapter("llama", tmp_path / "a", r=4)
    folder = quantized_folder(tmp_path, base, "q", config, tensors)
    out = tmp_path / "m"
    assert main(["merge", str(src), "-o", str(out), "--base-model", str(folder)]) == 2
    err = capsys.readouterr().err
    assert named in err and "--base-model ORIGINAL" in err and "damaged" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".m.*"))


def test_into_original_on_a_quantized_base_is_refused(tmp_path, capsys):
    src, base = make_adapter("llama", tmp_path / "a", r=4)
    save_fp8_base(base, tmp_path / "fp8")
    assert main(["merge", str(src), "-o", str(tmp_path / "m"), "--base-model", str(tmp_path / "fp8"),
                 "--into", "original"]) == 2
    err = capsys.readouterr().err
    assert "block-FP8" in err and "--base-model ORIGINAL" in err
    assert main(["merge", str(src), "-o", str(tmp_path / "m"), "--base-model", str(tmp_path / "fp8"),
                 "--into", "dequantised"]) == 2
    assert "dequantized or original" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


# --------------------------------------------------------------------------- bitsandbytes 4-bit (QLoRA)


def _peft_on_4bit(q, src, inputs) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(q, str(src)).eval()
    try:
        return _logits(model, inputs)
    finally:
        model.unload()


def test_qlora_merge_into_a_4bit_base_matches_peft_on_the_4bit_model(tmp_path):
    """A bitsandbytes NF4 folder: merged into dequant(W4) (bitsandbytes' own dequantization), its logits
    equal PEFT's 4-bit model plus the adapter, and are closer to it than a merge into the 16-bit base."""
    src, base, q = qlora(tmp_path)
    inputs = sample_inputs("llama", batch=2, seq=12, seed=5)
    ref = _peft_on_4bit(q, src, inputs)

    report = _merge(src, tmp_path / "base4", tmp_path / "m4", verify="full")
    assert report["into"] == "dequantized" and report["base_quantization"]["format"] == "bnb-4bit"
    assert report["dtype"] == "fp32" and "quantization_config" not in json.loads((tmp_path / "m4" / "config.json").read_text())
    assert not [k for k in _tensors(tmp_path / "m4") if "absmax" in k or "quant_" in k]
    into_4bit = (_written_logits(tmp_path / "m4", inputs) - ref).abs().max()

    _merge(src, tmp_path / "base16", tmp_path / "m16")
    into_16bit = (_written_logits(tmp_path / "m16", inputs) - ref).abs().max()
    assert into_4bit < 1e-4, into_4bit
    assert into_16bit > 100 * into_4bit, (into_16bit, into_4bit)


def test_qlora_merge_from_the_16bit_base_with_load_in_4bit_equals_the_4bit_folder(tmp_path, capsys):
    """The 16-bit base and --load-in-4bit (or the adapter's PEFT model card saying it was trained in 4-bit)
    merge into dequant(NF4(W)): the same weights as the merge into the saved 4-bit folder."""
    src, base, q = qlora(tmp_path)
    _merge(src, tmp_path / "base4", tmp_path / "m4", verify="modules")
    assert main(["merge", str(src), "-o", str(tmp_path / "f"), "--base-model", str(tmp_path / "base16"),
                 "--load-in-4bit", "--verify", "full"]) == 0
    assert "merged into the dequantized base weights" in capsys.readouterr().out
    four, flag = _tensors(tmp_path / "m4"), _tensors(tmp_path / "f")
    assert set(four) == set(flag)
    for k in four:
        assert torch.equal(four[k], flag[k]), k

    # The adapter says it: PEFT's model card (as PEFT < 0.22 wrote it; many hub adapters carry it) records the
    # bitsandbytes config of the base it was trained on.
    import shutil

    shutil.copytree(src, tmp_path / "carded")
    config = "\n".join(f"- {k}: {v}" for k, v in bnb4_config().to_dict().items())
    (tmp_path / "carded" / "README.md").write_text(
        "## Training procedure\n\n\nThe following `bitsandbytes` quantization config was used during training:\n"
        f"{config}\n\n### Framework versions\n\n- PEFT 0.6.2\n")
    report = _merge(tmp_path / "carded", tmp_path / "base16", tmp_path / "c", verify="modules")
    assert report["into"] == "dequantized" and "model card" in report["into_reason"]
    carded = _tensors(tmp_path / "c")
    assert all(torch.equal(four[k], carded[k]) for k in four)
    report = _merge(tmp_path / "carded", tmp_path / "base16", tmp_path / "o", into="original", verify="modules")
    assert report["into"] == "original" and report["base_quantization"] is None
    assert not torch.equal(_tensors(tmp_path / "o")["model.layers.0.self_attn.q_proj.weight"],
                           four["model.layers.0.self_attn.q_proj.weight"])

    # loracompress's own record: an adapter calibrated on the 4-bit base (compression_report.json).
    shutil.copytree(src, tmp_path / "calibrated")
    (tmp_path / "calibrated" / "compression_report.json").write_text(
        json.dumps({"settings": {"base": {"base_dtype": "bf16", "base_quantization": "bitsandbytes 4bit"}}}))
    report = _merge(tmp_path / "calibrated", tmp_path / "base16", tmp_path / "r", verify="modules")
    assert report["into"] == "dequantized" and "compression_report" in report["into_reason"]
    assert all(torch.equal(four[k], v) for k, v in _tensors(tmp_path / "r").items())


def test_plain_adapter_on_a_16bit_base_merges_into_the_original_weights(tmp_path):
    src, base = make_adapter("llama", tmp_path / "a", r=4)
    base.save_pretrained(str(tmp_path / "base"))
    report = _merge(src, tmp_path / "base", tmp_path / "m", verify="modules")
    assert report["into"] == "original" and report["base_quantization"] is None


def test_merge_into_an_8bit_base_matches_peft_on_transformers_dequantized_base(tmp_path):
    """bitsandbytes LLM.int8 (int8 rows and SCB scales): merged into the weights transformers' own
    ``dequantize()`` gives back, equal to PEFT on that model plus the adapter."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    src, base = make_adapter("llama", tmp_path / "a", r=8)
    base.save_pretrained(str(tmp_path / "base16"))
    q = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base16"), quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                             device_map="cpu")
    q.save_pretrained(str(tmp_path / "base8"))
    reference_base = q.dequantize(dtype=torch.float32).eval()
    inputs = sample_inputs("llama", batch=2, seq=12, seed=5)
    ref = _peft_logits(reference_base, src, inputs)

    report = _merge(src, tmp_path / "base8", tmp_path / "m", verify="full")
    assert report["into"] == "dequantized" and report["base_quantization"]["format"] == "bnb-8bit"
    assert not [k for k in _tensors(tmp_path / "m") if k.endswith(("SCB", "weight_format"))]
    assert (_written_logits(tmp_path / "m", inputs) - ref).abs().max() < 1e-4


def test_sharded_fp8_base_keeps_its_layout_without_the_scales(tmp_path):
    """Weights and their scales in different shards: the output keeps the base's shard files, its index
    names no scale, and the values equal the single-file merge."""
    from safetensors.torch import load_file, save_file

    src, base = make_adapter("llama", tmp_path / "a", r=4)
    save_fp8_base(base, tmp_path / "one")
    tensors = load_file(str(tmp_path / "one" / "model.safetensors"))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    names = sorted(tensors)
    files = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in files.items():
        save_file({k: tensors[k] for k in keys}, str(sharded / file), metadata={"format": "pt"})
    weight_map = {k: f for f, keys in files.items() for k in keys}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    _merge(src, tmp_path / "one", tmp_path / "m1", verify="modules")
    report = _merge(src, sharded, tmp_path / "m2", verify="modules")
    assert report["shards"] == list(files)
    index = json.loads((tmp_path / "m2" / "model.safetensors.index.json").read_text())["weight_map"]
    assert not [k for k in index if "scale" in k] and set(index) == set(_tensors(tmp_path / "m1"))
    one, two = _tensors(tmp_path / "m1"), _tensors(tmp_path / "m2")
    assert all(torch.equal(one[k], two[k]) for k in one)
