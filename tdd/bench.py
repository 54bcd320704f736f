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
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import hydra
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from tdd.guidance import DecoupledGuidance, combine
from tdd.losses import PseudoHuberLoss
from tdd.metrics.timing import Stopwatch
from tdd.models.students import LoRAStudent
from tdd.models.teacher import resolve_dtype
from tdd.module import DistillationModule
from tdd.prediction import ddim_map
from tdd.sampling import DDIMSampler, TCDSampler, TDDSampler, generate
from tdd.strategies import TDDTarget

#: The configs of the source checkout: every conf/strategy/ option is benchmarked.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def strategy_configs(conf_dir: str | Path = CONF_DIR) -> dict[str, DictConfig]:
    """Each option of ``conf/strategy/`` composed as ``run.py strategy=<name>`` composes it."""
    names = sorted(path.stem for path in Path(conf_dir, "strategy").glob("*.yaml"))
    if not names:
        raise FileNotFoundError(f"no strategy configs under {Path(conf_dir, 'strategy')}: the "
                                "benchmark reads conf/ of a source checkout")
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(Path(conf_dir).resolve()), version_base="1.3"):
        return {name: compose("config", overrides=[f"strategy={name}"]).strategy
                for name in names}


#: The three ways of taking one distillation step (see :func:`framework_step` and below).
VARIANTS = ("framework", "floor", "reference")
#: A ratio whose per-repeat values spread more than this (max / min) is flagged as unstable.
SPREAD_LIMIT = 1.20


def interleaved_seconds(fns: dict, device, repeats: int, warmup: int = 1,
                        peaks: dict | None = None) -> dict[str, list[float]]:
    """Wall times of each callable per repeat. Every callable is warmed up ``warmup`` times
    first; then each repeat runs all of them once, round-robin, starting one further along
    each time, so that load on a shared machine and any order effect hit all of them alike.
    On CUDA, ``peaks`` receives each callable's peak allocated memory (MiB) during its runs."""
    device = torch.device(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    keys = list(fns)
    times: dict[str, list[float]] = {key: [] for key in keys}
    for r in range(repeats):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with Stopwatch(device) as watch:
                fns[key]()
            times[key].append(watch.seconds)
            if device.type == "cuda" and peaks is not None:
                peak = torch.cuda.max_memory_allocated(device) / 2**20
                peaks[key] = max(peaks.get(key, 0.0), peak)
    return times


def spread(values: list[float]) -> dict[str, float]:
    """min / median / max of a figure's repeats."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def ratio(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """The ratio of two figures measured in the same repeats: the median of the per-repeat
    ratios, their min and max, and ``spread`` = max / min of the per-repeat ratios."""
    values = [a / b for a, b in zip(numerator, denominator)]
    return {**spread(values), "spread": max(values) / min(values)}


def unstable(report: dict, limit: float = SPREAD_LIMIT) -> list[str]:
    """Names of the ratios in ``report`` (nested dicts) whose spread exceeds ``limit``."""
    found = []
    for key, value in report.items():
        if isinstance(value, dict) and "spread" in value:
            found += [key] if value["spread"] > limit else []
        elif isinstance(value, dict):
            found += [f"{key}/{name}" for name in unstable(value, limit)]
    return found


def _optimizer_step(module, optimizer, loss):
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def floor_step(module, batch, optimizer):
    """Only the networks: student forward + backward, teacher on cond and uncond, target."""
    x_t = module.encode_images(batch["pixel_values"])
    t = torch.full((len(x_t),), 499, device=x_t.device)
    cond = module.text(batch["caption"])
    with torch.no_grad():
        module.student.teacher(x_t.repeat(2, 1, 1, 1), t.repeat(2), cond.cat(cond))
        module.student.target(x_t, t, cond)
    _optimizer_step(module, optimizer, module.student.online(x_t, t, cond).float().mean())


def scripts_target(strategy, index: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """TDD target selection as the published scripts write it: a Python loop per sample."""
    candidates = strategy.candidates.tolist()
    out = []
    for i in index.tolist():
        t_prev = max(int(strategy.grid.timesteps[i]) - strategy.grid.skip, 0)
        upper = max(m for m in candidates if m <= t_prev)
        choices = [m for m in candidates if max(upper - strategy.window, 0) <= m <= upper]
        tau = rng.choice(choices)
        out.append(int((1 - rng.random() * strategy.eta_max) * tau))
    return torch.tensor(out)


def reference_step(module, batch, optimizer, rng: random.Random):
    """One training step the scripts' way: per-sample target loop, two teacher calls."""
    grid, strategy, g = module.strategy.grid, module.strategy, module.generator
    i = grid.sample_index(len(batch["caption"]), g)
    t, t_prev = grid[i].to(module.device), grid.previous(i).to(module.device)
    if isinstance(strategy, TDDTarget):
        s = scripts_target(strategy, i, rng)
    else:
        s = strategy.sample(i, generator=g)
    s = s.to(module.device)
    cond, w = module.encode_prompts(batch["caption"])
    x0 = module.encode_images(batch["pixel_values"])
    x_t = module.schedule.add_noise(x0, module.randn_like(x0), t)
    with torch.no_grad():
        x0_c, eps_c = module.predict(module.student.teacher, x_t, t, cond)
        uncond = module.empty_conditioning(len(x_t))
        x0_u, eps_u = module.predict(module.student.teacher, x_t, t, uncond)
        w = w.to(module.device)
        x_prev = ddim_map(combine(x0_c, x0_u, w), combine(eps_c, eps_u, w), t_prev,
                          module.schedule)
        target = module.predict(module.student.target, x_prev, t_prev, cond)
    pred = module.predict(module.student.online, x_t, t, cond)
    pred_s = strategy.project(x_t, t, *pred, s, module.schedule)
    target_s = strategy.project_target(x_prev, t_prev, *target, s, module.schedule)
    _optimizer_step(module, optimizer, module.loss_fn(pred_s, target_s).mean())


def framework_step(module, batch, optimizer):
    _optimizer_step(module, optimizer, module.training_step(batch, 0))


def build(teacher_factory, strategy_config: DictConfig, device, rank: int = 16,
          checkpointing: bool = False):
    strategy = hydra.utils.instantiate(strategy_config)
    student = partial(LoRAStudent, rank=rank, alpha=rank, gradient_checkpointing=checkpointing)
    module = DistillationModule(teacher_factory(), student, strategy, DecoupledGuidance(),
                                PseudoHuberLoss(), partial(torch.optim.AdamW, lr=1e-5)).to(device)
    return module, module.configure_optimizers()


def mixed_precision(fn, device, dtype: torch.dtype):
    """``fn`` under autocast to the frozen networks' half precision (what ``trainer=gpu``'s
    bf16-mixed does), or plain in float32."""
    if dtype == torch.float32:
        return fn

    def autocast_fn():
        with torch.autocast(device.type, dtype=dtype):
            return fn()
    return autocast_fn


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def teacher_factory_of(model: str, resolution: int | None, dtype: str, device):
    """A callable building ``model``'s teacher: ``tiny`` (random), ``toy`` (shipped),
    ``<name>-config`` (published configurations, random weights) or a diffusers directory."""
    from tdd.models.teacher import load_teacher
    from tdd.models.tiny import build_tiny

    if model == "tiny":
        return partial(build_tiny, resolution or 32, dtype=dtype)
    if model.endswith("-config"):
        from tdd.models.config_teacher import config_teacher, published_configs

        configs = published_configs(model.removesuffix("-config"))
        return partial(config_teacher, configs, resolution or 512, dtype, device)
    from tdd.config import asset_path

    path = asset_path("toy/pipeline") if model == "toy" else model
    return partial(load_teacher, path, resolution or 32, dtype=dtype)


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
    unet = module.student.sampling_unet
    sample = partial(generate, pipeline=module.teacher, prompts=prompts,
                     seeds=list(range(images)), batch_size=2 * images)  # CFG: one call of 2x

    def teacher_sample():
        with module.student.as_teacher() as teacher_unet:
            sample(teacher_unet, sampler=DDIMSampler(), num_steps=25, guidance_scale=4.5)

    timed = {
        "tdd@4": partial(sample, unet, sampler=TDDSampler(), num_steps=4),
        "tdd@8": partial(sample, unet, sampler=TDDSampler(), num_steps=8),
        "tcd@4": partial(sample, unet, sampler=TCDSampler(), num_steps=4),
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
