"""Fuzzing the adapter loader: whatever is in the folder, ``load_adapter`` loads it or raises
:class:`LoraCompressError` — never another exception, never a hang.

Four generators: random JSON values for the config fields the loader reads, random tensor
shapes/dtypes/names, random safetensors headers (length prefix, JSON, offsets, shapes) and
random byte flips of a valid file. What loads must also be usable: inspecting and pruning it
raises nothing but :class:`LoraCompressError` either.

The default run keeps each property to a few dozen examples (well under 30 s in all); the
``slow`` profile runs thousands: ``pytest -m slow tests/robustness/test_fuzz.py``.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from loracompress.core.adapter import CONFIG_NAME, SAFETENSORS_NAME
from loracompress.core.budget import Budget
from loracompress.core.reader import load_adapter
from loracompress.core.records import adapter_stats
from loracompress.cuts.svd import compress_svd
from loracompress.errors import LoraCompressError
from tests.robustness.hostile import base_config, lora_tensors

# Per example: hypothesis's deadline flags slow examples, the alarm turns a real hang into a failure.
HANG_SECONDS = 10
FAST = settings(max_examples=30, deadline=3000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
SLOW = settings(max_examples=1500, deadline=3000, suppress_health_check=[HealthCheck.too_slow])

_WORK = Path(tempfile.mkdtemp(prefix="lc-fuzz-"))


@pytest.fixture(scope="module", autouse=True)
def _cleanup_workdir() -> Iterator[None]:
    yield
    shutil.rmtree(_WORK, ignore_errors=True)


@contextmanager
def no_hang(seconds: int = HANG_SECONDS) -> Iterator[None]:
    def _raise(signum: int, frame: Any) -> None:
        raise TimeoutError(f"load_adapter hung for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def load_or_refuse(directory: Path) -> None:
    """The property: loads (and the result is usable) or raises LoraCompressError; nothing else."""
    with no_hang():
        try:
            adapter = load_adapter(directory)
        except LoraCompressError as err:
            assert "\n" not in str(err), f"message is not one line: {err!r}"
            assert str(err).strip(), "empty message"
            return
        for m in adapter.modules.values():
            assert math.isfinite(m.scale), f"loaded a non-finite scale {m.scale}"
        adapter_stats(adapter)
        try:
            compress_svd(adapter, Budget.parse("0.5"))
        except LoraCompressError:
            pass


def fresh_dir(name: str) -> Path:
    d = _WORK / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


# --------------------------------------------------------------------------- strategies

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=10,
)
small_ints = st.integers(min_value=-3, max_value=12)
# Values plausible enough to get past the first checks, mixed with anything at all.
field_values = {
    "peft_type": st.one_of(st.sampled_from(["LORA", "ADALORA", "lora", "LOHA", "", "IA3"]), json_values),
    "r": st.one_of(small_ints, st.floats(-2, 10), json_values),
    "lora_alpha": st.one_of(small_ints, st.floats(allow_nan=True), json_values),
    "init_r": st.one_of(small_ints, json_values),
    "use_rslora": json_values,
    "fan_in_fan_out": json_values,
    "bias": st.one_of(st.sampled_from(["none", "all", "lora_only"]), json_values),
    "use_dora": json_values,
    "task_type": st.one_of(st.sampled_from(["CAUSAL_LM", "SEQ_CLS", None]), json_values),
    "target_modules": json_values,
    "modules_to_save": json_values,
    "rank_pattern": st.one_of(
        st.dictionaries(st.sampled_from(["q_proj", "k_proj", ".*", "(", "model.layers.0.mlp.up_proj", "["]),
                        st.one_of(small_ints, json_values), max_size=3),
        json_values,
    ),
    "alpha_pattern": st.one_of(
        st.dictionaries(st.sampled_from(["q_proj", "v_proj", ".*", ")", "down_proj"]),
                        st.one_of(small_ints, st.floats(allow_nan=True), json_values), max_size=3),
        json_values,
    ),
    "layers_to_transform": json_values,
    "base_model_name_or_path": json_values,
}


@st.composite
def configs(draw: Callable[..., Any]) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)  # not even an object, sometimes
    config = base_config()
    # One or two fields changed at a time, so most examples get past the first check and reach the next.
    for key in draw(st.sets(st.sampled_from(sorted(field_values)), min_size=1, max_size=2)):
        config[key] = draw(field_values[key])
    if draw(st.integers(0, 9)) == 0:
        del config[draw(st.sampled_from(sorted(config)))]
    return config


dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int64, torch.bool])
names = st.one_of(
    st.sampled_from(["lora_A.weight", "lora_B.weight", "lora_E", "lora_A.default.weight", "lora_embedding_A",
                     "lora_magnitude_vector", "weight", "lora_A", "lora_B"]),
    st.text(alphabet="abcAB._/lora", max_size=12),
)


@st.composite
def tensor_sets(draw: Callable[..., Any]) -> dict[str, torch.Tensor]:
    choice = draw(st.integers(0, 9))
    if choice < 6:
        return lora_tensors()  # the rank the default config names: the config decides what happens
    if choice < 8:
        return lora_tensors(r=draw(st.integers(0, 6)))
    out: dict[str, torch.Tensor] = {}
    for _ in range(draw(st.integers(1, 5))):
        module = draw(st.sampled_from(["model.layers.0.self_attn.q_proj", "m", "a..b", "x/../../y", ""]))
        key = f"base_model.model.{module}.{draw(names)}" if draw(st.booleans()) else draw(st.text(max_size=20))
        shape = draw(st.lists(st.integers(0, 6), min_size=0, max_size=3))
        dtype = draw(dtypes)
        t = torch.randn(shape) * draw(st.sampled_from([1.0, 0.0, float("nan"), float("inf"), 1e30]))
        out[key] = t.to(dtype) if dtype.is_floating_point else t.nan_to_num().clamp(-100, 100).to(dtype)
    return out


entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64"]), json_values),
        "shape": st.one_of(st.lists(st.integers(-2, 2**40), max_size=4), json_values),
        "data_offsets": st.one_of(st.lists(st.integers(-8, 2**64), min_size=0, max_size=3), json_values),
    },
)
headers = st.dictionaries(
    st.one_of(st.sampled_from(["base_model.model.m.lora_A.weight", "base_model.model.m.lora_B.weight", "__metadata__"]),
              st.text(max_size=10)),
    st.one_of(entries, json_values),
    max_size=4,
)


# --------------------------------------------------------------------------- properties


def _config_body(config: Any, tensors: dict[str, torch.Tensor]) -> None:
    d = fresh_dir("config")
    (d / CONFIG_NAME).write_text(json.dumps(config), encoding="utf-8")  # json.dumps writes NaN/Infinity too
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / SAFETENSORS_NAME))
    load_or_refuse(d)


def _header_body(header: dict[str, Any], data_len: int, length_delta: int) -> None:
    d = fresh_dir("header")
    (d / CONFIG_NAME).write_text(json.dumps(base_config()), encoding="utf-8")
    raw = json.dumps(header).encode()
    n = max(len(raw) + length_delta, 0)
    (d / SAFETENSORS_NAME).write_bytes(struct.pack("<Q", n) + raw + bytes(data_len))
    load_or_refuse(d)


def _bytes_body(blob: bytes) -> None:
    d = fresh_dir("bytes")
    (d / CONFIG_NAME).write_text(json.dumps(base_config()), encoding="utf-8")
    (d / SAFETENSORS_NAME).write_bytes(blob)
    load_or_refuse(d)


_VALID = None


def _valid_file() -> bytes:
    global _VALID
    if _VALID is None:
        d = fresh_dir("valid")
        save_file(lora_tensors(), str(d / SAFETENSORS_NAME), metadata={"format": "pt"})
        _VALID = (d / SAFETENSORS_NAME).read_bytes()
    return _VALID


def _flip_body(flips: list[tuple[int, int]], cut: int | None) -> None:
    blob = bytearray(_valid_file())
    for pos, value in flips:
        # Aim most flips at the 8-byte length and the JSON header, where a flip changes meaning.
        blob[pos % min(len(blob), 1200)] = value
    _bytes_body(bytes(blob[:cut] if cut is not None else blob))


config_args = (configs(), tensor_sets())
header_args = (headers, st.integers(0, 512), st.integers(-4, 4))
bytes_args = (st.binary(max_size=256),)
flip_args = (st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
             st.one_of(st.none(), st.integers(0, 9000)))

# Cases fuzzing found once; kept as fixed examples so they stay fixed.
_config_examples = [
    base_config(alpha_pattern={"q_proj": "x"}),
    base_config(alpha_pattern={"q_proj": float("nan")}),
    base_config(peft_type="ADALORA", init_r="four"),
    base_config(peft_type="ADALORA", init_r=0),
    base_config(r=4.0),
    base_config(use_rslora="no"),
]


def _with_examples(test: Callable[..., None]) -> Callable[..., None]:
    tensors = lora_tensors()
    with_e = {**tensors, **{k.replace("lora_A.weight", "lora_E"): torch.ones(4, 1) for k in tensors if "lora_A" in k}}
    for config in _config_examples:
        test = example(config, with_e if config["peft_type"] == "ADALORA" else tensors)(test)
    return test


test_config_fuzz = FAST(_with_examples(given(*config_args)(_config_body)))
test_header_fuzz = FAST(given(*header_args)(_header_body))
test_random_bytes = FAST(given(*bytes_args)(_bytes_body))
test_byte_flips = FAST(given(*flip_args)(_flip_body))

test_config_fuzz_long = pytest.mark.slow(SLOW(given(*config_args)(_config_body)))
test_header_fuzz_long = pytest.mark.slow(SLOW(given(*header_args)(_header_body)))
test_random_bytes_long = pytest.mark.slow(SLOW(given(*bytes_args)(_bytes_body)))
test_byte_flips_long = pytest.mark.slow(SLOW(given(*flip_args)(_flip_body)))


def test_fuzz_catches_a_foreign_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    """The property is not vacuous: a loader that leaks a ValueError fails it."""
    import loracompress.core.reader as adapter_mod

    def leaky(directory: Path) -> dict[str, Any]:
        raise ValueError("leaked")

    monkeypatch.setattr(adapter_mod, "_read_config", leaky)
    d = fresh_dir("leak")
    with pytest.raises(ValueError, match="leaked"):
        load_or_refuse(d)
