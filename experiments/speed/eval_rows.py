"""The default evaluation's sampling, timed three ways in one process, interleaved: as before
(LoRA adapters unmerged, teacher rows sampled), with the adapters merged, and with the teacher
rows read from the cache (merged student rows only). Toy teacher, rank-64 LoRA with random
B, the default settings: teacher 25 and 4 steps with CFG 4.5, student 2/4/6/8 steps at
g = 1 and 1.7, batch 32. Usage: python experiments/speed/eval_rows.py [images] [rounds]"""

import json
import sys
import time

import torch

from tdd.bench_steps import build, strategy_configs, teacher_factory_of
from tdd.sampling import DDIMSampler, TDDSampler, generate

images = int(sys.argv[1]) if len(sys.argv) > 1 else 64
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
device = torch.device("cpu")
module, _ = build(teacher_factory_of("toy", None, "float32", device), strategy_configs()["tdd"],
                  device, rank=64)
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for name, p in module.named_parameters():
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
prompts = ["a large red striped circle at the top left on a black background"] * images
seeds = list(range(images))


def rows(unet, sampler, settings):
    for steps, scale in settings:
        generate(unet, module.teacher, sampler, prompts, seeds, steps, scale, 32)


def teacher_rows():
    with module.student.as_teacher() as unet:
        rows(unet, DDIMSampler(), [(25, 4.5), (4, 4.5)])


student = [(k, s) for k in (2, 4, 6, 8) for s in (1.0, 1.7)]


def unmerged():
    rows(module.student.sampling_unet, TDDSampler(), student)


def merged():
    with module.student.sampling() as unet:
        rows(unet, TDDSampler(), student)


variants = {"before": lambda: (teacher_rows(), unmerged()),
            "merged": lambda: (teacher_rows(), merged()),
            "merged+cache": merged}
times = {k: [] for k in variants}
for fn in variants.values():  # warm-up
    fn()
for _ in range(rounds):
    for name, fn in variants.items():
        t = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t)
    print(json.dumps({k: [round(x, 2) for x in v] for k, v in times.items()}), flush=True)
ratios = {k: [b / x for b, x in zip(times["before"], v)] for k, v in times.items()}
print(json.dumps({"images": images, "rounds": rounds, "threads": torch.get_num_threads(),
                  "seconds": times, "speedup_vs_before": ratios}, indent=1))
