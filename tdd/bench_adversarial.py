"""What the adversarial term costs: training-step time with ``adversarial=hinge`` (its
discriminator steps and its student steps) against the same step without it. Prints JSON.

    python -m tdd.bench adversarial --model toy --batch-size 8 --steps 12
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

import lightning as L
import torch

from tdd.adversarial import HingeAdversarial
from tdd.guidance import DecoupledGuidance
from tdd.losses import PseudoHuberLoss
from tdd.models.students import LoRAStudent
from tdd.module import DistillationModule
from tdd.strategies import TDDTarget


class StepTimes(L.Callback):
    """Wall time of every training step (forward, backward, optimizer steps)."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self._start = device, [], 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._sync()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._sync()
        self.seconds.append(time.perf_counter() - self._start)


def teacher_factory(model: str):
    from tdd.models.teacher import load_teacher
    from tdd.models.tiny import build_tiny

    if model == "tiny":
        return build_tiny
    from tdd.config import asset_path

    return partial(load_teacher, asset_path("toy/pipeline") if model == "toy" else model, 32)


def step_times(teacher, adversarial, batch, steps: int, device: torch.device) -> list[float]:
    module = DistillationModule(
        teacher, partial(LoRAStudent, rank=16, alpha=16), TDDTarget(num_ddim_timesteps=50),
        DecoupledGuidance(), PseudoHuberLoss(), partial(torch.optim.AdamW, lr=1e-5),
        adversarial=adversarial)
    times = StepTimes(device)
    trainer = L.Trainer(max_steps=steps, accelerator=device.type, devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=1.0, callbacks=[times])
    trainer.fit(module, torch.utils.data.DataLoader([batch] * steps, batch_size=None))
    return times.seconds


def run(model: str, batch_size: int, steps: int, device: str, warmup: int = 2) -> dict:
    """Median step times after ``warmup`` steps; the term's cost per step is the mean of its
    discriminator and student steps (they alternate) over the plain step, its cost per student
    update twice that."""
    device = torch.device(device)
    factory = teacher_factory(model)
    teacher = factory()
    size = teacher.resolution
    generator = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.rand(batch_size, 3, size, size, generator=generator) * 2 - 1,
             "caption": ["a red striped circle at the top left"] * batch_size}
    plain = step_times(teacher, None, batch, steps, device)[warmup:]
    hinge = step_times(factory(), HingeAdversarial, batch, steps, device)
    discriminator = [s for k, s in enumerate(hinge) if k >= warmup and k % 2 == 0]
    student = [s for k, s in enumerate(hinge) if k >= warmup and k % 2 == 1]
    row = {"plain_step_s": statistics.median(plain),
           "discriminator_step_s": statistics.median(discriminator),
           "student_step_s": statistics.median(student)}
    mean_adversarial = (row["discriminator_step_s"] + row["student_step_s"]) / 2
    return {"device": str(device), "model": model, "batch_size": batch_size, "steps": steps,
            **row, "adversarial_over_plain": mean_adversarial / row["plain_step_s"],
            "student_step_over_plain": row["student_step_s"] / row["plain_step_s"],
            # two steps per student update with the term, one without
            "per_student_update_over_plain": 2 * mean_adversarial / row["plain_step_s"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy", help="tiny, toy, or a diffusers directory")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12, help="per run, 2 of them warm-up")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.steps < 4:
        parser.error("--steps must be >= 4 (2 warm-up steps, then both kinds of step)")
    print(json.dumps(run(args.model, args.batch_size, args.steps, args.device), indent=2))


if __name__ == "__main__":
    main()
