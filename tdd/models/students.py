"""Students: a LoRA on the teacher's own UNet, or a fully fine-tuned copy with optional EMA."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from torch import nn

from tdd.export import export_lora
from tdd.models.ema import ema_update

#: docs/methods.md section 4: the LoRA target modules of every published recipe.
LORA_TARGET_MODULES = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
    "time_emb_proj",
)


class Student(nn.Module):
    """The three networks of a consistency-distillation step behind one interface.

    ``online`` runs with gradient; ``teacher`` and ``target`` run without. Subclasses decide where
    the weights live and which of them a checkpoint keeps (only trainable state).
    """

    #: Whether the student UNet can take ``timestep_cond`` (guidance=w_embed).
    supports_guidance_embedding = False

    @classmethod
    def check_guidance_embedding(cls, dim: int | None) -> None:
        """Refuse a guidance mode that feeds w as ``timestep_cond`` (``dim`` set) when this
        student cannot add the UNet's guidance projection."""
        if dim is not None and not cls.supports_guidance_embedding:
            raise ValueError(
                "guidance=w_embed feeds w to the student as timestep_cond, which needs a guidance "
                f"projection (time_cond_proj_dim) that {cls.__name__} cannot add to the frozen "
                "teacher: use student=full"
            )

    def online(self, x, t, conditioning, timestep_cond=None) -> torch.Tensor:
        return self.unet(x, t, timestep_cond=timestep_cond, **conditioning.unet_kwargs()).sample

    def teacher(self, x, t, conditioning) -> torch.Tensor:
        raise NotImplementedError

    def target(self, x, t, conditioning, timestep_cond=None) -> torch.Tensor:
        raise NotImplementedError

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.unet.parameters() if p.requires_grad)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps, keyed like ``self.state_dict()``."""
        raise NotImplementedError

    def update_target(self) -> None:
        """Called after every optimizer step (EMA students move their target)."""

    @property
    def sampling_unet(self) -> UNet2DConditionModel:
        """The UNet that samples as the distilled student."""
        return self.unet

    @contextmanager
    def as_teacher(self):
        """Yields the teacher's UNet for sampling reference images."""
        raise NotImplementedError

    def export(self, directory, fmt: str = "diffusers"):
        """Write the distilled weights to ``directory`` in a diffusers-loadable format."""
        raise NotImplementedError


class LoRAStudent(Student):
    """peft LoRA adapters on the teacher UNet; the teacher is the same UNet with adapters off.

    Only one UNet is in memory. The target network is the online student under no-grad.
    ``init_lora_weights=True`` is PEFT's default (Kaiming-uniform A, zero B), as every released
    script starts; any other PEFT option (e.g. ``"gaussian"``) is passed through.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        rank: int = 64,
        alpha: float = 64,
        target_modules: tuple[str, ...] | list[str] = LORA_TARGET_MODULES,
        guidance_embedding_dim: int | None = None,
        init_lora_weights: bool | str = True,
    ):
        super().__init__()
        self.check_guidance_embedding(guidance_embedding_dim)
        if rank <= 0 or alpha <= 0:
            raise ValueError(f"student: rank ({rank}) and alpha ({alpha}) must be positive")
        self.rank, self.alpha = rank, alpha
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=list(target_modules),
            init_lora_weights=init_lora_weights,
        ))
        self.unet = unet

    @contextmanager
    def adapters_disabled(self):
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()

    @contextmanager
    def as_teacher(self):
        with self.adapters_disabled():
            yield self.unet

    def export(self, directory, fmt: str = "diffusers"):
        return export_lora(self, directory, fmt)

    @torch.no_grad()
    def teacher(self, x, t, conditioning):
        with self.adapters_disabled():
            return self.unet(x, t, **conditioning.unet_kwargs()).sample

    @torch.no_grad()
    def target(self, x, t, conditioning, timestep_cond=None):
        return self.online(x, t, conditioning, timestep_cond)

    def trainable_state_dict(self):
        return {k: v for k, v in self.state_dict().items() if "lora_" in k}


class FullStudent(Student):
    """A trainable copy of the teacher UNet, a frozen teacher, and an optional EMA target.

    With ``guidance_embedding_dim`` the copy gains a guidance projection (``time_cond_proj_dim``),
    zero-initialised so that the student starts equal to the teacher.
    """

    supports_guidance_embedding = True

    def __init__(
        self,
        unet: UNet2DConditionModel,
        ema_decay: float | None = None,
        guidance_embedding_dim: int | None = None,
    ):
        super().__init__()
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"student.ema_decay={ema_decay} must lie in [0, 1) or be null")
        self.ema_decay = ema_decay
        self.teacher_unet = unet.requires_grad_(False).eval()
        student = UNet2DConditionModel.from_config(
            unet.config, time_cond_proj_dim=guidance_embedding_dim
        ).to(unet.device)
        student.load_state_dict(unet.state_dict(), strict=False)
        if guidance_embedding_dim is not None:
            nn.init.zeros_(student.time_embedding.cond_proj.weight)
        self.unet = student.train().requires_grad_(True)
        self.ema = None
        if ema_decay is not None:
            self.ema = copy.deepcopy(student).requires_grad_(False).eval()

    @torch.no_grad()
    def teacher(self, x, t, conditioning):
        return self.teacher_unet(x, t, **conditioning.unet_kwargs()).sample

    @torch.no_grad()
    def target(self, x, t, conditioning, timestep_cond=None):
        network = self.unet if self.ema is None else self.ema
        return network(x, t, timestep_cond=timestep_cond, **conditioning.unet_kwargs()).sample

    @property
    def sampling_unet(self):
        return self.unet if self.ema is None else self.ema

    @contextmanager
    def as_teacher(self):
        yield self.teacher_unet

    def export(self, directory, fmt: str = "diffusers"):
        """The student UNet (EMA when present) as a diffusers ``unet/`` folder."""
        if fmt != "diffusers":
            raise ValueError(f"student=full exports fmt='diffusers' only, not {fmt!r}")
        path = Path(directory) / "unet"
        self.sampling_unet.save_pretrained(path)
        return path

    def update_target(self):
        if self.ema is not None:
            ema_update(self.ema, self.unet, self.ema_decay)

    def trainable_state_dict(self):
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher_unet.")}
