"""Builder of the toy evaluator: contrastive CLIP on shapes with hard negatives + detail head."""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from tdd.data.shapes import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    SINGLE_POSITIONS,
    SIZES,
    TEXTURES,
    SceneSpec,
    alternatives,
    reference_renders,
    scene_rng,
)
from tdd.metrics.clip_model import CLIPImageFeatures
from tdd.metrics.toy import CHECKPOINT, DETAIL_HEAD, detail_head, load_toy_evaluator
from tdd.toy.clip import create_clip, open_clip_config
from tdd.toy.common import (
    EVALUATOR_STAGE,
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
from tdd.toy.vae import reconstruct

DEFAULT_STEPS = 2000
BATCH = 64
GROUPS = 2  # attribute groups of hard negatives per image
ATTRIBUTE_WEIGHTS = {"shape": 3, "colour": 1, "size": 1, "texture": 3, "position": 3,
                     "background": 1}
MIX = {"clean": 0.4, "degraded": 0.25, "reconstructed": 0.35}  # shares of each training batch
CAPTIONED_LEVEL = 0.3  # degradations up to this level still show every attribute
GATES = {"real_each": 0.97, "vae_mean": 0.95, "detail_spearman": 0.9}


def attribute_groups(specs: list[SceneSpec], rng: np.random.Generator,
                     k: int) -> tuple[list[int], list[list[str]]]:
    """For each scene, ``k`` attributes (drawn without replacement, the ones that need spatial
    detail more often) and, for each, the captions of every one-attribute change: the zero-shot
    test's own comparison. Returns the scene index of each group and its captions."""
    weights = np.array([ATTRIBUTE_WEIGHTS[a] for a in ATTRIBUTES], dtype=float)
    owners, groups = [], []
    for i, spec in enumerate(specs):
        for j in rng.choice(len(ATTRIBUTES), size=k, replace=False, p=weights / weights.sum()):
            owners.append(i)
            groups.append([alt.caption for alt in alternatives(spec, ATTRIBUTES[j])])
    return owners, groups


def group_loss(img: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, owners: list[int],
               groups: list[list[str]], scale: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the true caption against its group of one-attribute changes."""
    owner = torch.tensor(owners)
    group_id = torch.tensor([g for g, group in enumerate(groups) for _ in group])
    slot = torch.tensor([j for group in groups for j in range(len(group))])
    sims = scale * (img[owner[group_id]] * neg).sum(-1)
    logits = torch.full((len(groups), max(map(len, groups))), float("-inf"))
    logits = logits.index_put((group_id, slot), sims)
    logits = torch.cat([scale * (img[owner] * pos[owner]).sum(-1, keepdim=True), logits], 1)
    return F.cross_entropy(logits, torch.zeros(len(groups), dtype=torch.long))


# Auxiliary tasks that make both towers encode every object's attributes by where it is:
# object count, single-object position, pair orientation, background, and for each spatial slot
# (the single object, or the left/top one, then the right/bottom one) shape, colour, size and
# texture. Linear probes on both embeddings; they steer training and are not shipped.
_SLOT = (("shape", SHAPES), ("colour", tuple(COLOURS)), ("size", tuple(SIZES)),
         ("texture", TEXTURES))
TASK_CLASSES = (2, len(SINGLE_POSITIONS), 2, len(BACKGROUNDS),
                *[len(options) for _ in range(2) for _, options in _SLOT])


def slot_labels(specs: list[SceneSpec]) -> torch.Tensor:
    """(B, len(TASK_CLASSES)) class indices; -100 where a task does not apply to a scene."""
    rows = []
    for spec in specs:
        objects = list(spec.objects)
        two = len(objects) == 2
        if two:
            objects.sort(key=lambda o: o.position in ("right", "bottom"))  # slot A first
        row = [int(two),
               -100 if two else list(SINGLE_POSITIONS).index(objects[0].position),
               int(objects[0].position in ("top", "bottom")) if two else -100,
               list(BACKGROUNDS).index(spec.background)]
        for slot in range(2):
            for name, options in _SLOT:
                row.append(options.index(getattr(objects[slot], name))
                           if slot < len(objects) else -100)
        rows.append(row)
    return torch.tensor(rows)


class SlotProbes(torch.nn.Module):
    """Linear probes for :data:`TASK_CLASSES` on the image and the text embedding."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.image = torch.nn.Linear(embed_dim, sum(TASK_CLASSES))
        self.text = torch.nn.Linear(embed_dim, sum(TASK_CLASSES))

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        parts = logits.split(TASK_CLASSES, dim=-1)
        return sum(F.cross_entropy(part, labels[:, k], ignore_index=-100)
                   for k, part in enumerate(parts)) / len(TASK_CLASSES)


def load_vae(settings: BuildSettings) -> AutoencoderKL | None:
    folder = settings.out / "pipeline" / "vae"
    return AutoencoderKL.from_pretrained(folder).eval() if folder.is_dir() else None


def augment(images, vae, generator):
    """Clean renders, renders degraded by blur/noise at a known level, and VAE reconstructions
    (when a VAE exists) in the shares of :data:`MIX`. Returns images, detail targets, which
    images have a known detail level, and which still show their caption (clean, mild,
    reconstructed)."""
    b = len(images)
    u = torch.rand(b, generator=generator)
    level = torch.rand(b, generator=generator) * (u >= MIX["clean"])
    kind = torch.randint(0, 3, (b,), generator=generator)
    out = degrade(images, level, kind, generator)
    known = torch.ones(b, dtype=torch.bool)
    if vae is not None:
        known = u < MIX["clean"] + MIX["degraded"]
        if not known.all():  # a small batch may draw no reconstruction at all
            out[~known] = reconstruct(vae, images[~known])
    captioned = ~known | (level <= CAPTIONED_LEVEL)
    return out, 1 - level, known, captioned


def evaluator_loss(model, head, probes, tokenizer, images, specs, step, settings, vae):
    """Contrastive loss (in-batch + groups of one-attribute changes) on images that still show
    their caption, plus the detail regression on images whose degradation level is known."""
    generator = step_generator(settings.seed + 202, step)
    x, detail_target, known, captioned = augment(images, vae, generator)
    image_emb = CLIPImageFeatures(model)(x)  # the evaluator's own preprocessing, with grad
    detail = F.mse_loss(head(image_emb).squeeze(-1)[known], detail_target[known])
    keep = captioned.nonzero().squeeze(1).tolist()
    if not keep:  # a tiny batch may draw only heavy degradations
        return 5.0 * detail
    specs = [specs[i] for i in keep]
    b = len(specs)
    owners, groups = attribute_groups(specs, scene_rng(11, settings.seed, step), GROUPS)
    captions = [s.caption for s in specs] + [c for group in groups for c in group]
    text = F.normalize(model.encode_text(tokenizer(captions)), dim=-1)
    img = F.normalize(image_emb[keep], dim=-1)
    scale = model.logit_scale.exp().clamp(max=100)
    pos, targets = text[:b], torch.arange(b)
    logits = scale * img @ pos.T
    same = torch.tensor([[a.caption == c.caption for c in specs] for a in specs])
    logits = logits.masked_fill(same & ~torch.eye(b, dtype=torch.bool), -1e4)  # duplicates
    clip = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    hard = group_loss(img, pos, text[b:], owners, groups, scale)
    labels = slot_labels(specs)
    probe = probes.loss(probes.image(image_emb[keep]), labels) + probes.loss(
        probes.text(text[:b] * 10), labels)
    return clip + hard + probe + 5.0 * detail


@torch.no_grad()
def measure_evaluator(settings: BuildSettings, vae: AutoencoderKL | None) -> dict:
    """Zero-shot accuracy on real renders (and their VAE reconstructions); detail Spearman."""
    from tdd.data.shapes import eval_scenes

    evaluator = load_toy_evaluator(settings.out / "evaluator", setting=EVALUATOR_STAGE)
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
    probes = SlotProbes(config["model_cfg"]["embed_dim"])
    params = [*model.parameters(), *head.parameters(), *probes.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    vae = load_vae(settings)
    ckpt = Checkpointer(settings.work_dir("evaluator"), settings.ckpt_every_s)
    start, vae_from = 0, None
    if (state := ckpt.load(model)) is not None:
        model.load_state_dict(state["model"])
        head.load_state_dict(state["head"])
        probes.load_state_dict(state["probes"])
        optimizer.load_state_dict(state["optimizer"])
        start, vae_from = state["step"], state.get("vae_from")
        print(f"[evaluator] resuming at step {start}", flush=True)
    if vae is not None and vae_from is None:
        vae_from = start  # the step from which VAE reconstructions join the augmentations

    def snapshot(step: int) -> dict:
        return {"model": model.state_dict(), "head": head.state_dict(),
                "probes": probes.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "vae_from": vae_from}

    progress = Progress("evaluator", total, start, settings.log_every)
    model.train()
    for step in range(start, total):
        images, specs = training_batch(settings.seed + 202, step, settings.batch_size or BATCH)
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, total, 1e-3)
        loss = evaluator_loss(model, head, probes, tokenizer, images, specs, step, settings, vae)
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
