"""QLoRA bases on the CPU: an adapter that PEFT trained on a 4-bit (NF4) base, calibrated against that base.

bitsandbytes (0.50) quantizes and runs on the CPU, so this is in the default suite: the teacher inside
the engine (the 4-bit base plus the original LoRA) must give what stock PEFT gives on the same 4-bit base.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from loracompress.calibration.engine import step as engine_step
from loracompress.core.adapter import LoraModule
from loracompress.core.reader import load_adapter
from loracompress.errors import LoraCompressError
from loracompress.pipelines.prune import prune
from loracompress.runtime import placement as placement_mod
from loracompress.runtime.layers import LoraLayer, base_shape
from loracompress.runtime.placement import resolve_placement
from loracompress_cli.app import main
from tests.calibration.test_engine import options
from tests.tiny import LLAMA_TARGETS, save_tiny_base, tiny_sentences, tiny_tokenizer

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                reason="needs bitsandbytes (the dev extra installs it)")

#: teacher logits, loracompress against PEFT on the same NF4 base: both run the same bitsandbytes
#: layers in float32 and add the same float32 LoRA path, only in another order of operations
TEACHER_ATOL = 1e-5


def _nf4(folder: Path):
    """The tiny Llama of ``folder`` loaded as stock transformers loads a QLoRA base, on the CPU, float32 compute."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=q, device_map={"": "cpu"},
                                                dtype=torch.float32).eval()


def _batch(texts: list[str]) -> dict[str, torch.Tensor]:
    return dict(tiny_tokenizer("llama")(texts, return_tensors="pt", padding=True))


@pytest.fixture(scope="module")
def qlora_files(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama base folder and a LoRA that stock PEFT trained on its NF4 quantization (QLoRA, a few
    AdamW steps of next-token loss), plus calibration data."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("qlora")
    base = save_tiny_base("llama", root / "base")
    torch.manual_seed(0)
    model = get_peft_model(_nf4(base), LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS,
                                                  task_type="CAUSAL_LM", lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    texts = tiny_sentences(64, seed=5)
    model.train()
    for i in range(12):
        batch = _batch(texts[(i * 8) % 64:(i * 8) % 64 + 8])
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(root / "adapter"))
    data = root / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in tiny_sentences(48, seed=1)), encoding="utf-8")
    return {"base": base, "adapter": root / "adapter", "data": data}


@pytest.fixture(scope="module")
def qlora_run(qlora_files, tmp_path_factory):
    """One ``prune --load-in-4bit --device cpu`` run; records every teacher target the engine computed."""
    seen: list[tuple[dict[str, torch.Tensor], torch.Tensor]] = []
    original = engine_step.StepLoop.teacher_targets

    def spy(self, idx, inputs):
        targets = original(self, idx, inputs)
        seen.append(({k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)}, targets.clone()))
        return targets

    out = tmp_path_factory.mktemp("qlora_out") / "o"
    mp = pytest.MonkeyPatch()
    mp.setattr(engine_step.StepLoop, "teacher_targets", spy)
    try:
        report = prune(qlora_files["adapter"], out, options(qlora_files, "lorpa", steps=8, load_in_4bit=True,
                                                            teacher_top_k=0, keep_best=False))
    finally:
        mp.undo()
    return {"report": report, "out": out, "seen": seen}


def test_the_engines_teacher_on_a_4bit_base_equals_peft_on_that_base(qlora_files, qlora_run):
    from peft import PeftModel

    peft = PeftModel.from_pretrained(_nf4(qlora_files["base"]), str(qlora_files["adapter"])).eval()
    assert qlora_run["seen"], "the engine computed no teacher targets"
    moved = 0.0
    for inputs, teacher in qlora_run["seen"]:
        with torch.no_grad():
            ref = peft(**inputs).logits.float()
            with peft.disable_adapter():
                bare = peft(**inputs).logits.float()
        assert teacher.shape == ref.shape
        torch.testing.assert_close(teacher, ref, atol=TEACHER_ATOL, rtol=0)
        moved = max(moved, float((ref - bare).abs().max()))
    assert moved > 100 * TEACHER_ATOL, moved  # the trained adapter really changes the 4-bit base's output


def test_calibration_on_a_4bit_base_runs_on_the_cpu_and_writes_the_adapter(qlora_files, qlora_run):
    report, out = qlora_run["report"], qlora_run["out"]
    assert report["settings"]["base"]["base_quantization"] == "bitsandbytes 4bit"
    assert report["settings"]["base"]["base_device"] == "cpu"
    assert report["settings"]["base"]["base_dtype"] == "fp32"  # the CPU keeps float32 compute
    assert "dequantized" in report["settings"]["base"]["merge_note"]
    run = report["settings"]["run"]
    assert run["steps"] == 8 and run["final_loss"] < run["first_loss"], run  # the student trains
    written = load_adapter(out)
    assert written.num_params == report["params_after"] <= report["budget"]["target_params"]
    assert set(written.modules) <= set(load_adapter(qlora_files["adapter"]).modules)


def test_lora_layer_wraps_a_4bit_linear():
    import bitsandbytes as bnb

    torch.manual_seed(0)
    dense = torch.nn.Linear(48, 32, bias=False)
    q = bnb.nn.Linear4bit(48, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    q.load_state_dict(dense.state_dict())
    q = q.to("cpu")  # quantizes
    assert base_shape(q) == (32, 48)  # the packed weight is [out·in/2, 1]; the layer's features say the shape
    module = LoraModule(A=torch.randn(4, 48) * 0.1, B=torch.randn(32, 4) * 0.1, scale=2.0)
    layer = LoraLayer(q, module, teacher=copy.deepcopy(module), trainable=True)
    assert layer.A.dtype == torch.float32 and layer.A.requires_grad
    x = torch.randn(3, 5, 48)
    y = layer(x)
    torch.testing.assert_close(y, q(x) + 2.0 * (x @ module.A.T) @ module.B.T, atol=1e-5, rtol=1e-5)
    y.square().sum().backward()
    assert layer.A.grad is not None and layer.A.grad.abs().sum() > 0 and layer.B.grad.abs().sum() > 0
    assert all(p.grad is None for p in q.parameters())  # the quantized base stays frozen


def test_8bit_base_calibrates_on_the_cpu(qlora_files, tmp_path):
    report = prune(qlora_files["adapter"], tmp_path / "o",
                   options(qlora_files, "lorpa", steps=2, load_in_8bit=True, keep_best=False))
    assert report["settings"]["base"]["base_quantization"] == "bitsandbytes 8bit"
    assert load_adapter(tmp_path / "o").num_params == report["params_after"]


# --------------------------------------------------------------------------- refused only where bitsandbytes cannot run


def _cli(files, tmp_path, flag: str) -> list[str]:
    return ["prune", str(files["adapter"]), "-b", "0.25", "--method", "lorpa", "--data", str(files["data"]),
            "--base-model", str(files["base"]), "--device", "cpu", "-o", str(tmp_path / "o"), flag]


@pytest.mark.parametrize("flag", ["--load-in-4bit", "--load-in-8bit"])
def test_quantized_base_without_bitsandbytes_exits_2_with_the_install_line(qlora_files, tmp_path, capsys,
                                                                          monkeypatch, flag):
    real = importlib.util.find_spec
    monkeypatch.setattr(placement_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    code = main(_cli(qlora_files, tmp_path, flag))
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "o").exists()
    assert "needs bitsandbytes: pip install 'loracompress[qlora]'" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bitsandbytes_that_cannot_import_is_refused(monkeypatch):
    def broken(name, *args):
        raise RuntimeError(f"{name}: CUDA Setup failed despite GPU being available")

    monkeypatch.setattr(placement_mod.importlib, "import_module", broken)  # installed (find_spec finds it), broken
    with pytest.raises(LoraCompressError, match="cannot be imported.*pip install -U"):
        resolve_placement(None, "cpu", load_in_4bit=True)


def test_bitsandbytes_without_a_backend_for_the_device_is_refused(monkeypatch):
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes, "supported_torch_devices", {"cuda"})
    with pytest.raises(LoraCompressError, match="no backend for the cpu device"):
        resolve_placement(None, "cpu", load_in_4bit=True)


def test_bitsandbytes_whose_backend_fails_is_refused(monkeypatch):
    import bitsandbytes

    def broken(*args, **kwargs):
        raise RuntimeError("native library not found\nsecond line")

    monkeypatch.setattr(bitsandbytes.nn, "Linear4bit", broken)
    with pytest.raises(LoraCompressError, match=r"cannot run 4bit layers on cpu here \(native library not found\)"):
        resolve_placement(None, "cpu", load_in_4bit=True)


def test_a_quantized_cpu_placement_keeps_float32_compute():
    p = resolve_placement(None, "cpu", load_in_4bit=True)
    assert (p.device, p.dtype, p.quantize) == ("cpu", torch.float32, "4bit")
    assert resolve_placement("bf16", "cpu", load_in_8bit=True).dtype == torch.bfloat16
