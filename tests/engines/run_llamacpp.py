"""Run inside the llama.cpp venv (scripts/engines/llamacpp.sh): greedy tokens and forced top-1 from llama-cpp-python.

Standalone on purpose (that venv has no loracompress): reads a JSON request on stdin, writes one
JSON answer on stdout (the line that starts with ``RESULT ``, engines log there too). Request: ``{"model": base.gguf, "lora": adapter.gguf | null, "prompts":
[[ids]], "max_tokens": N, "forced": [[ids]]}``. For each prompt, ``generated`` holds ``max_tokens``
greedy ids (argmax of the logits, no sampler); for each ``forced`` sequence, ``forced_argmax`` holds
the argmax after every position (teacher forcing) and ``forced_logprobs`` the log-probability of
the sequence's next token after every position.
"""

from __future__ import annotations

import json
import sys

import llama_cpp
import numpy as np


def main() -> None:
    req = json.load(sys.stdin)
    llm = llama_cpp.Llama(model_path=req["model"], lora_path=req.get("lora"), n_ctx=512, n_threads=2,
                          n_batch=512, logits_all=True, seed=0, verbose=False)
    generated = []
    for prompt in req["prompts"]:
        llm.reset()
        llm.eval(prompt)
        out: list[int] = []
        for _ in range(req["max_tokens"]):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(token)
            llm.eval([token])
        generated.append(out)
    forced, forced_logprobs = [], []
    for seq in req.get("forced", []):
        llm.reset()
        llm.eval(seq)
        scores = np.asarray(llm.scores[: len(seq)], dtype=np.float64)
        forced.append([int(i) for i in np.argmax(scores, axis=-1)])
        top = scores.max(axis=-1, keepdims=True)
        logz = (top + np.log(np.exp(scores - top).sum(axis=-1, keepdims=True)))[:, 0]
        # log-probability of the next token of the sequence after every position
        forced_logprobs.append([float(scores[t, seq[t + 1]] - logz[t]) for t in range(len(seq) - 1)])
    print("RESULT " + json.dumps({"generated": generated, "forced_argmax": forced, "forced_logprobs": forced_logprobs,
                                  "llama_cpp_python": llama_cpp.__version__}), flush=True)


if __name__ == "__main__":
    main()
