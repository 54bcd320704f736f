"""Teacher components loaded through diffusers from a local directory: a UNet (VP) teacher, or a
flow transformer (SD3, FLUX: :mod:`tdd.models.flow`) in the same :class:`Teacher` bundle."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from tdd.models.conditioning import TextConditioner
from tdd.models.flow import is_flow_pipeline
from tdd.schedule import Schedule, calculate_shift, is_flow_config, schedule_from_config

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Teacher:
    """A frozen diffusers teacher: its denoiser (``unet``: a UNet, or the transformer of a flow
    teacher), VAE, text conditioning and noise-schedule config."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text: TextConditioner
    scheduler_config: dict
    resolution: int

    @property
    def is_flow(self) -> bool:
        return is_flow_config(self.scheduler_config)

    @property
    def prediction_type(self) -> str:
        default = "flow_prediction" if self.is_flow else "epsilon"
        return self.scheduler_config.get("prediction_type") or default

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        """The VAE's latent shift (SD3, FLUX): ``x0 = (latent - shift) * scaling``; 0 for SD."""
        return float(self.vae.config.get("shift_factor") or 0.0)

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def mu(self) -> float | None:
        """FLUX's resolution-dependent shift at this resolution (its 2x2-patch token count);
        None for a scheduler without dynamic shifting."""
        if not self.scheduler_config.get("use_dynamic_shifting", False):
            return None
        return calculate_shift((self.latent_size // 2) ** 2, self.scheduler_config)

    def noise_schedule(self) -> Schedule:
        """The VP or flow schedule of this teacher (docs/methods.md 0 and 0.2)."""
        return schedule_from_config(self.scheduler_config, self.mu)

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
                      folders=None) -> Path:
    """Fail early, naming the setting, when a teacher directory is missing or incomplete
    (``folders``: by default those of its layout, UNet or flow transformer)."""
    if path in (None, "", "???"):
        raise ValueError(f"{setting} is not set: give the teacher's local diffusers directory")
    root = Path(path).expanduser()
    if folders is None:
        denoiser = "transformer" if is_flow_pipeline(root) else "unet"
        folders = (denoiser, "vae", "scheduler", "text_encoder", "tokenizer")
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
    max_sequence_length: int | None = None, use_t5: bool = True, collapse_padding: bool = False,
) -> Teacher:
    """Load a Stable Diffusion (``dual_text_encoder=False``) or SDXL teacher from ``path``, or
    a flow teacher (:func:`load_flow_teacher`) when its model_index.json names
    ``StableDiffusion3Pipeline`` or ``FluxPipeline``.

    The frozen networks run in ``dtype``. The VAE does too, except in float16 without a
    separate ``vae_path`` (e.g. the fp16-safe SDXL VAE): the stock SDXL VAE overflows in
    float16, so it stays float32, as the published scripts keep it. ``vae_slicing`` encodes and
    decodes one image at a time, ``vae_tiling`` decodes large images tile by tile.
    """
    from diffusers import DDPMScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = check_teacher_dir(path)
    if is_flow_pipeline(root):
        return load_flow_teacher(root, resolution, dtype, vae_path, vae_slicing, vae_tiling,
                                 max_sequence_length, use_t5, collapse_padding)
    if collapse_padding:
        raise ValueError(f"model.collapse_padding=true applies to an SD3 teacher without T5; "
                         f"{path} is a UNet teacher")
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


def load_flow_teacher(
    path: str | Path, resolution: int, dtype: str = "float32", vae_path: str | None = None,
    vae_slicing: bool = False, vae_tiling: bool = False,
    max_sequence_length: int | None = None, use_t5: bool = True, collapse_padding: bool = False,
) -> Teacher:
    """A flow teacher (SD3 / SD3.5 or FLUX.1) from a local diffusers pipeline folder.

    The transformer and text encoders run in ``dtype``; the VAE too, except in float16 (the
    SD3 and FLUX VAEs are run in float32 by their own trainers). ``max_sequence_length`` is
    the T5 prompt length (None: the pipeline's default, 256 for SD3, 512 for FLUX);
    ``use_t5=False`` runs SD3 without its T5 encoder (zeros in its place).

    ``collapse_padding`` (SD3 without T5 only): the ``max_sequence_length`` identical zero
    tokens become one, whose attention logit the transformer raises by ``log`` of their count
    (:mod:`tdd.models.flow_attention`): the same outputs as the stock call, at the cost of a
    context of the CLIP tokens plus one. What the toy flow teacher was trained on.
    """
    from tdd.models.flow import FlowTextConditioner, load_flow_components

    root = check_teacher_dir(path)
    vae_root = check_vae_dir(vae_path) if vae_path else None
    pipeline_cls, pipe = load_flow_components(root, resolve_dtype(dtype), vae_root,
                                              use_t5)
    if vae_slicing:
        pipe.vae.enable_slicing()
    if vae_tiling:
        pipe.vae.enable_tiling()
    if max_sequence_length is None:
        max_sequence_length = 512 if pipeline_cls.__name__ == "FluxPipeline" else 256
    if collapse_padding:
        if pipeline_cls.__name__ != "StableDiffusion3Pipeline" or pipe.components.get(
                "text_encoder_3") is not None:
            raise ValueError(
                f"model.collapse_padding=true: {path} pads its prompts with T5 tokens, not "
                "identical zeros; it applies to an SD3 teacher run without T5 "
                "(model.use_t5=false)")
        from tdd.models.flow_attention import collapse_padding as collapse

        collapse(pipe.transformer, repeats=max_sequence_length)
        max_sequence_length = 1  # the one zero token that stands for all of them
    text_parts = {k: v for k, v in pipe.components.items()
                  if k.startswith(("text_encoder", "tokenizer"))}
    text = FlowTextConditioner(pipeline_cls, {**text_parts, "transformer": pipe.transformer,
                                              "vae": None, "scheduler": None},
                               resolution, max_sequence_length)
    scheduler_config = dict(pipe.scheduler.load_config(root, subfolder="scheduler"))
    teacher = Teacher(pipe.transformer, pipe.vae, text, scheduler_config, resolution)
    return teacher.freeze(dtype, "float32" if dtype == "float16" else dtype)


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
