"""Options that several commands share, declared once so their flags and help read the same everywhere.

typer reads these ``OptionInfo`` objects as parameter defaults; one object may serve many commands.
"""

from __future__ import annotations

import typer

from loracompress.pipelines.inputs import DataOptions, ModelOptions

# Flags take no value: metavar="" keeps typer's help from showing them as "--force <bool>", which
# reads as if "--force true" were the syntax (it is refused: a flag is on by being there).
FORCE = typer.Option(False, "--force", metavar="",
                     help="Replace an existing output folder that loracompress wrote (or an empty one).")
ALLOW_NONFINITE = typer.Option(False, "--allow-nonfinite", metavar="", help="Zero out NaN/Inf weights instead of refusing.")
TRUST_REMOTE_CODE = typer.Option(False, "--trust-remote-code", metavar="", help="Allow custom model code (review it first).")
BASE_MODEL = typer.Option(None, "--base-model", help="Base model folder, cached hub id or .gguf (default: the adapter's).")
TEXT_FIELD = typer.Option(None, "--text-field", help="Text field/column of the data (detected by default).")
LABEL_FIELD = typer.Option(None, "--label-field", help="Label field/column of the data (detected by default).")
SEQ_LEN = typer.Option(DataOptions.seq_len, "--seq-len", help="Tokens per sample.")
DEVICE = typer.Option(ModelOptions.device, "--device", help="auto, cpu, cuda, cuda:1 ...")
BASE_DTYPE = typer.Option("auto", "--base-dtype", help="Dtype the frozen base is stored in: auto (bf16 on a GPU that has it, else fp32), bf16, fp16 (GPU) or fp32.")
LOAD_IN_4BIT = typer.Option(False, "--load-in-4bit", metavar="", help="Quantize the base to 4-bit NF4 with bitsandbytes (QLoRA adapters; CPU or CUDA, pip install 'loracompress[qlora]').")
LOAD_IN_8BIT = typer.Option(False, "--load-in-8bit", metavar="", help="Quantize the base to 8-bit with bitsandbytes (CPU or CUDA, pip install 'loracompress[qlora]').")
LABEL_MAP = typer.Option(None, "--label-map", help="String labels' class indices in the head, e.g. fresh=1,rotten=0 "
                         "(default: the head's own label names; refused without them).")
