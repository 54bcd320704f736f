"""The adversarial-term contract and its null version, ``adversarial=none``
(docs/methods.md section 1.2)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn


class Adversarial(nn.Module):
    """An optional term on top of the consistency loss, called by the training step.

    The module asks, per optimizer step, whether that step trains the student
    (``trains_student``); runs the student branch under ``student_grad`` (no gradient on the
    term's own steps); hands ``objective`` the per-batch consistency loss with both branches at
    s, and returns what it gives. After each optimizer step on which the student was not
    trained it calls ``step``. This class is ``adversarial=none``: every step trains the
    student, the objective is the consistency loss itself, and no random draw is made, so a run
    without the term is the plain distillation step.
    """

    @classmethod
    def check(cls, **settings) -> None:
        """Reject bad settings before any model loads (names the setting)."""

    def trains_student(self, step: int) -> bool:
        return True

    def student_grad(self, step: int):
        """Context for the student's forward pass: no gradient on steps that do not train it."""
        return nullcontext() if self.trains_student(step) else torch.no_grad()

    def objective(self, module, consistency: torch.Tensor, pred_s: torch.Tensor,
                  target_s: torch.Tensor, s: torch.Tensor, conditioning) -> torch.Tensor:
        return consistency

    def setup(self, trainer) -> None:
        """Adapt to the trainer (precision, DDP) before the model is wrapped."""

    def configure_optimizer(self) -> None:
        """Build the term's own optimizer (after a checkpoint's state was handed over)."""

    def step(self) -> None:
        """Update the term's own weights after a step that did not train the student."""

    def optimizer_state(self) -> dict | None:
        """The term's optimizer state for a checkpoint (None: nothing to save)."""
        return None

    def load_optimizer_state(self, state: dict | None) -> None:
        """Restore the state :meth:`optimizer_state` returned."""


class NoAdversarial(Adversarial):
    """``adversarial=none``: the consistency loss alone."""

    def __init__(self, unet=None):
        super().__init__()
