"""The adversarial term on flow teachers (docs/methods.md section 1.2): the discriminator reads
an SD3 or FLUX transformer's image tokens after the joint blocks of its first half."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from helpers_flow import T5_DIM, save_tiny_flux, save_tiny_sd3

from run import train
from tdd.adversarial import Discriminator, transformer_features
from tdd.adversarial.discriminator import feature_blocks, feature_channels, token_maps
from tdd.models.conditioning import Conditioning
from tdd.models.flow import pack_latents, run_transformer


def sd3(layers: int) -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_DIM,
        caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=8).eval()


def flux(layers: int) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=layers, num_single_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_DIM,
        pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4)).eval()


def conditioning(batch: int, flux_: bool) -> Conditioning:
    g = torch.Generator().manual_seed(3)
    added = {"pooled": torch.randn(batch, 16, generator=g)}
    if flux_:
        added["guidance"] = torch.full((batch,), 3.5)
    return Conditioning(torch.randn(batch, 5, T5_DIM, generator=g), added)


@pytest.mark.parametrize("layers, blocks", [(1, [0]), (2, [0]), (4, [0, 1]), (8, [0, 1, 2, 3]),
                                            (24, [2, 5, 8, 11]), (19, [1, 3, 6, 8])])
def test_feature_blocks_are_spread_over_the_first_half(layers, blocks):
    assert feature_blocks(sd3(layers) if layers <= 8 else _stub(layers)) == blocks


def _stub(layers: int):
    return type("Stub", (), {"transformer_blocks": [None] * layers})()


@pytest.mark.parametrize("build, flux_", [(sd3, False), (flux, True)], ids=["sd3", "flux"])
def test_features_are_the_joint_blocks_image_tokens_and_later_blocks_do_not_run(build, flux_):
    model = build(6)  # feature blocks 0, 1, 2 of 6
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([700.0, 250.0])
    cond = conditioning(2, flux_)
    caught, ran = [], []
    handles = [b.register_forward_hook(lambda m, a, out: caught.append(out[1]))
               for b in model.transformer_blocks[:3]]
    handles += [b.register_forward_hook(lambda m, a, out, i=i: ran.append(i))
                for i, b in enumerate(model.transformer_blocks)]
    with torch.no_grad():
        run_transformer(model, x, t, cond)  # the full forward: every block runs
        assert ran == list(range(6))
        ran.clear()
        features = transformer_features(model, x, t, cond)
    for handle in handles:
        handle.remove()
    assert ran == [0, 1, 2]  # the blocks after the last feature block were skipped
    full, taken = caught[:3], caught[3:]
    side = 4  # 8x8 latents in 2x2 patches (SD3's patch embedding, FLUX's packing)
    assert [f.shape for f in features] == [(2, model.inner_dim, side, side)] * 3
    for reference, again, feature in zip(full, taken, features):
        assert torch.equal(reference, again)
        assert torch.equal(feature, token_maps(reference, 8, 8))
    assert feature_channels(model) == [model.inner_dim] * 3


def test_token_maps_put_each_patch_back_where_it_was():
    x = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(2))
    packed = token_maps(pack_latents(x), 8, 6)  # FLUX: a 2x2 patch's 16 values per token
    assert packed.shape == (2, 16, 4, 3)
    for i in range(4):
        for j in range(3):
            assert torch.equal(packed[:, :, i, j], x[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
                               .reshape(2, 16))
    model = sd3(1)
    projected = model.pos_embed.proj(x)  # SD3: the stride-2 convolution before flattening
    tokens = projected.flatten(2).transpose(1, 2)
    assert torch.equal(token_maps(tokens, 8, 6), projected)


def test_generator_gradient_reaches_the_latents_through_transformer_features():
    model = flux(2).requires_grad_(False)
    disc = Discriminator(model, norm_groups=8)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4), requires_grad=True)
    logits = disc.logits(disc.features(model, x, torch.tensor([500.0, 500.0]),
                                       conditioning(2, True)), frozen_heads=True)
    torch.stack([logit.mean() for logit in logits]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.parameters())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adversarial_flow")
    return {"sd3": save_tiny_sd3(root / "sd3"), "flux": save_tiny_flux(root / "flux")}


@pytest.mark.parametrize("model, guidance, student", [
    ("sd3", "decoupled", "lora"), ("flux", "embedded", "full")])
def test_hinge_trains_on_flow_teachers(make_cfg, folders, model, guidance, student,
                                       monkeypatch):
    """Two steps: the heads' step, then the student's with the generator term; the
    transformer sees the noisy timestep u as it takes timesteps, sigma[u] * T."""
    from tdd.adversarial import hinge

    draws, seen, modules = [], [], []
    noisy, features = hinge.noisy_timestep, Discriminator.features
    objective = hinge.HingeAdversarial.objective
    monkeypatch.setattr(hinge.HingeAdversarial, "objective",
                        lambda self, module, *a: modules.append(module) or objective(
                            self, module, *a))
    monkeypatch.setattr(hinge, "noisy_timestep",
                        lambda *a, **k: draws.append(noisy(*a, **k)) or draws[-1])
    monkeypatch.setattr(Discriminator, "features",
                        lambda self, net, x, t, c: seen.append(t) or features(self, net, x, t, c))
    cfg = make_cfg(f"model={model}", f"model.path={folders[model]}", "model.resolution=32",
                   "model.max_sequence_length=8", "model.vae_slicing=false",
                   "adversarial=hinge", "adversarial.norm_groups=8", f"guidance={guidance}",
                   f"student={student}", "trainer.max_steps=2", "callbacks=none",
                   "data.batch_size=2", "export.enabled=false")
    results = train(cfg)
    logged = results["train"]
    assert {"train/d_loss", "train/g_loss"} <= set(logged)
    assert torch.isfinite(torch.tensor([logged["train/d_loss"], logged["train/g_loss"]])).all()
    assert (Path(cfg.paths.output_dir) / "results.json").is_file()
    schedule = modules[0].schedule
    assert type(schedule).__name__ == "FlowSchedule"
    assert len(draws) == 2 and len(seen) == 2
    assert torch.allclose(seen[0], schedule.model_timestep(draws[0]).repeat(2))  # real + fake
    assert torch.allclose(seen[1], schedule.model_timestep(draws[1]))
