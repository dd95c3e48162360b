"""Benchmark: the UNet's heavy layers one at a time, forward and backward, MindSpore graph mode
against PyTorch eager, at the tiny UNet's shapes (64x64 latent: 32 channels at 64x64, 64 at
32x32, 96 at 16x16).

    PYTHONPATH=. .venv/bin/python bench/kernels.py [--calls 10] [--torch-threads 1] [--ms-threads 0]

Each case chains --chain copies of one layer (library/layers.py: GroupNorm, a 3x3 Conv2d,
self-attention's core on (B*heads, L, 16), a Linear on token rows) and times `value_and_grad`
over the chain's input and weights under `ms.jit`, against the same chain's `.sum().backward()` in
PyTorch eager (.venv-bench). The table gives ms per layer (forward + backward): these are the
per-kernel floors under the whole train step (bench/train_step.py), so a layer whose MindSpore
time is far above PyTorch's bounds how close the step can get.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench_venv import bench_python, set_mindspore_threads, thread_env  # noqa: E402

# (layer, channels, spatial size): every level of the tiny UNet at a 64x64 latent
CASES = [("group_norm", 32, 64), ("group_norm", 64, 32), ("group_norm", 96, 16),
         ("conv3x3", 32, 64), ("conv3x3", 64, 32), ("conv3x3", 96, 16),
         ("attention", 64, 32), ("attention", 96, 16),
         ("linear", 64, 32), ("linear", 96, 16)]
HEAD_DIM = 16

TORCH_CASE = r'''
import json, sys, time, torch
from torch import nn
import torch.nn.functional as F
kind, c, s, chain, calls, threads = sys.argv[1], *(int(v) for v in sys.argv[2:7])
torch.set_num_threads(threads)
torch.manual_seed(0)
heads = c // 16
if kind == "group_norm":
    layers = [nn.GroupNorm(32, c) for _ in range(chain)]; x = torch.randn(1, c, s, s)
elif kind == "conv3x3":
    layers = [nn.Conv2d(c, c, 3, padding=1) for _ in range(chain)]; x = torch.randn(1, c, s, s)
elif kind == "linear":
    layers = [nn.Linear(c, c) for _ in range(chain)]; x = torch.randn(s * s, c)
else:
    def attn(t):
        q = t.reshape(1, -1, heads, 16).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(t.shape)
    layers = [attn] * chain; x = torch.randn(s * s, c)
x.requires_grad_(True)
def step():
    y = x
    for l in layers:
        y = l(y)
    y.sum().backward()
step()
start = time.perf_counter()
for _ in range(calls):
    step()
print(json.dumps({"ms": (time.perf_counter() - start) / calls / chain * 1000}))
'''


def mindspore_case(kind, c, s, chain, calls):
    import numpy as np
    import mindspore as ms
    from mindspore import Tensor, nn
    from library import device, layers
    device.configure(parallel_dispatch=False)
    set_mindspore_threads()
    heads = c // HEAD_DIM

    class Chain(nn.Cell):
        def __init__(self):
            super().__init__()
            if kind == "group_norm":
                cells = [layers.GroupNorm(32, c) for _ in range(chain)]
            elif kind == "conv3x3":
                cells = [layers.Conv2d(c, c, 3, padding=1) for _ in range(chain)]
            elif kind == "linear":
                cells = [layers.Linear(c, c) for _ in range(chain)]
            else:
                cells = [layers.Attention(heads) for _ in range(chain)]
            self.chain = nn.CellList(cells)

        def construct(self, x):
            for cell in self.chain:
                x = cell(x, x, x, 1) if kind == "attention" else cell(x)
            return x.sum()

    shape = (1, c, s, s) if kind in ("group_norm", "conv3x3") else (s * s, c)
    x = Tensor(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    net = Chain()
    step = ms.jit(ms.value_and_grad(net, grad_position=0, weights=net.trainable_params() or None))
    step(x)[0].asnumpy()       # compiles
    start = time.perf_counter()
    for _ in range(calls):
        step(x)[0].asnumpy()
    return {"ms": (time.perf_counter() - start) / calls / chain * 1000}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--chain", type=int, default=40, help="copies of the layer in one graph")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--ms-threads", type=int, default=0)
    p.add_argument("--case", help=argparse.SUPPRESS)      # kind,c,s: one MindSpore case, in-process
    args = p.parse_args()
    if args.case:
        kind, c, s = args.case.split(",")
        print(json.dumps(mindspore_case(kind, int(c), int(s), args.chain, args.calls)))
        return
    env = dict(os.environ, PYTHONPATH=ROOT, **thread_env(args.torch_threads, args.ms_threads))
    torch_python = bench_python()
    print(f"ms per layer, forward + backward, chain of {args.chain}, {args.calls} calls; "
          f"MindSpore graph mode ({args.ms_threads or 'default'} threads) against PyTorch eager "
          f"({args.torch_threads} thread(s))\n")
    print("| layer | channels | size | MindSpore ms | PyTorch ms | ratio |")
    print("|---|---|---|---|---|---|")
    total_ms = total_torch = 0.0
    for kind, c, s in CASES:
        ms_out = subprocess.run([sys.executable, __file__, "--case", f"{kind},{c},{s}", "--chain",
                                 str(args.chain), "--calls", str(args.calls)], env=env, check=True,
                                capture_output=True, text=True).stdout
        torch_out = subprocess.run([torch_python, "-c", TORCH_CASE, kind, str(c), str(s),
                                    str(args.chain), str(args.calls), str(args.torch_threads)],
                                   env=env, check=True, capture_output=True, text=True).stdout
        m = json.loads(ms_out.strip().splitlines()[-1])["ms"]
        t = json.loads(torch_out.strip().splitlines()[-1])["ms"]
        total_ms, total_torch = total_ms + m, total_torch + t
        print(f"| {kind} | {c} | {s}x{s} | {m:.2f} | {t:.2f} | {m / t:.1f}x |", flush=True)
    print(f"| all | | | {total_ms:.2f} | {total_torch:.2f} | {total_ms / total_torch:.1f}x |")


if __name__ == "__main__":
    main()
