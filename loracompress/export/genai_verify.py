"""Generation under onnxruntime-genai checked against stock PEFT in PyTorch.

Both sides decode greedily from the same prompt token ids for up to ``new_tokens`` tokens and stop
at the same end-of-sequence ids. A check passes when

* the first step's logits (every prompt position, full vocabulary) are within ``tolerance`` of
  PEFT's (max abs difference), and
* the token ids are identical, except that a sequence may part ways at a step where PEFT's own top
  two logits are within ``tolerance`` of each other: a near tie that any rounding can flip (fp16
  rounding does). Such a step is reported, never hidden.

``export --engine genai`` (:mod:`.genai`) and the bank's export (:mod:`.genai_bank`) both verify through
here: :func:`peft_references` for PEFT's side, :func:`verify_folder` for the built folder's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loracompress.errors import LoraCompressError
from loracompress.export.genai_graph import CONFIG_NAME

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


def peft_references(model: torch.nn.Module, sources: Sequence[Path], prompts: list[list[int]], new_tokens: int,
                    with_base: bool) -> tuple[list[list[Reference]], list[Reference] | None]:
    """Stock PEFT's greedy references for each adapter (and the base alone); ``model`` is left unwrapped."""
    from peft import PeftModel

    peft = PeftModel.from_pretrained(model, str(sources[0]), adapter_name="a0").eval()
    for i, src in enumerate(sources[1:], start=1):
        peft.load_adapter(str(src), adapter_name=f"a{i}")
    refs = []
    for i in range(len(sources)):
        peft.set_adapter(f"a{i}")
        refs.append(peft_greedy(peft, prompts, new_tokens, eos=set()))
    base_refs = None
    if with_base:
        with peft.disable_adapter():
            base_refs = peft_greedy(peft, prompts, new_tokens, eos=set())
    peft.unload()  # the base modules back in place, unmerged
    return refs, base_refs


def stop_at_eos(refs: list[Reference], eos: set[int]) -> list[Reference]:
    """References cut after the first end-of-sequence id, as onnxruntime-genai stops there."""
    out = []
    for ref in refs:
        end = next((k + 1 for k, t in enumerate(ref.tokens) if t in eos), len(ref.tokens))
        out.append(Reference(tokens=ref.tokens[:end], first_logits=ref.first_logits, margins=ref.margins[:end]))
    return out


def eos_ids(folder: Path) -> set[int]:
    """The end-of-sequence ids of a built folder (its genai_config.json): where onnxruntime-genai stops."""
    eos = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))["model"].get("eos_token_id", [])
    return {int(e) for e in (eos if isinstance(eos, list) else [eos])}


def verify_folder(og: Any, folder: Path, prompts: list[list[int]], refs: list[list[Reference]],
                  base_refs: list[Reference] | None, adapter_files: list[str], new_tokens: int, tolerance: float) -> list[GenerationCheck]:
    """Generate under onnxruntime-genai (CPU) and compare with the references, one check per adapter."""
    model = open_model(folder, cpu=True)
    if not adapter_files:  # merged
        return [compare("merged graph", model, prompts, refs[0], new_tokens, tolerance)]
    loaded = og.Adapters(model)
    for name in adapter_files:
        loaded.load(str(folder / name), name)
    checks = [compare(name, model, prompts, ref, new_tokens, tolerance, loaded, name) for name, ref in zip(adapter_files, refs)]
    if base_refs is not None:
        checks.append(compare("base only (no adapter active)", model, prompts, base_refs, new_tokens, tolerance))
    return checks


def engine_versions(og: Any) -> dict[str, str]:
    """The versions of both sides of the check, for the report."""
    import onnxruntime
    import transformers

    try:
        import peft
        peft_version = peft.__version__
    except ImportError:  # pragma: no cover - the references need it
        peft_version = "missing"
    return {"onnxruntime-genai": og.__version__, "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft_version}
