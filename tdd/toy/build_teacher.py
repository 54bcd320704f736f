"""Builder of the toy teacher: text encoder + UNet trained as an epsilon-prediction SD teacher."""

from __future__ import annotations

import copy
import json

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from tdd.metrics.toy import load_toy_evaluator
from tdd.models.conditioning import TextConditioner
from tdd.models.ema import ema_update
from tdd.models.teacher import Teacher, save_pipeline
from tdd.models.tokenizer import clip_tokenizer
from tdd.schedule import SD_SCHEDULER, NoiseSchedule
from tdd.toy.clip import clip_text_model
from tdd.toy.common import (
    EVALUATOR_STAGE,
    BuildSettings,
    Checkpointer,
    Progress,
    cosine_lr,
    descend,
    step_generator,
    training_batch,
    update_record,
)

DEFAULT_STEPS = 4000
BATCH = 48
LR = 5e-4
TEXT_LR = 1e-4  # the text encoder starts trained (the toy CLIP's tower): a gentler rate
MAX_LENGTH = 32
CAPTION_DROPOUT = 0.1
EMA_DECAY = 0.999
MIN_SNR_GAMMA = 5.0
GATES = {"mean_attribute_accuracy": 0.90, "all_attributes": 0.60}


def text_encoder(settings: BuildSettings) -> CLIPTextModel:
    """The toy evaluator's CLIP text tower as a ``CLIPTextModel``: the teacher's starting point.

    Stable Diffusion conditions on a contrastively trained CLIP text encoder. The toy CLIP's
    tower is 48 wide and its training only ever read the last token; the teacher fine-tunes it
    with the UNet (at ``TEXT_LR``) so that every token's state is shaped for cross-attention.
    """
    evaluator = load_toy_evaluator(settings.out / "evaluator", setting=EVALUATOR_STAGE)
    return clip_text_model(evaluator.model, MAX_LENGTH)


def unet(cross_attention_dim: int) -> UNet2DConditionModel:
    """8x8x4 latents; attention at 8x8 and 4x4."""
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128), norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4,
    )


def ema_decay(step: int) -> float:
    """The teacher's EMA decay: ``EMA_DECAY`` after a warm-up that starts near 0.1."""
    return min(EMA_DECAY, (1 + step) / (10 + step))


def load_vae(settings: BuildSettings) -> AutoencoderKL:
    folder = settings.out / "pipeline" / "vae"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} missing: build the VAE first (stage 'vae')")
    return AutoencoderKL.from_pretrained(folder).eval().requires_grad_(False)


def teacher_loss(model, tokenizer, vae, schedule, images, captions, generator):
    """Epsilon MSE with min-SNR weighting; captions dropped to "" with CAPTION_DROPOUT.

    ``model`` holds the ``unet`` and the ``text_encoder``; both are trained.
    """
    b = len(captions)
    drop = torch.rand(b, generator=generator) < CAPTION_DROPOUT
    captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    with torch.no_grad():
        posterior = vae.encode(images * 2 - 1).latent_dist
        x0 = posterior.sample(generator=generator) * vae.config.scaling_factor
    ids = tokenizer(captions, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                    return_tensors="pt").input_ids
    hidden = model["text_encoder"](ids)[0]
    t = torch.randint(0, schedule.num_train_timesteps, (b,), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    x_t = schedule.add_noise(x0, eps, t)
    pred = model["unet"](x_t, t, encoder_hidden_states=hidden).sample
    abar = schedule.alphas_cumprod[t].float()
    snr = abar / (1 - abar)
    weight = snr.clamp(max=MIN_SNR_GAMMA) / snr
    return (weight * (pred - eps).pow(2).flatten(1).mean(1)).mean()


def build_teacher(settings: BuildSettings) -> dict:
    """Train (resuming), save the SD-layout pipeline (fp16 UNet/text encoder), measure."""
    torch.manual_seed(settings.seed)
    total = settings.steps or DEFAULT_STEPS
    vae = load_vae(settings)
    tokenizer = clip_tokenizer(MAX_LENGTH)
    encoder = text_encoder(settings)
    model = torch.nn.ModuleDict({"unet": unet(encoder.config.hidden_size),
                                 "text_encoder": encoder})
    schedule = NoiseSchedule.from_config(SD_SCHEDULER)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": model["unet"].parameters(), "lr": LR},
         {"params": model["text_encoder"].parameters(), "lr": TEXT_LR}], weight_decay=0.01)
    ema = copy.deepcopy(model).requires_grad_(False)  # the shipped weights
    ckpt = Checkpointer(settings.work_dir("teacher"), settings.ckpt_every_s)
    start = 0
    if (state := ckpt.load(model)) is not None:
        for module, key in ((model, "model"), (ema, "ema"), (optimizer, "optimizer")):
            module.load_state_dict(state[key])
        start = state["step"]
        print(f"[teacher] resuming at step {start}", flush=True)

    def snapshot(step: int) -> dict:
        return {"model": model.state_dict(), "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(), "step": step}

    progress = Progress("teacher", total, start, settings.log_every)
    model.train()
    for step in range(start, total):
        images, specs = training_batch(settings.seed + 404, step, settings.batch_size or BATCH)
        for group, base in zip(optimizer.param_groups, (LR, TEXT_LR)):
            group["lr"] = cosine_lr(step, total, base)
        loss = teacher_loss(model, tokenizer, vae, schedule, images,
                            [s.caption for s in specs], step_generator(settings.seed + 404, step))
        descend(loss, optimizer, params)
        ema_update(ema, model, ema_decay(step))
        progress.update(step, loss.item())
        ckpt.maybe_save(snapshot, step + 1)
    ckpt.maybe_save(snapshot, total, force=True)
    save_teacher(settings, ema["unet"], ema["text_encoder"], load_vae(settings),
                 clip_tokenizer(MAX_LENGTH))  # a new one: no padding state from training
    from tdd.toy.measure_teacher import measure_teacher
    result = measure_teacher(settings)
    result.update(steps=total, gates=GATES, passed={
        name: result["teacher"][key] >= GATES[name]
        for name, key in (("mean_attribute_accuracy", "mean"), ("all_attributes", "all"))})
    update_record(settings.out, "teacher", result)
    print(f"[teacher] {json.dumps(result)}", flush=True)
    return result


def save_teacher(settings, model, encoder, vae, tokenizer) -> None:
    """The diffusers SD layout, stored in float16 (the VAE files already are; lossless)."""
    teacher = Teacher(
        unet=copy.deepcopy(model).half().eval(), vae=copy.deepcopy(vae).half(),
        text=TextConditioner([tokenizer], [copy.deepcopy(encoder).half().eval()], 32),
        scheduler_config=dict(SD_SCHEDULER), resolution=32,
    )
    folder = save_pipeline(teacher, settings.out / "pipeline")
    # float16 weights keep the files small; declaring float32 as the text encoder's dtype makes
    # a plain `StableDiffusionPipeline.from_pretrained(folder)` load every part in float32.
    config_path = folder / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # The same tokenizer without indentation: 1.7 MB instead of 3.6 MB of the asset budget.
    tokenizer_path = folder / "tokenizer" / "tokenizer.json"
    compact = json.dumps(json.loads(tokenizer_path.read_text()), ensure_ascii=False,
                         separators=(",", ":"))
    tokenizer_path.write_text(compact, encoding="utf-8")
