"""The benchmark (``make bench``): step time against its floor and the scripts' way, sampling
speed against the teacher, peak memory. Prints JSON; ratios are the figures that count.

    python -m tdd.bench --model tiny --batch-size 8 --repeats 5
    python -m tdd.bench memory --help   (peak memory of the published UNets: tdd/bench_memory.py)
    python -m tdd.bench adversarial     (step time with/without adversarial=hinge)
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
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


def _median_seconds(fns: dict, device, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each callable, measured round-robin so that load on a shared
    machine hits all of them alike (the ratios stay meaningful)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            with Stopwatch(device) as watch:
                fn()
            times[key].append(watch.seconds)
    return {key: statistics.median(values) for key, values in times.items()}


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


def build(teacher_factory, strategy_config: DictConfig, device):
    strategy = hydra.utils.instantiate(strategy_config)
    module = DistillationModule(teacher_factory(), partial(LoRAStudent, rank=16, alpha=16),
                                strategy, DecoupledGuidance(), PseudoHuberLoss(),
                                partial(torch.optim.AdamW, lr=1e-5)).to(device)
    return module, module.configure_optimizers()


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run(model: str, batch_size: int, repeats: int, images: int, device: str) -> dict:
    from tdd.models.teacher import load_teacher
    from tdd.models.tiny import build_tiny

    device = torch.device(device)
    if model == "tiny":
        teacher_factory = build_tiny
    else:
        from tdd.config import asset_path
        path = asset_path("toy/pipeline") if model == "toy" else model
        teacher_factory = partial(load_teacher, path, 32)
    generator = torch.Generator().manual_seed(0)
    report = {"device": str(device), "model": model, "batch_size": batch_size, "steps": {}}
    load = {"teacher_load_s": teacher_factory}  # what a run pays before its first step
    report.update(_median_seconds(load, device, repeats))
    for name, strategy_config in strategy_configs().items():
        module, optimizer = build(teacher_factory, strategy_config, device)
        resolution = module.teacher.resolution
        batch = {"pixel_values": torch.rand(batch_size, 3, resolution, resolution,
                                            generator=generator).to(device) * 2 - 1,
                 "caption": ["a red striped circle at the top left"] * batch_size}
        args = (module, batch, optimizer)
        timed = {
            "framework_s": partial(framework_step, *args),
            "floor_s": partial(floor_step, *args),
            "reference_s": partial(reference_step, *args, random.Random(0)),
        }
        row = _median_seconds(timed, device, repeats)
        row["framework_over_floor"] = row["framework_s"] / row["floor_s"]
        row["framework_over_reference"] = row["framework_s"] / row["reference_s"]
        report["steps"][name] = row
    prompts = ["a red striped circle at the top left"] * images
    seeds = list(range(images))
    unet = module.student.sampling_unet
    sample = partial(generate, pipeline=module.teacher, prompts=prompts, seeds=seeds)

    def teacher_sample():
        with module.student.as_teacher() as teacher_unet:
            sample(teacher_unet, sampler=DDIMSampler(), num_steps=25, guidance_scale=4.5)

    timed = {
        "tdd@4": partial(sample, unet, sampler=TDDSampler(), num_steps=4),
        "tdd@8": partial(sample, unet, sampler=TDDSampler(), num_steps=8),
        "tcd@4": partial(sample, unet, sampler=TCDSampler(), num_steps=4),
        "teacher@25_cfg": teacher_sample,
    }
    speed = {k: images / v for k, v in _median_seconds(timed, device, repeats).items()}
    report["sampling_images_per_s"] = speed
    report["sampling_speedup_vs_teacher"] = {
        k: v / speed["teacher@25_cfg"] for k, v in speed.items() if k != "teacher@25_cfg"}
    report["peak_memory_mb"] = peak_memory_mb(device)
    return report


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["memory"]:
        from tdd.bench_memory import main as memory_main

        return memory_main(argv[1:])
    if argv[:1] == ["adversarial"]:
        from tdd.bench_adversarial import main as adversarial_main

        return adversarial_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, toy, or a diffusers directory")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.model, args.batch_size, args.repeats, args.images, args.device),
                     indent=2))


if __name__ == "__main__":
    main()
