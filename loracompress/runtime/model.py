"""Loading the base model an adapter belongs to, offline.

``--base-model`` may be a local Hugging Face model folder, a hub id already in the local cache,
or a ``.gguf`` file (dequantized on load). By default it is the adapter's
``base_model_name_or_path``. The head follows the adapter's ``task_type``; heads saved in
``modules_to_save`` are restored, with the number of labels taken from the saved head's shape.
Nothing is ever downloaded, and ``trust_remote_code`` is off unless the user turns it on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from loracompress.core.adapter import KEY_PREFIX, Adapter, base_param_name
from loracompress.errors import LoraCompressError, brief
from loracompress.runtime.layers import check_fit
from loracompress.runtime.quantized import refuse_packed

log = logging.getLogger(__name__)

# task_type -> transformers auto class name
_AUTO = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
# Where heads live in common architectures, to read num_labels off a saved head.
_HEAD_NAMES = ("classifier", "score", "classifier.out_proj", "qa_outputs")


@dataclass
class BaseModel:
    """A loaded base model, its tokenizer (if any) and where it came from."""

    model: nn.Module
    tokenizer: Any
    source: str
    task_type: str | None
    gguf_file: str | None = None
    #: (base vocabulary, adapter's) when the adapter was saved after resizing the vocabulary.
    vocab_resized: tuple[int, int] | None = None
    #: why ``tokenizer`` is None when the user can fix it (a tokenizer that needs custom code)
    tokenizer_problem: str | None = None

    @property
    def is_causal_lm(self) -> bool:
        return self.task_type == "CAUSAL_LM" or (self.task_type is None and hasattr(self.model, "lm_head"))

    def check_tokenizer(self) -> None:
        """Raise the real reason there is no tokenizer when the user can fix it (it needs custom code);
        a plain missing tokenizer is refused where it is used (:func:`~loracompress.runtime.data.make_batches`)."""
        if self.tokenizer is None and self.tokenizer_problem:
            raise LoraCompressError(self.tokenizer_problem)


def resolve_base_model(spec: str | Path | None, adapter: Adapter) -> str:
    """The base model to load: the user's ``--base-model`` or the adapter's own record of it."""
    name = str(spec) if spec else adapter.config.get("base_model_name_or_path")
    if not name:
        raise LoraCompressError(
            "the adapter does not name its base model (base_model_name_or_path is empty); pass --base-model PATH"
        )
    return name


def _num_labels(adapter: Adapter) -> int | None:
    for head in _HEAD_NAMES:
        w = adapter.extra_tensors.get(f"{KEY_PREFIX}{head}.weight")
        if w is None:
            w = adapter.extra_tensors.get(f"{KEY_PREFIX}{head}.modules_to_save.default.weight")
        if w is not None and w.ndim == 2:
            return int(w.shape[0])
    return None


def load_base_model(
    spec: str | Path | None,
    adapter: Adapter,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    with_tokenizer: bool = True,
    quantization_config: Any = None,
) -> BaseModel:
    """Load the base model for ``adapter``, restore its ``modules_to_save``, check that it fits.

    The weights are read straight into ``dtype`` on ``device`` (a GPU gets them through ``device_map``):
    never a float32 copy in host RAM first. ``quantization_config`` (a ``BitsAndBytesConfig``, see
    :mod:`loracompress.runtime.placement`) loads a quantized base onto ``device`` (CPU or GPU, wherever
    bitsandbytes runs; :func:`~loracompress.runtime.placement.check_bitsandbytes` checked it).
    """
    transformers.utils.logging.disable_progress_bar()
    name = resolve_base_model(spec, adapter)
    task = adapter.config.get("task_type")
    task = str(task).upper() if task else None
    auto_name = _AUTO.get(task or "", "AutoModelForCausalLM" if task is None else None)
    if auto_name is None:
        raise LoraCompressError(f"task_type {task!r} is not supported; supported: {', '.join(_AUTO)}")
    auto = getattr(transformers, auto_name)
    # adapter_kwargs: transformers looks for an adapter_config.json in the repo first and does not pass
    # local_files_only on to that lookup, so without it an uncached id goes to the network (with retries).
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code,
                              "adapter_kwargs": {"local_files_only": True}}
    num_labels = _num_labels(adapter)
    if task in ("SEQ_CLS", "TOKEN_CLS") and num_labels is not None:
        kwargs["num_labels"] = num_labels
        # The adapter's head replaces the checkpoint's (restore_modules_to_save below), so a
        # checkpoint head with another number of classes is expected, not an error.
        kwargs["ignore_mismatched_sizes"] = True
    if str(device) != "cpu" or quantization_config is not None:
        kwargs["device_map"] = {"": str(device)}  # each shard straight onto the device
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    path = Path(name).expanduser()
    gguf_file = None
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise LoraCompressError(f"GGUF file {path} not found; pass --base-model with an existing .gguf file")
        if quantization_config is not None:
            raise LoraCompressError("--load-in-4bit/--load-in-8bit need a Hugging Face model folder, not a .gguf file; "
                                    "drop the flag (the GGUF is dequantized) or pass the folder")
        gguf_file = path.name
        load_from: str = str(path.parent)
        kwargs["gguf_file"] = gguf_file
    elif path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise LoraCompressError(f"{path} is not a Hugging Face model folder (no config.json); pass --base-model PATH")
        load_from = str(path)
    elif _looks_like_path(name):
        raise LoraCompressError(f"base model folder {path} does not exist; pass --base-model with an existing folder")
    else:
        load_from = name  # a hub id: only its local cache is used
    try:
        with _quiet_transformers():
            model = auto.from_pretrained(load_from, dtype=dtype, **kwargs)
    except OSError as err:
        if gguf_file or path.exists():  # a local folder or file: nothing was to be downloaded
            raise LoraCompressError(
                f"cannot load base model {name!r} ({brief(err, 140)}); its folder is incomplete or unreadable: "
                "re-download or re-save it"
            ) from None
        raise LoraCompressError(
            f"cannot load base model {name!r} offline ({brief(err, 140)}); pass --base-model with a local model folder or .gguf file"
        ) from None
    except ValueError as err:
        if needs_custom_code(err):
            raise custom_code_error(name) from None
        raise LoraCompressError(f"cannot load base model {name!r}: {brief(err, 200)}") from None
    except Exception as err:  # noqa: BLE001 - corrupt weights surface as SafetensorError, struct.error, ...
        log.debug("loading %s failed", name, exc_info=True)
        refuse_packed(name, "loading it")  # a GPTQ/AWQ/... base is not damaged: say what it is
        raise LoraCompressError(
            f"cannot load base model {name!r} ({brief(err, 140)}); its files look damaged: re-download or re-save it"
        ) from None
    model.eval()
    tokenizer, tokenizer_problem = None, None
    if with_tokenizer:
        with _quiet_transformers():
            tokenizer, tokenizer_problem = _load_tokenizer(load_from, gguf_file, trust_remote_code, name)
    resized = restore_modules_to_save(model, adapter, name)
    check_fit(model, adapter, base_name=f"base model {name!r}")
    if quantization_config is None:
        model.to(device)  # a no-op after device_map; a quantized model refuses .to()
    return BaseModel(model=model, tokenizer=tokenizer, source=name, task_type=task, gguf_file=gguf_file,
                     vocab_resized=resized, tokenizer_problem=tokenizer_problem)


def needs_custom_code(err: BaseException) -> bool:
    """Whether transformers refused to load something because it needs ``trust_remote_code``."""
    return "trust_remote_code" in str(err) or "custom code" in str(err)


def custom_code_error(name: str, what: str = "") -> LoraCompressError:
    """The one message for a base (or its ``what``: "tokenizer") that needs its own code to load."""
    subject = f"the {what} of base model {name!r}" if what else f"base model {name!r}"
    return LoraCompressError(f"{subject} needs custom code (auto_map); review it, then pass --trust-remote-code")


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Mute transformers' warnings while loading (``--debug`` keeps them).

    A checkpoint of the wrong architecture makes it log a multi-line "LOAD REPORT" to stderr;
    :func:`check_fit` then says what is wrong in one line that names the fix.
    """
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        yield
        return
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.utils.logging.set_verbosity(verbosity)


def _looks_like_path(name: str) -> bool:
    """``./m``, ``/abs/m``, ``~/m``, ``a/b/c`` are folders; a hub id is ``name`` or ``org/name``."""
    return name.startswith((".", "/", "~", os.sep)) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def _load_tokenizer(load_from: str, gguf_file: str | None, trust_remote_code: bool,
                    name: str | None = None) -> tuple[Any, str | None]:
    """The tokenizer, or None and why not when that is something the user can fix (its custom code): a
    command that needs no tokenizer (merge) goes on without one, one that does says the real reason."""
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        tok = AutoTokenizer.from_pretrained(load_from, **kwargs)
    except (OSError, ValueError, TypeError) as err:
        log.debug("no tokenizer for %s: %s", load_from, err)
        if needs_custom_code(err):
            return None, str(custom_code_error(name or load_from, "tokenizer"))
        return None, None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok, None


def saved_vocab_size(model: nn.Module, adapter: Adapter) -> int | None:
    """The vocabulary size of the adapter's saved embeddings when it differs from the model's.

    An adapter trained after ``resize_token_embeddings`` (new tokens) carries the resized input
    embeddings and head (``save_embedding_layers``); their row count is the vocabulary it needs.
    """
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    names = embedding_param_names(model)
    for key, tensor in adapter.extra_tensors.items():
        bare = base_param_name(key)
        if bare in names and tensor.ndim == 2 and bare in shapes and tensor.shape[1] == shapes[bare][1] \
                and tensor.shape[0] != shapes[bare][0]:
            return int(tensor.shape[0])
    return None


def embedding_param_names(model: nn.Module) -> set[str]:
    """Every parameter name of the input embeddings and the output head (tied names included)."""
    wanted = set()
    for get in ("get_input_embeddings", "get_output_embeddings"):
        try:
            layer = getattr(model, get)()
        except (AttributeError, NotImplementedError):
            layer = None
        if layer is not None and getattr(layer, "weight", None) is not None:
            wanted.add(id(layer.weight))
    return {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in wanted}


def restore_modules_to_save(model: nn.Module, adapter: Adapter, name: str | None = None) -> tuple[int, int] | None:
    """Copy the adapter's ``modules_to_save`` tensors (e.g. a trained classifier head) into the model.

    When the adapter's saved embeddings have another vocabulary size than the model's, the model's
    embeddings are resized to it first, as PEFT does when it loads such an adapter; returns
    ``(old, new)`` vocabulary sizes then, else ``None``.
    """
    if not adapter.extra_tensors:
        return None
    resized = None
    vocab = saved_vocab_size(model, adapter)
    if vocab is not None and hasattr(model, "resize_token_embeddings"):
        old = int(model.get_input_embeddings().weight.shape[0])
        # Every new row is overwritten by the adapter's saved copy: no need for mean initialisation.
        model.resize_token_embeddings(vocab, mean_resizing=False)
        log.info("resized the base model's vocabulary from %d to %d tokens, the size of the adapter's saved "
                 "embeddings (as PEFT does)", old, vocab)
        resized = (old, vocab)
    state = model.state_dict()
    params = dict(model.named_parameters(remove_duplicate=False))  # tied weights under every name
    base = f"base model {name!r}" if name else "the base model"
    for key, tensor in adapter.extra_tensors.items():
        bare = base_param_name(key)
        if bare not in state:
            raise LoraCompressError(
                f"the adapter carries {bare} (modules_to_save) but {base} has no such tensor; wrong --base-model?"
            )
        if tuple(state[bare].shape) != tuple(tensor.shape):
            raise LoraCompressError(
                f"{bare}: the adapter's saved tensor is {tuple(tensor.shape)} but {base} has "
                f"{tuple(state[bare].shape)}; wrong --base-model?"
            )
        target = params[bare] if bare in params else model.get_buffer(bare)
        with torch.no_grad():
            target.copy_(tensor.to(target.dtype))
    return resized


@dataclass
class BaseStructure:
    """A base model's structure without its weights: what a streaming merge needs to plan.

    ``model`` lives on the meta device (no memory); ``folder`` is the local folder of the checkpoint.
    """

    model: nn.Module
    config: Any
    tokenizer: Any
    folder: Path
    source: str
    task_type: str | None
    vocab_resized: tuple[int, int] | None = None


def load_base_structure(spec: str | Path | None, adapter: Adapter, *, trust_remote_code: bool = False) -> BaseStructure | str:
    """The structure :func:`load_base_model` would build for ``adapter``, built on the meta device.

    Returns a reason (a string) instead when the base is not a local Hugging Face folder (a GGUF file,
    an uncached id, a path that is not a model folder): those are loaded whole by
    :func:`load_base_model`, which also says what is wrong with a bad one. A structure that does not
    fit the adapter raises the same error :func:`load_base_model` would.
    """
    transformers.utils.logging.disable_progress_bar()
    name = resolve_base_model(spec, adapter)
    path = Path(name).expanduser()
    task = adapter.config.get("task_type")
    task = str(task).upper() if task else None
    auto_name = _AUTO.get(task or "", "AutoModelForCausalLM" if task is None else None)
    if auto_name is None:
        return f"task_type {task!r} is not supported"
    if path.suffix.lower() == ".gguf":
        return "a GGUF base is dequantized in memory"
    if path.exists():
        if not (path.is_dir() and (path / "config.json").is_file()):
            return "not a model folder"
        folder = path
    elif _looks_like_path(name):
        return "no such folder"
    else:
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(name, local_files_only=True))
        except Exception as err:  # noqa: BLE001 - not in the local cache, or not a valid id
            return f"not in the local cache ({type(err).__name__})"
    overrides: dict[str, Any] = {}
    num_labels = _num_labels(adapter)
    if task in ("SEQ_CLS", "TOKEN_CLS") and num_labels is not None:
        overrides["num_labels"] = num_labels
    try:
        with _quiet_transformers():
            config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True,
                                                             trust_remote_code=trust_remote_code, **overrides)
            with torch.device("meta"):
                model = getattr(transformers, auto_name).from_config(config, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - load_base_model reports a bad config with its fix
        log.debug("cannot build %s on the meta device", name, exc_info=True)
        return f"the model cannot be built from its config ({type(err).__name__})"
    resized = None
    vocab = saved_vocab_size(model, adapter)
    if vocab is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        resized = (int(text.vocab_size), vocab)
        text.vocab_size = vocab
        with torch.device("meta"):
            model = getattr(transformers, auto_name).from_config(config, trust_remote_code=trust_remote_code)
        log.info("resizing the base model's vocabulary from %d to %d tokens, the size of the adapter's saved "
                 "embeddings (as PEFT does)", *resized)
    model.eval()
    check_fit(model, adapter, base_name=f"base model {name!r}")
    with _quiet_transformers():
        tokenizer, _ = _load_tokenizer(str(folder), None, trust_remote_code)
    return BaseStructure(model=model, config=config, tokenizer=tokenizer, folder=folder, source=name,
                         task_type=task, vocab_resized=resized)
