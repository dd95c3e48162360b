"""The PyTorch side of the benches runs in its own venv, .venv-bench in the repo root
(git-ignored), created on first use with pinned versions: the torch 2.13.0 CPU wheel and the
diffusers / transformers releases the reference fixtures were made with."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_VENV = os.path.join(ROOT, ".venv-bench")
PINNED = ["torch==2.13.0", "diffusers==0.35.2", "transformers==4.57.1", "safetensors", "accelerate"]


def bench_python():
    """The venv's python, creating the venv (or installing what it lacks) first."""
    python = os.path.join(BENCH_VENV, "bin", "python")
    if not os.path.exists(python):
        print(f"creating {BENCH_VENV} ({', '.join(PINNED)}) ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", BENCH_VENV], check=True)
    probe = "import torch, diffusers, transformers; print(torch.__version__.split('+')[0], " \
            "diffusers.__version__, transformers.__version__)"
    found = subprocess.run([python, "-c", probe], capture_output=True, text=True).stdout.split()
    if found != [p.split("==")[1] for p in PINNED[:3]]:
        subprocess.run([python, "-m", "pip", "install", "-q", *PINNED], check=True)
    return python
