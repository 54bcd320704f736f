"""Builder of the toy flow teacher: a rectified-flow transformer in the stock
``StableDiffusion3Pipeline`` layout (``SD3Transformer2DModel``,
``FlowMatchEulerDiscreteScheduler``, two CLIP text encoders, no T5), trained on the shapes
world with the shipped toy VAE.

The pipeline without T5 conditions on ``max_sequence_length`` (256) zero tokens after the CLIP
tokens. Those tokens are identical, so attention over them equals attention over one of them
whose logit is raised by ``log(256)``; :class:`RepeatedTokenJointAttention` computes that, and
training and measuring run on 25 context tokens instead of 280 with the same function.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.models.attention_processor import JointAttnProcessor2_0
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from tdd.data.shapes import training_scene
from tdd.metrics.toy import load_toy_evaluator
from tdd.models.ema import ema_update
from tdd.models.flow_attention import (  # noqa: F401  (re-exported)
    T5_LENGTH,
    RepeatedTokenJointAttention,
    collapse_padding,
)
from tdd.models.tokenizer import clip_vocabulary
from tdd.toy.build_teacher import ema_decay, load_vae
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
LR = 8e-4
TEXT_LR = 1e-4
MAX_LENGTH = 24  # CLIP tokens: the longest caption of the world has 23
CAPTION_DROPOUT = 0.1
UNIFORM_SHARE = 0.25  # share of sigmas drawn uniformly; the rest logit-normal(0, 1) as in SD3
SHIFT = 1.0  # SD3's shift grows with resolution; 32x32 images are far below its 256^2 base
GATES = {"mean_attribute_accuracy": 0.90, "all_attributes": 0.60}
SCHEDULER = {"num_train_timesteps": 1000, "shift": SHIFT}
ENCODERS = ("text_encoder", "text_encoder_2")


def flow_out(settings: BuildSettings) -> Path:
    """The flow teacher's asset folder: ``toy_flow`` beside the UNet teacher's ``toy``."""
    return Path(settings.out).parent / "toy_flow"


# --- tokenizer and text encoders -----------------------------------------------------------

def world_words(n: int = 4000) -> list[str]:
    """Every word of the shapes world's captions (the first ``n`` training scenes hold all)."""
    words = set()
    for i in range(n):
        words.update(training_scene(0, i)[0].caption.split())
    return sorted(words)


def bpe_merges(word: str, ranks: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """The merges CLIP's byte-pair encoding applies to one lower-case ASCII word, in order."""
    parts, used = list(word[:-1]) + [word[-1] + "</w>"], []
    while len(parts) > 1:
        pairs = [(ranks.get(p, math.inf), i, p) for i, p in enumerate(zip(parts, parts[1:]))]
        rank, _, pair = min(pairs)
        if rank == math.inf:
            break
        used.append(pair)
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return used


def world_vocabulary() -> tuple[list[str], list[tuple[str, str]]]:
    """CLIP's byte alphabet, the merged tokens of the shapes world and the two specials.

    A CLIPTokenizer with these merges (in CLIP's order) splits the world's words exactly as the
    full CLIP tokenizer does; other words fall back to smaller pieces, never to an unknown id.
    """
    vocab, merges = clip_vocabulary()
    ranks = {m: r for r, m in enumerate(merges)}
    used = sorted({m for w in world_words() for m in bpe_merges(w, ranks)}, key=ranks.__getitem__)
    tokens = [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i < 512]
    tokens += ["".join(m) for m in used] + ["<|startoftext|>", "<|endoftext|>"]
    return tokens, used


def flow_tokenizer() -> CLIPTokenizer:
    tokens, merges = world_vocabulary()
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                         model_max_length=MAX_LENGTH)


def text_encoder(settings: BuildSettings) -> CLIPTextModelWithProjection:
    """The toy CLIP's text tower and projection on the world vocabulary: the encoders' start."""
    clip = load_toy_evaluator(settings.out / "evaluator", setting=EVALUATOR_STAGE).model
    tower = clip_text_model(clip, MAX_LENGTH)
    tokens, _ = world_vocabulary()
    full = clip_vocabulary()[0]
    rows = torch.tensor([full[t] for t in tokens])
    config = CLIPTextConfig(**{**tower.config.to_dict(), "vocab_size": len(tokens),
                               "projection_dim": clip.text_projection.shape[1],
                               "bos_token_id": len(tokens) - 2, "eos_token_id": len(tokens) - 1,
                               "pad_token_id": len(tokens) - 1})
    encoder = CLIPTextModelWithProjection(config)
    state = {k: v for k, v in tower.state_dict().items()}
    key = "embeddings.token_embedding.weight"
    state[key] = state[key][rows]
    state = {f"text_model.{k}": v for k, v in state.items()}
    state["text_projection.weight"] = clip.text_projection.detach().T.float()
    missing = encoder.load_state_dict(state, strict=False).missing_keys
    if [k for k in missing if "position_ids" not in k]:
        raise RuntimeError(f"text encoder weights not carried over: {missing}")
    return encoder.eval()


# --- the transformer and its collapsed padding ---------------------------------------------

def transformer(pooled_dim: int, joint_dim: int, width: int = 128, layers: int = 6,
                sample_size: int = 8, patch_size: int = 2) -> SD3Transformer2DModel:
    """8x8x4 latents in 2x2 patches (SD3's), 32-wide heads with RMS query/key norms."""
    return SD3Transformer2DModel(
        sample_size=sample_size, patch_size=patch_size, in_channels=4, out_channels=4,
        num_layers=layers, attention_head_dim=32, num_attention_heads=width // 32,
        joint_attention_dim=joint_dim, caption_projection_dim=width,
        pooled_projection_dim=pooled_dim, pos_embed_max_size=sample_size // patch_size,
        qk_norm="rms_norm",
    )


# --- training --------------------------------------------------------------------------------

def encode(model, tokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``StableDiffusion3Pipeline.encode_prompt`` gives without T5, with one zero token
    for the 256 (the transformer runs :class:`RepeatedTokenJointAttention`)."""
    ids = tokenizer(captions, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                    return_tensors="pt").input_ids
    states, pooled = [], []
    for name in ENCODERS:
        out = model[name](ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled.append(out.text_embeds)
    clip = torch.cat(states, -1)
    width = model["transformer"].config.joint_attention_dim
    clip = F.pad(clip, (0, width - clip.shape[-1]))
    return torch.cat([clip, clip.new_zeros(len(captions), 1, width)], 1), torch.cat(pooled, -1)


def sample_sigmas(n: int, generator: torch.Generator) -> torch.Tensor:
    """Training noise levels: logit-normal(0, 1) (SD3) with ``UNIFORM_SHARE`` uniform, so the
    sampler's first and last steps are trained too; then the scheduler's shift."""
    normal = torch.sigmoid(torch.randn(n, generator=generator))
    uniform = torch.rand(n, generator=generator)
    sigma = torch.where(torch.rand(n, generator=generator) < UNIFORM_SHARE, uniform, normal)
    return SHIFT * sigma / (1 + (SHIFT - 1) * sigma)


def flow_loss(model, tokenizer, vae, images, captions, generator) -> torch.Tensor:
    """Velocity MSE: x_s = (1 - s) x0 + s eps, target eps - x0 (rectified flow, SD3)."""
    b = len(captions)
    drop = torch.rand(b, generator=generator) < CAPTION_DROPOUT
    captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    with torch.no_grad():
        latents = vae.encode(images * 2 - 1).latent_dist.sample(generator=generator)
        x0 = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    context, pooled = encode(model, tokenizer, captions)
    sigma = sample_sigmas(b, generator)
    eps = torch.randn(x0.shape, generator=generator)
    s = sigma[:, None, None, None]
    x_s = (1 - s) * x0 + s * eps
    pred = model["transformer"](hidden_states=x_s, timestep=sigma * 1000,
                                encoder_hidden_states=context, pooled_projections=pooled).sample
    return (pred - (eps - x0)).pow(2).mean()


@torch.no_grad()
def latent_statistics(vae: AutoencoderKL, seed: int, n: int = 1024) -> tuple[float, float]:
    """(shift_factor, scaling_factor) of the VAE's latents on training renders: mean, 1 / std."""
    images, _ = training_batch(seed, 0, n)
    generator = torch.Generator().manual_seed(seed)
    z = torch.cat([vae.encode(c * 2 - 1).latent_dist.sample(generator=generator)
                   for c in images.split(256)])
    return round(float(z.mean()), 5), round(1.0 / float(z.std()), 5)


def flow_vae(settings: BuildSettings) -> AutoencoderKL:
    """The shipped toy VAE with the ``shift_factor`` and ``scaling_factor`` SD3 decodes with."""
    vae = load_vae(settings)
    shift, scale = latent_statistics(vae, settings.seed + 606)
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return vae


def build_models(settings: BuildSettings) -> torch.nn.ModuleDict:
    """The transformer (on collapsed padding) and two text encoders from the same start."""
    start = text_encoder(settings)
    encoders = {name: copy.deepcopy(start) for name in ENCODERS}
    pooled = sum(e.config.projection_dim for e in encoders.values())
    joint = sum(e.config.hidden_size for e in encoders.values())
    model = torch.nn.ModuleDict({"transformer": transformer(pooled, joint), **encoders})
    collapse_padding(model["transformer"])
    return model


def train(settings: BuildSettings, vae: AutoencoderKL) -> tuple[torch.nn.ModuleDict, dict]:
    """Train (resuming from the work folder); returns the EMA weights and the wall-clock and
    CPU seconds the training took, summed over the runs that resumed it."""
    torch.manual_seed(settings.seed)
    total = settings.steps or DEFAULT_STEPS
    tokenizer = flow_tokenizer()
    model = build_models(settings)
    params = list(model.parameters())
    text_params = [p for name in ENCODERS for p in model[name].parameters()]
    optimizer = torch.optim.AdamW(
        [{"params": model["transformer"].parameters(), "lr": LR},
         {"params": text_params, "lr": TEXT_LR}], weight_decay=0.01)
    ema = copy.deepcopy(model).requires_grad_(False)
    ckpt = Checkpointer(settings.work_dir("flow_teacher"), settings.ckpt_every_s)
    start, before = 0, {"wall": 0.0, "cpu": 0.0}
    if (state := ckpt.load(model)) is not None:
        for module, key in ((model, "model"), (ema, "ema"), (optimizer, "optimizer")):
            module.load_state_dict(state[key])
        start, before = state["step"], state.get("seconds", before)
        print(f"[flow] resuming at step {start}", flush=True)
    wall, cpu = time.monotonic(), time.process_time()

    def seconds() -> dict:
        return {"wall": round(before["wall"] + time.monotonic() - wall, 1),
                "cpu": round(before["cpu"] + time.process_time() - cpu, 1)}

    def snapshot(step: int) -> dict:
        return {"model": model.state_dict(), "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(), "step": step, "seconds": seconds()}

    progress = Progress("flow", total, start, settings.log_every)
    model.train()
    for step in range(start, total):
        images, specs = training_batch(settings.seed + 505, step, settings.batch_size or BATCH)
        for group, base in zip(optimizer.param_groups, (LR, TEXT_LR)):
            group["lr"] = cosine_lr(step, total, base)
        loss = flow_loss(model, tokenizer, vae, images, [s.caption for s in specs],
                         step_generator(settings.seed + 505, step))
        descend(loss, optimizer, params)
        ema_update(ema, model, ema_decay(step))
        progress.update(step, loss.item())
        ckpt.maybe_save(snapshot, step + 1)
    ckpt.maybe_save(snapshot, total, force=True)
    return ema, seconds()


def flow_pipeline(model: torch.nn.ModuleDict, vae: AutoencoderKL) -> StableDiffusion3Pipeline:
    """Copies of the trained parts in a stock ``StableDiffusion3Pipeline`` without T5, the
    transformer back on diffusers' own joint attention (the pipeline's 256 zero tokens)."""
    transformer_ = copy.deepcopy(model["transformer"]).eval()
    transformer_.set_attn_processor(JointAttnProcessor2_0())
    return StableDiffusion3Pipeline(
        transformer=transformer_, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=copy.deepcopy(vae), text_encoder=copy.deepcopy(model["text_encoder"]).eval(),
        tokenizer=flow_tokenizer(), text_encoder_2=copy.deepcopy(model["text_encoder_2"]).eval(),
        tokenizer_2=flow_tokenizer(), text_encoder_3=None, tokenizer_3=None)


def save_flow_pipeline(folder: Path, model: torch.nn.ModuleDict, vae: AutoencoderKL) -> Path:
    """The diffusers SD3 layout (no T5), weights in float16; loads as float32 by default:
    ``StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)``."""
    pipe = flow_pipeline(model, vae).to(torch.float16)
    if folder.exists():
        shutil.rmtree(folder)
    pipe.save_pretrained(folder)
    for name in ENCODERS:  # float16 files, float32 by default, as the UNet teacher's encoder
        path = folder / name / "config.json"
        config = json.loads(path.read_text())
        config["dtype"] = "float32"
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def asset_megabytes(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20, 3)


def build_flow_teacher(settings: BuildSettings) -> dict:
    """Train (resuming), save the SD3-layout pipeline, measure and record ``quality.json``."""
    vae = flow_vae(settings)
    ema, seconds = train(settings, vae)
    out = flow_out(settings)
    save_flow_pipeline(out / "pipeline", ema, vae)
    from tdd.toy.measure_flow_teacher import measure_flow_teacher
    result = measure_flow_teacher(settings, out)
    result.update(steps=settings.steps or DEFAULT_STEPS, gates=GATES,
                  parameters={k: sum(p.numel() for p in m.parameters()) for k, m in ema.items()},
                  vae_shift_factor=vae.config.shift_factor,
                  vae_scaling_factor=vae.config.scaling_factor,
                  train_seconds=seconds["wall"], train_cpu_seconds=seconds["cpu"])
    result["pipeline_megabytes"] = asset_megabytes(out / "pipeline")
    result["passed"] = {
        name: result["teacher"][key] >= GATES[name]
        for name, key in (("mean_attribute_accuracy", "mean"), ("all_attributes", "all"))}
    update_record(out, "teacher", result)
    print(f"[flow] {json.dumps(result)}", flush=True)
    return result
