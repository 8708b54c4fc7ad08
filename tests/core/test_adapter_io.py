"""Adapter I/O against stock PEFT: every variant reads right, every output loads right."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from loracompress.core.reader import load_adapter
from loracompress.core.writer import save_adapter
from tests.tiny import make_adapter, peft_deltas

VARIANTS = [
    ("llama", {}),
    ("llama", {"rank_pattern": {"q_proj": 4, "model.layers.1.mlp.down_proj": 6}, "alpha_pattern": {"v_proj": 3}}),
    ("llama", {"use_rslora": True, "rank_pattern": {"k_proj": 2}}),
    ("llama", {"dtype": torch.bfloat16}),
    ("bert", {}),  # modules_to_save classifier head
    ("bert", {"dtype": torch.float16, "lora_alpha": 5}),
    ("gpt2", {}),  # Conv1D, fan_in_fan_out
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


@pytest.mark.parametrize(("kind", "kw"), VARIANTS)
def test_load_matches_peft_deltas(tmp_path, kind, kw):
    src, base = make_adapter(kind, tmp_path / "a", **kw)
    adapter = load_adapter(src)
    expected = peft_deltas(src, base)
    assert set(adapter.modules) == set(expected)
    for path, delta in expected.items():
        assert _rel(adapter.modules[path].delta(), delta) <= 1e-5, path
    if kind == "bert":
        assert any("classifier" in k for k in adapter.extra_tensors)


@pytest.mark.parametrize(("kind", "kw"), VARIANTS)
def test_portable_roundtrip_loads_in_peft_and_global_scale_reader(tmp_path, kind, kw):
    src, base = make_adapter(kind, tmp_path / "a", **kw)
    adapter = load_adapter(src)
    out = save_adapter(adapter, tmp_path / "b")
    # exact round trip through our own reader
    again = load_adapter(out)
    assert again.dtype == adapter.dtype
    for path, m in adapter.modules.items():
        tol = 1e-5 if adapter.dtype == torch.float32 else 1e-2
        assert _rel(again.modules[path].delta(), m.delta()) <= tol
    # stock PEFT reads the portable form to the same deltas
    peft = peft_deltas(out, base)
    for path, m in again.modules.items():
        assert _rel(peft[path], m.delta()) <= 1e-5, path
    # a reader that ignores the patterns and applies one global lora_alpha / r (vLLM) sees the same
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == adapter.max_rank and cfg["use_rslora"] is False
    tensors = load_file(str(out / "adapter_model.safetensors"))
    global_scale = cfg["lora_alpha"] / cfg["r"]
    for path in again.modules:
        A = tensors[f"base_model.model.{path}.lora_A.weight"].float()
        B = tensors[f"base_model.model.{path}.lora_B.weight"].float()
        assert _rel(global_scale * B @ A, peft[path]) <= 1e-5
    # extra tensors (modules_to_save) carried unchanged
    for k, t in adapter.extra_tensors.items():
        assert torch.equal(tensors[k], t)


def test_adalora_checkpoint_reads_as_lora(tmp_path):
    """A real PEFT AdaLoRA checkpoint: E folded into B, the delta equals PEFT's."""
    import copy

    from peft import AdaLoraConfig, get_peft_model

    from tests.tiny import tiny_llama

    base = tiny_llama()
    cfg = AdaLoraConfig(init_r=6, target_r=3, lora_alpha=12, target_modules=["q_proj", "v_proj"], total_step=10,
                        task_type="CAUSAL_LM")
    model = get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in model.modules():
            if hasattr(mod, "lora_E") and "default" in mod.lora_E:
                for t in (mod.lora_A["default"], mod.lora_B["default"], mod.lora_E["default"]):
                    t.copy_(torch.randn(t.shape, generator=g))
    expected = {}
    for name, mod in model.base_model.model.named_modules():
        if hasattr(mod, "lora_E") and "default" in mod.lora_E:
            expected[name] = mod.get_delta_weight("default").float()
    model.save_pretrained(str(tmp_path / "ada"))
    adapter = load_adapter(tmp_path / "ada")
    assert set(adapter.modules) == set(expected)
    for path, delta in expected.items():
        assert _rel(adapter.modules[path].delta(), delta) <= 1e-5
    # and the portable form of it is a plain LoRA that stock PEFT loads to the same deltas
    out = save_adapter(adapter, tmp_path / "lora")
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    peft = peft_deltas(out, base)
    for path, delta in expected.items():
        assert _rel(peft[path], delta) <= 1e-5


def test_legacy_bin_is_read_with_weights_only(tmp_path):
    src, base = make_adapter("llama", tmp_path / "a")
    state = load_file(str(src / "adapter_model.safetensors"))
    (src / "adapter_model.safetensors").unlink()
    torch.save(state, src / "adapter_model.bin")
    adapter = load_adapter(src)
    expected = peft_deltas(src, base)
    for path, delta in expected.items():
        assert _rel(adapter.modules[path].delta(), delta) <= 1e-5


def test_portable_config_lists_full_paths_and_drops_rank_zero(tmp_path):
    from loracompress.core.adapter import LoraModule

    src, base = make_adapter("llama", tmp_path / "a")
    adapter = load_adapter(src)
    paths = list(adapter.modules)
    modules = dict(adapter.modules)
    dropped = paths[0]
    m = modules[dropped]
    modules[dropped] = LoraModule(A=m.A[:0], B=m.B[:, :0], scale=m.scale)
    out = save_adapter(adapter.replace(modules), tmp_path / "b")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert dropped not in cfg["target_modules"]
    assert set(cfg["target_modules"]) == set(paths[1:])
    peft = peft_deltas(out, base)
    assert dropped not in peft and len(peft) == len(paths) - 1


def test_scale_conventions():
    """alpha/r, and alpha/sqrt(r) with rslora, resolved through patterns (first match wins)."""
    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp())
    src, _ = make_adapter("llama", d / "a", r=8, lora_alpha=16, use_rslora=True, rank_pattern={"q_proj": 4},
                          alpha_pattern={"q_proj": 2})
    adapter = load_adapter(src)
    q = next(m for p, m in adapter.modules.items() if p.endswith("q_proj"))
    v = next(m for p, m in adapter.modules.items() if p.endswith("v_proj"))
    assert math.isclose(q.scale, 2 / math.sqrt(4))
    assert math.isclose(v.scale, 16 / math.sqrt(8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_all_finite_catches_every_nonfinite_value_and_accepts_huge_finite_ones(dtype):
    from loracompress.core.reader import all_finite

    t = torch.randn(64, 48).to(dtype)
    assert all_finite(t)
    for bad in (float("nan"), float("inf"), float("-inf")):
        u = t.clone()
        u[17, 5] = bad
        assert not all_finite(u)
    # +inf and -inf together sum to NaN, still refused
    u = t.clone()
    u[0, 0], u[1, 1] = float("inf"), float("-inf")
    assert not all_finite(u)
    # finite values whose sum overflows the accumulator are still finite
    big = torch.full((100,), torch.finfo(dtype).max, dtype=dtype)
    assert all_finite(big)
