"""Checkpoints of a calibration run: safetensors + JSON, never a pickle; resuming is exact."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from loracompress.calibration.methods.base import Method
from loracompress.core import jsonio
from loracompress.errors import LoraCompressError
from loracompress.runtime.layers import LoraLayer

CKPT_TENSORS = "state.safetensors"
CKPT_JSON = "state.json"


class Checkpoints:
    """``ROOT/step-NNNNNNNN/{state.safetensors,state.json}``; the newest complete one wins."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def latest(self) -> Path | None:
        found = sorted(p for p in self.root.glob("step-*") if p.is_dir() and re.fullmatch(r"step-\d{8}", p.name)
                       and (p / CKPT_JSON).is_file() and (p / CKPT_TENSORS).is_file())
        return found[-1] if found else None

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def save(self, step: int, layers: Mapping[str, LoraLayer], optimizer: torch.optim.Optimizer, accelerator: Any,
             method: Method, fingerprint: Mapping[str, Any], losses: list[float]) -> None:
        if accelerator.is_main_process:
            from safetensors.torch import save_file

            tensors: dict[str, torch.Tensor] = {}
            for path, layer in layers.items():
                tensors[f"layer.{path}.A"] = layer.A.detach()
                tensors[f"layer.{path}.B"] = layer.B.detach()
                tensors[f"layer.{path}.mask"] = layer.mask.detach()
            opt_state = optimizer.state_dict()
            opt_values: dict[str, Any] = {}
            for pid, st in opt_state["state"].items():
                for k, v in st.items():
                    if isinstance(v, torch.Tensor):
                        tensors[f"opt.{pid}.{k}"] = v.detach()
                    else:
                        opt_values[f"{pid}.{k}"] = v
            method_values: dict[str, Any] = {}
            for k, v in method.state_dict().items():
                if isinstance(v, torch.Tensor):
                    tensors[f"method.{k}"] = v.detach()
                else:
                    method_values[k] = v
            info = {
                "step": step,
                "fingerprint": fingerprint,
                "optimizer_groups": opt_state["param_groups"],
                "optimizer_values": opt_values,
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "method": method_values,
                "losses": losses,
            }
            self.root.mkdir(parents=True, exist_ok=True)
            final = self.root / f"step-{step:08d}"
            tmp = self.root / f".tmp-{final.name}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(tmp / CKPT_TENSORS),
                      metadata={"step": str(step)})
            jsonio.write_json(tmp / CKPT_JSON, info, indent=1)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in self.root.glob("step-*"):
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def load(self, layers: Mapping[str, LoraLayer], optimizer: torch.optim.Optimizer, accelerator: Any,
             method: Method, fingerprint: Mapping[str, Any]) -> tuple[int, list[float]]:
        from safetensors.torch import load_file

        where = self.latest()
        if where is None:
            raise LoraCompressError(f"--resume: no checkpoint in {self.root}; run without --resume to start afresh")
        try:
            info = json.loads((where / CKPT_JSON).read_text(encoding="utf-8"))
            tensors = load_file(str(where / CKPT_TENSORS))
        except (OSError, ValueError) as err:
            raise LoraCompressError(f"--resume: checkpoint {where} is unreadable ({err}); delete {self.root} and run without --resume") from None
        old = info.get("fingerprint", {})
        diff = [k for k in sorted(set(old) | set(fingerprint)) if old.get(k) != fingerprint.get(k)]
        if diff:
            k = diff[0]
            raise LoraCompressError(
                f"--resume: the checkpoint in {self.root} was made with {k}={old.get(k)!r}, this run has "
                f"{fingerprint.get(k)!r}; rerun with the same settings or drop --resume"
            )
        dev = accelerator.device
        with torch.no_grad():
            for path, layer in layers.items():
                for name in ("A", "B", "mask"):
                    getattr(layer, name).copy_(tensors[f"layer.{path}.{name}"].to(dev))
        state: dict[int, dict[str, Any]] = {}
        for key, v in tensors.items():
            if key.startswith("opt."):
                _, pid, name = key.split(".", 2)
                state.setdefault(int(pid), {})[name] = v
        for key, v in info.get("optimizer_values", {}).items():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = v
        groups = info["optimizer_groups"]
        for g in groups:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        if info.get("scaler") and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(info["scaler"])
        mstate: dict[str, Any] = dict(info.get("method", {}))
        mstate.update({k[len("method."):]: v.to(dev) for k, v in tensors.items() if k.startswith("method.")})
        method.load_state_dict(mstate)
        return int(info["step"]), [float(x) for x in info.get("losses", [])]


def remove_checkpoints(checkpoint_dir: Path | None) -> None:
    """Delete a run's checkpoint folder (after its output was written)."""
    if checkpoint_dir is not None and checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
