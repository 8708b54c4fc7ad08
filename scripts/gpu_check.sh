#!/usr/bin/env bash
# One command for the day a GPU is lent: from a bare machine with one CUDA GPU and this checkout,
# install what is needed, then measure (scripts/gpu_check.py has the steps):
#   - calibration of a 7B-shaped synthetic base, a few steps in bf16 and with --load-in-4bit
#     (peak GPU memory by torch.cuda.max_memory_allocated, step time),
#   - an fp16 ONNX export for the CUDA execution provider, checked against PyTorch, and generation
#     with onnxruntime-genai on CUDA (1.1B shape, so that the export fits the time),
#   - a sharded run (--fsdp) through torchrun on the GPU (NCCL, a world of one),
# and write benchmarks/results/gpu.md. Sized for at most 8 minutes on one H100 with a warm pip cache.
#
#   scripts/gpu_check.sh                       # the real check (needs a CUDA GPU and network for pip)
#   scripts/gpu_check.sh --wheels DIR          # install offline from a folder of wheels
#   scripts/gpu_check.sh --tiny --no-install   # a dry run of the steps on tiny shapes, CPU is fine
#   scripts/gpu_check.sh --venv .venv-gpu      # install into (and run from) a fresh virtual environment
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

python="${PYTHON:-python3}"
install=1
tiny=0
wheels=""
venv=""
out="benchmarks/results/gpu.md"
limit=480  # seconds for the measured steps (the install comes on top)
extra=()

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --tiny) tiny=1; out="${out/gpu.md/gpu_tiny.md}"; shift ;;
    --no-install) install=0; shift ;;
    --wheels) wheels="$2"; shift 2 ;;
    --venv) venv="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --skip) extra+=(--skip "$2"); shift 2 ;;
    --limit) limit="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

say() { printf '[gpu_check %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
started=$SECONDS

if [[ $tiny -eq 0 ]]; then
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check.sh: no NVIDIA GPU found (nvidia-smi); run it on a GPU machine, or pass --tiny for a dry run" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2
fi

if [[ -n "$venv" ]]; then
  [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
  python="$venv/bin/python"
fi

if [[ $install -eq 1 ]]; then
  say "installing (pip)"
  pip_args=(-q --disable-pip-version-check)
  if [[ -n "$wheels" ]]; then
    pip_args+=(--no-index --find-links "$wheels")
  fi
  "$python" -m pip install "${pip_args[@]}" --upgrade pip setuptools wheel >/dev/null || true
  # The package with its test, plot and QLoRA extras. torch==2.13.0 is pinned by the package: on Linux
  # PyPI's wheel is the CUDA build. The [genai] extra is left out on purpose: it names the CPU
  # onnxruntime, and the CUDA builds below provide the same modules.
  "$python" -m pip install "${pip_args[@]}" -e ".[dev,qlora,plot]"
  if [[ $tiny -eq 0 ]]; then
    "$python" -m pip uninstall -y -q onnxruntime onnxruntime-genai >/dev/null 2>&1 || true
    "$python" -m pip install "${pip_args[@]}" onnxruntime-gpu onnxruntime-genai-cuda "onnx>=1.16" "onnx-ir>=1.1" \
      "onnxscript>=0.3" "peft>=0.13"
  else
    "$python" -m pip install "${pip_args[@]}" -e ".[genai]"
  fi
  say "installed in $((SECONDS - started)) s"
fi

"$python" - <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}", flush=True)
EOF

step_args=(--out "$out" "${extra[@]}")
if [[ $tiny -eq 1 ]]; then
  step_args+=(--tiny)
else
  step_args+=(--require-gpu)
fi
say "measuring (at most ${limit} s)"
rc=0
HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false timeout --kill-after=10 "$limit" \
  "$python" scripts/gpu_check.py "${step_args[@]}" || rc=$?
if [[ $rc -eq 124 || $rc -eq 137 ]]; then
  say "stopped after ${limit} s: the steps that finished are in the log above; $out may be missing"
fi
say "done in $((SECONDS - started)) s (exit $rc); results: $out"
exit "$rc"
