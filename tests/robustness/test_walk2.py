"""The second hostile walk (issue 23), items 3-9: each case failed on the main of that day.

Every refusal is exit 2 with one ``error:`` line and nothing written (the whole temp tree is
compared before and after).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from loracompress_cli.app import main
from tests.robustness.hostile import refused as _refused
from tests.robustness.hostile import snapshot, stray_temps, tree, write_adapter

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- 6. SIGTERM cleans up like SIGINT

# Runs the CLI with the real writer; once the output is complete in its temporary folder (just before
# the rename into place) the process announces the folder and sleeps: a run caught at its fullest.
PAUSED_BEFORE_RENAME = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import loracompress.core.outputs as outputs
    from loracompress_cli.app import main

    def paused(tmp, out):
        part = Path(sys.argv[1] + ".part")
        part.write_text(str(tmp))
        part.rename(sys.argv[1])
        time.sleep(600)

    outputs._move_into_place = paused
    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.tiny import make_adapter, save_tiny_base

    root = tmp_path_factory.mktemp("bert")
    adapter, _ = make_adapter("bert", root / "adapter", r=4)
    return {"adapter": adapter, "base": save_tiny_base("bert", root / "base")}


def _terminate_while_writing(tmp_path: Path, args: list[str]) -> tuple[int, str, Path]:
    script = tmp_path / "paused.py"
    script.write_text(PAUSED_BEFORE_RENAME)
    ready = tmp_path / "writing"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), str(ready), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert proc.poll() is None, f"exited early ({proc.returncode}): {proc.stderr.read() if proc.stderr else ''}"
            assert time.monotonic() < deadline, "never reached the final rename"
            time.sleep(0.05)
        tmp = Path(ready.read_text())
        assert tmp.is_dir() and any(tmp.iterdir())  # really caught with a full temporary folder
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    return proc.returncode, err, tmp


@pytest.mark.parametrize("command", ["merge", "export"])
def test_sigterm_removes_the_temporary_folder(tmp_path: Path, bert: dict[str, Path], command: str) -> None:
    """A container runtime's SIGTERM left a merge's 289 MB of shards behind; now it unwinds as Ctrl-C does."""
    out = tmp_path / "out"
    extra = ["--format", "onnx"] if command == "export" else []
    code, err, tmp = _terminate_while_writing(
        tmp_path, [command, str(bert["adapter"]), "--base-model", str(bert["base"]), *extra, "-o", str(out)])
    assert code == 130, err[-2000:]
    assert "interrupted: nothing was written" in err and "Traceback" not in err, err[-2000:]
    assert not tmp.exists() and not out.exists()
    assert stray_temps(tmp_path) == []


# --------------------------------------------------------------------------- 7. tracebacks become one line


def test_a_legal_250_character_output_name_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The temporary sibling ``.NAME.tmp-PID-RANDOM`` of a 250-character name was longer than 255 bytes."""
    src = write_adapter(tmp_path / "adapter")
    out = tmp_path / ("x" * 250)
    assert main(["prune", str(src), "--budget", "0.5", "-o", str(out)]) == 0
    assert (out / "adapter_model.safetensors").is_file()
    assert main(["prune", str(src), "--budget", "0.25", "-o", str(out), "--force"]) == 0  # the .old sibling too
    assert stray_temps(tmp_path) == []
    assert json.loads((out / "compression_report.json").read_text())["budget"]


def test_a_killed_run_with_a_long_name_is_cleaned_up_by_the_next(tmp_path: Path) -> None:
    from loracompress.core.outputs import _sibling

    src = write_adapter(tmp_path / "adapter")
    out = tmp_path / ("y" * 250)
    stale = _sibling(out, "tmp")
    stale.mkdir()
    dead = stale.with_name(stale.name.replace(f"-{os.getpid()}-", "-999999999-"))  # a pid no process has
    stale.rename(dead)
    assert main(["prune", str(src), "--budget", "0.5", "-o", str(out)]) == 0
    assert stray_temps(tmp_path) == []


def test_a_long_output_name_keeps_its_checkpoint_folder_name_legal(tmp_path: Path) -> None:
    """Calibration checkpoints live in ``.NAME.ckpt`` beside the output: 256 bytes for a 250-character name."""
    from loracompress.pipelines.calibrate import checkpoint_dir

    assert checkpoint_dir(tmp_path / "small").name == ".small.ckpt"  # unchanged: --resume still finds old ones
    long = checkpoint_dir(tmp_path / ("é" * 125))  # 250 bytes in UTF-8
    assert len(os.fsencode(long.name)) <= 255 and long.name.endswith(".ckpt")
    long.mkdir()
    assert checkpoint_dir(tmp_path / ("é" * 125)) == long  # the same folder every run


@pytest.mark.parametrize("name", ["z" * 300, "/proc/x"])
def test_an_output_that_cannot_be_made_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    if name.startswith("/proc") and not Path("/proc").is_dir():
        pytest.skip("no /proc")
    src = write_adapter(tmp_path / "adapter")
    out = name if name.startswith("/") else str(tmp_path / name)
    _refused(capsys, tmp_path, ["prune", src, "--budget", "0.5", "-o", out], "cannot write", "choose another -o")


@pytest.mark.parametrize("folder", ["/sys", "/proc"])
def test_report_plot_into_an_unwritable_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            folder: str) -> None:
    """``/sys`` refuses even root (PermissionError), ``/proc`` has no room for files (FileNotFoundError)."""
    pytest.importorskip("matplotlib")
    if not Path(folder).is_dir():
        pytest.skip(f"no {folder}")
    src = write_adapter(tmp_path / "adapter")
    _refused(capsys, tmp_path, ["report", src, "--plot", f"{folder}/ranks.png"], "--plot", "cannot write",
             "choose another path")


# --------------------------------------------------------------------------- 5. NaN: refused as input, never written


@pytest.mark.parametrize("args", [
    ["prune", "{adapter}", "--budget", "0.5", "--method", "lorpa", "--data", "{data}", "--kd-weight", "nan", "-o", "{out}"],
    ["prune", "{adapter}", "--budget", "0.5", "--method", "lorpa", "--data", "{data}", "--lr", "inf", "-o", "{out}"],
    ["prune", "{adapter}", "--budget", "0.5", "--data", "{data}", "--eval-fraction", "nan", "-o", "{out}"],
    ["eval", "{adapter}", "--data", "{data}", "--temperature", "nan"],
    ["merge", "{adapter}", "--tolerance", "nan", "-o", "{out}"],
    ["export", "{adapter}", "--tolerance", "-inf", "-o", "{out}"],
])
def test_every_float_option_refuses_nan_and_inf(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 args: list[str]) -> None:
    """``nan > 0`` is false, so ``--kd-weight nan`` passed the old checks and turned distillation off."""
    src = write_adapter(tmp_path / "adapter")
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a b c"}\n')
    flag = next(a for a in args if a.startswith("--") and a not in ("--budget", "--method", "--data"))
    filled = [a.format(adapter=src, data=data, out=tmp_path / "out") for a in args]
    _refused(capsys, tmp_path, filled, flag, "finite number")


def test_library_options_refuse_nan_and_inf() -> None:
    from loracompress.calibration.engine.config import EngineConfig
    from loracompress.errors import LoraCompressError
    from loracompress.export.onnx import OnnxOptions
    from loracompress.pipelines.evaluate import EvalOptions
    from loracompress.pipelines.merge import MergeOptions
    from loracompress.pipelines.prune import PruneOptions

    nan, inf = float("nan"), float("inf")
    for make, flag in [
        (lambda: EngineConfig(kd_weight=nan), "--kd-weight"),
        (lambda: EngineConfig(weight_decay=inf), "--weight-decay"),
        (lambda: EngineConfig(max_grad_norm=nan), "--max-grad-norm"),
        (lambda: PruneOptions(task_weight=nan), "--task-weight"),
        (lambda: EvalOptions(data="x", temperature=nan), "--temperature"),
        (lambda: MergeOptions(tolerance=inf), "--tolerance"),
        (lambda: OnnxOptions(tolerance=nan), "--tolerance"),
    ]:
        with pytest.raises(LoraCompressError, match=f"^{flag} must be a finite number"):
            make()


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory: pytest.TempPathFactory, bert: dict[str, Path]) -> Path:
    from tests.tiny import tiny_sentences

    data = tmp_path_factory.mktemp("unlabelled") / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_sentences(24)))
    return data


@pytest.mark.parametrize("weights", [["--kd-weight", "0"], ["--kd-weight", "0", "--task-weight", "0"]])
def test_a_loss_of_exactly_zero_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], bert: dict[str, Path],
                                           unlabelled: Path, weights: list[str]) -> None:
    """Both weights 0, or ``--kd-weight 0`` on data without labels: nothing to learn (``--kd-weight nan
    --task-weight 0`` was the way around this, refused above)."""
    _refused(capsys, tmp_path, ["prune", bert["adapter"], "--base-model", bert["base"], "--data", unlabelled,
                                "--method", "lorpa", "--budget", "0.5", "--steps", "2", "--device", "cpu", *weights,
                                "-o", tmp_path / "out"], "--kd-weight")
    assert not list(tmp_path.glob(".out.ckpt*"))


def _strict_json(text: str) -> object:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_every_json_written_is_strict(tmp_path: Path) -> None:
    """A NaN measured value was written as a bare ``NaN``, which ``JSON.parse`` and ``jq`` reject."""
    from loracompress.core import jsonio
    from loracompress.core.records import report_json

    nan = float("nan")
    doc = {"quality": {"kl": nan, "ppl": [1.0, float("inf")]}, "ok": 0.5}
    assert _strict_json(report_json(doc)) == {"quality": {"kl": None, "ppl": [1.0, None]}, "ok": 0.5}
    jsonio.write_json(tmp_path / "r.json", doc)
    assert _strict_json((tmp_path / "r.json").read_text())["quality"]["kl"] is None
    import numpy as np

    assert _strict_json(jsonio.dumps({"x": np.float32("nan")}, default=lambda o: o.item())) == {"x": None}


def test_no_json_is_written_outside_the_strict_helper() -> None:
    """One helper (``loracompress.core.jsonio``) writes every JSON; a stray ``json.dump(s)`` would allow NaN."""
    import re

    strays = []
    for folder in ("loracompress", "loracompress_cli"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.name == "jsonio.py":
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if re.search(r"\bjson\.dumps?\(", line):
                    strays.append(f"{path.relative_to(REPO)}:{n}")
    assert strays == []


# --------------------------------------------------------------------------- 4. the gate never passes on nothing


@pytest.mark.parametrize("entry", [{}, {"note": "x"}, {"params": None, "bytes": None}])
def test_a_baseline_entry_without_sizes_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch, entry: dict) -> None:
    """``{"adapters": {"small": {}}}`` printed an empty table, "all 1 adapter pass" and exit 0."""
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    monkeypatch.chdir(tmp_path)
    write_adapter(tmp_path / "small")
    Path("sizes.json").write_text(json.dumps({"format": "loracompress-sizes/1", "adapters": {"small": entry}}))
    line = _refused(capsys, tmp_path, ["check", "small", "--baseline", "sizes.json"], "'small'", "holds no sizes")
    assert "sizes.json" in line


def test_an_adapter_checked_against_nothing_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Not in the baseline and under no limit: nothing was compared, so nothing may pass."""
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    monkeypatch.chdir(tmp_path)
    write_adapter(tmp_path / "small")
    write_adapter(tmp_path / "other")
    assert main(["report", "small", "--json"]) == 0
    Path("sizes.json").write_text(capsys.readouterr().out)
    _refused(capsys, tmp_path, ["check", "small", "other", "--baseline", "sizes.json"], "other: nothing to check it against",
             "--update-baseline")
    assert main(["check", "small", "other", "--baseline", "sizes.json", "--max-params", "1M"]) == 0  # a limit is a check


# --------------------------------------------------------------------------- 9. no workflow-command injection

INJECTED = "x\n::error::injected\r::set-output name=a::b\u2028::add-mask::c"


def _command_lines(text: str) -> list[str]:
    """Lines a CI runner would read as workflow commands (it splits on \\r and \\n; \\u2028 for safety)."""
    return [line for line in text.replace("\r", "\n").replace("\u2028", "\n").split("\n") if line.startswith("::")]


@pytest.mark.parametrize("as_json", [False, True])
def test_check_output_cannot_inject_workflow_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch, as_json: bool) -> None:
    """A ``--message`` or a folder name holding a newline started a line of its own: ``::error::…``."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    folder = write_adapter(tmp_path / f"ad{INJECTED.replace('/', '')}")
    capsys.readouterr()
    code = main(["check", str(folder.name), "--max-params", "10", "--message", f"{INJECTED} [/oops]",
                 *(["--json"] if as_json else [])])
    out, err = capsys.readouterr()
    assert code == 1, err
    ours = [line for line in _command_lines(out + "\n" + err)]
    assert ours and all(line.startswith("::error file=") for line in ours), ours  # only our own annotations
    assert "%0A::error::injected" in out + err and "[/oops]" in out + err
    assert all(not line.startswith("- ::") and "\n::" not in line for line in summary.read_text().split("\n"))


def test_an_error_line_stays_one_line_whatever_the_path_holds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _refused(capsys, tmp_path, ["inspect", tmp_path / f"missing{INJECTED}"], "no such folder", "%0A::error::injected")


# --------------------------------------------------------------------------- 8. the library refuses what the CLI refuses


@pytest.mark.parametrize("name", ["../x", "../../escaped.txt", "/tmp/abs.txt", "sub/x.md", "..", ".", "",
                                  "adapter_model.safetensors", "adapter_config.json", "a\0b"])
def test_save_adapter_extra_files_stay_plain_names_inside_the_output(tmp_path: Path, name: str) -> None:
    """``../x`` and absolute names were written outside the output; ``adapter_model.safetensors`` replaced the weights."""
    from loracompress import LoraCompressError, load_adapter, save_adapter

    adapter = load_adapter(write_adapter(tmp_path / "in" / "adapter"))
    work = tmp_path / "work"
    work.mkdir()
    before = tree(tmp_path), snapshot(tmp_path)
    with pytest.raises(LoraCompressError, match="extra_files name"):
        save_adapter(adapter, work / "out", extra_files={name.replace("/tmp", str(tmp_path)): "payload"})
    assert (tree(tmp_path), snapshot(tmp_path)) == before


def test_save_adapter_writes_the_extra_files_it_may(tmp_path: Path) -> None:
    from loracompress import load_adapter, save_adapter

    adapter = load_adapter(write_adapter(tmp_path / "adapter"))
    out = save_adapter(adapter, tmp_path / "out", extra_files={"README.md": "hi", "notes.txt": "x"})
    assert (out / "README.md").read_text() == "hi" and load_adapter(out).num_params == adapter.num_params


@pytest.mark.parametrize("dtype", ["int8", "float64", "int32", "fp8"])
def test_save_adapter_refuses_a_dtype_load_adapter_would_refuse(tmp_path: Path, dtype: str) -> None:
    import torch

    from loracompress import LoraCompressError, load_adapter, save_adapter

    adapter = load_adapter(write_adapter(tmp_path / "adapter"))
    value = getattr(torch, dtype) if hasattr(torch, dtype) else dtype
    with pytest.raises(LoraCompressError, match="fp32|float32"):
        save_adapter(adapter, tmp_path / "out", dtype=value)
    assert not (tmp_path / "out").exists() and stray_temps(tmp_path) == []


def test_save_adapter_takes_the_dtypes_the_cli_takes(tmp_path: Path) -> None:
    import torch

    from loracompress import load_adapter, save_adapter

    adapter = load_adapter(write_adapter(tmp_path / "adapter"))
    assert load_adapter(save_adapter(adapter, tmp_path / "a", dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert load_adapter(save_adapter(adapter, tmp_path / "b", dtype="fp16")).dtype == torch.float16


@pytest.mark.parametrize("kwargs, words", [
    ({"max_rank": 0}, "max_rank must be at least 1"),
    ({"max_rank": -3}, "max_rank must be at least 1"),
    ({"min_rank": -1}, "min_rank must be at least 0"),
    ({"min_rank": 1.5}, "min_rank must be a whole number"),
    ({"max_rank": True}, "max_rank must be a whole number"),
    ({"dtype": "int8"}, "unknown dtype"),
    ({"itemsize": 0}, "itemsize must be at least 1"),
    ({"select": 3}, "compress_svd(select)"),
])
def test_compress_svd_validates_like_the_cli(tmp_path: Path, kwargs: dict, words: str) -> None:
    """``compress_svd(a, B, max_rank=0)`` returned an adapter with no module left."""
    from loracompress import Budget, LoraCompressError, compress_svd, load_adapter

    adapter = load_adapter(write_adapter(tmp_path / "adapter"))
    with pytest.raises(LoraCompressError) as err:
        compress_svd(adapter, Budget.parse("0.5"), **kwargs)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_compress_svd_takes_budget_text_as_the_cli_does(tmp_path: Path) -> None:
    from loracompress import Budget, compress_svd, load_adapter

    adapter = load_adapter(write_adapter(tmp_path / "adapter"))
    by_text = compress_svd(adapter, "50%", select="energy:0.99").adapter
    assert by_text.ranks == compress_svd(adapter, Budget.parse("0.5"), select="energy:0.99").adapter.ranks


def _public_calls(tmp_path: Path) -> list[tuple[str, object]]:
    from loracompress import Adapter, Budget, LoraModule, allocate, compress_svd, load_adapter, save_adapter

    adapter = load_adapter(write_adapter(tmp_path / "adapter"))
    return [
        ("load_adapter(3)", lambda: load_adapter(3)),
        ("load_adapter(path, allow_nonfinite='yes')", lambda: load_adapter(tmp_path / "adapter", allow_nonfinite="yes")),
        ("save_adapter(str, path)", lambda: save_adapter(str(tmp_path), tmp_path / "o")),
        ("save_adapter(adapter, 3)", lambda: save_adapter(adapter, 3)),
        ("save_adapter(extra_files=list)", lambda: save_adapter(adapter, tmp_path / "o", extra_files=["README.md"])),
        ("save_adapter(extra_files={name: bytes})", lambda: save_adapter(adapter, tmp_path / "o", extra_files={"a": b"x"})),
        ("compress_svd(path, budget)", lambda: compress_svd(tmp_path / "adapter", "0.5")),
        ("compress_svd(adapter, [0.5])", lambda: compress_svd(adapter, [0.5])),
        ("Budget.parse(None)", lambda: Budget.parse(None)),
        ("Budget('percent', 1)", lambda: Budget("percent", 1)),
        ("Budget('params', nan)", lambda: Budget("params", float("nan"))),
        ("allocate(list, dict, 3)", lambda: allocate([1.0], {}, 3)),
        ("allocate(values, costs, '3')", lambda: allocate({"m": [1.0]}, {"m": 2}, "3")),
        ("allocate without a cost", lambda: allocate({"m": [1.0]}, {}, 3)),
        ("LoraModule(1, 2)", lambda: LoraModule(1, 2)),
        ("LoraModule(scale=nan)", lambda: LoraModule(adapter.modules[next(iter(adapter.modules))].A,
                                                     adapter.modules[next(iter(adapter.modules))].B, float("nan"))),
        ("Adapter(modules=list)", lambda: Adapter(modules=[], config={})),
        ("Adapter(modules={p: str})", lambda: Adapter(modules={"m": "x"}, config={})),
    ]


def test_public_functions_raise_the_project_error_for_wrong_types(tmp_path: Path) -> None:
    """Wrong argument types gave AttributeError/TypeError from deep inside; each is now one line naming it."""
    from loracompress import LoraCompressError

    for what, call in _public_calls(tmp_path):
        try:
            call()
        except LoraCompressError as err:
            assert "\n" not in str(err), what
        except Exception as err:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{what}: {type(err).__name__}: {err}")
        else:
            pytest.fail(f"{what}: accepted")
    assert stray_temps(tmp_path) == [] and not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- 3. one graph, one base


@pytest.fixture(scope="module")
def two_bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny BERT bases of the same shapes and different weights, and an adapter trained on each."""
    from tests.tiny import make_adapter, save_tiny_base

    root = tmp_path_factory.mktemp("two_bases")
    out = {}
    for key, seed in (("a", 0), ("b", 1)):
        base = save_tiny_base("bert", root / f"base_{key}", seed=seed)
        adapter, _ = make_adapter("bert", root / f"adapter_{key}", r=4, seed=seed)
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(base)
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        out[f"base_{key}"], out[f"adapter_{key}"] = base, adapter
    return out


def _peft_logits(adapter: Path, base: Path) -> object:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from tests.tiny import sample_inputs

    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(str(base)), str(adapter)).eval()
    import torch

    with torch.no_grad():
        return model(**sample_inputs("bert")).logits


def test_adapters_of_different_bases_are_not_put_on_one_graph(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              two_bases: dict[str, Path]) -> None:
    """The first adapter's base was used for the graph and every check: both passed, and the second adapter
    served on the wrong weights (0.35 off PEFT on its own base)."""
    a, b = two_bases["adapter_a"], two_bases["adapter_b"]
    wrong = (_peft_logits(b, two_bases["base_a"]) - _peft_logits(b, two_bases["base_b"])).abs().max().item()
    assert wrong > 0.05  # what one graph on base A would serve for adapter B, against stock PEFT on B's own base
    out = tmp_path / "out"
    for extra in ([], ["--base-model", two_bases["base_a"]]):
        _refused(capsys, tmp_path, ["export", a, b, "--format", "onnx", "--mode", "adapters", *extra, "-o", out],
                 "different base models", "--same-base", str(two_bases["base_b"]))
    _refused(capsys, tmp_path, ["export", a, b, "--format", "onnx", "--mode", "adapters", "--same-base", "-o", out],
             "--same-base needs", "--base-model")


@pytest.mark.slow  # two tiny ONNX exports: about a minute on a free core, several on a busy machine
def test_same_base_vouches_and_adapter_only_on_another_base_says_the_base_differs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], two_bases: dict[str, Path]) -> None:
    """--base-model plus --same-base exports (names can differ for one model: a hub id and a local copy).
    ``--adapter-only --graph`` on a graph of another base said "raise --tolerance", which would have
    shipped adapter files for the wrong base; it says the base differs now."""
    pytest.importorskip("onnxruntime")
    graph = tmp_path / "graph"
    code = main(["export", str(two_bases["adapter_a"]), str(two_bases["adapter_b"]), "--format", "onnx", "--mode",
                 "adapters", "--base-model", str(two_bases["base_a"]), "--same-base", "--device", "cpu", "-o", str(graph)])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in graph.glob("*.onnx_adapter")) == ["adapter_a.onnx_adapter", "adapter_b.onnx_adapter"]
    line = _refused(capsys, tmp_path, ["export", two_bases["adapter_b"], "--format", "onnx", "--mode", "adapters",
                                       "--adapter-only", "--graph", graph, "--device", "cpu", "-o", tmp_path / "more"],
                    "the base differs", "--base-model", str(two_bases["base_a"]))
    assert "tolerance" not in line
    # the graph's own base is the fix: then the adapter files are written (and verified on that base)
    assert main(["export", str(two_bases["adapter_b"]), "--format", "onnx", "--mode", "adapters", "--adapter-only",
                 "--graph", str(graph), "--base-model", str(two_bases["base_a"]), "--device", "cpu",
                 "-o", str(tmp_path / "more")]) == 0
