"""Teacher components loaded through diffusers from a local directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from tdd.models.conditioning import TextConditioner

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Teacher:
    """A frozen diffusers teacher: UNet, VAE, text conditioning and its noise-schedule config."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text: TextConditioner
    scheduler_config: dict
    resolution: int

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def frozen_modules(self) -> list[nn.Module]:
        return [self.unet, self.vae, self.text]


def resolve_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"model.dtype={name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def check_teacher_dir(path: str | Path | None, setting: str = "model.path") -> Path:
    """Fail early, naming the setting, when a teacher directory is missing or incomplete."""
    if path in (None, "", "???"):
        raise ValueError(f"{setting} is not set: give the teacher's local diffusers directory")
    root = Path(path).expanduser()
    missing = [p for p in ("unet", "vae", "scheduler", "text_encoder", "tokenizer")
               if not (root / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"{setting}={str(path)!r} lacks the diffusers folders {missing}")
    return root


def load_teacher(
    path: str, resolution: int, dual_text_encoder: bool = False, dtype: str = "float32"
) -> Teacher:
    """Load a Stable Diffusion (``dual_text_encoder=False``) or SDXL teacher from ``path``."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = check_teacher_dir(path)
    torch_dtype = resolve_dtype(dtype)
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=torch_dtype)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae")  # float32: decode stays stable
    tokenizers = [CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")]
    encoders = [CLIPTextModel.from_pretrained(root, subfolder="text_encoder",
                                              torch_dtype=torch_dtype)]
    if dual_text_encoder:
        tokenizers.append(CLIPTokenizer.from_pretrained(root, subfolder="tokenizer_2"))
        encoders.append(CLIPTextModelWithProjection.from_pretrained(
            root, subfolder="text_encoder_2", torch_dtype=torch_dtype))
    scheduler_config = dict(DDPMScheduler.load_config(root, subfolder="scheduler"))
    teacher = Teacher(unet, vae, TextConditioner(tokenizers, encoders, resolution),
                      scheduler_config, resolution)
    for module in teacher.frozen_modules():
        module.requires_grad_(False).eval()
    return teacher


def save_pipeline(teacher: Teacher, directory: str | Path) -> Path:
    """Save a one-encoder teacher in the diffusers Stable Diffusion layout."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if len(teacher.text.encoders) != 1:
        raise ValueError("save_pipeline writes the Stable Diffusion layout (one text encoder)")
    pipe = StableDiffusionPipeline(
        vae=teacher.vae, text_encoder=teacher.text.encoders[0],
        tokenizer=teacher.text.tokenizers[0], unet=teacher.unet,
        scheduler=DDIMScheduler.from_config(teacher.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(directory)
    return Path(directory)
