"""The toy flow teacher's builder: tokenizer, text encoders, collapsed padding, loss, resume,
the saved StableDiffusion3Pipeline, and the shipped assets with their gates."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.models.attention_processor import JointAttnProcessor2_0

from tdd.toy import build_flow_teacher as flow
from tdd.toy.common import ASSETS, BuildSettings

FLOW_ASSETS = ASSETS.parent / "toy_flow"
BUDGET_MB = 12
CAPTIONS = ["a small red circle in the center on a black background",
            "a large yellow dotted triangle on the right and a small blue striped square on the "
            "left on a gray background"]


@pytest.fixture(scope="module")
def toy_out(tmp_path_factory) -> Path:
    """A copy of the shipped toy VAE and evaluator: what the flow stage reads."""
    out = tmp_path_factory.mktemp("flow") / "toy"
    shutil.copytree(ASSETS / "evaluator", out / "evaluator")
    shutil.copytree(ASSETS / "pipeline" / "vae", out / "pipeline" / "vae")
    return out


@pytest.fixture
def settings(tmp_path, toy_out) -> BuildSettings:
    """A three-step build of batch 4 training in ``tmp_path``, saving every step."""
    return BuildSettings(work=tmp_path / "work", out=toy_out, steps=3, batch_size=4,
                         log_every=1, ckpt_every_s=0.0)


@pytest.fixture
def small(monkeypatch):
    """Builds use a 2-layer, 64-wide transformer (the shipped one is 6 x 128)."""
    full = flow.transformer
    monkeypatch.setattr(flow, "transformer",
                        lambda pooled, joint: full(pooled, joint, width=64, layers=2))


@pytest.fixture(scope="module")
def vae(toy_out):
    return flow.flow_vae(BuildSettings(work=toy_out.parent / "work", out=toy_out))


def test_world_tokenizer_splits_captions_as_clip():
    from tdd.data.shapes import training_scene
    from tdd.models.tokenizer import clip_tokenizer

    small, full = flow.flow_tokenizer(), clip_tokenizer(flow.MAX_LENGTH)
    captions = [training_scene(3, i)[0].caption for i in range(300)] + CAPTIONS
    for caption in captions:
        ids = small(caption).input_ids
        assert len(ids) <= flow.MAX_LENGTH
        assert small.convert_ids_to_tokens(ids) == full.convert_ids_to_tokens(
            full(caption).input_ids)
    assert len(small) < 700  # a vocabulary of the world, not CLIP's 49408
    other = small("an orange zebra!").input_ids  # other words: smaller pieces, never unknown
    assert small.decode(other, skip_special_tokens=True) == "an orange zebra !"


def test_flow_text_encoder_starts_from_the_toy_clip(settings):
    from tdd.metrics.toy import load_toy_evaluator

    clip = load_toy_evaluator(ASSETS / "evaluator").model
    encoder, tokenizer = flow.text_encoder(settings), flow.flow_tokenizer()
    ids = tokenizer(CAPTIONS, padding="max_length", max_length=flow.MAX_LENGTH,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        pooled = encoder(ids).text_embeds
        theirs = clip.encode_text(load_toy_evaluator(ASSETS / "evaluator").tokenizer(CAPTIONS))
    assert torch.allclose(pooled, theirs, atol=1e-4)  # same tower, projection and pooling


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_collapsed_padding_equals_the_pipeline_zero_tokens(qk_norm):
    """One zero token with the repeats' log-bias gives what the pipeline's 256 zeros give."""
    torch.manual_seed(0)
    model = flow.transformer(pooled_dim=16, joint_dim=24, width=64, layers=2)
    if qk_norm is None:
        model = type(model).from_config({**model.config, "qk_norm": None})
    g = torch.Generator().manual_seed(1)
    x, clip = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 5, 24, generator=g)
    pooled, t = torch.randn(3, 16, generator=g), torch.tensor([10.0, 500.0, 990.0])
    with torch.no_grad():
        model.set_attn_processor(JointAttnProcessor2_0())
        stock = model(x, torch.cat([clip, torch.zeros(3, 256, 24)], 1), pooled, t).sample
        flow.collapse_padding(model)
        collapsed = model(x, torch.cat([clip, torch.zeros(3, 1, 24)], 1), pooled, t).sample
    assert torch.allclose(collapsed, stock, atol=1e-5)
    flow.collapse_padding(model, repeats=1)  # no repeats: not what the pipeline computes
    with torch.no_grad():
        plain = model(x, torch.cat([clip, torch.zeros(3, 1, 24)], 1), pooled, t).sample
    assert (plain - stock).abs().max() > 1e-3


def test_encode_is_the_pipeline_prompt_encoding(settings, vae, small):
    model, tokenizer = flow.build_models(settings), flow.flow_tokenizer()
    pipe = flow.flow_pipeline(model, vae)
    with torch.no_grad():
        context, pooled = flow.encode(model, tokenizer, CAPTIONS)
        theirs, _, theirs_pooled, _ = pipe.encode_prompt(
            CAPTIONS, None, None, do_classifier_free_guidance=False, max_sequence_length=1)
    assert context.shape == (2, flow.MAX_LENGTH + 1, 96) and pooled.shape == (2, 256)
    assert torch.allclose(context, theirs) and torch.allclose(pooled, theirs_pooled)


def test_flow_vae_normalises_the_latents(vae):
    assert vae.config.shift_factor != 0 and vae.config.scaling_factor != 1
    from tdd.toy.common import training_batch

    images, _ = training_batch(7, 0, 256)
    with torch.no_grad():
        z = vae.encode(images * 2 - 1).latent_dist.mode()
    x0 = (z - vae.config.shift_factor) * vae.config.scaling_factor
    assert abs(float(x0.mean())) < 0.1 and 0.85 < float(x0.std()) < 1.15


def test_flow_loss_trains_the_transformer_and_both_text_encoders(settings, vae, small):
    from tdd.toy.common import training_batch

    model, tokenizer = flow.build_models(settings), flow.flow_tokenizer()
    images, specs = training_batch(0, 0, 4)
    loss = flow.flow_loss(model, tokenizer, vae, images,
                          [s.caption for s in specs], torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    for name in ("transformer", *flow.ENCODERS):
        grads = [p.grad for p in model[name].parameters() if p.grad is not None]
        assert grads and sum(g.abs().sum() for g in grads) > 0, name
    sigma = flow.sample_sigmas(10_000, torch.Generator().manual_seed(0))
    assert 0 < sigma.min() and sigma.max() < 1
    assert (sigma > 0.95).float().mean() > 0.01  # the uniform share reaches the first step


def test_flow_loss_is_the_velocity_error_on_normalised_latents(settings, vae, small,
                                                               monkeypatch):
    """With sigma 0 the transformer sees x0, with sigma 1 it sees eps (same draws); a
    prediction of ones then costs mean((1 - (eps - x0))^2), x0 the SD3-normalised latent."""
    from types import SimpleNamespace

    from tdd.toy.common import training_batch

    model, tokenizer = flow.build_models(settings), flow.flow_tokenizer()
    images, specs = training_batch(0, 0, 16)
    seen = {}

    def ones(hidden_states, timestep, **kwargs):
        seen["x"], seen["t"] = hidden_states, timestep
        return SimpleNamespace(sample=torch.ones_like(hidden_states))

    monkeypatch.setattr(model["transformer"], "forward", ones)
    inputs = {}
    for level in (0.0, 1.0):
        monkeypatch.setattr(flow, "sample_sigmas", lambda n, g, v=level: torch.full((n,), v))
        loss = flow.flow_loss(model, tokenizer, vae, images, [s.caption for s in specs],
                              torch.Generator().manual_seed(0))
        inputs[level] = seen["x"]
        assert torch.equal(seen["t"], torch.full((16,), 1000 * level))
    x0, eps = inputs[0.0], inputs[1.0]
    assert torch.allclose(loss, (1 - (eps - x0)).pow(2).mean())
    assert abs(float(x0.mean())) < 0.15 and 0.8 < float(x0.std()) < 1.2


def _params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_flow_build_resumes_where_it_stopped(settings, vae, small, monkeypatch, capsys):
    straight, _ = flow.train(BuildSettings(**{**vars(settings), "work": settings.work / "a"}),
                             vae)

    calls = []

    def stop_after_two(loss, optimizer, params):  # the build is killed during its third step
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        descend(loss, optimizer, params)

    from tdd.toy.common import descend
    monkeypatch.setattr(flow, "descend", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        flow.train(settings, vae)
    monkeypatch.setattr(flow, "descend", descend)
    resumed, seconds = flow.train(settings, vae)
    assert "[flow] resuming at step 2" in capsys.readouterr().out
    state = torch.load(settings.work / "flow_teacher" / "state.pt", weights_only=False)
    assert state["step"] == 3 and 0 < state["seconds"]["cpu"] <= seconds["cpu"]
    assert torch.allclose(_params(resumed), _params(straight), atol=1e-6)
    assert not torch.allclose(_params(resumed), _params(flow.build_models(settings)), atol=1e-4)


def test_flow_build_refuses_a_state_of_another_architecture(settings, vae):
    from tdd.toy.build_teacher import unet

    path = settings.work_dir("flow_teacher") / "state.pt"
    torch.save({"model": unet(48).state_dict(), "step": 7}, path)
    with pytest.raises(ValueError, match="flow_teacher/state.pt holds a model of another"):
        flow.train(settings, vae)
    assert torch.load(path, weights_only=False)["step"] == 7  # left as it was


def test_saved_pipeline_loads_as_stable_diffusion_3(settings, vae, small, tmp_path):
    from tdd.toy.measure_flow_teacher import load_flow_pipeline, sample

    torch.manual_seed(0)
    model = flow.build_models(settings)
    folder = flow.save_flow_pipeline(tmp_path / "pipeline", model, vae)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None,
                                                    tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.dtype == pipe.text_encoder.dtype == torch.float32
    assert pipe.vae.config.shift_factor == pytest.approx(vae.config.shift_factor, abs=1e-5)
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    stock = pipe(CAPTIONS, height=32, width=32, num_inference_steps=3, guidance_scale=3.0,
                 generator=generators, output_type="pt").images
    assert stock.shape == (2, 3, 32, 32) and torch.isfinite(stock).all()
    fast = sample(load_flow_pipeline(folder), CAPTIONS, 3.0, steps=3)  # what the record uses
    assert torch.allclose(fast, stock.clamp(0, 1), atol=1e-4)


def test_build_has_a_flow_stage(monkeypatch, tmp_path):
    from tdd.toy import build

    seen = []
    monkeypatch.setattr(flow, "build_flow_teacher", lambda s: seen.append(s))
    build.main(["flow", "--work", str(tmp_path), "--steps", "5"])
    assert len(seen) == 1 and seen[0].steps == 5
    assert build.STAGES[-1] == "flow" and flow.flow_out(seen[0]) == FLOW_ASSETS


def test_toy_flow_config_loads_the_shipped_teacher(make_cfg):
    from hydra.utils import instantiate

    from tdd.models.teacher import load_teacher

    if "use_t5" not in inspect.signature(load_teacher).parameters:
        pytest.skip("load_teacher has no flow teachers yet")
    cfg = make_cfg("model=toy_flow")
    assert cfg.model.use_t5 is False and cfg.model.max_sequence_length == flow.T5_LENGTH
    assert cfg.model.collapse_padding is True
    if not (FLOW_ASSETS / "pipeline").exists():
        pytest.skip("toy flow teacher not built (make toy-assets)")
    teacher = instantiate(cfg.model)
    assert teacher.resolution == 32


@pytest.fixture(scope="module")
def record() -> dict:
    path = FLOW_ASSETS / "quality.json"
    if not path.exists():
        pytest.skip("toy flow teacher not built (make toy-assets)")
    return json.loads(path.read_text())["teacher"]


def test_shipped_flow_teacher_meets_its_gates_and_budget(record):
    size = sum(p.stat().st_size for p in FLOW_ASSETS.rglob("*") if p.is_file())
    assert size <= BUDGET_MB * 2**20
    assert record["eval_prompts"] == 2000 and record["sampler"].startswith("Euler 28 steps")
    assert record["teacher"]["mean"] >= flow.GATES["mean_attribute_accuracy"]
    assert record["teacher"]["all"] >= flow.GATES["all_attributes"]
    assert all(record["passed"].values())


def test_shipped_flow_teacher_samples_with_the_stock_pipeline(record):
    pipe = StableDiffusion3Pipeline.from_pretrained(
        FLOW_ASSETS / "pipeline", text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(CAPTIONS, height=32, width=32, num_inference_steps=4,
                  guidance_scale=record["guidance_scale"], output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert images.std() > 0.05  # pictures, not a flat field
