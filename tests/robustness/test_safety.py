"""Safety: nothing we read can run code, and nothing we read decides where we write.

- A legacy ``adapter_model.bin`` holding a malicious pickle is refused (exit 2) and its payload never
  runs; a plain legacy state dict still loads.
- ``trust_remote_code`` reaches transformers as ``True`` only when the caller asks for it, and a model
  folder with custom code is refused without it (its code never imported).
- Paths inside configs and tensor names (``base_model_name_or_path = "../../x"``, module names with
  ``..`` or ``/``) never make the tool write outside the output folder.
- A static scan of the package: every ``torch.load`` passes ``weights_only=True``, nothing else
  unpickles, no call passes ``trust_remote_code=True``.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from loracompress.core.reader import load_adapter
from loracompress.errors import LoraCompressError
from loracompress_cli.app import main
from tests.robustness.hostile import (
    assert_user_error,
    base_config,
    lora_tensors,
    snapshot,
    tree,
    write_adapter,
)

REPO = Path(__file__).resolve().parents[2]


class _Payload:
    """Unpickling this creates ``marker``: the stand-in for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.marker, "w"))


def _evil_bin(directory: Path, marker: Path, zipped: bool) -> Path:
    write_adapter(directory)
    (directory / "adapter_model.safetensors").unlink()
    state = {**lora_tensors(), "base_model.model.x.lora_A.weight": _Payload(marker)}
    torch.save(state, directory / "adapter_model.bin", _use_new_zipfile_serialization=zipped)
    return directory


@pytest.mark.parametrize("zipped", [True, False], ids=["zip-format", "legacy-format"])
@pytest.mark.parametrize("command", ["inspect", "prune"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str,
                                                     zipped: bool) -> None:
    marker = tmp_path / "PWNED"
    src = _evil_bin(tmp_path / "in" / "adapter", marker, zipped)
    before = tree(tmp_path)
    args = [command, str(src)] + (["--budget", "0.5", "-o", str(tmp_path / "out")] if command == "prune" else [])
    code = main(args)
    line = assert_user_error(code, capsys.readouterr().err, "adapter_model.bin", "cannot be read safely", "safetensors")
    assert "weights_only" not in line  # never suggest the unsafe way out
    assert not marker.exists(), "the pickle payload ran"
    assert tree(tmp_path) == before


def test_the_payload_is_real(tmp_path: Path) -> None:
    """Control: an unsafe unpickler does run the payload, so the test above would notice."""
    marker = tmp_path / "PWNED"
    src = _evil_bin(tmp_path / "adapter", marker, zipped=True)
    torch.load(src / "adapter_model.bin", weights_only=False)
    assert marker.exists()
    marker.unlink()
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("zipped", [True, False], ids=["zip-format", "legacy-format"])
def test_plain_legacy_bin_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str], zipped: bool) -> None:
    tensors = lora_tensors(dtype=torch.float16)
    src = write_adapter(tmp_path / "adapter", tensors=tensors)
    (src / "adapter_model.safetensors").unlink()
    torch.save(tensors, src / "adapter_model.bin", _use_new_zipfile_serialization=zipped)
    adapter = load_adapter(src)
    assert adapter.dtype == torch.float16 and len(adapter.modules) == 5
    m = adapter.modules["model.layers.0.self_attn.q_proj"]
    assert torch.equal(m.A, tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])
    assert m.scale == 8 / 4
    assert main(["prune", str(src), "--budget", "0.5", "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()  # legacy in, safetensors out


# --------------------------------------------------------------------------- trust_remote_code


def _spy_from_pretrained(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict]]:
    """Record the kwargs of every transformers ``from_pretrained`` that load_base_model makes (and still load)."""
    import transformers

    calls: list[tuple[str, dict]] = []
    for name in ("AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoTokenizer", "AutoConfig"):
        cls = getattr(transformers, name)
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, _name=name, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            calls.append((_name, dict(kwargs)))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return calls


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny import save_tiny_base

    return save_tiny_base("llama", tmp_path_factory.mktemp("base") / "llama")


@pytest.mark.parametrize("flag", [False, True])
def test_trust_remote_code_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, llama_base: Path,
                                           flag: bool) -> None:
    from loracompress.runtime.model import load_base_model

    calls = _spy_from_pretrained(monkeypatch)
    adapter = load_adapter(write_adapter(tmp_path / "adapter"))
    kwargs = {"trust_remote_code": True} if flag else {}
    load_base_model(llama_base, adapter, **kwargs)
    names = [n for n, _ in calls]
    assert "AutoModelForCausalLM" in names and "AutoTokenizer" in names
    for name, kw in calls:
        assert kw.get("trust_remote_code", False) is flag, (name, kw)
        assert kw.get("local_files_only") is True, (name, kw)  # and never a download


def _custom_code_model(folder: Path, marker: Path) -> Path:
    """A model folder whose config points at custom code that, when imported, creates ``marker``."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "lc_custom",
        "architectures": ["LcModel"],
        "auto_map": {"AutoConfig": "configuration_lc.LcConfig", "AutoModelForCausalLM": "modeling_lc.LcModel"},
    }))
    payload = f"open({str(marker)!r}, 'w').close()\n"
    (folder / "configuration_lc.py").write_text(
        payload + "from transformers import PretrainedConfig\n\n"
        "class LcConfig(PretrainedConfig):\n    model_type = 'lc_custom'\n")
    (folder / "modeling_lc.py").write_text(
        payload + "import torch\nfrom transformers import PreTrainedModel\nfrom .configuration_lc import LcConfig\n\n"
        "class LcModel(PreTrainedModel):\n    config_class = LcConfig\n\n"
        "    def __init__(self, config):\n        super().__init__(config)\n        self.lin = torch.nn.Linear(2, 2)\n")
    return folder


def test_custom_code_refused_without_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loracompress.runtime.model import load_base_model

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    marker = tmp_path / "CUSTOM_CODE_RAN"
    model = _custom_code_model(tmp_path / "custom", marker)
    adapter = load_adapter(write_adapter(tmp_path / "adapter"))
    with pytest.raises(LoraCompressError) as info:
        load_base_model(model, adapter)
    assert "--trust-remote-code" in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists(), "custom model code was imported without --trust-remote-code"


def test_custom_code_runs_with_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Control: with the flag the folder's code is imported, so the test above would notice."""
    from loracompress.runtime.model import load_base_model

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    marker = tmp_path / "CUSTOM_CODE_RAN"
    model = _custom_code_model(tmp_path / "custom", marker)
    adapter = load_adapter(write_adapter(tmp_path / "adapter"))
    try:
        load_base_model(model, adapter, trust_remote_code=True)
    except LoraCompressError:
        pass  # the toy model has no weights or modules; what matters is that its code ran
    assert marker.exists()


def test_cli_passes_trust_remote_code_only_with_the_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Wiring: prune's options carry trust_remote_code=True only when --trust-remote-code is given."""
    import loracompress_cli.prune_cmd as prune_cmd

    seen: list[bool] = []

    def record(source, output, options, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(options.trust_remote_code)
        raise LoraCompressError("stop here")

    monkeypatch.setattr(prune_cmd, "prune", record)
    src = write_adapter(tmp_path / "adapter")
    for extra in ([], ["--trust-remote-code"]):
        assert main(["prune", str(src), "--budget", "0.5", "-o", str(tmp_path / "o"), *extra]) == 2
    assert seen == [False, True]


NO_NETWORK = """
import json, socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(str(args[0])[:80])
    raise OSError("network blocked by the test")
socket.getaddrinfo = refuse
socket.create_connection = refuse
from loracompress_cli.app import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "attempts": attempts}))
"""


def test_uncached_base_model_makes_no_network_request(tmp_path: Path) -> None:
    """Offline means offline: an id that is not in the local cache is refused without a single request
    (transformers' adapter lookup ignores local_files_only, and huggingface_hub fetches a registry)."""
    import subprocess
    import sys

    src = write_adapter(tmp_path / "adapter")
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "good movie"}\n')
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf-home")  # an empty cache
    proc = subprocess.run([sys.executable, "-c", NO_NETWORK, "eval", str(src), "--data", str(data),
                           "--base-model", "nobody-x/not-cached-anywhere"], capture_output=True, text=True,
                          timeout=300, env=env, cwd=REPO)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 2
    assert_user_error(2, proc.stderr, "offline", "--base-model")
    assert result["attempts"] == [], f"network requests were attempted: {result['attempts']}"


# --------------------------------------------------------------------------- static scan


def _calls(root: Path) -> list[tuple[Path, ast.Call]]:
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                out.append((path, node))
    return out


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Name):
        return node.id
    return "?"


def test_source_never_unpickles_or_trusts_remote_code() -> None:
    sources = _calls(REPO / "loracompress") + _calls(REPO / "loracompress_cli")
    assert len(sources) > 100  # the scan sees the package
    torch_loads = 0
    for path, call in sources:
        name = _dotted(call.func)
        kw = {k.arg: k.value for k in call.keywords if k.arg}
        where = f"{path.relative_to(REPO)}:{call.lineno}"
        if name in ("torch.load",):
            torch_loads += 1
            value = kw.get("weights_only")
            assert isinstance(value, ast.Constant) and value.value is True, f"{where}: torch.load without weights_only=True"
        assert name not in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "joblib.load",
                            "cloudpickle.load"), f"{where}: {name} unpickles"
        if name.endswith(("np.load", "numpy.load")):
            value = kw.get("allow_pickle")
            assert value is None or (isinstance(value, ast.Constant) and value.value is False), f"{where}: allow_pickle"
        value = kw.get("trust_remote_code")
        assert not (isinstance(value, ast.Constant) and value.value is True), f"{where}: trust_remote_code=True"
    assert torch_loads >= 1  # the legacy .bin reader is found and checked


# --------------------------------------------------------------------------- paths from configs


def _escape_targets(tmp_path: Path) -> list[Path]:
    return [tmp_path / "evil", tmp_path / "etc", tmp_path / "abs-target", tmp_path / "head"]


@pytest.mark.parametrize(
    "variant",
    ["base-model-dotdot", "base-model-absolute", "module-dotdot", "module-absolute", "extra-tensor-dotdot"],
)
def test_config_paths_never_redirect_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch, variant: str) -> None:
    """Run from deep inside tmp_path so that '../../x' names a place inside it we can watch."""
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    config = base_config()
    tensors = lora_tensors()
    if variant == "base-model-dotdot":
        config["base_model_name_or_path"] = "../../etc"
    elif variant == "base-model-absolute":
        config["base_model_name_or_path"] = str(tmp_path / "abs-target")
    elif variant in ("module-dotdot", "module-absolute"):
        name = "../../evil" if variant == "module-dotdot" else str(tmp_path / "abs-target")
        tensors = lora_tensors(modules=[(name, 48, 48), ("model.layers.0.mlp.up_proj", 48, 80)])
    else:
        tensors["base_model.model.../../head.modules_to_save.default.weight"] = torch.ones(3, 48)
    src = write_adapter(tmp_path / "src" / "adapter", config, tensors)
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    code = main(["prune", str(src), "--budget", "0.5", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    after = snapshot(tmp_path)
    written = {p for p in after if p not in before or after[p] != before[p]}
    assert written and all(p.startswith("out/") for p in written), written
    assert {Path(p).name for p in written} == {"adapter_model.safetensors", "adapter_config.json",
                                               "compression_report.json", "README.md"}
    for target in _escape_targets(tmp_path):
        assert not target.exists(), f"wrote {target}"
    assert not any(os.listdir(cwd))
    # what was read is kept as data: names and the base model record survive as strings
    small = load_adapter(out)
    if variant.startswith("base-model"):
        assert small.config["base_model_name_or_path"] == config["base_model_name_or_path"]
    if variant == "module-dotdot":
        assert "../../evil" in small.modules
