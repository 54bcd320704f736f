"""Helpers for the sampling and export tests: a tiny LoRA student whose adapter matters."""

from __future__ import annotations

import torch

from tdd.models.students import LoRAStudent
from tdd.models.teacher import Teacher


def perturbed_lora_student(
    teacher: Teacher, rank: int = 4, alpha: float = 2, seed: int = 0, std: float = 0.1
) -> LoRAStudent:
    """A LoRA student on ``teacher.unet`` with seeded non-zero ``lora_B`` (peft starts it at 0)."""
    student = LoRAStudent(teacher.unet, rank=rank, alpha=alpha)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in student.unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return student.eval()


class CallCounter:
    """Counts forward calls of a module and the batch sizes they saw."""

    def __init__(self, module: torch.nn.Module):
        self.batches: list[int] = []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.batches.append(args[0].shape[0])

    def remove(self) -> None:
        self.handle.remove()
