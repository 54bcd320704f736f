"""The benchmark (``make bench``): step time against its floor and the scripts' way, sampling
speed against the teacher, peak memory. Prints JSON; ratios are the figures that count.

    python -m tdd.bench --model tiny --batch-size 8 --repeats 5
    python -m tdd.bench --model toy --batch-size 32 --repeats 3   (the main job's settings)

    python -m tdd.bench memory --help   (peak memory of the published UNets: tdd/bench_memory.py)
    python -m tdd.bench profile --help  (where the main job's time goes: tdd/profile.py)
    python -m tdd.bench adversarial     (step time with/without adversarial=hinge)
    python -m tdd.bench threads         (one process x all cores vs one process per core)
    python -m tdd.bench precision       (the training step in float32 vs bf16 autocast)

So that the figures hold still on a shared machine: every strategy's module is built first;
every timed callable (each strategy's framework, floor and reference step; each sampler) runs
``--warmup`` times untimed; then each repeat runs all of them once, round-robin. Every figure
is reported as min / median / max over the repeats. A ratio is computed per repeat (both sides
measured back to back) and reported as the median of those, with their min, max and
``spread`` = max / min; ``unstable`` lists the ratios whose spread exceeds 1.20.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from functools import partial

import torch

from tdd.bench_steps import (  # noqa: F401  (re-exported: tdd.bench is the public entry)
    CONF_DIR,
    build,
    floor_step,
    framework_step,
    interleaved_seconds,
    mixed_precision,
    ratio,
    reference_step,
    scripts_target,
    spread,
    strategy_configs,
    teacher_factory_of,
)
from tdd.metrics.timing import Stopwatch
from tdd.models.teacher import resolve_dtype
from tdd.module import DistillationModule
from tdd.sampling import DDIMSampler, TCDSampler, TDDSampler, generate

#: The three ways of taking one distillation step (see :func:`framework_step` and below).
VARIANTS = ("framework", "floor", "reference")
#: A ratio whose per-repeat values spread more than this (max / min) is flagged as unstable.
SPREAD_LIMIT = 1.20


def unstable(report: dict, limit: float = SPREAD_LIMIT) -> list[str]:
    """Names of the ratios in ``report`` (nested dicts) whose spread exceeds ``limit``."""
    found = []
    for key, value in report.items():
        if isinstance(value, dict) and "spread" in value:
            found += [key] if value["spread"] > limit else []
        elif isinstance(value, dict):
            found += [f"{key}/{name}" for name in unstable(value, limit)]
    return found


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def step_timings(teacher_factory, names: list[str], batch_size: int, repeats: int,
                 warmup: int, device, rank: int = 16, checkpointing=(False,)
                 ) -> tuple[dict, list[float], DistillationModule]:
    """Framework, floor and reference step of every strategy (and gradient-checkpointing
    setting: rows ``<strategy>+checkpointing``), all interleaved."""
    configs = strategy_configs()
    unknown = sorted(set(names) - set(configs))
    if unknown:
        raise SystemExit(f"--strategies: no conf/strategy/ option {unknown}; have {list(configs)}")
    generator = torch.Generator().manual_seed(0)
    timed, loads, modules, labels = {}, [], [], []
    for name in names:
        for ckpt in checkpointing:
            label = name + ("+checkpointing" if ckpt else "")
            with Stopwatch(device) as watch:
                module, optimizer = build(teacher_factory, configs[name], device, rank, ckpt)
            loads.append(watch.seconds)  # building includes loading the teacher
            modules.append(module)
            labels.append(label)
            resolution = module.teacher.resolution
            batch = {"pixel_values": torch.rand(batch_size, 3, resolution, resolution,
                                                generator=generator).to(device) * 2 - 1,
                     "caption": ["a red striped circle at the top left"] * batch_size}
            args, dtype = (module, batch, optimizer), module.student.unet.dtype
            steps = {"framework": partial(framework_step, *args),
                     "floor": partial(floor_step, *args),
                     "reference": partial(reference_step, *args, random.Random(0))}
            for variant, fn in steps.items():
                timed[f"{label}/{variant}"] = mixed_precision(fn, device, dtype)
    peaks: dict[str, float] = {}
    times = interleaved_seconds(timed, device, repeats, warmup, peaks)
    rows = {}
    for label in labels:
        row = {f"{v}_s": spread(times[f"{label}/{v}"]) for v in VARIANTS}
        row["steps_per_s"] = {v: 1 / row[f"{v}_s"]["median"] for v in VARIANTS}
        if peaks:
            row["peak_memory_mb"] = {v: peaks[f"{label}/{v}"] for v in VARIANTS}
        row["framework_over_floor"] = ratio(times[f"{label}/framework"], times[f"{label}/floor"])
        row["framework_over_reference"] = ratio(times[f"{label}/framework"],
                                                times[f"{label}/reference"])
        rows[label] = row
    return rows, loads, modules[0]


def sampling_timings(module, images: int, repeats: int, warmup: int, device) -> dict:
    """Images/s of the student's few-step samplers and the teacher's 25-step CFG, end to end
    (text encoding and VAE decoding included), interleaved."""
    prompts = ["a red striped circle at the top left"] * images
    sample = partial(generate, pipeline=module.teacher, prompts=prompts,
                     seeds=list(range(images)), batch_size=2 * images)  # CFG: one call of 2x

    def teacher_sample():
        with module.student.as_teacher() as teacher_unet:
            sample(teacher_unet, sampler=DDIMSampler(), num_steps=25, guidance_scale=4.5)

    def student_sample(sampler, num_steps):  # as evaluation samples (LoRA: merged)
        with module.student.sampling() as unet:
            sample(unet, sampler=sampler, num_steps=num_steps)

    timed = {
        "tdd@4": partial(student_sample, TDDSampler(), 4),
        "tdd@8": partial(student_sample, TDDSampler(), 8),
        "tcd@4": partial(student_sample, TCDSampler(), 4),
        "teacher@25_cfg": teacher_sample,
    }
    times = interleaved_seconds(timed, device, repeats, warmup)
    teacher = times["teacher@25_cfg"]
    return {
        "sampling_images_per_s": {k: spread([images / t for t in v]) for k, v in times.items()},
        "sampling_speedup_vs_teacher": {k: ratio(teacher, v) for k, v in times.items()
                                        if k != "teacher@25_cfg"},
    }


def run(model: str, batch_size: int, repeats: int, images: int, device: str, warmup: int = 1,
        strategies: list[str] | None = None, resolution: int | None = None,
        dtype: str = "float32", checkpointing=(False,), rank: int = 16) -> dict:
    """The benchmark report: per strategy the three steps' times and their ratios, sampling
    speed, peak memory; every figure as min / median / max over ``repeats`` and every ratio
    with its spread; ``unstable`` lists the ratios whose spread exceeds :data:`SPREAD_LIMIT`."""
    if repeats < 1 or warmup < 0 or images < 1 or batch_size < 1:
        raise SystemExit("--repeats, --images and --batch-size must be >= 1, --warmup >= 0")
    resolve_dtype(dtype)
    device = torch.device(device)
    start, cpu = time.perf_counter(), time.process_time()
    names = strategies or list(strategy_configs())
    factory = teacher_factory_of(model, resolution, dtype, device)
    steps, loads, module = step_timings(factory, names, batch_size, repeats, warmup, device,
                                        rank, checkpointing)
    report = {"device": str(device), "model": model, "batch_size": batch_size,
              "resolution": module.teacher.resolution, "dtype": dtype, "lora_rank": rank,
              "repeats": repeats, "warmup": warmup, "images": images,
              "threads": torch.get_num_threads(), "teacher_load_s": spread(loads),
              "steps": steps}
    report.update(sampling_timings(module, images, repeats, warmup, device))
    report["peak_memory_mb"] = peak_memory_mb(device)
    report["wall_s"], report["cpu_s"] = time.perf_counter() - start, time.process_time() - cpu
    report["unstable"] = unstable(report)
    return report


#: ``--model <name>-config`` defaults: the GPU measurement of the published recipes.
CONFIG_DEFAULTS = {"batch_size": 8, "dtype": "bfloat16", "checkpointing": ["off", "on"],
                   "rank": 64, "strategies": ["tdd"]}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["memory"]:
        from tdd.bench_memory import main as memory_main

        return memory_main(argv[1:])
    if argv[:1] == ["profile"]:
        from tdd.profile import main as profile_main

        return profile_main(argv[1:])
    if argv[:1] == ["precision"]:
        from tdd.bench_precision import main as precision_main

        return precision_main(argv[1:])
    if argv[:1] == ["threads"]:
        from tdd.bench_threads import main as threads_main

        return threads_main(argv[1:])
    if argv[:1] == ["adversarial"]:
        from tdd.bench_adversarial import main as adversarial_main

        return adversarial_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, toy, sd15-config (the published "
                        "SD1.5 configurations, random weights) or a diffusers directory")
    parser.add_argument("--batch-size", type=int, help="default 8")
    parser.add_argument("--resolution", type=int, help="pixels (default: 32; -config: 512)")
    parser.add_argument("--dtype", help="the frozen networks' dtype (default float32; -config: "
                        "bfloat16, the steps run under autocast to it)")
    parser.add_argument("--checkpointing", nargs="+", choices=["off", "on"],
                        help="gradient checkpointing settings to time (default off; -config: "
                        "off on)")
    parser.add_argument("--rank", type=int, help="LoRA rank (default 16; -config: 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of every figure")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of every figure first")
    parser.add_argument("--images", type=int, default=8, help="images per sampling figure")
    parser.add_argument("--strategies", nargs="+", help="conf/strategy/ options (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    defaults = {"batch_size": 8, "dtype": "float32", "checkpointing": ["off"], "rank": 16}
    if args.model.endswith("-config"):
        defaults.update(CONFIG_DEFAULTS)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    report = run(args.model, args.batch_size, args.repeats, args.images, args.device,
                 args.warmup, args.strategies, args.resolution, args.dtype,
                 [mode == "on" for mode in args.checkpointing], args.rank)
    print(json.dumps(report, indent=2))
    if report["unstable"]:
        print(f"unstable (per-repeat spread > {SPREAD_LIMIT:.2f}x): {report['unstable']}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
