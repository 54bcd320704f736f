"""One toy-UNet call of batch 64 against two of batch 32 (and the one call under bf16 autocast),
no gradient, interleaved round-robin: ``OMP_NUM_THREADS=2 python experiments/speed/unet_calls.py``
"""

import statistics
import time

import torch

from tdd.config import asset_path
from tdd.models.teacher import load_teacher

torch.set_num_threads(2)
unet = load_teacher(asset_path("toy/pipeline"), 32).unet
g = torch.Generator().manual_seed(0)
t = torch.tensor(500)


def inputs(b):
    return torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 32, 48, generator=g)


(x32, h32), (x64, h64) = inputs(32), inputs(64)


@torch.no_grad()
def two_calls():
    unet(x32, t, h32)
    unet(x32, t, h32)


@torch.no_grad()
def one_call():
    unet(x64, t, h64)


@torch.no_grad()
def one_call_bf16():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unet(x64, t, h64)


fns = {"2x32": two_calls, "1x64": one_call, "1x64_bf16": one_call_bf16}
for fn in fns.values():
    fn()  # warm-up
runs = {k: [] for k in fns}
for _ in range(4):
    for key, fn in fns.items():
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        runs[key].append((time.perf_counter() - wall, time.process_time() - cpu))
for key, values in runs.items():
    print(key, "wall med %.4f" % statistics.median(w for w, _ in values),
          "cpu med %.4f" % statistics.median(c for _, c in values))
for key in fns:
    print(key, "ratio to 2x32 per repeat:",
          ["%.2f" % (a[0] / b[0]) for a, b in zip(runs[key], runs["2x32"])])
