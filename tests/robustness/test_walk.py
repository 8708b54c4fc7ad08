"""The hostile walk of issue 13, replayed: what ``--force`` may replace, and ``-o`` with missing parents.

``--force`` replaces only a folder that a loracompress command wrote (it holds one of the record files
in :data:`loracompress.core.outputs.OUTPUT_RECORDS`) or an empty folder; never the current folder or
one above it, never any input of the run (adapter, ``--base-model``, ``--data``, ``--eval-data``,
``--graph``). Every refusal is exit 2 with one line naming the folder, and the whole temp tree is
byte-for-byte unchanged (sizes and mtimes of every file, and the set of paths).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from loracompress_cli.app import main
from tests.robustness.hostile import refused, snapshot, stray_temps, tree, write_adapter
from tests.tiny import save_tiny_base

REPO = Path(__file__).resolve().parents[2]


def _state(root: Path) -> tuple[set[str], dict[str, tuple[int, int]]]:
    return tree(root), snapshot(root)


_refused = refused


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``p/`` with ``p/src/main.py`` and an adapter beside it; the cwd is ``p``."""
    p = tmp_path / "p"
    (p / "src").mkdir(parents=True)
    (p / "src" / "main.py").write_text("x\n")
    write_adapter(tmp_path / "adapter")
    monkeypatch.chdir(p)
    return p


def test_force_never_replaces_the_current_folder(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``cd p && prune ADAPTER --budget 0.5 -o . --force`` used to delete ``src/`` and print "wrote .". """
    root = project.parent
    line = _refused(capsys, root, ["prune", root / "adapter", "--budget", "0.5", "-o", ".", "--force"],
                    "refusing to replace", "current folder")
    assert "replace .:" in line  # names the folder as typed
    assert (project / "src" / "main.py").read_text() == "x\n"


@pytest.mark.parametrize("out", ["..", "../.."])
def test_force_never_replaces_an_ancestor_of_the_cwd(project: Path, capsys: pytest.CaptureFixture[str], out: str) -> None:
    root = project.parent
    (root / "compression_report.json").write_text("{}")  # even one that looks like an output
    _refused(capsys, root, ["prune", root / "adapter", "--budget", "0.5", "-o", out, "--force"],
             "refusing to replace", out, "current folder")


def test_force_never_replaces_a_folder_loracompress_did_not_write(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    src = write_adapter(tmp_path / "adapter")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    _refused(capsys, tmp_path, ["prune", src, "--budget", "0.5", "-o", mine, "--force"],
             str(mine), "did not write it", "another -o")
    _refused(capsys, tmp_path, ["export", src, "--target", "peft", "-o", mine, "--force"], str(mine), "did not write it")
    _refused(capsys, tmp_path, ["truncate", src, "--budget", "0.5", "-o", mine, "--force"], str(mine), "did not write it")


def test_force_replaces_an_empty_folder_and_its_own_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The other side: what loracompress wrote (every command's record), or an empty folder, is replaced."""
    src = write_adapter(tmp_path / "adapter")
    out = tmp_path / "out"
    out.mkdir()
    outside = snapshot(tmp_path / "adapter")
    assert main(["prune", str(src), "--budget", "0.5", "-o", str(out), "--force"]) == 0  # empty: replaced
    assert (out / "compression_report.json").is_file()
    assert main(["truncate", str(src), "--budgets", "0.5,0.25", "-o", str(out), "--force"]) == 0
    assert (out / "truncate_report.json").is_file()
    assert main(["export", str(src), "--target", "vllm", "-o", str(out), "--force"]) == 0
    assert json.loads((out / "export_report.json").read_text())["format"] == "vllm"
    assert main(["prune", str(src), "--budget", "0.25", "-o", str(out), "--force"]) == 0
    assert snapshot(tmp_path / "adapter") == outside and stray_temps(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == ["adapter", "out"]


def test_every_record_name_a_command_writes_is_known() -> None:
    """--force recognises an output by its record; a command with a new record name must be listed."""
    from loracompress.bank.io import MANIFEST_NAME as BANK
    from loracompress.core.outputs import OUTPUT_RECORDS
    from loracompress.core.records import COMPRESSION_REPORT as PRUNE
    from loracompress.export import REPORT_NAME as EXPORT
    from loracompress.pipelines.merge import MERGE_REPORT
    from loracompress.pipelines.truncate import SUMMARY_NAME

    assert {EXPORT, PRUNE, MERGE_REPORT, SUMMARY_NAME, BANK} == set(OUTPUT_RECORDS)


def test_merge_never_overwrites_its_base_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``merge A --base-model B -o B --force`` used to replace the base model with the merged one."""
    base = save_tiny_base("llama", tmp_path / "base")
    (base / "merge_report.json").write_text("{}")  # even a base that was itself a merge output
    src = write_adapter(tmp_path / "adapter")
    _refused(capsys, tmp_path, ["merge", src, "--base-model", base, "-o", base, "--force"],
             "overlaps the input", str(base))
    _refused(capsys, tmp_path, ["merge", src, "--base-model", base, "-o", base / "merged", "--force"],
             "overlaps the input")


def test_export_never_overwrites_its_base_model_or_graph(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime")
    base = save_tiny_base("llama", tmp_path / "base")
    src = write_adapter(tmp_path / "adapter")
    _refused(capsys, tmp_path, ["export", src, "--format", "onnx", "--engine", "ort", "--base-model", base, "-o", base,
                                "--force"],
             "overlaps the input", str(base))
    graph = tmp_path / "graph"
    graph.mkdir()
    (graph / "export_report.json").write_text("{}")
    _refused(capsys, tmp_path, ["export", src, "--format", "onnx", "--engine", "ort", "--mode", "adapters", "--adapter-only", "--graph",
                                graph, "--base-model", base, "-o", graph, "--force"], "overlaps the input", str(graph))


@pytest.mark.parametrize("flag", ["--data", "--eval-data"])
def test_prune_never_replaces_a_folder_holding_its_data(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        flag: str) -> None:
    """An earlier output that now holds the data file: replacing it would delete the data being read."""
    src = write_adapter(tmp_path / "adapter")
    old = tmp_path / "old"
    old.mkdir()
    (old / "compression_report.json").write_text("{}")
    inside, beside = old / "calib.jsonl", tmp_path / "other.jsonl"
    for f in (inside, beside):
        f.write_text('{"text": "a b c"}\n' * 4)
    data, eval_data = (inside, beside) if flag == "--data" else (beside, inside)
    args = ["prune", src, "--budget", "0.5", "--method", "svd", "--base-model", tmp_path / "nowhere",
            "--data", data, "--eval-data", eval_data, "-o", old, "--force"]
    _refused(capsys, tmp_path, args, "overlaps the input", str(inside))


def test_truncate_never_replaces_a_folder_holding_its_eval_data(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    src = write_adapter(tmp_path / "adapter")
    old = tmp_path / "cuts"
    old.mkdir()
    (old / "truncate_report.json").write_text("{}")
    (old / "test.jsonl").write_text('{"text": "a b c"}\n')
    _refused(capsys, tmp_path, ["truncate", src, "--budget", "0.5", "--eval-data", old / "test.jsonl",
                                "-o", old, "--force"], "overlaps the input")


def test_data_beside_the_output_is_fine(tmp_path: Path) -> None:
    """A data file is protected by its own path: an output next to it (the usual layout) is allowed."""
    from loracompress.core.outputs import check_output_path

    data = tmp_path / "calib.jsonl"
    data.write_text("x\n")
    assert check_output_path(tmp_path / "out", inputs=[data, None, "some/hub-id"]) == tmp_path / "out"


# --------------------------------------------------------------------------- -o with missing parents (item 11)


def test_missing_parents_of_the_output_are_created(tmp_path: Path) -> None:
    src = write_adapter(tmp_path / "adapter")
    out = tmp_path / "out" / "deep" / "small"
    assert main(["prune", str(src), "--budget", "0.5", "-o", str(out)]) == 0
    assert (out / "compression_report.json").is_file()
    assert stray_temps(out.parent) == []


def test_a_failed_write_removes_the_parents_it_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import loracompress.core.writer as adapter_mod
    from loracompress.errors import LoraCompressError

    def fail(adapter, directory, dtype=None):  # noqa: ANN001, ANN202
        (directory / "adapter_model.safetensors").write_bytes(b"partial")
        raise LoraCompressError("disk went away; run again")

    monkeypatch.setattr(adapter_mod, "write_adapter_files", fail)
    src = write_adapter(tmp_path / "adapter")
    (tmp_path / "existing").mkdir()
    before = _state(tmp_path)
    assert main(["prune", str(src), "--budget", "0.5", "-o", str(tmp_path / "existing" / "new" / "deeper" / "out")]) == 2
    assert _state(tmp_path) == before, "the parents this run created were left behind"


def test_readme_first_command_runs_on_a_fresh_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's first command, read from the README (as .ci/run does), where ``out/`` does not exist.

    Only ``python -m pip install -e .`` is left out: the suite already runs from an install.
    """
    import shutil
    import subprocess
    import sys

    commands = subprocess.run([sys.executable, str(REPO / ".ci" / "readme_commands.py"), str(REPO / "README.md")],
                              capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(commands) == 2 and commands[1].endswith("python -m pytest"), commands
    first = commands[0].split(" && ")
    assert first[0] == "python -m pip install -e ." and first[1].startswith("python -m loracompress prune "), first
    shutil.copytree(REPO / "samples" / "minilm-rt" / "adapter", tmp_path / "samples" / "minilm-rt" / "adapter")
    monkeypatch.chdir(tmp_path)
    assert not (tmp_path / "out").exists()
    args = first[1].split()[3:]
    assert main(args) == 0
    out = tmp_path / args[args.index("-o") + 1]
    assert (out / "compression_report.json").is_file()


@pytest.mark.parametrize(("first", "suite", "gate", "expected", "says"), [
    ("true", "true", 0, 0, "ci: passed"),
    ("true", "exit 3", 0, 3, "tests failed (exit 3)"),
    ("exit 4", "true", 0, 4, "first command failed (exit 4)"),
    ("true", "true", 1, 1, "loracompress check failed (exit 1)"),
])
def test_ci_runs_the_readme_commands_and_keeps_their_exit_codes(tmp_path: Path, first: str, suite: str, gate: int,
                                                               expected: int, says: str) -> None:
    """.ci/run against a stand-in README (its two commands) and a stand-in ``loracompress`` on PATH."""
    import shutil
    import subprocess

    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    for name in ("run", "readme_commands.py"):
        shutil.copy2(REPO / ".ci" / name, repo / ".ci" / name)
    (repo / "README.md").write_text(f"# x\n\n## Two commands\n\n```bash\n{first}\n```\n\ntext\n\n```bash\n{suite}\n```\n"
                                    "\n## Other\n\n```bash\nexit 9\n```\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "loracompress"
    stub.write_text(f"#!/usr/bin/env bash\n[ \"$1\" = check ] && exit {gate}\nexit 0\n")
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run(["bash", str(repo / ".ci" / "run")], capture_output=True, text=True, env=env)
    assert run.returncode == expected, run.stderr
    assert says in run.stdout + run.stderr
    (repo / "out").mkdir()  # a leftover out/ would hide a missing-parent bug: not a clean clone
    run = subprocess.run(["bash", str(repo / ".ci" / "run")], capture_output=True, text=True, env=env)
    assert run.returncode == 2 and "clean clone" in run.stderr
