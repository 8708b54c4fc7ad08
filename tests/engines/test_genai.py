"""onnxruntime-genai serves two rank-heterogeneous SmolLM2 adapters and no adapter from one graph like PEFT.

Slow: builds the shared case (tests/engines/smollm2.py: r=16 on all projections, pruned to
--budget 0.3) and a second cut of the same LoRA at --budget 0.15, exports both with
``export --format onnx --mode adapters`` in the genai venv (scripts/engines/genai.sh), and generates
there with ``og.Adapters``. Criterion (fp32 on both sides): greedy token ids identical to PEFT's for
every prompt, with each adapter active and with none, all on the same graph.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.engines.smollm2 import MAX_TOKENS, greedy, run_engine

pytestmark = pytest.mark.slow


def test_genai_serves_two_ranked_adapters_and_none_like_peft(genai_python, smollm2_case, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loracompress.core.reader import load_adapter

    case = smollm2_case
    second = tmp_path / "compressed-0.15"
    subprocess.run([sys.executable, "-m", "loracompress", "prune", str(case.original), "--budget", "0.15", "-o", str(second)],
                   check=True, capture_output=True, timeout=600)
    ranks2 = load_adapter(second).ranks
    assert ranks2 != case.ranks and len(set(ranks2.values())) > 4
    base = AutoModelForCausalLM.from_pretrained(str(case.base_dir), dtype=torch.float32).eval()
    second_tokens = greedy(PeftModel.from_pretrained(base, str(second)).eval(), case.prompt_ids)

    answer = run_engine("genai", "run_genai.py", {
        "base": str(case.base_dir), "adapters": [str(case.compressed), str(second)], "out": str(tmp_path / "genai"),
        "prompts": case.prompt_ids, "max_tokens": MAX_TOKENS})
    tokens = answer["tokens"]
    assert tokens[case.compressed.name] == case.peft_tokens
    assert tokens[second.name] == second_tokens
    assert tokens["<base>"] == case.base_tokens
    assert case.peft_tokens != case.base_tokens  # the adapter changes what is generated
    report = answer["report"]
    print(f"onnxruntime-genai {report['versions']['onnxruntime-genai']}: tokens identical on {len(case.prompt_ids)} prompts x "
          f"{MAX_TOKENS} for 2 adapters ({len(set(case.ranks.values()))} and {len(set(ranks2.values()))} distinct ranks) "
          f"and none, one graph; export check {report['tokens_identical']}, first-step logits within "
          f"{report['first_step_max_abs_diff']:.3g}")
