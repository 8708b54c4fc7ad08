"""``loracompress check`` and ``loracompress report`` through the real CLI on real adapters.

Adapters are made by stock PEFT (tests/tiny.py) and compressed with ``loracompress.pipelines.prune.prune``;
every expected number is measured from the files, never hard-coded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from loracompress.core.reader import load_adapter
from loracompress.core.records import COMPRESSION_REPORT
from loracompress.gate.baselines import load_baseline
from loracompress.gate.config import load_config
from loracompress.pipelines.prune import PruneOptions, prune
from loracompress_cli.app import main
from tests.tiny import make_adapter


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An original tiny Llama adapter and two compressions of it: ``small`` (25%) and ``big`` (50%)."""
    root = tmp_path_factory.mktemp("adapters")
    orig, _ = make_adapter("llama", root / "orig")
    prune(orig, root / "small", PruneOptions(budget="0.25"))
    prune(orig, root / "big", PruneOptions(budget="0.5"))
    return {"orig": orig, "small": root / "small", "big": root / "big"}


@pytest.fixture(autouse=True)
def no_github(monkeypatch: pytest.MonkeyPatch) -> None:
    # This suite may itself run under GitHub Actions: keep its summary and annotations clean.
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, adapters: dict[str, Path]) -> Path:
    """A project folder (the cwd) with ``out/a`` = small and ``out/b`` = big."""
    (tmp_path / "out").mkdir()
    shutil.copytree(adapters["small"], tmp_path / "out" / "a")
    shutil.copytree(adapters["big"], tmp_path / "out" / "b")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["check", *args])
    out, err = capsys.readouterr()
    return code, out, err


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def replace(dst: Path, src: Path) -> None:
    shutil.rmtree(dst)
    shutil.copytree(src, dst)


# --------------------------------------------------------------------------- thresholds


def test_max_params_boundary_and_suffix(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = load_adapter(work / "out/a").num_params
    code, out, _ = run(capsys, "out/a", "--max-params", str(params))
    assert code == 0 and "pass" in out
    code, out, err = run(capsys, "out/a", "--max-params", str(params - 1))
    assert code == 1
    assert "FAIL" in out and "params" in out and "above the maximum" in out
    assert "check failed" in err
    assert run(capsys, "out/a", "--max-params", "1M")[0] == 0
    assert run(capsys, "out/a", "--max-params", "1k")[0] == 1


def test_max_bytes_counts_every_file_on_disk(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    size = disk_bytes(work / "out/a")
    assert run(capsys, "out/a", "--max-bytes", str(size))[0] == 0
    (work / "out/a" / "notes.txt").write_text("x" * 10)  # not a tensor, but shipped with the folder
    code, out, _ = run(capsys, "out/a", "--max-bytes", str(size))
    assert code == 1 and "bytes" in out
    assert run(capsys, "out/a", "--max-bytes", "4MB")[0] == 0
    assert run(capsys, "out/a", "--max-bytes", "1KiB")[0] == 1


def test_max_rank(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rank = load_adapter(work / "out/b").max_rank
    assert rank > 1
    assert run(capsys, "out/b", "--max-rank", str(rank))[0] == 0
    code, out, _ = run(capsys, "out/b", "--max-rank", str(rank - 1))
    assert code == 1 and "max_rank" in out


def _with_quality(folder: Path, quality: dict) -> dict:
    report = json.loads((folder / COMPRESSION_REPORT).read_text())
    report["quality"] = quality
    (folder / COMPRESSION_REPORT).write_text(json.dumps(report))
    return report


def test_min_and_max_quality_from_the_report(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    energy = json.loads((work / "out/a" / COMPRESSION_REPORT).read_text())["retained_energy"]
    assert 0 < energy < 1
    assert run(capsys, "out/a", "--min-quality", f"retained_energy>={energy - 1e-6}")[0] == 0
    code, out, _ = run(capsys, "out/a", "--min-quality", f"retained_energy={energy + 1e-3}")
    assert code == 1 and "below the minimum" in out

    _with_quality(work / "out/a", {"accuracy": {"before": 0.90, "after": 0.88}, "kl": {"after": 0.02}})
    # accuracy.retained = after / before = 0.9778
    assert run(capsys, "out/a", "--min-quality", "accuracy.retained>=0.97")[0] == 0
    assert run(capsys, "out/a", "--min-quality", "accuracy.retained>=0.99")[0] == 1
    assert run(capsys, "out/a", "--min-quality", "accuracy>=0.88")[0] == 0  # bare name = after
    assert run(capsys, "out/a", "--min-quality", "accuracy.before>=0.9")[0] == 0
    assert run(capsys, "out/a", "--max-quality", "kl.after<=0.05")[0] == 0
    assert run(capsys, "out/a", "--max-quality", "kl.after<=0.01")[0] == 1


def test_quality_not_measured_fails_and_names_what_is_there(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _with_quality(work / "out/a", {"accuracy": {"before": 0.9, "after": 0.88}})
    code, out, _ = run(capsys, "out/a", "--min-quality", "f1.retained>=0.9")
    assert code == 1 and "accuracy.retained" in out and "retained_energy" in out
    (work / "out/a" / COMPRESSION_REPORT).unlink()
    code, out, _ = run(capsys, "out/a", "--min-quality", "accuracy.retained>=0.9")
    assert code == 1 and f"no {COMPRESSION_REPORT}" in out


def test_every_applicable_threshold_must_hold(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = load_adapter(work / "out/b").num_params
    (work / "loracompress.toml").write_text(
        f'[check]\n[[check.adapters]]\npath = "out/b"\nmax_params = {params - 1}\nmessage = "b must stay small"\n'
    )
    code, out, _ = run(capsys, "out/b", "--max-params", "1M")  # the flag passes, the config entry fails
    assert code == 1 and "b must stay small" in out


# --------------------------------------------------------------------------- config and globbing


def test_pyproject_config_globs_discovered_from_a_subfolder(work: Path, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = load_adapter(work / "out/a"), load_adapter(work / "out/b")
    (work / "pyproject.toml").write_text(
        '[project]\nname = "x"\n\n[tool.loracompress.check]\n\n[[tool.loracompress.check.adapters]]\n'
        f'path = "out/*"\nmax_params = "{b.num_params}"\nmax_rank = {b.max_rank}\n'
    )
    (work / "sub").mkdir()
    monkeypatch.chdir(work / "sub")  # paths in a discovered config are relative to its folder
    code, out, _ = run(capsys, "--json")
    assert code == 0, out
    result = json.loads(out)
    assert [x["path"] for x in result["adapters"]] == [str(work / "out/a"), str(work / "out/b")]
    assert [x["measured"]["params"] for x in result["adapters"]] == [a.num_params, b.num_params]
    assert all(len(x["checks"]) == 2 for x in result["adapters"])

    # the same glob given on the command line, relative to the cwd
    monkeypatch.chdir(work)
    code, out, _ = run(capsys, "out/*", "--max-rank", str(a.max_rank), "--json")
    assert code == 1
    ok = {x["path"]: x["ok"] for x in json.loads(out)["adapters"]}
    assert ok == {"out/a": True, "out/b": False}


def test_explicit_config_is_relative_to_the_cwd(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (work / "ci").mkdir()
    (work / "ci" / "gate.toml").write_text('[check]\n[[check.adapters]]\npath = ["out/a", "out/b"]\nmax_rank = 64\n')
    code, out, _ = run(capsys, "--config", "ci/gate.toml", "--json")
    assert code == 0 and len(json.loads(out)["adapters"]) == 2


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[check\n", "not valid TOML"),
        ('[check]\n[[check.adapters]]\npath = "out/a"\nmax_param = "2M"\n', "unknown key 'max_param'"),
        ('[check]\n[[check.adapters]]\npath = "out/a"\nmax_params = "2 apples"\n', "max_params"),
        ('[check]\n[[check.adapters]]\npath = "out/a"\nmax_bytes = "2M"\n', "is a parameter count"),
        ('[check]\n[[check.adapters]]\npath = "out/a"\nmax_rank = 0\n', "max_rank"),
        ('[check]\n[[check.adapters]]\npath = "out/a"\nmin_quality = 0.99\n', "min_quality must be a table"),
        ('[check]\n[[check.adapters]]\npath = "out/a"\n', "no threshold"),
        ('[check]\n[[check.adapters]]\nmax_rank = 4\n', "path must be"),
        ('[check]\ntolerance = "lots"\n', "tolerance"),
        ('[check]\nadapters = "out/a"\n', "array of tables"),
        ('[check]\n[[check.adapters]]\npath = "nowhere/*"\nmax_rank = 4\n', "matched no adapter folder"),
    ],
)
def test_malformed_config_exits_2_with_one_line(work: Path, capsys: pytest.CaptureFixture[str], text: str,
                                                needle: str) -> None:
    (work / "loracompress.toml").write_text(text)
    code, out, err = run(capsys)
    assert code == 2
    assert needle in err and err.startswith("error: ") and err.count("\n") == 1
    assert "Traceback" not in err and out == ""


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["missing/", "--max-rank", "4"], "no such folder"),
        (["out/z*", "--max-rank", "4"], "matched no adapter folder"),
        (["out/a"], "no threshold applies"),
        ([], "nothing to check"),
        (["out/a", "--max-params", "50%"], "is a fraction"),
        (["out/a", "--min-quality", "accuracy"], "quote it"),
        (["out/a", "--min-quality", "kl<=0.1"], "--max-quality"),
        (["out/a", "--max-rank", "4", "--tolerance", "2%"], "needs a baseline"),
        (["out/a", "--config", "nope.toml", "--max-rank", "4"], "no such file"),
    ],
)
def test_bad_input_exits_2(work: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str) -> None:
    code, _, err = run(capsys, *args)
    assert code == 2 and needle in err and err.count("\n") == 1


# --------------------------------------------------------------------------- baselines


def make_baseline(capsys: pytest.CaptureFixture[str], *paths: str) -> dict:
    assert main(["report", *paths, "--json"]) == 0
    text = capsys.readouterr().out
    Path("sizes.json").write_text(text)
    return json.loads(text)


def test_report_json_is_a_baseline_that_passes(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = make_baseline(capsys, "out/a", "out/b")
    a = load_adapter(work / "out/a")
    assert doc["adapters"]["out/a"]["params"] == a.num_params
    assert doc["adapters"]["out/a"]["max_rank"] == a.max_rank
    assert doc["adapters"]["out/a"]["bytes"] == disk_bytes(work / "out/a")
    code, out, _ = run(capsys, "out/a", "out/b", "--baseline", "sizes.json")
    assert code == 0 and "±0" in out


def test_baseline_growth_fails_with_the_delta(work: Path, capsys: pytest.CaptureFixture[str],
                                              adapters: dict[str, Path]) -> None:
    doc = make_baseline(capsys, "out/a")
    replace(work / "out/a", adapters["big"])  # the adapter at out/a grew
    old, new = doc["adapters"]["out/a"]["params"], load_adapter(work / "out/a").num_params
    assert new > old
    code, out, err = run(capsys, "out/a", "--baseline", "sizes.json", "--tolerance", "2%", "--json")
    assert code == 1 and "check failed" in err
    checks = {c["metric"]: c for c in json.loads(out)["adapters"][0]["checks"]}
    assert checks["params"]["ok"] is False
    assert checks["params"]["delta"] == new - old
    assert checks["params"]["delta_pct"] == pytest.approx(100 * (new - old) / old)
    code, out, _ = run(capsys, "out/a", "--baseline", "sizes.json", "--tolerance", "2%")
    assert f"+{(100 * (new - old) / old):.1f}%" in out and "grew" in out
    # a tolerance above the growth lets it pass
    growth = max((new - old) / old, (disk_bytes(work / "out/a") - doc["adapters"]["out/a"]["bytes"]) / doc["adapters"]["out/a"]["bytes"])
    assert run(capsys, "out/a", "--baseline", "sizes.json", "--tolerance", f"{100 * growth + 1}%")[0] == 0


def test_baseline_shrink_passes_and_shows_the_delta(work: Path, capsys: pytest.CaptureFixture[str],
                                                    adapters: dict[str, Path]) -> None:
    doc = make_baseline(capsys, "out/b")
    replace(work / "out/b", adapters["small"])
    code, out, _ = run(capsys, "out/b", "--baseline", "sizes.json", "--json")
    assert code == 0
    checks = {c["metric"]: c for c in json.loads(out)["adapters"][0]["checks"]}
    assert checks["params"]["delta"] == load_adapter(work / "out/b").num_params - doc["adapters"]["out/b"]["params"] < 0
    assert checks["max_rank"]["delta"] < 0 and checks["bytes"]["delta"] < 0


def test_new_adapter_with_a_limit_passes_and_is_marked(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_baseline(capsys, "out/a")
    code, out, _ = run(capsys, "out/a", "out/b", "--baseline", "sizes.json", "--max-params", "10M")
    assert code == 0 and "not in the baseline" in out


def test_new_adapter_without_a_limit_is_not_passed_on_nothing(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 23: an adapter neither in the baseline nor under any limit was "passed", having been checked
    against nothing. It is a user error now; --update-baseline adds it."""
    make_baseline(capsys, "out/a")
    code, out, err = run(capsys, "out/a", "out/b", "--baseline", "sizes.json")
    assert code == 2 and "out/b: nothing to check it against" in err and "--update-baseline" in err, err
    assert run(capsys, "out/a", "out/b", "--baseline", "sizes.json", "--update-baseline")[0] == 0
    assert run(capsys, "out/a", "out/b", "--baseline", "sizes.json")[0] == 0


def test_update_baseline_rewrites_it_atomically(work: Path, capsys: pytest.CaptureFixture[str],
                                                adapters: dict[str, Path]) -> None:
    make_baseline(capsys, "out/a", "out/b")
    replace(work / "out/a", adapters["orig"])  # grew a lot
    code, out, _ = run(capsys, "out/a", "--baseline", "sizes.json", "--update-baseline")
    assert code == 0 and "updated baseline" in out
    after = json.loads(Path("sizes.json").read_text())
    assert after["adapters"]["out/a"]["params"] == load_adapter(work / "out/a").num_params
    assert after["adapters"]["out/b"]["params"] == load_adapter(work / "out/b").num_params  # kept
    assert [p.name for p in work.iterdir() if p.name.startswith(".sizes.json")] == []
    assert run(capsys, "out/a", "out/b", "--baseline", "sizes.json")[0] == 0
    # thresholds still apply while updating
    assert run(capsys, "out/a", "--baseline", "sizes.json", "--update-baseline", "--max-rank", "1")[0] == 1
    # a baseline can be created from nothing
    assert run(capsys, "out/a", "--baseline", "new.json", "--update-baseline")[0] == 0
    assert list(json.loads(Path("new.json").read_text())["adapters"]) == ["out/a"]


def test_config_baseline_keys_are_relative_to_the_config_folder(work: Path, capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    (work / "loracompress.toml").write_text('[check]\nbaseline = "sizes.json"\ntolerance = "1%"\n'
                                            '[[check.adapters]]\npath = "out/*"\nmax_rank = 64\n')
    assert main(["report", "--json"]) == 0  # no paths: the config's entries
    Path("sizes.json").write_text(capsys.readouterr().out)
    (work / "deep").mkdir()
    monkeypatch.chdir(work / "deep")
    code, out, _ = run(capsys, "--json")
    assert code == 0
    kinds = [c["kind"] for x in json.loads(out)["adapters"] for c in x["checks"]]
    assert kinds.count("baseline") == 6 and kinds.count("limit") == 2


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("{not json", "not valid JSON"),
        ('{"sizes": {}}', '"adapters" table'),
        ('{"adapters": {"out/a": {"params": -5}}}', "not a whole number"),
        ('{"adapters": {"out/a": 3}}', "not an object"),
        ('{"format": "other/9", "adapters": {}}', "format"),
    ],
)
def test_malformed_baseline_exits_2(work: Path, capsys: pytest.CaptureFixture[str], text: str, needle: str) -> None:
    Path("sizes.json").write_text(text)
    code, _, err = run(capsys, "out/a", "--baseline", "sizes.json")
    assert code == 2 and needle in err and err.count("\n") == 1


def test_missing_baseline_exits_2(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "out/a", "--baseline", "absent.json")
    assert code == 2 and "no such file" in err and "--update-baseline" in err


# --------------------------------------------------------------------------- GitHub output


def test_step_summary_is_appended(work: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    summary = work / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    rank_b = load_adapter(work / "out/b").max_rank
    code, _, _ = run(capsys, "out/a", "out/b", "--max-rank", str(rank_b - 1), "--message", "serving caps rank")
    assert code == 1
    text = summary.read_text()
    assert text.startswith("earlier step\n")
    lines = text.splitlines()
    assert "### loracompress check: ❌ 1 breach in 1 of 2 adapters" in lines
    assert "| adapter | check | value | limit | baseline | Δ | result |" in lines
    assert any(line.startswith("| `out/a` | max_rank |") and "✅ pass" in line for line in lines)
    row_b = next(line for line in lines if line.startswith("| `out/b` | max_rank |"))
    assert f"| {rank_b} | ≤ {rank_b - 1} |" in row_b and "❌ **fail**" in row_b
    assert f"- out/b: max_rank {rank_b} is above the maximum {rank_b - 1} — serving caps rank" in lines

    assert run(capsys, "out/a", "--max-rank", "64")[0] == 0  # a passing run appends too
    assert summary.read_text().count("### loracompress check") == 2
    assert "✅ all 1 adapter pass" in summary.read_text()


def test_github_annotations(work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                            adapters: dict[str, Path]) -> None:
    make_baseline(capsys, "out/a")
    replace(work / "out/a", adapters["big"])
    rank = load_adapter(work / "out/a").max_rank
    code, out, _ = run(capsys, "out/a", "--max-rank", str(rank - 1), "--baseline", "sizes.json")
    assert code == 1 and "::error" not in out  # only under GitHub Actions

    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    code, out, _ = run(capsys, "out/a", "--max-rank", str(rank - 1), "--message", "100% over: fix,\nplease",
                       "--baseline", "sizes.json")
    assert code == 1
    errors = [line for line in out.splitlines() if line.startswith("::error ")]
    assert len(errors) == 4  # the rank limit, and params/bytes/max_rank growth
    assert errors[0] == (
        "::error file=out/a/adapter_config.json,title=loracompress check%3A max_rank is over its limit::"
        f"out/a: max_rank {rank} is above the maximum {rank - 1} — 100%25 over: fix,%0Aplease"
    )
    assert all("title=loracompress check%3A" in e and "grew past the baseline" in e for e in errors[1:])

    # with --json the annotations go to stderr and stdout stays parseable
    code, out, err = run(capsys, "out/a", "--max-rank", str(rank - 1), "--json")
    assert code == 1 and json.loads(out)["ok"] is False
    assert err.startswith("::error file=out/a/adapter_config.json,")


def test_report_table(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "out/*"]) == 0
    out = capsys.readouterr().out
    a = load_adapter(work / "out/a")
    assert "out/a" in out and "out/b" in out and f"{a.num_params / 1e3:.3g}k" in out


def test_the_repository_gate_config_and_baseline_are_valid() -> None:
    """.ci/run checks the bundled sample with samples/ci; a broken file there would break CI with exit 2."""
    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(repo / "samples/ci/loracompress.toml", repo)
    assert cfg.baseline == repo / "samples/ci/sizes.json" and cfg.tolerance == pytest.approx(0.02)
    baseline = load_baseline(cfg.baseline)
    assert set(baseline) == {p for e in cfg.entries for p in e.patterns}
    for entry in cfg.entries:  # the recorded sizes satisfy the limits
        for key in entry.patterns:
            assert baseline[key]["params"] <= entry.thresholds.max_params
            assert baseline[key]["bytes"] <= entry.thresholds.max_bytes
            assert baseline[key]["max_rank"] <= entry.thresholds.max_rank


def test_report_plot_shows_the_ranks_of_every_module(adapters: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The PNG is written and its data are the report's ranks (pruned modules at 0), or the adapter's own."""
    from matplotlib.image import imread

    from loracompress.gate.plots import rank_profile

    out = tmp_path / "ranks.png"
    assert main(["report", str(adapters["small"]), str(adapters["orig"]), "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and imread(out).shape[0] > 400  # two panels
    assert [p.name for p in tmp_path.iterdir()] == ["ranks.png"]  # no temp file left

    report = json.loads((adapters["small"] / COMPRESSION_REPORT).read_text())
    prof = rank_profile("small", report, load_adapter(adapters["small"]).ranks)
    kept = load_adapter(adapters["small"]).ranks
    assert prof.after == [kept.get(m, 0) for m in prof.modules] and prof.before == [8] * len(prof.modules)
    assert rank_profile("orig", None, load_adapter(adapters["orig"]).ranks).before is None

    capsys.readouterr()
    assert main(["report", str(adapters["small"]), "--plot", str(tmp_path / "ranks.pdf")]) == 2
    assert "write a .png" in capsys.readouterr().err
    assert main(["report", str(adapters["small"]), "--plot", str(tmp_path / "missing" / "r.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
