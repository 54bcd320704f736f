"""FID, aesthetic head, tensor preprocessing and timing on controlled inputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torchvision.transforms.functional as TF
from torch import nn

import tdd.metrics.timing as timing
from tdd.metrics import (
    AestheticPredictor,
    AestheticScorer,
    FIDScorer,
    SamplingCost,
    Stopwatch,
    clip_preprocess,
    require_file,
)

#: The published LAION aesthetic head (sac+logos+ava1-l14-linearMSE), written out: state_dict
#: names and shapes of a Sequential of Linear layers with Dropout at 1, 3 and 5.
LAION_LAYOUT = {
    "layers.0.weight": (1024, 768), "layers.0.bias": (1024,),
    "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
    "layers.4.weight": (64, 128), "layers.4.bias": (64,),
    "layers.6.weight": (16, 64), "layers.6.bias": (16,),
    "layers.7.weight": (1, 16), "layers.7.bias": (1,),
}
#: Set to the published head file to also check it (nothing is downloaded).
LAION_HEAD_ENV = "TDD_LAION_HEAD"


def textures(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """Random coloured stripe patterns: fine detail that blur removes."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    freq = 0.3 + 1.2 * torch.rand(n, 1, 1, generator=g)
    angle = torch.pi * torch.rand(n, 1, 1, generator=g)
    wave = torch.sin(freq * (xx * torch.cos(angle) + yy * torch.sin(angle)))
    fg, bg = torch.rand(n, 3, 1, 1, generator=g), torch.rand(n, 3, 1, 1, generator=g)
    mask = (wave > 0).float()[:, None]
    return mask * fg + (1 - mask) * bg


def feature_net(seed: int = 0) -> nn.Module:
    """A fixed random conv net giving 16-d features (order 1) sensitive to edges and colour."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 4, 3, padding=1), nn.Tanh(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 16),
    )
    net[-1].weight.data = 30 * torch.eye(16)
    return net.requires_grad_(False)


@pytest.fixture(scope="module")
def real_images() -> torch.Tensor:
    return textures(96, seed=1)


@pytest.fixture()
def scorer(real_images) -> FIDScorer:
    fid = FIDScorer(feature_net(), batch_size=32)
    fid.set_reference(real_images)
    return fid


def test_fid_of_a_set_against_itself_is_zero(scorer, real_images):
    assert abs(scorer.score(real_images)) < 1e-6
    assert scorer.score(textures(96, seed=2)) > 0.1  # another sample of the same world is not 0


def test_fid_grows_with_blur(scorer, real_images):
    values = [scorer.score(real_images)]
    for sigma in (0.5, 1.0, 2.0, 4.0):
        values.append(scorer.score(TF.gaussian_blur(real_images, 9, sigma)))
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert values[1] > 1e-3  # even the mildest blur is far above the self-distance


def test_fid_reference_is_kept_and_batching_does_not_matter(real_images):
    blurred = TF.gaussian_blur(real_images, 9, 1.0)
    small, large = FIDScorer(feature_net(), batch_size=7), FIDScorer(feature_net(), batch_size=96)
    small.add_reference(real_images[:50])
    small.add_reference(real_images[50:])
    large.set_reference([real_images[:40], real_images[40:]])
    first = small.score(blurred)
    assert small.score(blurred) == pytest.approx(first, rel=1e-9)  # reset keeps the reference
    assert large.score(blurred) == pytest.approx(first, rel=1e-5)
    small.set_reference(blurred)  # replaced, not accumulated
    assert abs(small.score(blurred)) < 1e-6


def test_fid_against_two_references(real_images):
    teacher = TF.gaussian_blur(real_images, 9, 1.0)
    fid = FIDScorer(feature_net())
    fid.set_reference(real_images, "real")
    fid.set_reference(teacher, "teacher")
    fid.update(teacher[:48])
    fid.update(teacher[48:])
    out = fid.compute()
    assert set(out) == {"real", "teacher"}
    assert abs(out["teacher"]) < 1e-6 < out["real"]
    assert out["real"] == pytest.approx(fid.score(teacher, "real"), rel=1e-6)


def test_fid_says_when_it_cannot_be_computed(real_images):
    fid = FIDScorer(feature_net())
    with pytest.raises(RuntimeError, match="no reference"):
        fid.update(real_images)
    fid.set_reference(real_images)
    with pytest.raises(ValueError, match=">= 2"):
        fid.score(real_images[:1])
    with pytest.raises(KeyError, match="teacher"):
        fid.compute(["teacher"])


def test_require_file_names_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"metrics\.fid_weights: file not found: .*nope"):
        require_file(tmp_path / "nope", "metrics.fid_weights")
    with pytest.raises(FileNotFoundError, match=r"metrics\.x: no file given"):
        require_file(None, "metrics.x")
    (tmp_path / "w.pth").write_bytes(b"0")
    assert require_file(str(tmp_path / "w.pth"), "metrics.x") == tmp_path / "w.pth"


def reference_mlp(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The published head written out: five affine maps, no activations (dropout is eval-off)."""
    for i in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    return x[:, 0]


@pytest.fixture()
def laion_layout_head(tmp_path) -> Path:
    """A head file with the published layout and random weights of the published scale."""
    g = torch.Generator().manual_seed(0)
    state = {name: 0.1 * torch.randn(shape, generator=g) for name, shape in LAION_LAYOUT.items()}
    path = tmp_path / "laion-layout-random.pth"
    torch.save(state, path)
    return path


def check_head_matches_reference(path: Path) -> None:
    """Loads strictly with the published names and shapes, computes the written-out MLP."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == LAION_LAYOUT
    head = AestheticPredictor.load(path)
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == LAION_LAYOUT
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(8, 768, generator=g), dim=-1)
    got = head(emb)
    assert got.shape == (8,)
    torch.testing.assert_close(got, reference_mlp(state, emb), atol=1e-5, rtol=1e-5)
    assert torch.equal(head(emb), got)  # eval mode: dropout off


def test_aesthetic_head_loads_the_published_layout_and_matches_the_reference(laion_layout_head):
    check_head_matches_reference(laion_layout_head)
    assert AestheticPredictor().state_dict().keys() == LAION_LAYOUT.keys()  # the default is it


def test_aesthetic_head_loads_the_published_file():
    path = os.environ.get(LAION_HEAD_ENV)
    if not path:
        pytest.skip(f"optional: set {LAION_HEAD_ENV}=<path to the published LAION head "
                    "sac+logos+ava1-l14-linearMSE.pth> to check the real file")
    check_head_matches_reference(Path(path))


def test_aesthetic_load_is_strict(tmp_path):
    head = AestheticPredictor(embed_dim=12)
    state = head.state_dict()
    torch.save(state, tmp_path / "ok.pth")
    loaded = AestheticPredictor.load(tmp_path / "ok.pth")
    x = torch.randn(3, 12)
    torch.testing.assert_close(loaded(x), reference_mlp(state, x))
    torch.save({**state, "layers.8.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(RuntimeError, match="layers.8.weight"):
        AestheticPredictor.load(tmp_path / "extra.pth")
    torch.save({"fc.weight": torch.zeros(1, 12)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an aesthetic head"):
        AestheticPredictor.load(tmp_path / "other.pth", setting="metrics.aesthetic_head")
    with pytest.raises(FileNotFoundError, match="metrics.aesthetic_head"):
        AestheticPredictor.load(tmp_path / "missing.pth")


def test_aesthetic_scorer_normalises_embeddings():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 12))
    head = AestheticPredictor(embed_dim=12).eval()
    images = torch.rand(5, 3, 8, 8)
    scores = AestheticScorer(encoder, head, batch_size=2)(images)
    emb = torch.nn.functional.normalize(encoder(images), dim=-1)
    torch.testing.assert_close(scores, head(emb).detach())
    tripled = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 12))
    tripled[1].weight.data = 3 * encoder[1].weight.data
    tripled[1].bias.data = 3 * encoder[1].bias.data
    torch.testing.assert_close(AestheticScorer(tripled, head)(images), scores)


def test_clip_preprocess_modes():
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    images = torch.rand(2, 3, 16, 16)
    same = clip_preprocess(images, (16, 16), mean, std)
    torch.testing.assert_close(same, (images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    wide = torch.rand(2, 3, 32, 64)
    assert clip_preprocess(wide, (16, 16), mean, std).shape == (2, 3, 16, 16)
    assert clip_preprocess(wide, (16, 16), mean, std, resize_mode="squash").shape == (2, 3, 16, 16)
    padded = clip_preprocess(wide, (16, 16), mean, std, resize_mode="longest")
    black = (-mean / std).view(1, 3, 1)
    torch.testing.assert_close(padded[:, :, 0, :], black.expand(2, 3, 16))
    torch.testing.assert_close(padded[:, :, -1, :], black.expand(2, 3, 16))
    assert not torch.allclose(padded[:, :, 8, :], black.expand(2, 3, 16))
    with pytest.raises(ValueError, match="resize_mode"):
        clip_preprocess(wide, (16, 16), mean, std, resize_mode="stretch")


def test_sampling_cost_and_stopwatch(monkeypatch):
    assert SamplingCost(nfe=4, seconds=2.0, images=8).as_dict() == {
        "nfe": 4.0, "sec_per_image": 0.25
    }
    with pytest.raises(ValueError, match="no images"):
        SamplingCost(nfe=4, seconds=1.0, images=0).as_dict()
    clock = iter([10.0, 12.5])  # the stopwatch reads the clock once at each end
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    watch = Stopwatch("cpu")
    assert watch.seconds is None
    with watch:
        pass
    assert watch.seconds == 2.5
