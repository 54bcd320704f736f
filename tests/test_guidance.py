import pytest
import torch

from tdd.guidance import (
    CFGGuidance,
    DecoupledGuidance,
    Guidance,
    NoGuidance,
    WEmbedGuidance,
    combine,
    guidance_embedding,
)
from tdd.models.conditioning import Conditioning


def test_combine_is_the_lcm_form():
    cond, uncond = torch.full((2, 3), 2.0), torch.full((2, 3), 0.5)
    w = torch.tensor([0.0, 3.5])
    out = combine(cond, uncond, w)
    assert torch.equal(out[0], cond[0])  # w = 0 is the conditional prediction
    # LCM-form w equals the diffusers scale g = w + 1: u + g (c - u)
    assert torch.allclose(out[1], uncond[1] + 4.5 * (cond[1] - uncond[1]))


def test_empty_prompt_share():
    captions = ["a red circle"] * 20_000
    dropped = DecoupledGuidance().drop_captions(captions, torch.Generator().manual_seed(0))
    share = sum(c == "" for c in dropped) / len(dropped)
    assert abs(share - 0.2) < 0.01
    assert CFGGuidance().drop_captions(captions[:50], torch.Generator()) == captions[:50]
    assert all(c == "" for c in Guidance(empty_prompt_share=1.0).drop_captions(captions[:5]))


def test_guidance_scale_draws():
    g = torch.Generator().manual_seed(0)
    assert torch.all(DecoupledGuidance(w=3.5).sample_w(8, g) == 3.5)
    w = CFGGuidance(w_min=4, w_max=5).sample_w(10_000, g)
    assert w.min() >= 4 and w.max() <= 5 and abs(w.mean().item() - 4.5) < 0.02
    assert not NoGuidance().uses_uncond and DecoupledGuidance().uses_uncond


def test_w_embedding_conditions_only_w_embed():
    w = torch.tensor([3.0, 7.5])
    embedding = WEmbedGuidance(embedding_dim=256).student_condition(w)
    assert embedding.shape == (2, 256)
    assert torch.allclose(embedding[:, 0], torch.sin(w * 1000))
    assert not torch.allclose(embedding[0], embedding[1])
    assert DecoupledGuidance().student_condition(w) is None
    assert guidance_embedding(torch.zeros(1), 8)[0, 4:].eq(1).all()


def test_unconditional_embedding_modes():
    cond = Conditioning(torch.ones(2, 4, 8), {"text_embeds": torch.ones(2, 8),
                                               "time_ids": torch.ones(2, 6)})
    empty = lambda n: Conditioning(torch.full((n, 4, 8), 5.0))  # noqa: E731
    assert DecoupledGuidance().unconditional(cond, empty).hidden.eq(5).all()
    zeros = DecoupledGuidance(uncond="zeros").unconditional(cond, empty)
    assert zeros.hidden.eq(0).all() and zeros.added["text_embeds"].eq(0).all()
    assert zeros.added["time_ids"].eq(1).all()  # size conditioning is kept


@pytest.mark.parametrize(
    "build, setting",
    [
        (lambda: DecoupledGuidance(empty_prompt_share=1.2), "empty_prompt_share"),
        (lambda: DecoupledGuidance(uncond="null"), "uncond"),
        (lambda: CFGGuidance(w_min=5, w_max=4), "w_min"),
        (lambda: WEmbedGuidance(embedding_dim=255), "embedding_dim"),
    ],
)
def test_bad_guidance_settings_are_named(build, setting):
    with pytest.raises(ValueError, match=setting):
        build()


def test_inference_scales_follow_the_guidance_mode():
    assert DecoupledGuidance().inference_scales == (1.0, 1.7)
    assert CFGGuidance().inference_scales == (1.0,)
    assert WEmbedGuidance(w_min=3, w_max=15).inference_scales == (10.0,)
