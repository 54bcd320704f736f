"""Toy-asset builders and evaluators: helpers, smoke runs of every builder, shipped budgets."""

from __future__ import annotations

import json

import pytest
import torch

from tdd.data.shapes import ATTRIBUTES, eval_scenes, reference_renders
from tdd.metrics.fid import FIDScorer
from tdd.metrics.toy import load_toy_evaluator
from tdd.toy.common import ASSETS, degrade, gaussian_blur, psnr, spearman

SIZE_BUDGET_MB = 25


def test_degradations_are_controlled_by_level():
    images = reference_renders("val", 8)
    g = torch.Generator().manual_seed(0)
    zero = torch.zeros(8)
    assert torch.allclose(degrade(images, zero, torch.arange(8) % 3, g), images, atol=1e-5)
    blurred = gaussian_blur(images, torch.full((8,), 1.0))
    assert torch.allclose(blurred.mean((1, 2, 3)), images.mean((1, 2, 3)), atol=0.02)
    sharp = (images[..., 1:] - images[..., :-1]).pow(2).mean()  # gradient energy
    assert (blurred[..., 1:] - blurred[..., :-1]).pow(2).mean() < 0.6 * sharp
    noisy = degrade(images, torch.ones(8), torch.ones(8, dtype=torch.long), g)
    assert 0 <= noisy.min() and noisy.max() <= 1 and psnr(noisy, images).mean() < 25


def test_vae_loss_weighs_texture_marks_above_flat_areas():
    from tdd.data.shapes import ObjectSpec, SceneSpec, render
    from tdd.toy.vae import detail_weight

    spec = SceneSpec((ObjectSpec("circle", "red", "large", "dotted", "center"),), "white")
    x = render([spec], [0]) * 2 - 1
    weight = detail_weight(x)[0, 0]
    assert weight.shape == (32, 32) and weight.min() >= 1
    assert torch.allclose(weight[:4, :4], torch.ones(4, 4), atol=0.05)  # flat background corner
    dark = x[0].sum(0) < x[0, :, 12:20, 12:20].sum(0).median() - 0.5  # the dots' pixels
    assert dark.any() and weight[dark].mean() > 2


def test_evaluator_batches_mix_clean_degraded_and_reconstructed_renders():
    from tdd.toy.build_evaluator import MIX, augment
    from tdd.toy.vae import vae_model

    assert sum(MIX.values()) == pytest.approx(1.0)
    images = reference_renders("val", 400)
    out, target, known, captioned = augment(images, vae_model().eval(),
                                            torch.Generator().manual_seed(0))
    clean = (out == images).flatten(1).all(1)
    assert clean.float().mean() == pytest.approx(MIX["clean"], abs=0.07)
    assert (~known).float().mean() == pytest.approx(MIX["reconstructed"], abs=0.07)
    assert (target[clean] > 0.8).all() and captioned[~known].all()  # a blur below 0.2 px is exact


def test_spearman_and_psnr():
    x = torch.arange(10.0)
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])) < 1
    a = torch.zeros(2, 3, 4, 4)
    assert psnr(a + 0.1, a) == pytest.approx(torch.full((2,), 20.0), abs=1e-4)


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    """Every builder for two steps on a few held-out prompts, in a temp folder."""
    from tdd.toy.build import main

    root = tmp_path_factory.mktemp("toy")
    args = ["--work", str(root / "work"), "--out", str(root / "out"), "--steps", "2",
            "--batch-size", "4", "--eval-size", "8", "--log-every", "1"]
    main(["all", *args])
    return root, args


def test_builders_write_the_layout_and_the_record(tiny_build):
    root, _ = tiny_build
    out = root / "out"
    for path in ("pipeline/model_index.json", "pipeline/unet", "pipeline/vae",
                 "pipeline/text_encoder", "pipeline/tokenizer", "pipeline/scheduler",
                 "evaluator/open_clip_config.json", "evaluator/open_clip_model.safetensors",
                 "evaluator/detail_head.safetensors", "samples.png", "quality.json"):
        assert (out / path).exists(), path
    tokenizer = json.loads((out / "pipeline/tokenizer/tokenizer.json").read_text())
    assert tokenizer["padding"] is None and tokenizer["truncation"] is None  # not training's
    record = json.loads((out / "quality.json").read_text())
    assert set(record) == {"vae", "evaluator", "teacher"}
    assert record["vae"]["steps"] == 2 and not record["vae"]["passed"]
    assert 0 < record["vae"]["scaling_factor"] and record["vae"]["psnr_db"] < 29
    assert set(record["evaluator"]["real"]) == {*ATTRIBUTES, "mean", "all"}
    teacher = record["teacher"]
    assert str(teacher["guidance_scale"]) in teacher["guidance_search"]
    assert teacher["fid_real_vs_real_noise_floor"] >= 0 and teacher["eval_prompts"] == 8
    fid = FIDScorer(load_toy_evaluator(out / "evaluator").features)  # the runs' FID
    fid.set_reference(reference_renders("val", 8))
    runs = fid.score(reference_renders("val", 8, variant=1))
    assert teacher["fid_real_vs_real_noise_floor"] == pytest.approx(runs, rel=1e-5)
    assert set(teacher["passed"]) == set(teacher["gates"]) and not any(teacher["passed"].values())
    by_count = teacher["teacher_by_object_count"]
    assert set(by_count) <= {"1", "2"} and by_count  # 8 prompts: at least one kind
    assert all(set(acc) == {*ATTRIBUTES, "mean", "all"} for acc in by_count.values())


def test_builders_write_the_flow_teacher_beside(tiny_build):
    """``all`` ends with the flow stage: an SD3-layout pipeline and its own record."""
    flow = tiny_build[0] / "toy_flow"
    for path in ("pipeline/model_index.json", "pipeline/transformer", "pipeline/vae",
                 "pipeline/text_encoder", "pipeline/text_encoder_2", "pipeline/tokenizer",
                 "pipeline/tokenizer_2", "pipeline/scheduler", "samples.png", "quality.json"):
        assert (flow / path).exists(), path
    index = json.loads((flow / "pipeline/model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder_3"] == [None, None]
    teacher = json.loads((flow / "quality.json").read_text())["teacher"]
    assert teacher["steps"] == 2 and teacher["eval_prompts"] == 8
    assert teacher["sampler"].startswith("Euler 28 steps")
    assert str(teacher["guidance_scale"]) in teacher["guidance_search"]
    assert set(teacher["teacher"]) >= {*ATTRIBUTES, "mean", "all", "clip_score"}
    assert set(teacher["passed"]) == set(teacher["gates"]) and not any(teacher["passed"].values())
    assert 0 < teacher["pipeline_megabytes"] < 12 and teacher["vae_shift_factor"] != 0
    assert teacher["train_cpu_seconds"] > 0 and teacher["measure_seconds"] > 0


def test_built_pipeline_loads_as_stable_diffusion(tiny_build):
    from diffusers import StableDiffusionPipeline

    from tdd.models.teacher import load_teacher

    folder = tiny_build[0] / "out" / "pipeline"
    pipe = StableDiffusionPipeline.from_pretrained(folder)  # no dtype given: all float32
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a large blue dotted square at the top left on a white background"],
                  height=32, width=32, num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    assert pipe.vae.config.scaling_factor != 1.0  # measured, not the default
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.tokenizer("a red circle").input_ids[0] == 49406  # real CLIP ids
    teacher = load_teacher(str(folder), resolution=32)
    cond = teacher.text(["a small red circle in the center on a black background"])
    eps = teacher.unet(torch.zeros(1, 4, 8, 8), torch.tensor([10]), **cond.unet_kwargs()).sample
    assert eps.shape == (1, 4, 8, 8) and teacher.prediction_type == "epsilon"
    assert next(teacher.unet.parameters()).dtype == torch.float32


def test_built_evaluator_interfaces(tiny_build):
    import open_clip

    folder = tiny_build[0] / "out" / "evaluator"
    evaluator = load_toy_evaluator(folder)
    specs, _ = eval_scenes("val", 4)
    images = reference_renders("val", 4)
    by_spec = evaluator.attribute_accuracy(images, specs)
    by_caption = evaluator.attribute_accuracy(images, [s.caption for s in specs])
    assert by_spec == by_caption and set(by_spec) == {*ATTRIBUTES, "mean", "all"}
    assert evaluator.image_features(images).norm(dim=-1) == pytest.approx(torch.ones(4))
    assert evaluator.detail_score(images).shape == (4,)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokens = open_clip.get_tokenizer(f"local-dir:{folder}")([specs[0].caption])
    with torch.no_grad():
        text = model.encode_text(tokens)
        ours = evaluator.model.encode_text(tokens)
    assert torch.allclose(text, ours, atol=1e-4)


def test_builders_resume_from_their_state(tiny_build, capsys):
    from tdd.toy.build import main

    root, args = tiny_build
    main(["vae", *args[:5], "3", *args[6:]])
    assert "[vae] resuming at step 4" in capsys.readouterr().out  # 2 + 2 decoder steps
    state = torch.load(root / "work" / "vae" / "state.pt", weights_only=False)
    assert state["step"] == 6


def test_shipped_assets_fit_the_budget():
    if not (ASSETS / "quality.json").exists():
        pytest.skip("toy assets not built (make toy-assets)")
    size = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert size <= SIZE_BUDGET_MB * 2**20
    record = json.loads((ASSETS / "quality.json").read_text())
    assert {"vae", "evaluator", "teacher"} <= set(record)


def open_clip_token_states(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Per-token outputs of an open_clip ``CLIP`` text tower (final LayerNorm, no pooling)."""
    x = model.token_embedding(ids) + model.positional_embedding[:ids.shape[1]]
    mask = model.attn_mask[:ids.shape[1], :ids.shape[1]]
    return model.ln_final(model.transformer(x, attn_mask=mask))


def test_teacher_text_encoder_equals_the_evaluator_text_tower():
    """The teacher starts from the toy CLIP's text tower: same per-token outputs and pooling."""
    from tdd.models.tokenizer import clip_tokenizer
    from tdd.toy.clip import clip_text_model, create_clip, open_clip_config

    torch.manual_seed(0)
    model, _ = create_clip(open_clip_config())
    with torch.no_grad():  # move every weight off its initial value (LayerNorms start at 1, 0)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    encoder = clip_text_model(model)
    captions = ["a small red square at the bottom and a large purple circle at the top "
                "on a black background", ""]
    ids = clip_tokenizer(32)(captions, padding="max_length", max_length=32,
                             return_tensors="pt").input_ids
    with torch.no_grad():
        ours = encoder(ids)[0]
        theirs = open_clip_token_states(model, ids)
        pooled = model.encode_text(ids)
    assert ours.shape == (2, 32, encoder.config.hidden_size)
    assert torch.allclose(ours, theirs, atol=1e-5)
    eos = ids.argmax(-1)  # open_clip pools the first end-of-text token
    assert torch.allclose(ours[torch.arange(2), eos] @ model.text_projection, pooled, atol=1e-5)
    assert not torch.allclose(ours[0], ours[1], atol=1e-3)


def test_teacher_loss_trains_the_unet_and_the_text_encoder():
    from tdd.models.tokenizer import clip_tokenizer
    from tdd.schedule import SD_SCHEDULER, NoiseSchedule
    from tdd.toy.build_teacher import MAX_LENGTH, teacher_loss, unet
    from tdd.toy.clip import clip_text_model, create_clip, open_clip_config
    from tdd.toy.common import training_batch
    from tdd.toy.vae import vae_model

    torch.manual_seed(0)
    encoder = clip_text_model(create_clip(open_clip_config())[0], MAX_LENGTH)
    model = torch.nn.ModuleDict({"unet": unet(encoder.config.hidden_size),
                                 "text_encoder": encoder})
    images, specs = training_batch(0, 0, 4)
    loss = teacher_loss(model, clip_tokenizer(MAX_LENGTH), vae_model().eval(),
                        NoiseSchedule.from_config(SD_SCHEDULER), images,
                        [s.caption for s in specs], torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    for part in ("unet", "text_encoder"):
        grads = [p.grad for p in model[part].parameters() if p.grad is not None]
        assert grads and sum(g.abs().sum() for g in grads) > 0, part


def test_checkpointer_refuses_a_state_of_another_architecture(tmp_path):
    from tdd.toy.common import Checkpointer

    ckpt = Checkpointer(tmp_path, every_s=0)
    assert ckpt.load(torch.nn.Linear(2, 2)) is None
    ckpt.maybe_save(lambda step: {"model": torch.nn.Linear(2, 2).state_dict(), "step": step}, 5)
    assert ckpt.load(torch.nn.Linear(2, 2))["step"] == 5
    with pytest.raises(ValueError, match="state.pt holds a model of another architecture"):
        ckpt.load(torch.nn.Linear(3, 2))
    assert ckpt.load(torch.nn.Linear(2, 2))["step"] == 5  # nothing lost
