"""Generation under onnxruntime-genai checked against stock PEFT in PyTorch.

Both sides decode greedily from the same prompt token ids for up to ``new_tokens`` tokens and stop
at the same end-of-sequence ids. A check passes when

* the first step's logits (every prompt position, full vocabulary) are within ``tolerance`` of
  PEFT's (max abs difference), and
* the token ids are identical, except that a sequence may part ways at a step where PEFT's own top
  two logits are within ``tolerance`` of each other: a near tie that any rounding can flip (fp16
  rounding does). Such a step is reported, never hidden.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loracompress.errors import LoraCompressError

log = logging.getLogger(__name__)

#: Max abs difference of first-step logits against PEFT (fp32 reference) by graph dtype. An LLM's
#: logits reach |20|; fp16 keeps about 3 significant digits of them.
DEFAULT_TOLERANCE = {"fp32": 1e-3, "fp16": 0.25}
DEFAULT_PROMPTS = (
    "The capital of France is",
    "Here is a short story about a robot who learns to paint:",
    "def fibonacci(n):",
)
DEFAULT_NEW_TOKENS = 20


@dataclass
class Reference:
    """PEFT's greedy continuation of one prompt: tokens, first-step logits, top-2 margin per step."""

    tokens: list[int]
    first_logits: np.ndarray
    margins: list[float]


@dataclass
class GenerationCheck:
    name: str
    prompts: int
    identical: int
    first_step_max_abs_diff: float
    tolerance: float
    near_ties: list[dict[str, Any]] = field(default_factory=list)
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.first_step_max_abs_diff <= self.tolerance and not self.mismatches

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "tokens_identical": f"{self.identical}/{self.prompts}"}


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    if tokenizer is None:
        raise LoraCompressError("the base model has no tokenizer; onnxruntime-genai needs one beside the graph")
    ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    if any(not x for x in ids):
        raise LoraCompressError("a verification prompt encodes to no tokens")
    return ids


@torch.no_grad()
def peft_greedy(model: torch.nn.Module, prompts: Sequence[list[int]], new_tokens: int, eos: set[int]) -> list[Reference]:
    """Greedy decoding with the KV cache, in float32, on whatever adapter ``model`` has active."""
    refs = []
    for ids in prompts:
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        first = out.logits[0].float().numpy()
        logits, past, tokens, margins = out.logits[0, -1].float(), out.past_key_values, [], []
        for _ in range(new_tokens):
            top = torch.topk(logits, 2)
            margins.append(float(top.values[0] - top.values[1]))
            token = int(top.indices[0])
            tokens.append(token)
            if token in eos:
                break
            out = model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
            logits, past = out.logits[0, -1].float(), out.past_key_values
        refs.append(Reference(tokens=tokens, first_logits=first, margins=margins))
    return refs


def open_model(folder: Path, cpu: bool = True) -> Any:
    """An ``og.Model`` of ``folder``; with ``cpu`` the providers the config names are cleared."""
    from loracompress.export.genai_graph import import_genai

    og = import_genai()
    config = og.Config(str(folder))
    if cpu:
        config.clear_providers()
    return og.Model(config)


def genai_generate(model: Any, prompt: list[int], new_tokens: int, adapters: Any = None, name: str | None = None,
                   ) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and first-step logits ``[seq, vocab]`` from ORT GenAI, ``name`` adapter active."""
    from loracompress.export.genai_graph import import_genai

    og = import_genai()
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    if name is not None:
        gen.set_active_adapter(adapters, name)
    gen.append_tokens(prompt)
    first = np.asarray(gen.get_output("logits"), dtype=np.float32)[0]
    tokens: list[int] = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return tokens, first


def compare(name: str, model: Any, prompts: Sequence[list[int]], refs: Sequence[Reference], new_tokens: int,
            tolerance: float, adapters: Any = None, adapter: str | None = None) -> GenerationCheck:
    check = GenerationCheck(name=name, prompts=len(prompts), identical=0, first_step_max_abs_diff=0.0, tolerance=tolerance)
    for i, (ids, ref) in enumerate(zip(prompts, refs)):
        tokens, first = genai_generate(model, ids, new_tokens, adapters, adapter)
        check.tokens.append(tokens)
        diff = float(np.abs(first[-ref.first_logits.shape[0]:] - ref.first_logits).max())
        check.first_step_max_abs_diff = max(check.first_step_max_abs_diff, diff)
        if tokens == ref.tokens:
            check.identical += 1
            continue
        step = next((k for k, (a, b) in enumerate(zip(tokens, ref.tokens)) if a != b), min(len(tokens), len(ref.tokens)))
        margin = ref.margins[step] if step < len(ref.margins) else float("inf")
        entry = {"prompt": i, "step": step, "reference_margin": margin, "genai": tokens[step:step + 3],
                 "peft": ref.tokens[step:step + 3]}
        (check.near_ties if margin <= tolerance else check.mismatches).append(entry)
    return check


def require_passed(checks: Sequence[GenerationCheck]) -> None:
    failed = [c for c in checks if not c.passed]
    if failed:
        c = failed[0]
        why = (f"first-step logits differ by {c.first_step_max_abs_diff:.3g} (> tolerance {c.tolerance:.3g})"
               if c.first_step_max_abs_diff > c.tolerance else
               f"generated tokens differ from PEFT's at step {c.mismatches[0]['step']} of prompt {c.mismatches[0]['prompt']}")
        raise LoraCompressError(f"{c.name} under onnxruntime-genai: {why}; nothing was written (--tolerance sets the bound)")

