"""Rectified-flow teachers: SD3 / SD3.5 and FLUX.1 transformers (docs/methods.md 0.2).

A flow teacher is a :class:`tdd.models.teacher.Teacher` whose denoiser is a diffusers
``SD3Transformer2DModel`` or ``FluxTransformer2DModel`` and whose scheduler config is a
``FlowMatchEulerDiscreteScheduler`` one. The prompts are encoded by the stock pipeline's own
``encode_prompt`` (CLIP-L + CLIP-G + optional T5 for SD3, CLIP pooled + T5 for FLUX), so that
``tdd.sampling.generate`` and a stock pipeline condition the transformer identically.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from tdd.models.conditioning import Conditioning

#: The stock pipelines of the flow teachers, by the ``_class_name`` of their model_index.json.
FLOW_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")

#: LoRA targets on a flow transformer: the attention projections of both streams and the
#: feed-forward projections, the default of diffusers' own FLUX LoRA trainer.
FLOW_LORA_TARGET_MODULES = (
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)


def pipeline_class_name(root: str | Path) -> str | None:
    """The ``_class_name`` of a diffusers folder's model_index.json (None without one)."""
    index = Path(root) / "model_index.json"
    if not index.is_file():
        return None
    return json.loads(index.read_text()).get("_class_name")


def is_flow_pipeline(root: str | Path) -> bool:
    return pipeline_class_name(root) in FLOW_PIPELINES


def is_transformer(model: nn.Module) -> bool:
    """Whether a denoiser is a flow transformer (else a UNet)."""
    return type(model).__name__ in ("SD3Transformer2DModel", "FluxTransformer2DModel")


def packs_latents(model: nn.Module) -> bool:
    """FLUX transformers take latents packed into 2x2 patches (B, h/2 * w/2, 4C)."""
    return type(model).__name__ == "FluxTransformer2DModel"


def pipeline_class(model: nn.Module):
    """The stock pipeline class of a flow transformer (its LoRA loader and saver)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    return FluxPipeline if packs_latents(model) else StableDiffusion3Pipeline


# -- latent packing (FLUX) ---------------------------------------------------------------------
def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): each 2x2 patch becomes one token, channels first."""
    b, c, h, w = x.shape
    patches = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for latents of ``height`` x ``width``."""
    b, _, channels = x.shape
    patches = x.reshape(b, height // 2, width // 2, channels // 4, 2, 2)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(b, channels // 4, height, width)


def image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """FLUX's position ids of the packed latent tokens: (0, row, column) per 2x2 patch."""
    rows = torch.arange(height // 2)[:, None].expand(height // 2, width // 2)
    cols = torch.arange(width // 2)[None, :].expand(height // 2, width // 2)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


# -- the network call --------------------------------------------------------------------------
def run_transformer(model: nn.Module, x: torch.Tensor, t: torch.Tensor,
                    conditioning: Conditioning) -> torch.Tensor:
    """The velocity a flow transformer predicts for latents ``x`` (B, C, h, w) at the model
    timestep ``t`` (``sigma * 1000``), as the stock pipelines call it: FLUX on packed latents
    with ``t / 1000``, its position ids and, when guidance-distilled, the guidance scale."""
    dtype = model.dtype
    x = x.to(dtype)
    hidden = conditioning.hidden.to(dtype)
    pooled = conditioning.added["pooled"].to(dtype)
    t = torch.as_tensor(t, device=x.device).expand(len(x))
    if not packs_latents(model):  # SD3 takes float32 timesteps in [0, 1000]
        return model(hidden_states=x, timestep=t.to(torch.float32), encoder_hidden_states=hidden,
                     pooled_projections=pooled).sample
    guidance = conditioning.added.get("guidance")
    if model.config.guidance_embeds and guidance is None:
        raise ValueError("this FLUX transformer is guidance-distilled (guidance_embeds): it needs "
                         "the guidance scale as input, i.e. guidance=embedded")
    height, width = x.shape[-2:]
    out = model(
        hidden_states=pack_latents(x), timestep=t.to(dtype) / 1000,
        guidance=guidance.float() if model.config.guidance_embeds else None,
        pooled_projections=pooled, encoder_hidden_states=hidden,
        txt_ids=torch.zeros(hidden.shape[1], 3, device=x.device, dtype=dtype),
        img_ids=image_ids(height, width, x.device, dtype),
    ).sample
    return unpack_latents(out, height, width)


# -- text conditioning ---------------------------------------------------------------------------
class FlowTextConditioner(nn.Module):
    """Prompts -> :class:`Conditioning` (``hidden`` = prompt embeddings, ``added["pooled"]``)
    through ``encode_prompt`` of the stock pipeline class (SD3: CLIP-L and CLIP-G hidden states
    beside T5's, or zeros without T5; FLUX: T5 hidden states and CLIP's pooled output)."""

    def __init__(self, pipeline_cls, components: dict, resolution: int,
                 max_sequence_length: int):
        super().__init__()
        self.pipeline_cls, self.components = pipeline_cls, components
        self.encoders = nn.ModuleList(
            [m for k, m in sorted(components.items()) if k.startswith("text_encoder") and m])
        self.tokenizers = [m for k, m in sorted(components.items())
                           if k.startswith("tokenizer") and m]
        self.resolution, self.max_sequence_length = resolution, max_sequence_length
        self.requires_grad_(False)
        self._pipe = None

    @property
    def device(self) -> torch.device:
        return next(self.encoders.parameters()).device

    def pipeline(self):
        """The stock pipeline holding only the text encoders (and the transformer, whose config
        SD3 reads without T5)."""
        if self._pipe is None:
            self._pipe = self.pipeline_cls(**self.components)
        return self._pipe

    @torch.no_grad()
    def forward(self, captions: list[str], original_size=None, crop_top_left=None
                ) -> Conditioning:
        pipe, captions = self.pipeline(), list(captions)
        kwargs = dict(device=self.device, max_sequence_length=self.max_sequence_length)
        if self.pipeline_cls.__name__ == "FluxPipeline":
            hidden, pooled, _ = pipe.encode_prompt(captions, None, **kwargs)
        else:
            hidden, _, pooled, _ = pipe.encode_prompt(
                captions, None, None, do_classifier_free_guidance=False, **kwargs)
        return Conditioning(hidden, {"pooled": pooled})


# -- loading ----------------------------------------------------------------------------------
def load_flow_components(root: Path, torch_dtype: torch.dtype, vae_root: Path | None,
                         use_t5: bool = True):
    """The stock pipeline's components from a local folder (``from_pretrained`` of the class
    model_index.json names), the VAE from ``vae_root`` when given; SD3 without T5 when
    ``use_t5`` is false."""
    import diffusers
    from diffusers import AutoencoderKL

    index = json.loads((Path(root) / "model_index.json").read_text())
    name = index["_class_name"]
    pipeline_cls = getattr(diffusers, name)
    # components the folder saved as absent (e.g. SD3 without T5) are passed as None
    extra = {k: None for k, v in index.items()
             if not k.startswith("_") and (v is None or v == [None, None])}
    if vae_root is not None:
        extra["vae"] = AutoencoderKL.from_pretrained(vae_root)
    if name == "StableDiffusion3Pipeline" and not use_t5:
        extra.update(text_encoder_3=None, tokenizer_3=None)
    return pipeline_cls, pipeline_cls.from_pretrained(root, torch_dtype=torch_dtype, **extra)


def check_guidance(denoiser_config: dict, guidance, where: str = "the teacher") -> None:
    """Refuse a guidance mode the teacher cannot apply, naming both (docs/methods.md 2)."""
    takes_scale = bool(denoiser_config.get("guidance_embeds", False))
    embedded = getattr(guidance, "embeds_scale", False)
    mode = type(guidance).__name__
    if embedded and not takes_scale:
        raise ValueError(
            f"guidance=embedded feeds the guidance scale to the transformer, which only a "
            f"guidance-distilled teacher takes (FLUX.1-dev: guidance_embeds); {where} has no "
            "such input: use guidance=decoupled, cfg or none")
    if takes_scale and not embedded:
        raise ValueError(
            f"{where} is guidance-distilled (FLUX.1-dev: guidance_embeds): its transformer takes "
            f"the guidance scale as input and has no unconditional prediction to guide with, so "
            f"{mode} cannot apply: use guidance=embedded")
    is_flow = "joint_attention_dim" in denoiser_config
    if is_flow and getattr(guidance, "condition_dim", None) is not None:
        raise ValueError(
            "guidance=w_embed feeds w through a UNet guidance projection (time_cond_proj_dim) "
            f"that the flow transformer of {where} lacks: use guidance=decoupled, cfg or none "
            "(or embedded for FLUX.1-dev)")


def denoiser_config(root: str | Path) -> dict:
    """The config.json of a teacher folder's denoiser (``transformer/`` or ``unet/``)."""
    for folder in ("transformer", "unet"):
        path = Path(root) / folder / "config.json"
        if path.is_file():
            return json.loads(path.read_text())
    return {}
