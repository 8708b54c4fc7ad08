"""Issue 13, item 10: what the CLI and the docs tell a user (each case failed on the main of 1 Dec 2026).

--debug anywhere, flags shown as flags, merge saying it wrote a new folder, messages that say what is
really wrong, a bar of its own for the held-out evaluation, docstring examples that run, and the
retained_energy claim of docs/check.md.
"""

from __future__ import annotations

import doctest
import importlib
import io
import json
import pkgutil
from pathlib import Path

import pytest

import loracompress
from loracompress_cli.app import hoist_debug, main
from tests.robustness.hostile import assert_user_error, snapshot, tree, write_adapter
from tests.tiny import save_tiny_base

REPO = Path(__file__).resolve().parents[2]
COMMANDS = ["inspect", "prune", "check", "report", "eval", "truncate", "merge", "export", "bank", "bank-add", "bank-export"]


def _state(root: Path) -> tuple[set[str], dict[str, tuple[int, int]]]:
    return tree(root), snapshot(root)


# --------------------------------------------------------------------------- --debug, flags in help


def test_debug_is_accepted_after_the_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["inspect", str(tmp_path / "missing"), "--debug"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" in err and "no such folder" in err  # the traceback --debug promises
    assert hoist_debug(["prune", "a", "--debug", "--", "--debug"]) == ["--debug", "prune", "a", "--", "--debug"]


@pytest.mark.parametrize("command", COMMANDS)
def test_flags_are_shown_without_a_value(command: str, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """"--force <bool>" read as if "--force true" worked (it is refused): flags show no value type."""
    monkeypatch.setenv("COLUMNS", "200")
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    shown = [line for line in out.splitlines() if "<bool>" in line and "--help" not in line]
    assert shown == [], shown
    if command in ("prune", "truncate", "merge", "export", "bank", "bank-add", "bank-export"):
        assert "--force" in out and "loracompress wrote" in out


# --------------------------------------------------------------------------- merge's summary


def test_merge_says_it_wrote_a_new_folder_and_left_the_base_alone(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    base = save_tiny_base("llama", tmp_path / "base")
    src = write_adapter(tmp_path / "adapter")
    before = snapshot(base)
    capsys.readouterr()
    assert main(["merge", str(src), "--base-model", str(base), "-o", str(tmp_path / "merged")]) == 0
    out = capsys.readouterr().out
    assert "into a new copy of the base model" in out and "the base model was not changed" in out, out
    assert f"wrote the merged model to {tmp_path / 'merged'}" in out
    assert snapshot(base) == before


# --------------------------------------------------------------------------- messages that misled


@pytest.mark.parametrize("fraction", ["0", "1", "-0.5"])
def test_eval_fraction_out_of_range_says_how_to_skip(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     fraction: str) -> None:
    """"between 0 and 1" for 0 read as nonsense; it is also said before any model or data is loaded."""
    src = write_adapter(tmp_path / "adapter")
    (tmp_path / "calib.jsonl").write_text('{"text": "a b c"}\n' * 8)
    before = _state(tmp_path)
    code = main(["prune", str(src), "--budget", "0.5", "--data", str(tmp_path / "calib.jsonl"), "--base-model",
                 str(tmp_path / "nowhere"), "--eval-fraction", fraction, "-o", str(tmp_path / "out")])
    assert_user_error(code, capsys.readouterr().err, "--eval-fraction must be above 0 and below 1", "--no-eval",
                      "--eval-data")
    assert _state(tmp_path) == before


def test_update_baseline_into_a_missing_folder_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_adapter(tmp_path / "adapter")
    monkeypatch.chdir(tmp_path)
    before = _state(tmp_path)
    code = main(["check", str(src), "--max-params", "1M", "--baseline", "no/such/sizes.json", "--update-baseline"])
    line = assert_user_error(code, capsys.readouterr().err, "no/such", "does not exist", "create the folder")
    assert "permission" not in line
    assert _state(tmp_path) == before


# --------------------------------------------------------------------------- the held-out evaluation's own bar


def test_calibration_reports_the_held_out_evaluation_as_its_own_phase(tmp_path: Path) -> None:
    """After the last step the pipeline reports the evaluation (and --keep-best's comparison) batch by
    batch; and docs/check.md is right that a calibrated output writes retained_energy: null."""
    from loracompress.pipelines.calibrate import EVALUATING
    from loracompress.pipelines.prune import PruneOptions, prune
    from tests.calibration.test_engine import calib_files

    files = calib_files(tmp_path / "files", "bert", n=48)
    events: list[tuple] = []
    options = PruneOptions(budget="0.25", method="lorpa", base_model=str(files["base"]), data=str(files["data"]),
                           steps=3, batch_size=8, device="cpu", seq_len=16, eval_fraction=0.25)
    out = tmp_path / "out"
    prune(files["adapter"], out, options, progress=lambda *a: events.append(("step", *a[:2])),
          phase=lambda *a: events.append(("phase", *a)))
    steps = [e for e in events if e[0] == "step"]
    phases = [e for e in events if e[0] == "phase"]
    assert steps and steps[-1][1:] == (3, 3)
    assert events.index(phases[0]) > events.index(steps[-1]), "the evaluation phase must come after the steps"
    assert {p[1] for p in phases} == {EVALUATING}
    done = [p[2] for p in phases]
    assert done == sorted(done) and done[0] == 0 and done[-1] == phases[-1][3] > 1

    report = json.loads((out / "compression_report.json").read_text())
    assert report["retained_energy"] is None  # calibrated: trained factors, no share of the spectrum
    text = (REPO / "docs" / "check.md").read_text(encoding="utf-8")
    assert "every `prune`" not in text and "calibrated" in text and "`null`" in text


def test_the_cli_bar_switches_to_the_evaluation_phase() -> None:
    from rich.console import Console
    from rich.progress import Progress

    from loracompress_cli.prune_cmd import _Bars

    with Progress(console=Console(file=io.StringIO())) as progress:
        bars = _Bars(progress)
        bars.step(5, 5, 0.1, 0.0)
        bars.phase("evaluating on the held-out data", 2, 9)
        tasks = {t.description: t for t in progress.tasks}
    assert not tasks["calibrating"].visible
    evaluating = tasks["evaluating on the held-out data"]
    assert evaluating.visible and (evaluating.completed, evaluating.total) == (2, 9)


# --------------------------------------------------------------------------- docstring examples


def _modules_with_examples() -> list[str]:
    names = ["loracompress"] + [m.name for m in pkgutil.walk_packages(loracompress.__path__, "loracompress.")]
    found = []
    for name in names:
        path = Path(importlib.util.find_spec(name).origin)  # type: ignore[union-attr]
        if ">>>" in path.read_text(encoding="utf-8"):
            found.append(name)
    return found


def test_every_docstring_example_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Examples in docstrings are doctests, run from the repository root (the bundled sample)."""
    monkeypatch.chdir(REPO)
    modules = _modules_with_examples()
    assert "loracompress" in modules
    for name in modules:
        result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
        assert result.attempted > 0


def test_the_package_exports_a_curated_api() -> None:
    namespace: dict[str, object] = {}
    exec("from loracompress import *", namespace)  # noqa: S102
    exported = {k for k in namespace if not k.startswith("__")}
    assert exported == set(loracompress.__all__)
    assert {"load_adapter", "save_adapter", "compress_svd", "SvdResult", "Budget", "LoraCompressError"} <= exported
    assert len(loracompress.__all__) == len(set(loracompress.__all__)) and loracompress.__all__ == sorted(
        loracompress.__all__, key=lambda n: (n[0].islower(), n))
