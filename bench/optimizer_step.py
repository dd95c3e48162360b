"""Compile time and time per update of each optimizer, alone in ms.jit, on LoRA-shaped tensors
(the optimizer's input: one flat float32 gradient vector per parameter group, as the apply step
passes it).

    PYTHONPATH=. .venv/bin/python bench/optimizer_step.py [--modules 175] [--rank 4] [--steps 20]

The default parameter set is the shape of the tiny-UNet LoRA the probe trained (175 modules,
350 tensors); --modules 1052 --rank 32 --dim 1280 is roughly an SDXL LoRA of rank 32.
Prints one table row per optimizer.
"""

import argparse
import time

import numpy as np
import mindspore as ms
from mindspore import nn, Parameter, Tensor

from library.training.optimizer_options import build_optimizer
from library.training.optimizer_cells import ParamGroup


class Update(nn.Cell):
    def __init__(self, optimizer):
        super().__init__(auto_prefix=False)
        self.optimizer = optimizer

    @ms.jit
    def construct(self, grads, lrs):
        return self.optimizer(grads, lrs)


def lora_params(modules, rank, dim, tag):
    rng = np.random.default_rng(0)
    params = []
    for i in range(modules):
        params.append(Parameter(Tensor(rng.normal(size=(rank, dim)).astype(np.float32) * 0.01),
                                name=f"{tag}.m{i}.lora_down.weight"))
        params.append(Parameter(Tensor(np.zeros((dim, rank), np.float32)), name=f"{tag}.m{i}.lora_up.weight"))
    return params


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--modules", type=int, default=175)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--dim", type=int, default=320)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    print(f"{args.modules} modules, rank {args.rank}, dim {args.dim} ({2 * args.modules} tensors)")
    print(f"| optimizer | compile + first step (s) | update (ms, median of {args.steps}) |")
    print("|---|---|---|")
    rng = np.random.default_rng(1)
    for name, lr, opt_args in [("AdamW", 1e-4, []), ("Lion", 1e-4, []), ("SGDNesterov", 1e-2, []),
                               ("Adafactor", 0.0, []), ("Prodigy", 1.0, [])]:
        params = lora_params(args.modules, args.rank, args.dim, name)
        built = build_optimizer([ParamGroup(params, lr, "unet")], lr, name, opt_args)
        built.optimizer.layout.compiled_writes = True     # as compile.step_graphs sets it
        update = Update(built.optimizer)
        grads = ms.mutable(tuple(Tensor(rng.normal(size=s.size).astype(np.float32))
                                 for s in built.optimizer.layout.segments))
        lrs = Tensor(np.array([lr], np.float32))
        t0 = time.perf_counter()
        update(grads, lrs)
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            update(grads, lrs)
            params[0].asnumpy()  # wait for the update to finish
            times.append(time.perf_counter() - t0)
        print(f"| {name} | {compile_s:.1f} | {1000 * float(np.median(times)):.1f} |", flush=True)


if __name__ == "__main__":
    main()
