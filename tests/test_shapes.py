"""The shapes world: captions, renders, held-out sets and the data module."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tdd.data.shapes import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLOURS,
    ObjectSpec,
    SceneSpec,
    ShapesDataModule,
    alternatives,
    eval_scenes,
    parse_caption,
    reference_renders,
    render,
    sample_spec,
    scene_rng,
    training_scene,
)

CONF = Path(__file__).resolve().parents[1] / "conf"


def one(shape="square", colour="red", size="large", texture="plain", position="center",
        background="black") -> SceneSpec:
    return SceneSpec((ObjectSpec(shape, colour, size, texture, position),), background)


def test_caption_grammar_round_trips():
    specs = [training_scene(3, i)[0] for i in range(300)]
    assert {len(s.objects) for s in specs} == {1, 2}
    for spec in specs:
        assert parse_caption(spec.caption) == spec
    assert one(texture="striped").caption == (
        "a large red striped square in the center on a black background")


@pytest.mark.parametrize("text", [
    "a large red square in the center on a black background and more",
    "a huge red square in the center on a black background",
    "a large pink square in the center on a black background",
    "a large red square on the left on a black background",  # pair position, one object
])
def test_parse_rejects_text_outside_the_grammar(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_alternatives_change_exactly_one_attribute():
    spec = sample_spec(scene_rng(5), p_two=1.0)
    for attribute in ATTRIBUTES:
        alts = alternatives(spec, attribute)
        assert alts and len({a.caption for a in alts}) == len(alts)
        for alt in alts:
            assert alt != spec and alt.caption != spec.caption
            if attribute == "background":
                assert alt.objects == spec.objects
            else:
                assert alt.background == spec.background
                pairs = [(a, o) for a, o in zip(alt.objects, spec.objects) if a != o]
                assert len(pairs) == (2 if attribute == "position" else 1)
                for a, o in pairs:
                    fields = {f for f in ObjectSpec.__annotations__
                              if getattr(a, f) != getattr(o, f)}
                    assert fields == {attribute}
    assert len(alternatives(spec, "position")) == 3  # the other pair layouts
    assert len(alternatives(one(), "colour")) == len(COLOURS) - 1


def test_render_is_deterministic_and_varies_beyond_the_caption():
    spec = one(texture="dotted")
    a, b = render([spec, spec], [1, 1]), render([spec], [2])
    assert a.shape == (2, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a[0], a[1])
    assert (a[0] - b[0]).abs().max() > 0.1
    assert render([spec], [1], resolution=64).shape == (1, 3, 64, 64)


def _object_mask(image: torch.Tensor, background: str) -> torch.Tensor:
    return (image - BACKGROUNDS[background]).abs().amax(0) > 0.2


def test_renders_show_the_captioned_attributes():
    seeds = list(range(10))
    for position, (x, y) in {"top left": (0, 0), "bottom right": (1, 1)}.items():
        for image in render([one(size="small", position=position)] * 10, seeds):
            ys, xs = torch.nonzero(_object_mask(image, "black"), as_tuple=True)
            assert (xs.float().mean() >= 16) == bool(x) and (ys.float().mean() >= 16) == bool(y)
    small = render([one(size="small")] * 10, seeds)
    large = render([one(size="large")] * 10, seeds)
    assert all(_object_mask(s, "black").sum() * 2 < _object_mask(g, "black").sum()
               for s, g in zip(small, large))
    for name in COLOURS:
        image = render([one(colour=name, background="gray")], [0])[0]
        pixels = image[:, _object_mask(image, "gray")].mean(1)
        nearest = min(COLOURS, key=lambda c: float(((torch.tensor(COLOURS[c]) - pixels)
                                                   ** 2).sum()))
        assert nearest == name


def test_textures_add_fine_detail():
    def detail(texture):  # mean gradient inside a large centred circle
        images = render([one("circle", texture=texture)] * 8, list(range(8)))[..., 12:20, 12:20]
        return float((images[..., 1:] - images[..., :-1]).abs().mean())
    assert detail("plain") < 0.01 < 0.05 < detail("striped")
    assert detail("dotted") > 0.03


def test_held_out_sets_are_fixed_and_disjoint_from_training():
    specs, seeds = eval_scenes("val", 300)
    again, seeds_again = eval_scenes("val", 300)
    assert specs == again and seeds == seeds_again
    test_specs, test_seeds = eval_scenes("test", 300)
    train_seeds = {training_scene(0, i)[1] for i in range(2000)}
    assert not set(seeds) & set(test_seeds) and not set(seeds) & train_seeds
    assert 0.35 < np.mean([len(s.objects) == 2 for s in specs]) < 0.65
    with pytest.raises(ValueError):
        eval_scenes("train", 10)


def test_reference_render_variants_share_captions_not_pixels():
    first, second = reference_renders("val", 12), reference_renders("val", 12, variant=1)
    assert torch.equal(first, reference_renders("val", 12))
    assert ((first - second).abs().flatten(1).amax(1) > 0.1).all()
    assert len(eval_scenes("val", 2000)[0]) == 2000


def test_data_module_batches_follow_the_contract():
    dm = ShapesDataModule(batch_size=6, seed=1, val_size=8)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"pixel_values", "caption"}
    assert batch["pixel_values"].shape == (6, 3, 32, 32)
    assert batch["pixel_values"].dtype == torch.float32
    assert -1 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1
    assert all(isinstance(c, str) and parse_caption(c) for c in batch["caption"])
    same = next(iter(ShapesDataModule(batch_size=6, seed=1).train_dataloader()))
    other = next(iter(ShapesDataModule(batch_size=6, seed=2).train_dataloader()))
    assert torch.equal(batch["pixel_values"], same["pixel_values"])
    assert batch["caption"] == same["caption"] and batch["caption"] != other["caption"]
    val = list(dm.val_dataloader())
    assert sum(len(b["caption"]) for b in val) == 8
    assert val[0]["caption"][0] == eval_scenes("val", 1)[0][0].caption
    with pytest.raises(ValueError, match="batch_size"):
        ShapesDataModule(batch_size=0)


def test_data_module_resumes_the_stream_where_it_stopped():
    fresh = iter(ShapesDataModule(batch_size=3, seed=1).train_dataloader())
    fourth = [next(fresh) for _ in range(4)][-1]
    resumed = ShapesDataModule(batch_size=3, seed=1)
    resumed.load_state_dict({"batches_drawn": 3})  # what a checkpoint at step 3 records
    again = next(iter(resumed.train_dataloader()))
    assert again["caption"] == fourth["caption"]
    assert torch.equal(again["pixel_values"], fourth["pixel_values"])
    assert resumed.state_dict() == {"batches_drawn": 3}  # no trainer: what it was given


def test_data_module_with_workers_matches_without():
    plain = next(iter(ShapesDataModule(batch_size=4, seed=3).train_dataloader()))
    workers = next(iter(ShapesDataModule(batch_size=4, seed=3, num_workers=2)
                        .train_dataloader()))
    assert torch.equal(plain["pixel_values"], workers["pixel_values"])


def test_config_instantiates_the_data_module():
    from hydra.utils import instantiate

    cfg = OmegaConf.create({"seed": 4, "model": {"resolution": 32},
                            "data": OmegaConf.load(CONF / "data" / "shapes.yaml")})
    dm = instantiate(cfg.data)
    assert isinstance(dm, ShapesDataModule) and dm.dataset.seed == 4
    model = OmegaConf.load(CONF / "model" / "toy.yaml")
    assert model._target_ == "tdd.models.teacher.load_teacher" and model.resolution == 32
