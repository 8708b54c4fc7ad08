"""Test-wide settings."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

# The tests use tiny models: threads only add spin-waiting, which on a shared 2-core machine
# makes a 0.3 s test take 30 s. Subprocesses inherit the same setting through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
