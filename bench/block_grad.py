"""Benchmark: one UNet block's LoRA grad, MindSpore graph mode against PyTorch eager, back to back.

    PYTHONPATH=. .venv/bin/python bench/block_grad.py [--channels 64] [--size 32] [--heads 4]
                                                      [--calls 10] [--torch-threads 1]

The block of the tiny UNet's 32x32 level: `ResBlock(C, C)` then `SpatialTransformer(C,
context C, heads, depth 1)` from library/models/unet.py, with networks.lora's rank-8 LoRA on its
Linear layers, forward and backward (`ms.value_and_grad` over the LoRA parameters, under
`ms.jit`) on a 1xCxSxS input; then diffusers' ResnetBlock2D + Transformer2DModel with the same
LoRA in PyTorch eager (.venv-bench). Prints wall and user-CPU time per call of each, after a
warm-up: compiling the whole UNet step takes minutes on these shared cores, this takes seconds,
so before/after comparisons of a layer change fit in one quiet moment.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench_venv import bench_python, thread_env  # noqa: E402

TORCH_CASE = r'''
import json, resource, sys, time, torch
from torch import nn
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
c, size, heads, calls, threads = (int(v) for v in sys.argv[1:6])
torch.set_num_threads(threads)
groups = 32 if c % 32 == 0 else 16
res = ResnetBlock2D(in_channels=c, out_channels=c, temb_channels=128, groups=groups)
st = Transformer2DModel(num_attention_heads=heads, attention_head_dim=c // heads, in_channels=c,
                        num_layers=1, cross_attention_dim=c, norm_num_groups=groups,
                        use_linear_projection=True)
for m in (res, st):
    m.requires_grad_(False)
class LoRA(nn.Module):
    def __init__(self, org, rank=8):
        super().__init__()
        self.down = nn.Linear(org.in_features, rank, bias=False)
        self.up = nn.Linear(rank, org.out_features, bias=False)
        nn.init.normal_(self.up.weight, std=0.01)
        self.org_forward = org.forward
        org.forward = self.forward
    def forward(self, x):
        return self.org_forward(x) + self.up(self.down(x)) * 0.125
params = [p for m in st.modules() if isinstance(m, nn.Linear) for p in LoRA(m).parameters()]
x, emb, ctx = torch.randn(1, c, size, size), torch.randn(1, 128), torch.randn(1, 77, c)
def step():
    (st(res(x, emb), encoder_hidden_states=ctx).sample ** 2).mean().backward()
    for p in params:
        p.grad = None
step(); step()
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(calls):
    step()
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps(dict(wall=(time.perf_counter() - t0) / calls, user=(r1.ru_utime - r0.ru_utime) / calls)))
'''


def run_mindspore(c, size, heads, calls):
    import numpy as np
    import mindspore as ms
    from mindspore import nn, Tensor
    from library import device
    from library.models.unet import ResBlock, SpatialTransformer
    from networks.lora import LoRANetwork
    device.configure(graph_mode=True)
    groups = 32 if c % 32 == 0 else 16

    class Block(nn.Cell):
        def __init__(self):
            super().__init__()
            self.res = ResBlock(c, c, 128, groups)
            self.st = SpatialTransformer(c, c, heads, 1, groups)

        def construct(self, x, emb, ctx):
            return self.st(self.res(x, emb), emb, ctx)

    block = Block()
    for p in block.get_parameters():
        p.requires_grad = False
    network = LoRANetwork([], block, lora_dim=8, alpha=1)
    network.apply_to([], block)
    params = network.get_trainable_params()
    rng = np.random.default_rng(0)
    for p in params:
        p.requires_grad = True
        p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.01))

    class Step(nn.Cell):
        def __init__(self):
            super().__init__()
            self.block = block
            self.grad = ms.value_and_grad(self.loss, None, ms.ParameterTuple(params))

        def loss(self, x, emb, ctx):
            return (self.block(x, emb, ctx) ** 2).mean()

        def construct(self, x, emb, ctx):
            return self.grad(x, emb, ctx)

    fn = ms.jit(Step().construct)
    x = Tensor(rng.standard_normal((1, c, size, size)).astype(np.float32))
    emb = Tensor(rng.standard_normal((1, 128)).astype(np.float32))
    ctx = Tensor(rng.standard_normal((1, 77, c)).astype(np.float32))
    fn(x, emb, ctx)[0].asnumpy()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(calls):
        out = fn(x, emb, ctx)
    out[0].asnumpy()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return dict(wall=(time.perf_counter() - t0) / calls, user=(r1.ru_utime - r0.ru_utime) / calls)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--no-torch", action="store_true")
    args = p.parse_args()
    rows = [("MindSpore graph", run_mindspore(args.channels, args.size, args.heads, args.calls))]
    if not args.no_torch:
        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
            f.write(TORCH_CASE)
        proc = subprocess.run([bench_python(), f.name, str(args.channels), str(args.size),
                               str(args.heads), str(args.calls), str(args.torch_threads)],
                              capture_output=True, text=True,
                              env=dict(os.environ, **thread_env(args.torch_threads)))
        os.unlink(f.name)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        rows.append((f"PyTorch eager ({args.torch_threads} thread)",
                     json.loads(lines[-1]) if lines else {"error": proc.stderr[-200:]}))
    print(f"\nResBlock + SpatialTransformer LoRA grad, {args.channels} channels, "
          f"{args.size}x{args.size}, {args.heads} heads; load average {os.getloadavg()[0]:.1f}\n")
    print("| backend | wall s/call | user CPU s/call |")
    print("|---|---|---|")
    for name, r in rows:
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | – |")
        else:
            print(f"| {name} | {r['wall']:.3f} | {r['user']:.3f} |")


if __name__ == "__main__":
    main()
