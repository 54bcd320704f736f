"""The hinge adversarial term of TDD-adv and PCM-adv (docs/methods.md section 1.2)."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from tdd.adversarial.base import Adversarial
from tdd.adversarial.discriminator import Discriminator
from tdd.prediction import renoise

#: The heads' optimizer in the TDD release: AdamW, lr 1e-5, betas (0, 0.999), weight decay 1e-3.
RELEASE_OPTIMIZER = partial(torch.optim.AdamW, lr=1e-5, betas=(0.0, 0.999), weight_decay=1e-3)


def hinge_discriminator(real: list[torch.Tensor], fake: list[torch.Tensor]) -> torch.Tensor:
    """Per sample: ``mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))``, averaged over heads."""
    per_head = [F.relu(1 - r).flatten(1).mean(1) + F.relu(1 + f).flatten(1).mean(1)
                for r, f in zip(real, fake)]
    return torch.stack(per_head).mean(0)


def hinge_generator(fake: list[torch.Tensor]) -> torch.Tensor:
    """Per sample: ``mean(relu(1 - D(fake)))``, averaged over heads (the TDD release's form)."""
    return torch.stack([F.relu(1 - f).flatten(1).mean(1) for f in fake]).mean(0)


def noisy_timestep(s: torch.Tensor, num_train_timesteps: int, k_min: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``u ~ U{s, ..., min(s + T // k_min, T) - 1}`` per sample: where both branches are
    re-noised to before the discriminator sees them."""
    s = s.cpu().long()
    high = (s + num_train_timesteps // k_min).clamp(max=num_train_timesteps)
    draw = torch.rand(len(s), generator=generator, dtype=torch.float64)
    return s + (draw * (high - s)).long()


class HingeAdversarial(Adversarial):
    """``adversarial=hinge``: a discriminator on the frozen teacher's features (UNet or flow
    transformer), trained with
    hinge losses on even steps; on odd steps the student gets ``weight`` times the generator
    hinge loss on top of the consistency loss (the alternation of the TDD release).

    "Real" is the target branch at s, "fake" the student branch at s, each re-noised with its
    own noise from s to the same ``u ~ U[s, min(s + T // k_min, T))``. The heads have their own
    optimizer (``optimizer``, a partial taking ``params``) and gradient clipping.
    """

    def __init__(
        self,
        unet,
        weight: float = 0.1,
        k_min: int = 4,
        kernel_size: int = 1,
        norm_groups: int = 32,
        optimizer=RELEASE_OPTIMIZER,
        gradient_clip_val: float | None = 1.0,
    ):
        super().__init__()
        self.check(weight=weight, k_min=k_min, kernel_size=kernel_size,
                   norm_groups=norm_groups, gradient_clip_val=gradient_clip_val)
        self.weight, self.k_min, self.gradient_clip_val = weight, k_min, gradient_clip_val
        self.discriminator = Discriminator(unet, kernel_size, norm_groups)
        self.optimizer_factory = optimizer
        self._optimizer: torch.optim.Optimizer | None = None
        self._pending_state: dict | None = None

    @classmethod
    def check(cls, weight=0.1, k_min=4, kernel_size=1, norm_groups=32, gradient_clip_val=1.0,
              **_) -> None:
        problems = [
            (weight < 0, f"adversarial.weight={weight} must be >= 0"),
            (k_min < 1, f"adversarial.k_min={k_min} must be >= 1"),
            (kernel_size < 1 or kernel_size % 2 == 0,
             f"adversarial.kernel_size={kernel_size} must be a positive odd number"),
            (norm_groups < 1, f"adversarial.norm_groups={norm_groups} must be >= 1"),
            (gradient_clip_val is not None and gradient_clip_val <= 0,
             f"adversarial.gradient_clip_val={gradient_clip_val} must be positive or null"),
        ]
        for failed, message in problems:
            if failed:
                raise ValueError(message)

    def trains_student(self, step: int) -> bool:
        return step % 2 == 1

    # -- the objective ---------------------------------------------------------------------------
    def objective(self, module, consistency, pred_s, target_s, s, conditioning):
        """The discriminator's hinge loss on its steps; else consistency + weight * G loss.
        Draws u, the real branch's noise, then the fake branch's, every step."""
        schedule = module.schedule
        u = noisy_timestep(s, schedule.num_train_timesteps, self.k_min, module.generator)
        u = u.to(s.device)
        real = renoise(target_s.detach(), s, u, schedule, module.randn_like(target_s))
        fake = renoise(pred_s, s, u, schedule, module.randn_like(pred_s))
        at = schedule.model_timestep(u)  # u itself on VP UNets, sigma[u] * T on flow ones
        with module.student.as_teacher() as unet:  # a LoRA student: adapters off
            if self.trains_student(module.global_step):
                return consistency + self.generator_loss(module, unet, fake, at, conditioning)
            return self.discriminator_loss(module, unet, real, fake.detach(), at, conditioning)

    def discriminator_loss(self, module, unet, real, fake, u, conditioning) -> torch.Tensor:
        """``u``: the model timestep of the noisy timestep (both branches are there)."""
        with torch.no_grad():  # the features are frozen: gradient reaches the heads only
            features = self.discriminator.features(unet, torch.cat([real, fake]), u.repeat(2),
                                                   conditioning.cat(conditioning))
        logits = self.discriminator.logits(features)
        real_logits, fake_logits = zip(*(logit.chunk(2) for logit in logits))
        loss = hinge_discriminator(real_logits, fake_logits).mean()
        module.log_dict({"train/d_loss": loss.detach(),
                         "train/logit_real": _mean(real_logits),
                         "train/logit_fake": _mean(fake_logits)}, batch_size=len(u))
        return loss

    def generator_loss(self, module, unet, fake, u, conditioning) -> torch.Tensor:
        features = self.discriminator.features(unet, fake, u, conditioning)
        logits = self.discriminator.logits(features, frozen_heads=True)
        loss = self.weight * hinge_generator(logits).mean()
        module.log_dict({"train/g_loss": loss.detach(), "train/logit_fake": _mean(logits)},
                        batch_size=len(u))
        return loss

    # -- the discriminator's optimizer -----------------------------------------------------------
    def setup(self, trainer) -> None:
        from lightning.pytorch.strategies import DDPStrategy

        if str(trainer.precision).startswith("16"):
            raise ValueError(f"adversarial=hinge with trainer.precision={trainer.precision}: "
                             "the discriminator's optimizer steps outside the fp16 grad "
                             "scaler; use bf16-mixed or 32-true")
        if isinstance(trainer.strategy, DDPStrategy):
            # each step leaves either the student or the heads without gradient
            trainer.strategy._ddp_kwargs["find_unused_parameters"] = True

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            self.configure_optimizer()
        return self._optimizer

    def configure_optimizer(self) -> None:
        """The heads' optimizer, with the configured settings over a checkpoint's state."""
        self._optimizer = self.optimizer_factory(params=list(self.discriminator.parameters()))
        if self._pending_state is not None:
            settings = [{k: v for k, v in group.items() if k != "params"}
                        for group in self._optimizer.param_groups]
            self._optimizer.load_state_dict(self._pending_state)
            for group, configured in zip(self._optimizer.param_groups, settings):
                group.update(configured)
            self._pending_state = None

    def step(self) -> None:
        parameters = list(self.discriminator.parameters())
        if self.gradient_clip_val is not None:
            torch.nn.utils.clip_grad_norm_(parameters, self.gradient_clip_val)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_state(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict | None) -> None:
        self._pending_state = state
        if self._optimizer is not None:
            self.configure_optimizer()


def _mean(logits) -> torch.Tensor:
    return torch.stack([logit.detach().mean() for logit in logits]).mean()
