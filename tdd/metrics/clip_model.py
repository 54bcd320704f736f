"""open_clip models from local files, and their image preprocessing done on tensors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tdd.metrics.files import require_file

Tokenizer = Callable[[list[str]], Tensor]


def clip_config_name(model_name: str, setting: str) -> str:
    """Registry name of an open_clip architecture: a built-in name or a config ``.json`` file.

    A json file is registered with open_clip under its stem. Hub schemas are refused: they
    download at run time.
    """
    if model_name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"{setting}: {model_name!r}: give a built-in name or a config .json path")
    if model_name.endswith(".json"):
        path = require_file(model_name, setting)
        open_clip.add_model_config(path)
        model_name = path.stem
    if open_clip.get_model_config(model_name) is None:
        raise ValueError(f"{setting}: unknown open_clip architecture {model_name!r}")
    return model_name


def load_clip(
    model_name: str,
    checkpoint: str | Path,
    model_setting: str = "metrics.clip_model",
    checkpoint_setting: str = "metrics.clip_checkpoint",
) -> tuple[nn.Module, Tokenizer]:
    """A frozen open_clip model with weights from a local file, and its tokenizer.

    OpenAI's weights need the QuickGELU variant of the architecture (e.g. ``ViT-L-14-quickgelu``).
    """
    path = require_file(checkpoint, checkpoint_setting)
    name = clip_config_name(model_name, model_setting)
    model = open_clip.create_model(name, pretrained=str(path), pretrained_text=False)
    return model.eval().requires_grad_(False), open_clip.get_tokenizer(name)


def load_clip_folder(folder: str | Path, setting: str) -> tuple[nn.Module, Tokenizer]:
    """A frozen open_clip model from a folder in open_clip's ``local-dir`` layout.

    The folder holds ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``) and the
    weights (``open_clip_model.safetensors`` or another checkpoint name open_clip looks for).
    """
    root = Path(str(folder)).expanduser()
    require_file(root / "open_clip_config.json", setting)
    if not any(root.glob(pattern) for pattern in ("*.safetensors", "*.bin", "*.pth")):
        raise FileNotFoundError(f"{setting}: no open_clip checkpoint in {root}")
    name = f"local-dir:{root}"
    model = open_clip.create_model(name, pretrained_text=False)
    return model.eval().requires_grad_(False), open_clip.get_tokenizer(name)


def clip_preprocess(
    images: Tensor,
    size: tuple[int, int],
    mean: Tensor,
    std: Tensor,
    interpolation: str = "bicubic",
    resize_mode: str = "shortest",
) -> Tensor:
    """open_clip's eval transform on (N, 3, H, W) images in [0, 1]: resize, crop or pad, normalise.

    ``shortest`` scales the short side to fit then centre-crops, ``squash`` resizes to ``size``,
    ``longest`` scales the long side to fit then pads with black.
    """
    height, width = images.shape[-2:]
    if resize_mode == "squash":
        new = size
    elif resize_mode in ("shortest", "longest"):
        pick = max if resize_mode == "shortest" else min
        scale = pick(size[0] / height, size[1] / width)
        new = (round(height * scale), round(width * scale))
    else:
        raise ValueError(f"unknown open_clip resize_mode {resize_mode!r}")
    x = images.clamp(0, 1)
    if new != (height, width):
        x = F.interpolate(x, size=new, mode=interpolation, antialias=True, align_corners=False)
        x = x.clamp(0, 1)
    top, left = (new[0] - size[0]) // 2, (new[1] - size[1]) // 2
    if top < 0 or left < 0:
        pad_t, pad_l = max(-top, 0), max(-left, 0)
        pad = (pad_l, size[1] - new[1] - pad_l, pad_t, size[0] - new[0] - pad_t)
        x = F.pad(x, tuple(max(p, 0) for p in pad))
        top, left = max(top, 0), max(left, 0)
    x = x[..., top:top + size[0], left:left + size[1]]
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


class CLIPImageFeatures(nn.Module):
    """Image embeddings of an open_clip model for images in [0, 1] (FID features, aesthetic input).

    Preprocessing follows the model's own ``preprocess_cfg`` (size, mean, std, resize mode).
    """

    def __init__(self, model: nn.Module, normalize: bool = False):
        super().__init__()
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg.get("size", 224)
        self.model = model
        self.normalize = normalize
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.interpolation = cfg.get("interpolation", "bicubic")
        self.resize_mode = cfg.get("resize_mode", "shortest")
        self.register_buffer("mean", torch.tensor(cfg["mean"]), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        x = clip_preprocess(
            images.to(self.mean.device, torch.float32), self.size, self.mean, self.std,
            self.interpolation, self.resize_mode,
        )
        dtype = next(self.model.parameters()).dtype
        return self.model.encode_image(x.to(dtype), normalize=self.normalize).float()
