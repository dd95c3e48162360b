"""Benchmark: SDXL model build and UNet forward on this machine, as a table.

    python bench/model_forward.py [--skip-full] [--repeats 3] [--mem-limit-gib 20]

Each case runs in its own process so that its peak RSS is its own. Cases:
  - build time of the full-size models with and without random initialisation;
  - UNet forward, 64x64 latent (a 512 px image), batch 1, float32, PyNative and graph mode,
    for the tiny preset and full size (full size in graph mode is stopped by a memory watchdog
    when it passes --mem-limit-gib, and reported as such);
  - tiny UNet forward + backward (gradients of every parameter) in graph mode at a 32x32 latent
    (256 px, the size the tests and the demo train at): the model part of a training step.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_gib():
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2 ** 20
    return float("nan")


def _watchdog(limit_gib):
    def watch():
        while True:
            with open(f"/proc/{os.getpid()}/status") as f:
                rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            if rss / 2 ** 20 > limit_gib:
                print(json.dumps({"error": f"RSS passed {limit_gib} GiB"}), flush=True)
                os._exit(3)
            time.sleep(0.2)
    threading.Thread(target=watch, daemon=True).start()


def run_case(case, preset, repeats, limit_gib):
    """Child process: run one case, print one JSON line."""
    _watchdog(limit_gib)
    sys.path.insert(0, ROOT)
    import numpy as np
    import mindspore as ms
    from mindspore import Tensor
    from library.models import build_sdxl

    if case in ("build_init", "build_no_init"):
        start = time.time()
        build_sdxl(preset, init=case == "build_init")
        return {"seconds": time.time() - start, "peak_rss_gib": _rss_gib()}

    start = time.time()
    unet = build_sdxl(preset, init=True).unet
    built = time.time() - start
    cfg = unet.cfg
    rng = np.random.default_rng(0)
    side = 32 if case == "train_graph" else 64
    x = Tensor(rng.standard_normal((1, 4, side, side), dtype=np.float32))
    t = Tensor(np.array([500.0], np.float32))
    ctx = Tensor(rng.standard_normal((1, 77, cfg.context_dim), dtype=np.float32))
    y = Tensor(rng.standard_normal((1, cfg.adm_in_channels), dtype=np.float32))

    if case == "train_graph":
        def loss_fn(*inputs):
            return unet(*inputs).square().mean()

        fn = ms.jit(ms.value_and_grad(loss_fn, None, unet.trainable_params()))
    elif case == "forward_graph":
        fn = ms.jit(unet.construct)
    else:
        fn = unet

    times = []
    for _ in range(repeats + 1):
        start = time.time()
        out = fn(x, t, ctx, y)
        (out[0] if isinstance(out, tuple) else out).asnumpy()
        times.append(time.time() - start)
    return {"build_s": built, "first_s": times[0], "seconds": float(np.median(times[1:])),
            "peak_rss_gib": _rss_gib()}


CASES = [
    ("build_init", "sdxl_base", "build, random init"),
    ("build_no_init", "sdxl_base", "build, no init"),
    ("forward_pynative", "tiny", "UNet forward, PyNative"),
    ("forward_graph", "tiny", "UNet forward, graph"),
    ("train_graph", "tiny", "UNet forward+backward (32x32 latent), graph"),
    ("forward_pynative", "sdxl_base", "UNet forward, PyNative"),
    ("forward_graph", "sdxl_base", "UNet forward, graph"),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-full", action="store_true", help="only the tiny preset")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mem-limit-gib", type=float, default=20.0)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(run_case(*args.child, args.repeats, args.mem_limit_gib)), flush=True)
        return

    rows = []
    for case, preset, label in CASES:
        if args.skip_full and preset != "tiny":
            continue
        repeats = args.repeats if preset == "tiny" else 1
        proc = subprocess.run([sys.executable, __file__, "--child", case, preset, "--repeats",
                               str(repeats), "--mem-limit-gib", str(args.mem_limit_gib)],
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        result = json.loads(lines[-1]) if lines else {"error": proc.stderr.strip()[-200:]}
        rows.append((preset, label, result))
        print(f"done: {preset} {label}: {result}", file=sys.stderr, flush=True)

    print("| preset | case | first call (incl. compile) s | s per call | peak RSS GiB |")
    print("|---|---|---|---|---|")
    for preset, label, r in rows:
        if "error" in r:
            print(f"| {preset} | {label} | – | – | {r['error']} |")
            continue
        first = f"{r['first_s']:.2f}" if "first_s" in r else "–"
        print(f"| {preset} | {label} | {first} | {r['seconds']:.3f} | {r['peak_rss_gib']:.2f} |")


if __name__ == "__main__":
    main()
