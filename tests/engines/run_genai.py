"""Run inside the onnxruntime-genai venv (scripts/engines/genai.sh): export, then greedy tokens from og.

Reads a JSON request on stdin, writes one JSON answer (the stdout line that starts with ``RESULT ``).
Request: ``{"base": hf_folder, "adapters": [dir, ...], "out": folder, "dtype": "fp32", "prompts": [[ids]],
"max_tokens": N}``. The export is ``loracompress export ... --format onnx --mode adapters`` (the venv
has the project installed); the answer holds the tokens with each adapter active and with none.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def generate(og, model, ids, max_tokens, adapters=None, name=None):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + max_tokens, do_sample=False)
    gen = og.Generator(model, params)
    if name:
        gen.set_active_adapter(adapters, name)
    gen.append_tokens(ids)
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return tokens


def main() -> None:
    req = json.load(sys.stdin)
    out = Path(req["out"])
    subprocess.run([sys.executable, "-m", "loracompress", "export", *req["adapters"], "--format", "onnx", "--mode", "adapters",
                    "--dtype", req.get("dtype", "fp32"), "--base-model", req["base"], "-o", str(out)], check=True,
                   stdout=sys.stderr)
    import onnxruntime_genai as og

    config = og.Config(str(out))
    config.clear_providers()  # fp16 graphs ask for CUDA; run them on CPU here
    model = og.Model(config)
    adapters = og.Adapters(model)
    names = [Path(a).name for a in req["adapters"]]
    for name in names:
        adapters.load(str(out / f"{name}.onnx_adapter"), name)
    tokens = {name: [generate(og, model, ids, req["max_tokens"], adapters, name) for ids in req["prompts"]] for name in names}
    tokens["<base>"] = [generate(og, model, ids, req["max_tokens"]) for ids in req["prompts"]]
    report = json.loads((out / "export_report.json").read_text())
    print("RESULT " + json.dumps({"tokens": tokens, "report": {k: report[k] for k in (
        "tokens_identical", "first_step_max_abs_diff", "versions", "checks")}}))


if __name__ == "__main__":
    main()
