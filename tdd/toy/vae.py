"""Builder of the toy teacher's AutoencoderKL: 32x32 RGB renders <-> 8x8x4 latents."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from tdd.data.shapes import eval_scenes, reference_renders
from tdd.toy.common import (
    BuildSettings,
    Checkpointer,
    Progress,
    cosine_lr,
    descend,
    gaussian_blur,
    psnr,
    step_generator,
    training_batch,
    update_record,
)

DEFAULT_STEPS = 3000
DECODER_STEPS = 2500
BATCH = 32
KL_WEIGHT = 1e-6
EDGE_WEIGHT = 0.5
DETAIL_WEIGHT = 4.0
PSNR_GATE = 29.0


def vae_model(widths: tuple[int, int, int] = (16, 32, 64)) -> AutoencoderKL:
    """Three blocks (two downsamplings): 32x32x3 -> 8x8x4."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        block_out_channels=widths,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8, sample_size=32, scaling_factor=1.0,
    )


def edge_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and vertical pixel differences of two image batches."""
    return (F.l1_loss(a.diff(dim=-1), b.diff(dim=-1)) + F.l1_loss(a.diff(dim=-2), b.diff(dim=-2)))


def detail_weight(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) per-pixel loss weight: 1 plus how far a pixel stands out from its blurred
    neighbourhood, so the few pixels of a dot or a stripe edge count like a large flat area."""
    blurred = gaussian_blur(x, torch.ones(len(x)))
    return 1 + DETAIL_WEIGHT * (x - blurred).abs().sum(1, keepdim=True)


def vae_loss(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator):
    """Detail-weighted pixel MSE + L1 on a posterior sample, an edge term and a weak KL term
    (images in [0, 1]). Stripes and dots are a small share of the pixels: with plain pixel
    losses the encoder learns to drop them."""
    x = images * 2 - 1
    posterior = vae.encode(x).latent_dist
    rec = vae.decode(posterior.sample(generator=generator)).sample
    weight = detail_weight(x)
    err = rec - x
    pixel = (weight * (err.pow(2) + 0.5 * err.abs())).mean() / weight.mean()
    return pixel + EDGE_WEIGHT * edge_l1(rec, x) + KL_WEIGHT * posterior.kl().mean()


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Decode the posterior mean of each image (images and output in [0, 1])."""
    out = []
    for chunk in images.split(batch):
        z = vae.encode(chunk * 2 - 1).latent_dist.mode()
        out.append(((vae.decode(z).sample + 1) / 2).clamp(0, 1))
    return torch.cat(out)


@torch.no_grad()
def measure_vae(vae: AutoencoderKL, n: int, seed: int = 0) -> dict:
    """Held-out PSNR (overall and by texture) and the latent scaling factor 1 / std."""
    vae.eval()
    images = reference_renders("val", n)
    rec = reconstruct(vae, images)
    scores = psnr(rec, images)
    specs, _ = eval_scenes("val", n)
    by_texture = {}
    for texture in ("plain", "striped", "dotted"):
        mask = torch.tensor([any(o.texture == texture for o in s.objects) for s in specs])
        by_texture[texture] = round(float(scores[mask].mean()), 3)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.cat([vae.encode(c * 2 - 1).latent_dist.sample(generator=generator)
                         for c in images.split(500)])
    return {"psnr_db": round(float(scores.mean()), 3), "psnr_db_by_texture": by_texture,
            "psnr_db_p05": round(float(scores.quantile(0.05)), 3),
            "scaling_factor": round(1.0 / float(latents.std()), 5),
            "latent_mean": round(float(latents.mean()), 5), "eval_images": n}


def decoder_loss(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator):
    """Phase 2: the decoder alone, on pixel MSE (what PSNR measures); the frozen encoder keeps
    the latent space, so a teacher trained on it stays valid."""
    x = images * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.sample(generator=generator)
    return F.mse_loss(vae.decode(z).sample, x)


def _phase(vae: AutoencoderKL, step: int, first: int):
    """(loss function, trained parameters, base lr, phase start) at ``step``."""
    if step < first:
        return vae_loss, list(vae.parameters()), 1e-3, 0
    decoder = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    return decoder_loss, decoder, 5e-4, first


def build_vae(settings: BuildSettings) -> AutoencoderKL:
    """Train both phases (resuming from the work folder), measure, record and save the VAE.

    Phase 1 trains the whole autoencoder; phase 2 fine-tunes the decoder with the encoder
    frozen, so a teacher trained on phase-1 latents stays valid.
    """
    torch.manual_seed(settings.seed)
    first = settings.steps or DEFAULT_STEPS
    total = first + (settings.steps or DECODER_STEPS)
    vae = vae_model()
    ckpt = Checkpointer(settings.work_dir("vae"), settings.ckpt_every_s)
    saved, start = ckpt.load(vae), 0
    if saved is not None:
        vae.load_state_dict(saved["model"])
        start = saved["step"]
        print(f"[vae] resuming at step {start}", flush=True)
    loss_fn, params, base_lr, phase_start = _phase(vae, start, first)
    optimizer = torch.optim.AdamW(params, lr=base_lr, weight_decay=0.0)
    if saved is not None and saved.get("phase_start", 0) == phase_start:
        optimizer.load_state_dict(saved["optimizer"])

    def snapshot(step: int) -> dict:
        return {"model": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "phase_start": phase_start}

    progress = Progress("vae", total, start, settings.log_every)
    vae.train()
    for step in range(start, total):
        if step == first and phase_start == 0:  # phase 2 begins: decoder only, fresh optimizer
            loss_fn, params, base_lr, phase_start = _phase(vae, step, first)
            optimizer = torch.optim.AdamW(params, lr=base_lr, weight_decay=0.0)
        images, _ = training_batch(settings.seed + 101, step, settings.batch_size or BATCH)
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step - phase_start, (first if phase_start == 0 else
                                                         total - first), base_lr)
        loss = loss_fn(vae, images, step_generator(settings.seed, step))
        descend(loss, optimizer, params)
        progress.update(step, loss.item())
        ckpt.maybe_save(snapshot, step + 1)
    ckpt.maybe_save(snapshot, total, force=True)
    folder = settings.out / "pipeline" / "vae"
    copy.deepcopy(vae).half().save_pretrained(folder)  # float16 files; diffusers loads float32
    shipped = AutoencoderKL.from_pretrained(folder)
    quality = measure_vae(shipped, settings.eval_size, settings.seed)  # what ships is measured
    quality.update(steps=first, decoder_steps=total - first, gate_psnr_db=PSNR_GATE,
                   passed=quality["psnr_db"] >= PSNR_GATE,
                   parameters=sum(p.numel() for p in vae.parameters()))
    shipped.register_to_config(scaling_factor=quality["scaling_factor"])
    shipped.half().save_pretrained(folder)
    update_record(settings.out, "vae", quality)
    print(f"[vae] {quality}", flush=True)
    return shipped.float()
