"""Quality of the shipped toy teacher: 25-step DDIM samples scored by the toy evaluator."""

from __future__ import annotations

import json
import time

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from torchvision.utils import save_image

from tdd.data.shapes import eval_scenes, reference_renders
from tdd.metrics.fid import FIDScorer
from tdd.metrics.toy import ToyEvaluator, load_toy_evaluator
from tdd.toy.common import EVALUATOR_STAGE, BuildSettings
from tdd.toy.vae import reconstruct

STEPS = 25
SEARCH_PROMPTS = 200
GUIDANCE_SCALES = (1.5, 2.5, 3.5, 5.0, 7.0)


def load_pipeline(folder) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample(pipe: StableDiffusionPipeline, captions: list[str], guidance: float,
           seed: int = 0, batch: int = 250) -> torch.Tensor:
    """25-step DDIM samples in [0, 1]; image i uses its own generator seeded ``seed + i``."""
    out = []
    for i in range(0, len(captions), batch):
        chunk = captions[i:i + batch]
        generators = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        images = pipe(chunk, height=32, width=32, num_inference_steps=STEPS,
                      guidance_scale=guidance, generator=generators, output_type="pt").images
        out.append(images.float().clamp(0, 1))
    return torch.cat(out)


def _scores(evaluator: ToyEvaluator, images, specs, captions) -> dict:
    result = evaluator.attribute_accuracy(images, specs)
    result["clip_score"] = float(evaluator.clip_score(images, captions).mean())
    result["detail_score"] = float(evaluator.detail_score(images).mean())
    return result


def by_object_count(evaluator: ToyEvaluator, images, specs) -> dict:
    """Attribute accuracy on one-object and on two-object prompts apart: pairs also test which
    attribute belongs to which object."""
    out = {}
    for count in (1, 2):
        index = [i for i, s in enumerate(specs) if len(s.objects) == count]
        if index:
            out[str(count)] = evaluator.attribute_accuracy(images[index],
                                                           [specs[i] for i in index])
    return out


def sample_grid(pipe, guidance: float, path, n: int = 32, columns: int = 8,
                sampler=None) -> list[str]:
    """Rows of real renders, each followed by teacher samples (``sampler``, default
    :func:`sample`) for the same prompts."""
    specs, _ = eval_scenes("val", n)
    captions = [s.caption for s in specs]
    real, fake = reference_renders("val", n), (sampler or sample)(pipe, captions, guidance)
    rows = []
    for i in range(0, n, columns):
        rows += [real[i:i + columns], fake[i:i + columns]]
    grid = torch.nn.functional.interpolate(torch.cat(rows), scale_factor=3, mode="nearest")
    save_image(grid, path, nrow=columns, padding=2, pad_value=1.0)
    return captions


def measure_teacher(settings: BuildSettings) -> dict:
    """Guidance search on a subset, then the full held-out set at the best scale."""
    t0 = time.monotonic()
    pipe = load_pipeline(settings.out / "pipeline")
    evaluator = load_toy_evaluator(settings.out / "evaluator", setting=EVALUATOR_STAGE)
    n = settings.eval_size
    specs, _ = eval_scenes("val", n)
    captions = [s.caption for s in specs]
    m = min(SEARCH_PROMPTS, n)
    search = {}
    for w in GUIDANCE_SCALES:
        images = sample(pipe, captions[:m], w)
        search[str(w)] = evaluator.attribute_accuracy(images, specs[:m])
        print(f"[teacher] guidance {w}: {json.dumps(search[str(w)])}", flush=True)
    best = max(GUIDANCE_SCALES, key=lambda w: search[str(w)]["mean"])
    samples = sample(pipe, captions, best)
    real = reference_renders("val", n)
    second = reference_renders("val", n, variant=1)
    recon = reconstruct(pipe.vae, second)
    fid = FIDScorer(evaluator.features, batch_size=evaluator.batch_size)  # the runs' FID
    fid.set_reference(real, "real")
    result = {
        "guidance_scale": best, "guidance_search": search, "search_prompts": m,
        "eval_prompts": n, "sampler": f"DDIM {STEPS} steps",
        "teacher": _scores(evaluator, samples, specs, captions),
        "teacher_by_object_count": by_object_count(evaluator, samples, specs),
        "real_second_set": _scores(evaluator, second, specs, captions),
        "vae_reconstructions": _scores(evaluator, recon, specs, captions),
        "fid_teacher_vs_real": fid.score(samples),
        "fid_real_vs_real_noise_floor": fid.score(second),
        "fid_vae_vs_real_autoencoder_floor": fid.score(recon),
    }
    result["grid_captions"] = sample_grid(pipe, best, settings.out / "samples.png", min(32, n))
    result["measure_seconds"] = round(time.monotonic() - t0, 1)
    return result
