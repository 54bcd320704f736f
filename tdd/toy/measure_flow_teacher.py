"""Quality of the toy flow teacher: 28-step Euler samples of the stock SD3 pipeline scored by
the toy evaluator, as the UNet teacher's record (:mod:`tdd.toy.measure_teacher`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline

from tdd.data.shapes import eval_scenes, reference_renders
from tdd.metrics.fid import FIDScorer
from tdd.metrics.toy import load_toy_evaluator
from tdd.models.flow_attention import collapse_padding
from tdd.toy.common import EVALUATOR_STAGE, BuildSettings
from tdd.toy.measure_teacher import _scores, by_object_count, sample_grid

STEPS = 28  # StableDiffusion3Pipeline's default: Euler on FlowMatchEulerDiscreteScheduler
SEARCH_PROMPTS = 200
GUIDANCE_SCALES = (2.0, 3.5, 5.0, 7.0)


def load_flow_pipeline(folder, collapsed: bool = True) -> StableDiffusion3Pipeline:
    """The shipped pipeline in float32 (no T5). ``collapsed``: the transformer takes one zero
    token for the pipeline's 256, so calls must pass ``max_sequence_length=1`` (as
    :func:`sample` does); the images are those of the stock call."""
    pipe = StableDiffusion3Pipeline.from_pretrained(
        folder, text_encoder_3=None, tokenizer_3=None, torch_dtype=torch.float32)
    if collapsed:
        collapse_padding(pipe.transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample(pipe: StableDiffusion3Pipeline, captions: list[str], guidance: float,
           seed: int = 0, batch: int = 250, steps: int = STEPS) -> torch.Tensor:
    """``steps``-step Euler samples in [0, 1] from a collapsed pipeline; image i uses its own
    generator seeded ``seed + i``."""
    out = []
    for i in range(0, len(captions), batch):
        chunk = captions[i:i + batch]
        generators = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        images = pipe(chunk, height=32, width=32, num_inference_steps=steps,
                      guidance_scale=guidance, generator=generators, output_type="pt",
                      max_sequence_length=1).images
        out.append(images.float().clamp(0, 1))
    return torch.cat(out)


def measure_flow_teacher(settings: BuildSettings, out: Path) -> dict:
    """Guidance search on a subset, then the full held-out set at the best scale."""
    t0 = time.monotonic()
    pipe = load_flow_pipeline(out / "pipeline")
    evaluator = load_toy_evaluator(settings.out / "evaluator", setting=EVALUATOR_STAGE)
    n = settings.eval_size
    specs, _ = eval_scenes("val", n)
    captions = [s.caption for s in specs]
    m = min(SEARCH_PROMPTS, n)
    search = {}
    for w in GUIDANCE_SCALES:
        search[str(w)] = evaluator.attribute_accuracy(sample(pipe, captions[:m], w), specs[:m])
        print(f"[flow] guidance {w}: {json.dumps(search[str(w)])}", flush=True)
    best = max(GUIDANCE_SCALES, key=lambda w: search[str(w)]["mean"])
    samples = sample(pipe, captions, best)
    fid = FIDScorer(evaluator.features, batch_size=evaluator.batch_size)
    fid.set_reference(reference_renders("val", n), "real")
    result = {
        "guidance_scale": best, "guidance_search": search, "search_prompts": m,
        "eval_prompts": n, "sampler": f"Euler {STEPS} steps (FlowMatchEulerDiscreteScheduler)",
        "teacher": _scores(evaluator, samples, specs, captions),
        "teacher_by_object_count": by_object_count(evaluator, samples, specs),
        "fid_teacher_vs_real": fid.score(samples),
    }
    result["grid_captions"] = sample_grid(pipe, best, out / "samples.png", min(32, n),
                                          sampler=sample)
    result["measure_seconds"] = round(time.monotonic() - t0, 1)
    return result
