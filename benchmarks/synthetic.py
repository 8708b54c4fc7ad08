"""Synthetic Llama checkpoints and LoRA adapters of any size, written without building the model.

The tensor names and shapes come from the model built on the meta device; each tensor is drawn at
random (seeded, scaled like an initialised model) and written straight to its shard, so making a
3B checkpoint needs one tensor in memory, not the model. Used by ``benchmarks/scale.py`` and by the
test that bounds the streaming merge's memory.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from loracompress.core.safeio import write_safetensors_lazy

_POOL = 1 << 22
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions of a Llama-architecture model."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000
    tie: bool = False

    def config(self):  # -> transformers.LlamaConfig
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, max_position_embeddings=2048,
                           tie_word_embeddings=self.tie, pad_token_id=0, bos_token_id=1, eos_token_id=2)

    def parameters(self) -> int:
        return sum(math.prod(s) for s in _shapes(self).values())


def _shapes(shape: LlamaShape) -> dict[str, tuple[int, ...]]:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(shape.config())
    seen: set[int] = set()
    out = {}
    for name, p in model.named_parameters():  # tied duplicates once, as save_pretrained does
        if id(p) not in seen:
            seen.add(id(p))
            out[name] = tuple(p.shape)
    return out


def write_llama_checkpoint(folder: Path, shape: LlamaShape, shard_bytes: int, dtype: torch.dtype = torch.bfloat16,
                           seed: int = 0) -> list[str]:
    """Write a random-init Llama checkpoint (config, shards of about ``shard_bytes``, index). Returns shard names."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = _shapes(shape)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    groups: list[list[str]] = [[]]
    size = 0
    for name, s in shapes.items():
        nbytes = math.prod(s) * itemsize
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    names = ["model.safetensors"] if len(groups) == 1 else [
        f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    generator = torch.Generator().manual_seed(seed)
    # Drawing billions of normals takes minutes on a small CPU; tensors are cut from one random pool
    # at a random offset instead (values like an initialised model's, and no two tensors alike).
    pool = torch.empty(_POOL, dtype=dtype).normal_(0.0, 0.02, generator=generator)

    def produce(name: str) -> torch.Tensor:
        s = shapes[name]
        if name.endswith("norm.weight"):
            return torch.ones(s, dtype=dtype)
        n = math.prod(s)
        start = int(torch.randint(0, _POOL, (1,), generator=generator))
        reps = -(-(start + n) // _POOL)
        return pool.repeat(reps)[start:start + n].reshape(s).clone() if reps > 1 else pool[start:start + n].reshape(s).clone()

    for file, group in zip(names, groups):
        write_safetensors_lazy(folder / file, {n: (dtype, shapes[n]) for n in group}, produce, metadata={"format": "pt"})
    if len(names) > 1:
        weight_map = {n: f for f, g in zip(names, groups) for n in g}
        total = sum(math.prod(s) for s in shapes.values()) * itemsize
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    config = shape.config()
    config.dtype = dtype
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(str(folder))
    return names


def lora_parameters(shape: LlamaShape, r: int, targets: tuple[str, ...] = LLAMA_TARGETS) -> int:
    """The LoRA parameter count :func:`write_lora` gives: ``r · (in + out)`` for every targeted weight."""
    return sum(r * sum(s) for name, s in _shapes(shape).items()
               if name.endswith(".weight") and name[: -len(".weight")].rsplit(".", 1)[-1] in targets)


def write_lora(folder: Path, base: Path, shape: LlamaShape, r: int, targets: tuple[str, ...] = LLAMA_TARGETS,
               dtype: torch.dtype = torch.float32, seed: int = 1) -> Path:
    """A PEFT LoRA adapter folder (rank ``r`` on ``targets`` of every layer) with random non-zero factors."""
    from loracompress.core.safeio import write_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    shapes = _shapes(shape)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, s in shapes.items():
        module = name[: -len(".weight")]
        if not name.endswith(".weight") or module.rsplit(".", 1)[-1] not in targets:
            continue
        out_f, in_f = s
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = (torch.randn(r, in_f, generator=generator) / math.sqrt(in_f)).to(dtype)
        tensors[f"{key}.lora_B.weight"] = (torch.randn(out_f, r, generator=generator) * 0.01).to(dtype)
    write_safetensors(folder / "adapter_model.safetensors", tensors, {"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
              "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
              "base_model_name_or_path": str(base), "inference_mode": True}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder
