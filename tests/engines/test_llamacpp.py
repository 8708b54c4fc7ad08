"""llama.cpp (llama-cpp-python) serves our GGUF adapter of the compressed SmolLM2 adapter like PEFT.

Slow: loads SmolLM2, exports the adapter with ``export --target gguf`` and runs llama-cpp-python in
its own venv (scripts/engines/llamacpp.sh) on the Q4_1 SmolLM2 GGUF by subprocess.

The reference is PEFT on the *dequantized* Q4_1 base in fp32, so both sides hold the same weights;
llama.cpp still quantizes activations to 8 bits inside its Q4 matmuls, so log-probabilities differ a
little and single greedy tokens may flip where two candidates are close. Criterion, teacher-forced
on PEFT's greedy continuation (3 prompts x 20 tokens):

- the mean |log-prob difference| of the next token, llama.cpp + our adapter vs PEFT, is at the Q4
  noise floor: at most 1.25x that of llama.cpp without adapter vs transformers without adapter
  (the same engines, the base alone, on the base's own continuation);
- it is at most 0.6x that of llama.cpp *without* the adapter vs PEFT (the adapter is really applied);
- llama.cpp's top-1 token agrees with PEFT's at >= 90% of the positions;
- the first 3 greedy tokens of every prompt are identical.
"""

from __future__ import annotations

import pytest

from loracompress_cli.app import main
from tests.engines.smollm2 import MAX_TOKENS, run_engine

pytestmark = pytest.mark.slow

FIRST_EQUAL = 3
MIN_AGREEMENT = 0.9


def _continuation(ids: list[int], values: list, n: int) -> list:
    return values[len(ids) - 1 : len(ids) - 1 + n]


def _agreement(case, forced_argmax: list[list[int]]) -> float:
    hits = total = 0
    for ids, tokens, argmax in zip(case.prompt_ids, case.peft_tokens, forced_argmax):
        hits += sum(p == t for p, t in zip(_continuation(ids, argmax, len(tokens)), tokens))
        total += len(tokens)
    return hits / total


def _logprob_gap(case, engine_logprobs: list[list[float]], reference, tokens) -> float:
    """Mean |log p_engine(next) - log p_reference(next)| over the continuation positions."""
    gaps = []
    for ids, toks, got, ref in zip(case.prompt_ids, tokens, engine_logprobs, reference):
        for i, (value, token) in enumerate(zip(_continuation(ids, got, len(toks)), toks)):
            gaps.append(abs(value - float(ref[i, token])))
    return sum(gaps) / len(gaps)


def test_llamacpp_serves_our_gguf_adapter_like_peft(llamacpp_python, smollm2_case, tmp_path):
    case = smollm2_case
    out = tmp_path / "gguf"
    assert main(["export", str(case.compressed), "--target", "gguf", "--base-model", str(case.base_gguf),
                 "-o", str(out)]) == 0
    request = {"model": str(case.base_gguf), "prompts": case.prompt_ids, "max_tokens": MAX_TOKENS}
    with_adapter = run_engine("llamacpp", "run_llamacpp.py",
                              {**request, "lora": str(out / "adapter.gguf"), "forced": case.forced()})
    without = run_engine("llamacpp", "run_llamacpp.py",
                         {**request, "lora": None, "forced": case.forced() + case.forced(base=True)})
    n = len(case.prompt_ids)
    gap = _logprob_gap(case, with_adapter["forced_logprobs"], case.peft_logprobs, case.peft_tokens)
    gap_without = _logprob_gap(case, without["forced_logprobs"][:n], case.peft_logprobs, case.peft_tokens)
    floor = _logprob_gap(case, without["forced_logprobs"][n:], case.base_logprobs, case.base_tokens)
    agreement = _agreement(case, with_adapter["forced_argmax"])
    first_equal = [next((i for i, (a, b) in enumerate(zip(g, t)) if a != b), len(t))
                   for g, t in zip(with_adapter["generated"], case.peft_tokens)]
    print(f"llama-cpp-python {with_adapter['llama_cpp_python']}: mean |log-prob gap| to PEFT {gap:.4f} "
          f"(Q4 floor, base vs base: {floor:.4f}; without the adapter: {gap_without:.4f}); top-1 agreement "
          f"{agreement:.3f}; greedy tokens equal before the first difference: {first_equal} of {MAX_TOKENS}")
    assert gap <= 1.25 * floor
    assert gap <= 0.6 * gap_without
    assert agreement >= MIN_AGREEMENT
    assert min(first_equal) >= FIRST_EQUAL
