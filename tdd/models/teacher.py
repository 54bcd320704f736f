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

    def freeze(self, dtype: str = "float32", vae_dtype: str | None = None) -> Teacher:
        """Frozen, in eval mode, UNet and text encoders in ``dtype``, the VAE in ``vae_dtype``
        (default: ``dtype``)."""
        dtypes = (dtype, vae_dtype or dtype, dtype)
        for module, name in zip(self.frozen_modules(), dtypes):
            module.requires_grad_(False).eval()
            if next(module.parameters()).dtype != resolve_dtype(name):
                module.to(resolve_dtype(name))
        return self


def resolve_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"model.dtype={name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def check_teacher_dir(path: str | Path | None, setting: str = "model.path",
                      folders=("unet", "vae", "scheduler", "text_encoder", "tokenizer")) -> Path:
    """Fail early, naming the setting, when a teacher directory is missing or incomplete."""
    if path in (None, "", "???"):
        raise ValueError(f"{setting} is not set: give the teacher's local diffusers directory")
    root = Path(path).expanduser()
    missing = [p for p in folders if not (root / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"{setting}={str(path)!r} lacks the diffusers folders {missing}")
    return root


def check_vae_dir(path: str | Path) -> Path:
    """``model.vae_path``: a diffusers AutoencoderKL folder (config.json and weights)."""
    root = Path(path).expanduser()
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"model.vae_path={str(path)!r} is not a diffusers VAE folder "
                                "(no config.json)")
    return root


def load_teacher(
    path: str, resolution: int, dual_text_encoder: bool = False, dtype: str = "float32",
    vae_path: str | None = None, vae_slicing: bool = False, vae_tiling: bool = False,
) -> Teacher:
    """Load a Stable Diffusion (``dual_text_encoder=False``) or SDXL teacher from ``path``.

    The frozen networks run in ``dtype``. The VAE does too, except in float16 without a
    separate ``vae_path`` (e.g. the fp16-safe SDXL VAE): the stock SDXL VAE overflows in
    float16, so it stays float32, as the published scripts keep it. ``vae_slicing`` encodes and
    decodes one image at a time, ``vae_tiling`` decodes large images tile by tile.
    """
    from diffusers import DDPMScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = check_teacher_dir(path)
    vae_root = check_vae_dir(vae_path) if vae_path else root / "vae"
    torch_dtype = resolve_dtype(dtype)
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=torch_dtype)
    vae = AutoencoderKL.from_pretrained(vae_root)
    if vae_slicing:
        vae.enable_slicing()
    if vae_tiling:
        vae.enable_tiling()
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
    vae_dtype = "float32" if dtype == "float16" and not vae_path else dtype
    return teacher.freeze(dtype, vae_dtype)


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
