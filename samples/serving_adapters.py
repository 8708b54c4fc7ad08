#!/usr/bin/env python
"""Rank-heterogeneous SmolLM2 adapters for the serving tests and benchmarks, made in seconds.

Two stock PEFT LoRA adapters (r=16, alpha=32, on all seven projections of all 30 layers) with a
geometric singular spectrum, compressed by the training-free SVD cut (``prune --budget``) so
their modules end up with many different ranks, plus the first one padded back to uniform rank
16 (``export --target uniform``): the same function at the cost of the largest rank everywhere.

The factors are random (seeded), not trained: the serving checks compare token ids of an engine
with PEFT's on the same adapter, which needs an adapter that changes the output, not a useful one.
Only the GGUF's config is read here (the shapes); no weights are loaded.

    python samples/serving_adapters.py OUT_DIR     # writes OUT_DIR/{small-a,small-b,small-a-uniform}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from base_model_path import base_model_path  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: name -> (seed, budget); different budgets give different rank patterns.
ADAPTERS = {"small-a": (1, "0.3"), "small-b": (2, "0.15")}


def module_shapes(config) -> dict[str, tuple[int, int]]:
    """``path -> (in, out)`` of every projection of a Llama-style config."""
    h, inter = config.hidden_size, config.intermediate_size
    head = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head, config.num_key_value_heads * head
    shapes = {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
              "self_attn.o_proj": (q, h), "mlp.gate_proj": (h, inter), "mlp.up_proj": (h, inter),
              "mlp.down_proj": (inter, h)}
    return {f"model.layers.{i}.{name}": s for i in range(config.num_hidden_layers) for name, s in shapes.items()}


def random_adapter(shapes: dict[str, tuple[int, int]], seed: int, r: int = 16, alpha: int = 32,
                   base_id: str = "HuggingFaceTB/SmolLM2-135M-Instruct"):
    """A PEFT-format LoRA with spectrum ``0.75**i`` times a log-normal per-module strength (so the
    SVD cut keeps very different ranks); ΔW is a few percent of a SmolLM2 weight's norm."""
    from loracompress import Adapter, LoraModule

    g = torch.Generator().manual_seed(seed)
    spectrum = torch.tensor([0.75**i for i in range(r)])
    modules = {}
    for path, (in_f, out_f) in shapes.items():
        A = torch.randn(r, in_f, generator=g) / in_f**0.5
        strength = float(torch.exp(0.8 * torch.randn((), generator=g)))
        B = torch.randn(out_f, r, generator=g) * spectrum[None, :] * (0.02 * strength)
        modules[path] = LoraModule(A=A, B=B, scale=alpha / r)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "target_modules": list(TARGETS),
              "bias": "none", "lora_dropout": 0.0, "fan_in_fan_out": False, "use_rslora": False,
              "base_model_name_or_path": base_id}
    return Adapter(modules=modules, config=config)


def make_serving_adapters(out: Path) -> dict[str, Path]:
    """Write the compressed adapters and the padded copy under ``out``; returns name -> folder."""
    from transformers import AutoConfig

    from loracompress import Budget, compress_svd, save_adapter
    from loracompress.export.targets import pad_to_rank

    gguf = base_model_path("smollm2")
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    shapes = module_shapes(config)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, (seed, budget) in ADAPTERS.items():
        small = compress_svd(random_adapter(shapes, seed), Budget.parse(budget)).adapter
        paths[name] = save_adapter(small, out / name, force=True)
        if name == "small-a":
            padded = pad_to_rank(small, small.max_rank)
            paths["small-a-uniform"] = save_adapter(padded, out / "small-a-uniform", force=True)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    from loracompress import load_adapter

    for name, path in make_serving_adapters(args.out).items():
        ranks = load_adapter(path).ranks
        print(json.dumps({"adapter": name, "path": str(path), "modules": len(ranks),
                          "distinct_ranks": sorted(set(ranks.values()))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
