"""Run inside the vLLM venv (scripts/engines/vllm.sh): greedy tokens from vLLM with a LoRA adapter.

Standalone on purpose (that venv has no loracompress): reads a JSON request on stdin, writes one
JSON answer (the stdout line that starts with ``RESULT ``). Request: ``{"model": hf_folder, "lora": adapter_dir | null,
"max_lora_rank": 16, "prompts": [[ids]], "max_tokens": N, "logprobs": 5}``.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    req = json.load(sys.stdin)
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    llm = LLM(model=req["model"], dtype="float32", enable_lora=req.get("lora") is not None,
              max_lora_rank=req.get("max_lora_rank", 16), max_loras=1, max_model_len=256, seed=0,
              enforce_eager=True)
    params = SamplingParams(temperature=0.0, max_tokens=req["max_tokens"], logprobs=req.get("logprobs", 5))
    lora = LoRARequest("adapter", 1, req["lora"]) if req.get("lora") else None
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in req["prompts"]], params, lora_request=lora)
    generated, logprobs = [], []
    for o in outputs:
        c = o.outputs[0]
        generated.append(list(c.token_ids))
        logprobs.append([{str(t): float(lp.logprob) for t, lp in step.items()} for step in (c.logprobs or [])])
    print("RESULT " + json.dumps({"generated": generated, "logprobs": logprobs, "vllm": vllm.__version__}))


if __name__ == "__main__":
    main()
