"""Students: a LoRA on the teacher's own UNet (or flow transformer), or a fully fine-tuned copy
with optional EMA."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import nn

from tdd.export import export_lora
from tdd.models.ema import ema_update
from tdd.models.flow import FLOW_LORA_TARGET_MODULES, is_transformer, run_transformer

#: docs/methods.md section 4: the LoRA target modules of every published recipe.
LORA_TARGET_MODULES = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
    "time_emb_proj",
)


def _cast(value, dtype: torch.dtype):
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value


def run_unet(unet, x, t, conditioning, timestep_cond=None) -> torch.Tensor:
    """``unet``'s output for latents ``x`` at ``t``; latents and conditions are cast to the
    UNet's dtype (a half-precision frozen teacher meets fp32 latents here). A flow transformer
    is called as its stock pipeline calls it (:func:`tdd.models.flow.run_transformer`)."""
    if is_transformer(unet):
        return run_transformer(unet, x, t, conditioning)
    kwargs = _cast(conditioning.unet_kwargs(), unet.dtype)
    return unet(x.to(unet.dtype), t, timestep_cond=_cast(timestep_cond, unet.dtype),
                **kwargs).sample


def cast_training_params(module: nn.Module, dtype: torch.dtype = torch.float32) -> None:
    """Trainable parameters in ``dtype`` (fp32) beside half-precision frozen weights."""
    for parameter in module.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.to(dtype)


class Student(nn.Module):
    """The three networks of a consistency-distillation step behind one interface.

    ``online`` runs with gradient; ``teacher`` and ``target`` run without. Subclasses decide where
    the weights live and which of them a checkpoint keeps (only trainable state). Trainable
    parameters are fp32 whatever the teacher's dtype; ``gradient_checkpointing`` recomputes the
    student UNet's block activations in the backward pass instead of storing them.
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
        return run_unet(self.unet, x, t, conditioning, timestep_cond)

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
    def sampling(self):
        """Yields :attr:`sampling_unet` prepared for inference-only use (a LoRA student merges
        its adapters for the duration); every weight is as before when the block exits."""
        yield self.sampling_unet

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
    ``target_modules=None``: :data:`LORA_TARGET_MODULES` on a UNet, the attention and
    feed-forward projections (:data:`tdd.models.flow.FLOW_LORA_TARGET_MODULES`) on a flow
    transformer.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        rank: int = 64,
        alpha: float = 64,
        target_modules: tuple[str, ...] | list[str] | None = None,
        guidance_embedding_dim: int | None = None,
        init_lora_weights: bool | str = True,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        self.check_guidance_embedding(guidance_embedding_dim)
        if rank <= 0 or alpha <= 0:
            raise ValueError(f"student: rank ({rank}) and alpha ({alpha}) must be positive")
        self.rank, self.alpha = rank, alpha
        if target_modules is None:
            target_modules = FLOW_LORA_TARGET_MODULES if is_transformer(unet) else \
                LORA_TARGET_MODULES
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=list(target_modules),
            init_lora_weights=init_lora_weights,
        ))
        cast_training_params(unet)
        if gradient_checkpointing:  # gradients still reach the adapters through frozen blocks
            unet.enable_gradient_checkpointing()
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

    @contextmanager
    def sampling(self):
        """The UNet with its adapters merged into the fp32 base weights (one matmul per layer
        instead of three: the student samples at the teacher's cost); the base weights are
        restored bit for bit on exit, so evaluating never changes training. Layers whose base
        weights are not fp32 (a half-precision teacher) stay unmerged: rounding the update into
        bf16/fp16 would change the student."""
        layers = [m for m in self.unet.modules() if isinstance(m, LoraLayer)
                  and not m.merged and m.get_base_layer().weight.dtype == torch.float32]
        saved = [m.get_base_layer().weight.detach().clone() for m in layers]
        try:
            for layer in layers:
                layer.merge()
            yield self.unet
        finally:
            with torch.no_grad():
                for layer, weight in zip(layers, saved):
                    if layer.merged:
                        layer.unmerge()
                    layer.get_base_layer().weight.copy_(weight)

    def export(self, directory, fmt: str = "diffusers"):
        return export_lora(self, directory, fmt)

    @torch.no_grad()
    def teacher(self, x, t, conditioning):
        with self.adapters_disabled():
            return run_unet(self.unet, x, t, conditioning)

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
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"student.ema_decay={ema_decay} must lie in [0, 1) or be null")
        self.ema_decay = ema_decay
        self.teacher_unet = unet.requires_grad_(False).eval()
        if is_transformer(unet):
            self.check_guidance_embedding_of(unet, guidance_embedding_dim)
            student = type(unet).from_config(unet.config).to(unet.device)
        else:
            student = UNet2DConditionModel.from_config(
                unet.config, time_cond_proj_dim=guidance_embedding_dim
            ).to(unet.device)
        student.load_state_dict(unet.state_dict(), strict=False)  # into fp32 parameters
        if guidance_embedding_dim is not None:
            nn.init.zeros_(student.time_embedding.cond_proj.weight)
        self.unet = student.train().requires_grad_(True)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.ema = None
        if ema_decay is not None:
            self.ema = copy.deepcopy(student).requires_grad_(False).eval()

    @torch.no_grad()
    def teacher(self, x, t, conditioning):
        return run_unet(self.teacher_unet, x, t, conditioning)

    @torch.no_grad()
    def target(self, x, t, conditioning, timestep_cond=None):
        network = self.unet if self.ema is None else self.ema
        return run_unet(network, x, t, conditioning, timestep_cond)

    @property
    def sampling_unet(self):
        return self.unet if self.ema is None else self.ema

    @contextmanager
    def as_teacher(self):
        yield self.teacher_unet

    @staticmethod
    def check_guidance_embedding_of(model, dim: int | None) -> None:
        if dim is not None:
            raise ValueError(f"guidance=w_embed needs a UNet guidance projection "
                             f"(time_cond_proj_dim); {type(model).__name__} has none")

    def export(self, directory, fmt: str = "diffusers"):
        """The student UNet (EMA when present) as a diffusers ``unet/`` folder (a flow
        transformer: ``transformer/``)."""
        if fmt != "diffusers":
            raise ValueError(f"student=full exports fmt='diffusers' only, not {fmt!r}")
        path = Path(directory) / ("transformer" if is_transformer(self.unet) else "unet")
        self.sampling_unet.save_pretrained(path)
        return path

    def update_target(self):
        if self.ema is not None:
            ema_update(self.ema, self.unet, self.ema_decay)

    def trainable_state_dict(self):
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher_unet.")}
