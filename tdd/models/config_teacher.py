"""A teacher built from published configurations with random weights (no download): the
speed and memory of a real model's step, e.g. ``python -m tdd.bench --model sd15-config``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from tdd.models.conditioning import TextConditioner
from tdd.models.teacher import Teacher
from tdd.models.tokenizer import clip_tokenizer
from tdd.schedule import SD_SCHEDULER

CONFIGS = Path(__file__).parent / "configs"
#: The parts of a config-built teacher: tdd/models/configs/<name>_<part>.json.
PARTS = ("unet", "vae", "text_encoder")


def published_configs(name: str = "sd15") -> dict[str, dict]:
    """The UNet, VAE and text-encoder configurations of ``name`` (SD1.5: the published ones)."""
    paths = {part: CONFIGS / f"{name}_{part}.json" for part in PARTS}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"--model {name}-config: no {missing}")
    return {part: json.loads(path.read_text()) for part, path in paths.items()}


def config_teacher(configs: dict[str, dict], resolution: int, dtype: str = "float32",
                   device: str | torch.device = "cpu", seed: int = 0) -> Teacher:
    """A Stable Diffusion teacher of the given configurations, random weights (seeded), frozen
    in ``dtype``, built directly on ``device``."""
    torch.manual_seed(seed)
    text = configs["text_encoder"]
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        encoder = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in text.items()
                                                  if k != "architectures"}))
    tokenizer = clip_tokenizer(text["max_position_embeddings"])
    teacher = Teacher(unet, vae, TextConditioner([tokenizer], [encoder], resolution),
                      dict(SD_SCHEDULER), resolution)
    return teacher.freeze(dtype)
