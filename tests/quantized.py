"""Quantized base checkpoints for tests, built from the tiny models: block FP8 (as DeepSeek-V3 and Qwen3-FP8
publish it, quantized here), bitsandbytes 4-bit (saved by transformers), and folders that only claim a format."""

from __future__ import annotations

import json

import pytest
import torch

from tests.tiny import make_adapter

BLOCK = (32, 32)  # 48 and 80 are not multiples: the edge blocks are partial, as in real checkpoints' odd sizes


def quantize_fp8(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block FP8 as DeepSeek-V3 / Qwen3-FP8 publish it: e4m3 values and a scale_inv per block (W ≈ q · s)."""
    rows, cols = w.shape
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    s = torch.empty(grid, dtype=torch.float32)
    for i in range(grid[0]):
        for j in range(grid[1]):
            tile = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]].float()
            s[i, j] = tile.abs().max().clamp_min(1e-12) / 448.0
            q[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] = (tile / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def dequantize_fp8(q: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    w = q.float()
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] *= s[i, j]
    return w


def save_fp8_base(base: torch.nn.Module, folder, block=BLOCK) -> dict[str, torch.Tensor]:
    """Write ``base`` as a block-FP8 checkpoint (projections in FP8, the rest bf16); returns the
    dequantized float state dict, the weights the FP8 model computes with."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    tensors, dequantized = {}, {}
    for name, w in base.state_dict().items():
        if name.endswith("_proj.weight"):
            q, s = quantize_fp8(w, block)
            tensors[name], tensors[f"{name}_scale_inv"] = q, s
            dequantized[name] = dequantize_fp8(q, s, block)
        else:
            tensors[name] = w.to(torch.bfloat16).contiguous()
            dequantized[name] = tensors[name].float()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = base.config.to_dict()
    config.update(dtype="bfloat16", architectures=["LlamaForCausalLM"],
                  quantization_config={"quant_method": "fp8", "activation_scheme": "dynamic",
                                       "fmt": "e4m3", "weight_block_size": list(block)})
    (folder / "config.json").write_text(json.dumps(config))
    return dequantized


def quantized_folder(tmp_path, base, name, quantization_config=None, tensors=None):
    from safetensors.torch import save_file

    folder = tmp_path / name
    folder.mkdir()
    config = base.config.to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in base.state_dict().items()}
    state.update(tensors or {})
    save_file(state, str(folder / "model.safetensors"))
    return folder


def bnb4_config(compute=torch.float32):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def qlora(tmp_path):
    """A 16-bit base, its 4-bit copy saved by transformers, and an adapter saved by PEFT on the 4-bit model."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    src, base = make_adapter("llama", tmp_path / "a", r=8)
    base.save_pretrained(str(tmp_path / "base16"))
    q = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base16"), quantization_config=bnb4_config(), device_map="cpu")
    q.save_pretrained(str(tmp_path / "base4"))
    return src, base, q
