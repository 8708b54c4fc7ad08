"""``loracompress export --format peft|vllm|uniform``: stock PEFT reads each with the same ΔW."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from loracompress.core.reader import load_adapter
from loracompress.errors import LoraCompressError
from loracompress.export.targets import VLLM_RANKS, vllm_rank
from loracompress_cli.app import main
from tests.tiny import make_adapter, peft_deltas


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """A llama adapter pruned to heterogeneous ranks (max rank not a vLLM value), and its base."""
    root = tmp_path_factory.mktemp("targets")
    src, base = make_adapter("llama", root / "a", r=12, lora_alpha=24, rank_pattern={"q_proj": 10})
    assert main(["prune", str(src), "--budget", "0.45", "-o", str(root / "small")]) == 0
    small = load_adapter(root / "small")
    ranks = {m.rank for m in small.modules.values()}
    assert len(ranks) > 1 and small.max_rank not in VLLM_RANKS
    return root, root / "small", base


def _same_deltas(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> None:
    assert set(reference) == set(other)
    for path, delta in reference.items():
        assert torch.allclose(other[path], delta, atol=1e-6, rtol=1e-5), path


@pytest.mark.parametrize("target", ["peft", "vllm", "uniform"])
def test_target_loads_in_stock_peft_with_identical_deltas(compressed, capsys, target):
    root, small, base = compressed
    out = root / f"out-{target}"
    assert main(["export", str(small), "--target", target, "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed
    _same_deltas(peft_deltas(small, base), peft_deltas(out, base))
    config = json.loads((out / "adapter_config.json").read_text())
    ours = load_adapter(out)
    max_rank = load_adapter(small).max_rank
    assert config["lora_alpha"] == config["r"] and not config["use_rslora"]
    if target == "peft":
        assert config["r"] == max_rank
    if target == "vllm":
        assert config["r"] == vllm_rank(max_rank) > max_rank
        assert f"--max-lora-rank {config['r']}" in printed
        # vLLM ignores rank/alpha patterns and applies one global lora_alpha / r to the raw factors.
        tensors = load_file(str(out / "adapter_model.safetensors"))
        scale = config["lora_alpha"] / config["r"]
        reference = peft_deltas(small, base)
        for path, delta in reference.items():
            A = tensors[f"base_model.model.{path}.lora_A.weight"].float()
            B = tensors[f"base_model.model.{path}.lora_B.weight"].float()
            assert torch.allclose(scale * B @ A, delta, atol=1e-6, rtol=1e-5)
    if target == "uniform":
        assert {m.rank for m in ours.modules.values()} == {max_rank}
        assert not config["rank_pattern"] and not config["alpha_pattern"]


def test_uniform_to_a_chosen_rank_and_refusals(compressed, capsys):
    root, small, base = compressed
    out = root / "u16"
    assert main(["export", str(small), "--format", "uniform", "--rank", "16", "-o", str(out), "--dtype", "fp16"]) == 0
    padded = load_adapter(out)
    assert {m.rank for m in padded.modules.values()} == {16} and padded.dtype == torch.float16
    for path, delta in peft_deltas(small, base).items():
        assert torch.allclose(padded.modules[path].delta(), delta, atol=2e-3, rtol=1e-2)
    capsys.readouterr()
    for args, fix in ((["--rank", "2"], "--rank >= "), (["--rank", "100"], "smaller --rank")):
        dest = root / f"bad{args[1]}"
        assert main(["export", str(small), "--target", "uniform", *args, "-o", str(dest)]) == 2
        err = capsys.readouterr().err
        assert fix in err and len(err.strip().splitlines()) == 1
        assert not dest.exists()


def test_vllm_refuses_modules_to_save(tmp_path, capsys):
    src, _ = make_adapter("bert", tmp_path / "a", r=4)  # SEQ_CLS: PEFT saves the classifier head
    out = tmp_path / "v"
    assert main(["export", str(src), "--format", "vllm", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "modules_to_save" in err and "classifier" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert main(["export", str(src), "--format", "peft", "-o", str(out)]) == 0  # peft keeps the head


def test_vllm_rank_rounding():
    assert [vllm_rank(r) for r in (1, 2, 8, 9, 33, 257, 320, 321, 512)] == [1, 8, 8, 16, 64, 320, 320, 512, 512]
    with pytest.raises(LoraCompressError, match="up to 512"):
        vllm_rank(513)


def test_format_and_target_must_agree(compressed, capsys):
    root, small, _ = compressed
    assert main(["export", str(small), "--format", "vllm", "--target", "uniform", "-o", str(root / "x")]) == 2
    assert "disagree" in capsys.readouterr().err


def test_vllm_leaves_out_peft_copies_of_embedding_layers(tmp_path, capsys):
    """A LoRA on lm_head makes PEFT save ``lm_head.base_layer.weight`` (save_embedding_layers): the base
    model's own head, not a modules_to_save the user set. vLLM skips such tensors, so the vllm target
    leaves them out and says so; a real modules_to_save beside it is still refused by its own name."""
    from peft import LoraConfig, get_peft_model

    from tests.tiny import tiny_llama

    base = tiny_llama()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(str(tmp_path / "a"))
    copy_key = "base_model.model.lm_head.base_layer.weight"
    assert copy_key in load_file(str(tmp_path / "a" / "adapter_model.safetensors"))

    out = tmp_path / "v"
    capsys.readouterr()
    assert main(["export", str(tmp_path / "a"), "--target", "vllm", "-o", str(out)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "left out lm_head.base_layer.weight" in printed and "modules_to_save" not in printed
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert not any(".base_layer." in k for k in tensors)
    assert "base_model.model.lm_head.lora_A.weight" in tensors
    _same_deltas(peft_deltas(tmp_path / "a", base), peft_deltas(out, base))

    with_head = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "lm_head"],
                                                              modules_to_save=["model.norm"], task_type="CAUSAL_LM"))
    with_head.save_pretrained(str(tmp_path / "b"))
    assert main(["export", str(tmp_path / "b"), "--target", "vllm", "-o", str(tmp_path / "vb")]) == 2
    err = capsys.readouterr().err
    assert "modules_to_save (model.norm)" in err and "lm_head" not in err
    assert not (tmp_path / "vb").exists()


def test_export_takes_device_like_every_other_command(compressed, capsys):
    root, small, _ = compressed
    assert main(["export", str(small), "--format", "onnx", "--device", "tpu", "-o", str(root / "y")]) == 2
    assert "unknown --device 'tpu'" in capsys.readouterr().err
    assert not (root / "y").exists()
