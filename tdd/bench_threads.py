"""Training throughput of a CPU: one process with a thread per core against one process per
core with one thread each (what ``python -m tdd.study run <study> --jobs <cores>`` does). Prints
JSON; the ratio ``per_core_over_one_process`` is the figure that counts.

    python -m tdd.bench threads --model toy --batch-size 32 --steps 20

Every process builds its module and takes ``--warmup`` untimed steps, then all of a
configuration's processes start their ``--steps`` timed steps together (a barrier); its
throughput is the steps of all its processes over the slowest one's wall time. The two
configurations alternate for ``--rounds`` rounds (A B, B A, ...), so that slow drift on a shared
machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time

import torch


def _worker(model: str, batch_size: int, steps: int, warmup: int, threads: int, barrier,
            results) -> None:
    torch.set_num_threads(threads)
    from tdd.bench_steps import build, framework_step, strategy_configs, teacher_factory_of

    device = torch.device("cpu")
    module, optimizer = build(teacher_factory_of(model, None, "float32", device),
                              strategy_configs()["tdd"], device)
    resolution = module.teacher.resolution
    batch = {"pixel_values": torch.rand(batch_size, 3, resolution, resolution,
                                        generator=torch.Generator().manual_seed(0)) * 2 - 1,
             "caption": ["a red striped circle at the top left"] * batch_size}
    for _ in range(warmup):
        framework_step(module, batch, optimizer)
    barrier.wait()
    start = time.perf_counter()
    for _ in range(steps):
        framework_step(module, batch, optimizer)
    results.put(time.perf_counter() - start)


def throughput(model: str, batch_size: int, steps: int, warmup: int, processes: int,
               threads: int) -> float:
    """Training steps per second of ``processes`` processes with ``threads`` threads each."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=_worker, args=(model, batch_size, steps, warmup, threads,
                                                     barrier, results))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    walls = [results.get(timeout=3600) for _ in workers]
    for worker in workers:
        worker.join()
        if worker.exitcode != 0:
            raise RuntimeError(f"a benchmark process failed (exit code {worker.exitcode})")
    return processes * steps / max(walls)


def run(model: str, batch_size: int, steps: int, warmup: int, rounds: int,
        cores: int | None = None) -> dict:
    cores = cores or os.cpu_count() or 1
    configurations = {"one_process": (1, cores), "per_core": (cores, 1)}
    measured: dict[str, list[float]] = {name: [] for name in configurations}
    order = list(configurations)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            measured[name].append(throughput(model, batch_size, steps, warmup,
                                             *configurations[name]))
    ratios = [b / a for a, b in zip(measured["one_process"], measured["per_core"])]
    return {
        "model": model, "batch_size": batch_size, "steps": steps, "warmup": warmup,
        "rounds": rounds, "cores": cores,
        "configurations": {k: {"processes": p, "threads": t}
                           for k, (p, t) in configurations.items()},
        "steps_per_s": {k: {"min": min(v), "median": statistics.median(v), "max": max(v)}
                        for k, v in measured.items()},
        "per_core_over_one_process": {"min": min(ratios), "median": statistics.median(ratios),
                                      "max": max(ratios)},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tdd.bench threads",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy", help="tiny, toy or a diffusers directory")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per process")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cores", type=int, default=None, help="default: os.cpu_count()")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.steps, args.rounds) < 1 or args.warmup < 0:
        raise SystemExit("--batch-size, --steps and --rounds must be >= 1, --warmup >= 0")
    print(json.dumps(run(args.model, args.batch_size, args.steps, args.warmup, args.rounds,
                         args.cores), indent=2))


if __name__ == "__main__":
    main()
