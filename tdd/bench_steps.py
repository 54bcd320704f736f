"""What every benchmark times: one distillation step three ways (the framework's
``training_step``, the networks alone, the published scripts' way), built the way ``run.py``
builds them, and how repeated timings are taken and summarised (``python -m tdd.bench`` and its
subcommands)."""

from __future__ import annotations

import random
import statistics
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
