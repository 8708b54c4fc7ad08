"""Reading a PEFT LoRA folder exactly as PEFT reads it (:func:`load_adapter`): every LoRA variant that leaves
the base alone, the config's scope (:mod:`loracompress.core.scope`), ``.safetensors`` or a legacy ``.bin``
read with ``weights_only=True``; everything else refused with a one-line error naming the feature."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import stat
import warnings
from pathlib import Path
from typing import Any

import torch

from loracompress.core.adapter import (
    BIN_NAME,
    CONFIG_NAME,
    SAFETENSORS_NAME,
    Adapter,
    LoraModule,
    natural_key,
)
from loracompress.core.dtypes import DTYPE_NAMES, common_dtype
from loracompress.core.scope import Scope, Skipped, split_tensors, summary
from loracompress.core.validate import require_type
from loracompress.errors import LoraCompressError

log = logging.getLogger(__name__)

# Config fields naming PEFT features whose weights or forward pass differ from plain LoRA.
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (use_dora=true)",
    "lora_bias": "LoRA bias (lora_bias=true)",
    "use_qalora": "QALoRA (use_qalora=true)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "layer_replication": "layer replication (layer_replication)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "kasa_config": "KaSA (kasa_config: it changes the base weights and adds lora_diag)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "arrow_config": "Arrow routing (arrow_config)",
}


def _pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's rule: the first pattern whose regex matches a suffix of ``path`` wins."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", path):
                return value
        except re.error as err:
            raise LoraCompressError(
                f"adapter_config.json has an invalid pattern {key!r} ({err}): fix or remove that pattern key"
            ) from None
    return default


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise LoraCompressError(f"{directory}: no {CONFIG_NAME} found; point to a PEFT adapter folder (save_pretrained output)")
    try:
        # utf-8-sig: editors on Windows save JSON with a byte-order mark; the content is fine.
        config = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LoraCompressError(f"{path}: not valid JSON ({err}); restore the file from the training run") from None
    if not isinstance(config, dict):
        raise LoraCompressError(f"{path}: expected a JSON object, got {type(config).__name__}; restore the file from the training run")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in ("LORA", "ADALORA"):
        what = f"peft_type {config.get('peft_type')!r}" if "peft_type" in config else "no peft_type"
        raise LoraCompressError(f"{path}: {what}; loracompress reads LoRA and AdaLoRA adapters (peft_type LORA/ADALORA)")
    for name, feature in _UNSUPPORTED_FLAGS.items():
        value = config.get(name)
        if value not in (None, False, [], {}, ""):
            raise LoraCompressError(f"{path}: {feature} is not supported; only plain LoRA weights can be compressed")
    if config.get("bias", "none") != "none":
        raise LoraCompressError(
            f"{path}: bias={config['bias']!r} is not supported (the trained biases would be lost); retrain with bias='none'"
        )
    if peft_type == "LORA":  # AdaLoRA layers only test init_lora_weights for truth
        _check_init(config.get("init_lora_weights", True), path)
    for key in ("r", "lora_alpha", "init_r"):
        if key in ("r", "lora_alpha") or config.get(key) is not None:
            _check_positive(config.get(key, 8), f"{path}: {key}", integer=key != "lora_alpha")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise LoraCompressError(f"{path}: {key} must be an object mapping module patterns to values")
        if key == "rank_pattern" and peft_type == "ADALORA":
            _check_adalora_masks(patterns, path)
            continue
        for pattern, value in patterns.items():
            _check_positive(value, f"{path}: {key}[{pattern!r}]", integer=key == "rank_pattern")
    for key in ("use_rslora", "fan_in_fan_out"):
        if config.get(key) not in (None, True, False):
            raise LoraCompressError(f"{path}: {key}={config[key]!r} must be true or false; fix adapter_config.json")
    return config


def _check_init(value: Any, path: Path) -> None:
    """Refuse the ``init_lora_weights`` values for which ``W + s·B·A`` is not what the adapter learned.

    Mirrors what PEFT's ``LoraLayer.update_layer`` does with each value when it loads an adapter.
    A PiSSA/OLoRA/CorDA/LoRA-GA adapter saved *with* ``path_initial_model_for_weight_conversion``
    has ``init_lora_weights: true`` (and doubled rank) and is plain LoRA.
    """
    if value is None or isinstance(value, bool) or value == "":
        return
    if not isinstance(value, str):
        raise LoraCompressError(f"{path}: init_lora_weights={value!r} must be true, false or a PEFT init name; fix adapter_config.json")
    name = _base_changing_init(value)
    if name is not None:
        raise LoraCompressError(
            f"{path}: init_lora_weights={value!r}: {name} trained this adapter against a changed base weight, so it cannot "
            "be merged, served or compressed as saved; convert it to plain LoRA with PEFT's "
            "`path_initial_model_for_weight_conversion` (save_pretrained) and pass the converted folder"
        )
    if value == "loftq":
        raise LoraCompressError(
            f"{path}: init_lora_weights='loftq': PEFT re-quantizes the base model when it loads this adapter; save it with "
            "init_lora_weights=true beside its LoftQ base model (as PEFT's LoftQ example does) and pass that base as --base-model"
        )
    # What PEFT builds without touching the base: gaussian and mica (any case), eva, orthogonal.
    if value.lower() not in ("gaussian", "mica") and value not in ("eva", "orthogonal"):
        raise LoraCompressError(
            f"{path}: init_lora_weights={value!r} is not an init PEFT knows, and PEFT refuses to load it; set it to true "
            "in adapter_config.json (trained weights do not depend on it)"
        )


def _base_changing_init(value: str) -> str | None:
    """The method name when PEFT's init subtracts ``s·B0·A0`` from the base weight as it builds the layer.

    Such an adapter was trained against ``W - s·B0·A0``, so ``W + s·B·A`` (our merge, and PEFT's own
    load for LoRA-GA, which skips the subtraction without its gradients) is not what it learned.
    PEFT tests these exactly like this: prefixes for PiSSA (``pissa_niter_N``) and CorDA, OLoRA in any case.
    """
    if value.startswith("pissa"):
        return "PiSSA"
    if value.startswith("corda"):
        return "CorDA"
    if value.lower() == "olora":
        return "OLoRA"
    if value == "lora_ga":
        return "LoRA-GA"
    return None


def _check_adalora_masks(patterns: dict[str, Any], path: Path) -> None:
    """AdaLoRA's ``rank_pattern``: ``{"<module>.lora_E": [true, false, ...]}``, the components it kept."""
    for key, mask in patterns.items():
        if not (isinstance(mask, list) and all(isinstance(b, bool) for b in mask)) or ".lora_E" not in key:
            raise LoraCompressError(
                f"{path}: rank_pattern[{key!r}]={str(mask)[:40]} is not an AdaLoRA mask (a list of true/false keyed by "
                "'<module>.lora_E'); use the adapter_config.json saved with these weights"
            )


def _adalora_masks(config: dict[str, Any]) -> dict[str, list[bool]]:
    """Module path -> kept-component mask, keys stripped as PEFT's AdaLoraModel does (``….lora_E[.adapter]``)."""
    return {key.split(".lora_E")[0]: mask for key, mask in (config.get("rank_pattern") or {}).items()}


def _check_positive(value: Any, what: str, integer: bool) -> None:
    """Ranks are positive integers, alphas positive finite numbers (JSON also allows NaN, 1e999, "8")."""
    if integer:
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        kind = "a positive integer" if integer else "a positive number"
        raise LoraCompressError(f"{what}={value!r} must be {kind}; fix adapter_config.json")


def _read_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    st_path, bin_path = directory / SAFETENSORS_NAME, directory / BIN_NAME
    if st_path.is_file():
        from loracompress.core.safeio import read_safetensors

        return read_safetensors(st_path)
    if bin_path.is_file():
        try:
            # weights_only=True: a pickle from the internet must never run code.
            with warnings.catch_warnings():  # torch warns about pickle protocols on stderr; the error says it all
                warnings.simplefilter("ignore")
                state = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
            raise LoraCompressError(
                f"{bin_path}: cannot be read safely ({_unpickling_detail(err)[:160]}); re-save the adapter as safetensors"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise LoraCompressError(f"{bin_path}: not a state dict of tensors; re-save the adapter with save_pretrained")
        return dict(state), {}
    for path in (st_path, bin_path):
        if os.path.lexists(path):  # there, but a device, a FIFO, a folder or a dangling link: not "missing"
            what = "a broken symlink" if not path.exists() else _file_kind(path)
            raise LoraCompressError(
                f"{path} is {what}, not a regular file; put the adapter weights file itself next to {CONFIG_NAME}"
            )
    raise LoraCompressError(
        f"{directory}: no {SAFETENSORS_NAME} or {BIN_NAME}; the adapter weights are missing: copy them next to {CONFIG_NAME}"
    )


def _file_kind(path: Path) -> str:
    """What ``path`` (followed through links) is, in words, when it is not a regular file."""
    mode = path.stat().st_mode
    for test, word in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return word + (" (through a symlink)" if path.is_symlink() else "")
    return "not a regular file"


def _unpickling_detail(err: Exception) -> str:
    """The informative line of torch's weights-only error (which also suggests weights_only=False: never)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).split("WeightsUnpickler error:")[-1]
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1)", "(2)")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    detail = next((line for line in lines if not line.startswith(boilerplate)), lines[0] if lines else type(err).__name__)
    return detail.split(". Please use")[0]  # torch goes on to explain how to allowlist the global: no


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``, in one reduction pass for the common (finite) case.

    NaN and ±Inf propagate through a sum, so a finite sum proves every element finite. A sum of
    finite values can itself overflow (fp32/bf16 values near 1e38; never fp16 ones in float32), so
    a non-finite sum is confirmed elementwise. ``isfinite(t).all()`` builds a boolean tensor of
    ``t``'s size and was a quarter of the training-free cut's time on a 7B-shaped fp16 adapter.
    """
    if not t.is_floating_point():
        return True
    if bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())


def load_adapter(path: str | Path, allow_nonfinite: bool = False) -> Adapter:
    """Read a PEFT LoRA (or AdaLoRA) adapter folder.

    Per-module scales follow PEFT exactly: ``alpha / r`` (or ``alpha / √r`` with ``use_rslora``),
    ``r`` and ``alpha`` resolved through ``rank_pattern`` / ``alpha_pattern``. AdaLoRA's ``E``
    is folded into ``B``.

    Raises:
        LoraCompressError: for anything wrong with the files, with a message naming the fix.
    """
    require_type("load_adapter(path)", path, (str, os.PathLike), "the adapter folder's path")
    require_type("load_adapter(allow_nonfinite)", allow_nonfinite, bool, "True or False")
    directory = Path(path)
    if not directory.exists():
        raise LoraCompressError(f"{directory}: no such folder; pass the folder that holds {CONFIG_NAME}")
    if directory.is_file():
        if directory.name in (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME):
            directory = directory.parent
        else:
            raise LoraCompressError(f"{directory}: is a file; pass the adapter folder that holds {CONFIG_NAME}")
    config = _read_config(directory)
    scope = Scope.from_config(config, str(directory / CONFIG_NAME))
    tensors, metadata = _read_tensors(directory)
    if not tensors:
        raise LoraCompressError(f"{directory}: the weights file holds no tensors; re-save the adapter")

    is_adalora = str(config.get("peft_type")).upper() == "ADALORA"
    parts, extra, skipped = _parts_in_scope(directory, scope, tensors, is_adalora)

    r_default = config.get("r", 8)
    alpha_default = config.get("lora_alpha", 8)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    use_rslora = bool(config.get("use_rslora", False))
    # AdaLoRA after training: rank_pattern holds the kept-component masks (PEFT saves only the kept ones).
    masks = _adalora_masks(config) if is_adalora else {}
    dtypes: set[torch.dtype] = set()
    modules: dict[str, LoraModule] = {}
    for mpath in sorted(parts, key=natural_key):
        p = parts[mpath]
        missing = [n for n in ("A", "B") if n not in p] + (["E"] if is_adalora and "E" not in p else [])
        if missing:
            raise LoraCompressError(
                f"{directory}: module {mpath} has no lora_{missing[0]} tensor; the file is incomplete: re-save the adapter"
            )
        A, B = p["A"], p["B"]
        if A.ndim != 2 or B.ndim != 2:
            raise LoraCompressError(
                f"{directory}: module {mpath} has {A.ndim}-D LoRA weights; only Linear/Conv1D layers are supported (not Conv2d)"
            )
        if A.shape[0] != B.shape[1]:
            raise LoraCompressError(
                f"{directory}: module {mpath}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} disagree on the rank; "
                "the file is corrupt: re-save the adapter"
            )
        r = A.shape[0]
        if r > min(A.shape[1], B.shape[0]):
            raise LoraCompressError(
                f"{directory}: module {mpath} has rank {r} > min(in={A.shape[1]}, out={B.shape[0]}); the weights are not a LoRA of this layer"
            )
        dtypes.update((A.dtype, B.dtype))
        if is_adalora:
            E = p["E"].reshape(-1)
            if E.numel() != r:
                raise LoraCompressError(f"{directory}: module {mpath}: lora_E has {E.numel()} values for rank {r}")
            # PEFT saves only the components the mask keeps and sizes the layer to sum(mask) when it loads.
            mask = masks.get(mpath)
            if mask is not None and r != sum(mask):
                raise LoraCompressError(
                    f"{directory}: module {mpath} has rank {r} but its rank_pattern mask keeps {sum(mask)} of {len(mask)}; "
                    "the config does not belong to these weights: use the adapter_config.json saved with them"
                )
            # AdaLoRA: ΔW = B (A ⊙ E) · alpha / ranknum, ranknum fixed at init_r (the r it started from).
            A = A.float() * E.float()[:, None]
            ranknum = float(config.get("init_r") or r_default)
            scale = float(alpha_default) / (ranknum + 1e-5)
        else:
            r_cfg = _pattern_value(rank_pattern, mpath, r_default)
            alpha = _pattern_value(alpha_pattern, mpath, alpha_default)
            if not isinstance(r_cfg, int) or isinstance(r_cfg, bool):
                raise LoraCompressError(f"{directory}: rank_pattern gives {r_cfg!r} for {mpath}; ranks must be integers")
            if r_cfg != r:
                raise LoraCompressError(
                    f"{directory}: adapter_config.json says r={r_cfg} for {mpath} but its weights have rank {r}; "
                    "the config does not belong to these weights: use the adapter_config.json saved with them"
                )
            scale = float(alpha) / (math.sqrt(r) if use_rslora else r)
        for name, t in (("lora_A", A), ("lora_B", B)):
            if not allow_nonfinite and not all_finite(t):
                raise LoraCompressError(
                    f"{directory}: module {mpath} {name} contains NaN or Inf; the training diverged "
                    "(pass --allow-nonfinite to zero them out and continue)"
                )
        if allow_nonfinite:
            A = torch.nan_to_num(A, nan=0.0, posinf=0.0, neginf=0.0)
            B = torch.nan_to_num(B, nan=0.0, posinf=0.0, neginf=0.0)
        modules[mpath] = LoraModule(A=A, B=B, scale=scale)
    unknown = sorted(set(masks) - set(modules) - {s.name for s in skipped})
    if unknown:
        raise LoraCompressError(
            f"{directory}: rank_pattern names {unknown[0]}, which has no LoRA weights; "
            "use the adapter_config.json saved with these weights"
        )
    dtype = common_dtype(dtypes)
    if dtype not in DTYPE_NAMES:
        raise LoraCompressError(f"{directory}: LoRA weights are {dtype}; expected fp32, fp16 or bf16")
    if skipped:
        log.warning("%s: %s", directory, summary(skipped))
    return Adapter(modules=modules, config=config, extra_tensors=extra, dtype=dtype, metadata=metadata, source=directory,
                   skipped=skipped)


def _parts_in_scope(
    directory: Path, scope: Scope, tensors: dict[str, torch.Tensor], adalora: bool
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor], list[Skipped]]:
    """The LoRA tensors PEFT loads, by module path and part; the other tensors; what PEFT would skip.

    A file whose LoRA tensors PEFT would load none of is refused: PEFT would run the bare base model.
    """
    found, extra, skipped = split_tensors(tensors, str(directory), adalora)
    if not found:
        if skipped:
            raise LoraCompressError(
                f"{directory}: PEFT loads none of the weights file's LoRA tensors ({skipped[0].name}: {skipped[0].reason}); "
                "rename the keys to the form save_pretrained writes (….lora_A.weight)"
            )
        raise LoraCompressError(f"{directory}: no lora_A/lora_B tensors found; is this a LoRA adapter?")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for path in sorted(found, key=natural_key):
        reason = scope.skip_reason(path)
        if reason is not None:
            skipped.append(Skipped(path, reason))
            continue
        if any(part.startswith("embedding") for part in found[path]):
            raise LoraCompressError(f"{directory}: LoRA on embeddings ({path}) is not supported; target Linear layers only")
        if "magnitude_vector" in found[path]:
            raise LoraCompressError(
                f"{directory}: DoRA weights (lora_magnitude_vector) are not supported; only plain LoRA weights can be compressed"
            )
        parts[path] = found[path]
    if not parts:
        raise LoraCompressError(
            f"{directory}: adapter_config.json ({scope.describe()}) matches none of the {len(found)} LoRA modules in the "
            "weights file, so PEFT would apply no LoRA at all; use the adapter_config.json saved with these weights"
        )
    return parts, extra, skipped


