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


# Kernel threads. Importing MindSpore sets OMP_NUM_THREADS=1 in the process environment (at the C
# level: os.environ does not show it), so a PyTorch child started from a bench that had imported
# the library always ran single-threaded, unsaid. The benches now set both sides explicitly:
# PyTorch with --torch-threads (default 1, its fastest setting on these shared cores: OpenMP's
# barriers stall when the cores are busy with other jobs, e.g. 0.12 s one thread vs 1.8 s two
# threads for one SDXL block's grad under load 8), MindSpore with --ms-threads (default 0, its
# own default: here threads_num(1) made small kernels several times slower, measured in
# docs/training.md).
def thread_env(torch_threads, ms_threads=0):
    """Environment for a bench child: OMP/MKL threads for PyTorch, BENCH_MS_THREADS for
    MindSpore (0: its default)."""
    n = str(int(torch_threads))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "BENCH_TORCH_THREADS": n,
            "BENCH_MS_THREADS": str(int(ms_threads))}


def set_mindspore_threads():
    """In a MindSpore case process: CPU kernel threads from BENCH_MS_THREADS, if not 0."""
    n = int(os.environ.get("BENCH_MS_THREADS") or 0)
    if n:
        import mindspore as ms
        ms.device_context.cpu.op_tuning.threads_num(n)
