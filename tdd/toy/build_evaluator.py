"""Builder of the toy evaluator: contrastive CLIP on shapes with hard negatives + detail head."""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from tdd.data.shapes import ATTRIBUTES, SceneSpec, alternatives, reference_renders, scene_rng
from tdd.toy.common import (
    BuildSettings,
    Checkpointer,
    Progress,
    cosine_lr,
    degrade,
    descend,
    spearman,
    step_generator,
    training_batch,
    update_record,
)
from tdd.toy.evaluator import (
    CHECKPOINT,
    DETAIL_HEAD,
    create_clip,
    detail_head,
    load_toy_evaluator,
    open_clip_config,
)
from tdd.toy.vae import reconstruct

DEFAULT_STEPS = 2600
BATCH = 64
NEGATIVES = 4
GATES = {"real_each": 0.97, "vae_mean": 0.95, "detail_spearman": 0.9}


def hard_negatives(specs: list[SceneSpec], rng: np.random.Generator, k: int) -> list[str]:
    """``k`` captions per scene that each change one attribute (attribute drawn uniformly)."""
    out = []
    for spec in specs:
        for _ in range(k):
            options = alternatives(spec, ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))])
            out.append(options[int(rng.integers(len(options)))].caption)
    return out


def load_vae(settings: BuildSettings) -> AutoencoderKL | None:
    folder = settings.out / "pipeline" / "vae"
    return AutoencoderKL.from_pretrained(folder).eval() if folder.is_dir() else None


def augment(images, vae, generator):
    """Random blur/noise (level known) and, when a VAE exists, some VAE reconstructions."""
    b = len(images)
    level = torch.rand(b, generator=generator)
    level = torch.where(torch.rand(b, generator=generator) < 0.4, torch.zeros_like(level), level)
    kind = torch.randint(0, 3, (b,), generator=generator)
    out = degrade(images, level, kind, generator)
    known = torch.ones(b, dtype=torch.bool)
    if vae is not None:
        known = torch.rand(b, generator=generator) >= 0.25
        if not known.all():  # a small batch may draw no reconstruction at all
            out[~known] = reconstruct(vae, images[~known])
    return out, 1 - level, known


def evaluator_loss(model, head, tokenizer, images, specs, step, settings, vae):
    generator = step_generator(settings.seed + 202, step)
    x, detail_target, known = augment(images, vae, generator)
    image_emb = model.encode_image((x - 0.5) / 0.5)
    negatives = hard_negatives(specs, scene_rng(11, settings.seed, step), NEGATIVES)
    captions = [s.caption for s in specs] + negatives
    text = F.normalize(model.encode_text(tokenizer(captions)), dim=-1)
    img = F.normalize(image_emb, dim=-1)
    scale = model.logit_scale.exp().clamp(max=100)
    b = len(specs)
    pos = text[:b]
    targets = torch.arange(b)
    logits = scale * img @ pos.T
    same = torch.tensor([[a.caption == c.caption for c in specs] for a in specs])
    logits = logits.masked_fill(same & ~torch.eye(b, dtype=torch.bool), -1e4)  # duplicates
    clip = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    neg = text[b:].reshape(b, NEGATIVES, -1)
    hard_logits = scale * torch.cat([(img * pos).sum(-1, keepdim=True),
                                     torch.einsum("bd,bkd->bk", img, neg)], 1)
    hard = F.cross_entropy(hard_logits, torch.zeros(b, dtype=torch.long))
    detail = F.mse_loss(head(image_emb).squeeze(-1)[known], detail_target[known])
    return clip + hard + 5.0 * detail


@torch.no_grad()
def measure_evaluator(settings: BuildSettings, vae: AutoencoderKL | None) -> dict:
    """Zero-shot accuracy on real renders (and their VAE reconstructions); detail Spearman."""
    from tdd.data.shapes import eval_scenes

    evaluator = load_toy_evaluator(settings.out / "evaluator")
    n = settings.eval_size
    specs, _ = eval_scenes("val", n)
    images = reference_renders("val", n)
    result = {"real": evaluator.attribute_accuracy(images, specs), "eval_images": n}
    if vae is not None:
        result["vae_reconstructions"] = evaluator.attribute_accuracy(
            reconstruct(vae, images), specs)
    generator = torch.Generator().manual_seed(settings.seed + 303)
    held_out = reference_renders("test", n)
    level = torch.rand(n, generator=generator)
    kind = torch.randint(0, 3, (n,), generator=generator)
    score = evaluator.detail_score(degrade(held_out, level, kind, generator))
    result["detail_spearman"] = spearman(score, -level)
    result["detail_spearman_by_kind"] = {
        name: spearman(score[kind == k], -level[kind == k])
        for k, name in enumerate(("blur", "noise", "both"))}
    result["detail_score_clean_mean"] = float(evaluator.detail_score(held_out).mean())
    return result


def _gates(result: dict) -> dict:
    real_ok = min(v for k, v in result["real"].items() if k in ATTRIBUTES) >= GATES["real_each"]
    vae_ok = ("vae_reconstructions" in result
              and result["vae_reconstructions"]["mean"] >= GATES["vae_mean"])
    detail_ok = result["detail_spearman"] >= GATES["detail_spearman"]
    return {"real_each_attribute": real_ok, "vae_mean": vae_ok, "detail": detail_ok}


def build_evaluator(settings: BuildSettings) -> dict:
    """Train (resuming from the work folder), save in open_clip's local-dir format, measure."""
    torch.manual_seed(settings.seed)
    total = settings.steps or DEFAULT_STEPS
    config = open_clip_config()
    model, tokenizer = create_clip(config)
    head = detail_head(config["model_cfg"]["embed_dim"])
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    vae = load_vae(settings)
    ckpt = Checkpointer(settings.work_dir("evaluator"), settings.ckpt_every_s)
    start, vae_from = 0, None
    if (state := ckpt.load()) is not None:
        model.load_state_dict(state["model"])
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        start, vae_from = state["step"], state.get("vae_from")
        print(f"[evaluator] resuming at step {start}", flush=True)
    if vae is not None and vae_from is None:
        vae_from = start  # the step from which VAE reconstructions join the augmentations

    def snapshot(step: int) -> dict:
        return {"model": model.state_dict(), "head": head.state_dict(),
                "optimizer": optimizer.state_dict(), "step": step, "vae_from": vae_from}

    progress = Progress("evaluator", total, start, settings.log_every)
    model.train()
    for step in range(start, total):
        images, specs = training_batch(settings.seed + 202, step, settings.batch_size or BATCH)
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, total, 1e-3)
        loss = evaluator_loss(model, head, tokenizer, images, specs, step, settings, vae)
        descend(loss, optimizer, params)
        progress.update(step, loss.item())
        ckpt.maybe_save(snapshot, step + 1)
    ckpt.maybe_save(snapshot, total, force=True)
    folder = settings.out / "evaluator"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()},
              folder / CHECKPOINT)
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()},
              folder / DETAIL_HEAD)
    result = measure_evaluator(settings, vae)
    result.update(steps=total, gates=GATES, passed=_gates(result),
                  vae_reconstructions_from_step=vae_from)
    update_record(settings.out, "evaluator", result)
    print(f"[evaluator] {json.dumps(result)}", flush=True)
    return result
