"""The published training transform, decoding of every image mode, and SDXL size conditioning."""

import io
from functools import partial

import numpy as np
import pytest
import torch
from helpers_data import image_bytes, truncated_jpeg
from PIL import Image

from tdd.data.report import BadSample
from tdd.data.transforms import ImageTransform, decode_caption, decode_image, sample_generator


def test_center_crop_matches_resize_then_crop_by_hand():
    image = Image.open(io.BytesIO(image_bytes("RGB", 40, 30, 0))).convert("RGB")
    out = ImageTransform(16)(image, sample_generator(0))
    # short side 30 -> 16: 40 x 30 becomes 21 x 16; centered, the crop starts at column 2
    assert out["original_size"].tolist() == [30, 40]
    assert out["crop_top_left"].tolist() == [0, 2]
    expected = image.resize((21, 16), Image.Resampling.BILINEAR).crop((2, 0, 18, 16))
    pixels = torch.from_numpy(np.asarray(expected).copy()).permute(2, 0, 1).float()
    assert out["pixel_values"].shape == (3, 16, 16)
    assert torch.allclose(out["pixel_values"], pixels / 127.5 - 1)
    assert out["pixel_values"].min() >= -1 and out["pixel_values"].max() <= 1


def test_random_crop_is_reproducible_per_seed_and_varies_across_seeds():
    image = Image.open(io.BytesIO(image_bytes("RGB", 64, 20, 1))).convert("RGB")
    crop = ImageTransform(16, crop="random")
    corners = {tuple(crop(image, sample_generator(0, k))["crop_top_left"].tolist())
               for k in range(20)}
    assert len(corners) > 5 and all(top == 0 and 0 <= left <= 51 - 16 for top, left in corners)
    a, b = (crop(image, sample_generator(3, 7)) for _ in range(2))
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    assert a["crop_top_left"].tolist() == b["crop_top_left"].tolist()


def test_flip_mirrors_half_of_the_samples():
    image = Image.open(io.BytesIO(image_bytes("RGB", 48, 32, 2))).convert("RGB")
    plain = ImageTransform(16)(image, sample_generator(0))["pixel_values"]
    flips = [ImageTransform(16, flip=True)(image, sample_generator(0, k))["pixel_values"]
             for k in range(16)]
    mirrored = sum(torch.equal(f, plain.flip(-1)) for f in flips)
    kept = sum(torch.equal(f, plain) for f in flips)
    assert mirrored + kept == 16 and 3 <= mirrored <= 13


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "LA", "RGB"])
def test_every_mode_decodes_to_rgb(mode):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    image = decode_image(image_bytes(mode, 20, 10, 3, fmt), "x")
    assert image.mode == "RGB" and image.size == (20, 10)


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    out = io.BytesIO()
    rgba.save(out, "PNG")
    assert decode_image(out.getvalue(), "x").getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty_file"),
    (b"plain text with a .jpg name", "not_an_image"),
    (truncated_jpeg(0), "corrupt_image"),
    (image_bytes("RGB", 30, 12, 4), "too_small"),
])
def test_bad_images_raise_their_reason(data, reason):
    with pytest.raises(BadSample) as bad:
        decode_image(data, "some/file.jpg", min_size=16)
    assert bad.value.reason == reason and bad.value.path == "some/file.jpg"


def test_captions_missing_or_blank_are_bad():
    assert decode_caption(b" a cat \n", "x") == "a cat"
    for data, reason in ((None, "missing_caption"), (b" \n", "empty_caption")):
        with pytest.raises(BadSample, match=reason):
            decode_caption(data, "x")


def test_sdxl_time_ids_follow_each_samples_crop():
    from tdd.models.tiny import build_tiny

    teacher = build_tiny(sdxl=True)
    captions = ["a red circle", "a red circle"]
    cond = teacher.text(captions, torch.tensor([[30, 40], [30, 40]]),
                        torch.tensor([[0, 2], [0, 9]]))
    assert cond.added["time_ids"].tolist() == [[30, 40, 0, 2, 32, 32], [30, 40, 0, 9, 32, 32]]
    default = teacher.text(captions).added["time_ids"]
    assert default.tolist() == [[32, 32, 0, 0, 32, 32]] * 2  # no size information: inference's
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).repeat(2, 1, 1, 1)
    with torch.no_grad():
        out = teacher.unet(x, torch.tensor([500, 500]), **cond.unet_kwargs()).sample
    assert not torch.allclose(out[0], out[1])  # the UNet sees the two crops as different


def test_training_step_feeds_the_batch_sizes_to_the_teacher():
    from tdd.guidance import DecoupledGuidance
    from tdd.losses import PseudoHuberLoss
    from tdd.models.students import LoRAStudent
    from tdd.models.tiny import build_tiny
    from tdd.module import DistillationModule
    from tdd.strategies import TDDTarget

    teacher = build_tiny(sdxl=True)
    module = DistillationModule(teacher, partial(LoRAStudent, rank=4, alpha=4),
                                TDDTarget(1000, 50), DecoupledGuidance(w=3.0),
                                PseudoHuberLoss(0.001), partial(torch.optim.AdamW, lr=1e-4))
    sizes, crops = torch.tensor([[100, 80], [64, 64]]), torch.tensor([[5, 0], [0, 0]])
    cond, _ = module.encode_prompts(["a", "b"], sizes, crops)
    assert cond.added["time_ids"][:, :4].tolist() == [[100, 80, 5, 0], [64, 64, 0, 0]]
    uncond = module.empty_conditioning(2).with_sizes_of(cond)
    assert torch.equal(uncond.added["time_ids"], cond.added["time_ids"])
    seen = []
    original = module.text.forward
    module.text.forward = lambda *args: seen.append(args[1:]) or original(*args)
    batch = {"pixel_values": torch.zeros(2, 3, 32, 32), "caption": ["a", "b"],
             "original_size": sizes, "crop_top_left": crops}
    assert torch.isfinite(module.training_step(batch, 0))
    assert torch.equal(seen[0][0], sizes) and torch.equal(seen[0][1], crops)
