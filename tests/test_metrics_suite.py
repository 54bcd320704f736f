"""CLIP score on a tiny trained open_clip model, InceptionV3 from a local file, the metric suite
and every conf/metrics option (none, real, toy)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from helpers_metrics import kernel_distance
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf.errors import MissingMandatoryValue
from safetensors.torch import load_file, save_file
from torch_fidelity import feature_extractor_inceptionv3 as fidelity_inception

import tdd.metrics.suite as suite_module
import tdd.metrics.toy as toy_evaluator
import tdd.toy.clip as toy_clip
from tdd.config import asset_path
from tdd.data.shapes import eval_scenes, reference_renders
from tdd.metrics import (
    AestheticPredictor,
    AestheticScorer,
    CLIPImageFeatures,
    CLIPScorer,
    FIDScorer,
    InceptionFeatures,
    MetricSuite,
    NoMetrics,
    clip_score,
    load_clip,
)

CONF = Path(__file__).resolve().parents[1] / "conf"
COLOURS = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 0.8, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "white": (1.0, 1.0, 1.0), "purple": (0.5, 0.0, 0.6),
    "cyan": (0.0, 1.0, 1.0), "orange": (1.0, 0.5, 0.0),
}
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def squares(names: list[str], seed: int, size: int = 32) -> torch.Tensor:
    """Flat colour squares with a little noise; captions are "a <colour> square"."""
    g = torch.Generator().manual_seed(seed)
    rgb = torch.tensor([COLOURS[n] for n in names])[:, :, None, None]
    noise = 0.05 * torch.randn(len(names), 3, size, size, generator=g)
    return (rgb.expand(-1, 3, size, size) + noise).clamp(0, 1)


def captions(names: list[str]) -> list[str]:
    return [f"a {n} square" for n in names]


def open_clip_direct(model, images: torch.Tensor, prompts: list[str], tokenizer):
    """Raw image embeddings and CLIP scores straight from open_clip, preprocessing written out
    with torchvision from the model's own preprocess config (resize, centre crop, normalise)."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    mode = TF.InterpolationMode(cfg.get("interpolation", "bicubic"))
    x = TF.resize(images, [size], interpolation=mode, antialias=True).clamp(0, 1)
    x = TF.normalize(TF.center_crop(x, [size, size]), cfg["mean"], cfg["std"])
    with torch.no_grad():
        image_embeds = model.encode_image(x).double()
        text_embeds = model.encode_text(tokenizer(prompts)).double()
    cos = F.cosine_similarity(image_embeds, text_embeds, dim=-1)
    return image_embeds, 100 * cos.clamp(min=0)  # the suite's CLIP score: negatives count 0


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))`` in numpy; the trace of the root is
    the sum of the square roots of the eigenvalues of C_a C_b (real and >= 0 for PSD C)."""
    a, b = a.double().numpy(), b.double().numpy()
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_trace = np.sqrt(np.linalg.eigvals(cov_a @ cov_b).real.clip(min=0)).sum()
    mean_term = ((a.mean(0) - b.mean(0)) ** 2).sum()
    return float(mean_term + np.trace(cov_a) + np.trace(cov_b) - 2 * root_trace)


def fit_tiny_clip(model: torch.nn.Module, steps: int = 30) -> None:
    """Contrastive fit on the colour world (each step: every colour once, shuffled).

    The random token embedding (most of the weights) stays frozen: it already tells words apart.
    """
    names = list(COLOURS)
    encode = CLIPImageFeatures(model, normalize=True)
    tokens = open_clip.get_tokenizer("tiny-metrics-clip")(captions(names))
    model.token_embedding.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=3e-3)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(len(names))
    for step in range(steps):
        order = torch.randperm(len(names), generator=g)
        images = squares([names[i] for i in order], seed=step)
        logits = 10 * encode(images) @ model.encode_text(tokens[order], normalize=True).T
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture(scope="module")
def tiny_clip_files(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny open_clip architecture as a config .json and a trained checkpoint beside it."""
    folder = tmp_path_factory.mktemp("tiny_clip")
    config = folder / "tiny-metrics-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-metrics-clip")
    fit_tiny_clip(model)
    torch.save(model.state_dict(), folder / "tiny_clip.pt")
    return config, folder / "tiny_clip.pt"


@pytest.fixture(scope="module")
def tiny_scorer(tiny_clip_files) -> CLIPScorer:
    return CLIPScorer(*load_clip(str(tiny_clip_files[0]), tiny_clip_files[1]), batch_size=5)


def test_clip_score_formula():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 2.0]])
    text = torch.tensor([[3.0, 0.0], [-1.0, 0.0], [0.0, 5.0]])
    torch.testing.assert_close(clip_score(image, text), torch.tensor([100.0, 0.0, 100 / 2**0.5]))


def test_clip_score_prefers_matching_captions(tiny_scorer):
    names = list(COLOURS) * 2
    images, prompts = squares(names, seed=1000), captions(names)
    shuffled = prompts[3:] + prompts[:3]  # a derangement: no image keeps its caption
    assert all(a != b for a, b in zip(prompts, shuffled))
    matching, wrong = tiny_scorer(images, prompts), tiny_scorer(images, shuffled)
    assert matching.shape == (len(names),)
    assert ((matching >= 0) & (matching <= 100)).all()
    assert matching.mean() > wrong.mean() + 20, (matching.mean(), wrong.mean())
    assert (matching > wrong).float().mean() > 0.9


def test_clip_scorer_on_a_loaded_checkpoint_equals_the_model_it_was_saved_from(tiny_clip_files):
    model = open_clip.create_model("tiny-metrics-clip", pretrained=str(tiny_clip_files[1]))
    names = list(COLOURS)
    images = squares(names, seed=7)
    in_memory = CLIPScorer(model.eval())(images, captions(names))
    loaded = CLIPScorer(*load_clip(str(tiny_clip_files[0]), tiny_clip_files[1]))
    torch.testing.assert_close(loaded(images, captions(names)), in_memory)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        loaded(images[:2], ["a red square"])


def test_clip_loading_never_downloads(tmp_path, tiny_clip_files):
    with pytest.raises(FileNotFoundError, match=r"metrics\.clip_checkpoint: file not found"):
        load_clip("ViT-B-32", "openai")  # a hub tag is not a local file
    with pytest.raises(ValueError, match=r"metrics\.clip_model: unknown open_clip architecture"):
        load_clip("ViT-Nope", tiny_clip_files[1])
    with pytest.raises(ValueError, match=r"metrics\.clip_model: 'hf-hub:"):
        load_clip("hf-hub:org/model", tiny_clip_files[1])
    with pytest.raises(FileNotFoundError, match=r"metrics\.clip_model: file not found"):
        load_clip(str(tmp_path / "absent.json"), tiny_clip_files[1])


def write_random_inception(path: Path, monkeypatch) -> None:
    """A randomly initialised torch-fidelity InceptionV3 state_dict (the real one is 100 MB)."""
    with monkeypatch.context() as patch:
        patch.setattr(fidelity_inception.torch, "load", lambda *args, **kwargs: {})
        patch.setattr(fidelity_inception.FeatureExtractorInceptionV3, "load_state_dict",
                      lambda self, state, strict=True: None)
        torch.manual_seed(0)
        net = fidelity_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], "x")
    torch.save(net.state_dict(), path)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inception") / "weights-inception.pth"
    with pytest.MonkeyPatch.context() as monkeypatch:
        write_random_inception(path, monkeypatch)
    return path


def no_downloads(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a metric tried to download weights")

    monkeypatch.setattr(fidelity_inception, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", refuse)


def test_inception_features_from_a_local_file(inception_file, tmp_path, monkeypatch):
    no_downloads(monkeypatch)
    features = InceptionFeatures(inception_file)
    assert features.net.use_antialias is False
    loaded = torch.load(inception_file, weights_only=True)
    assert torch.equal(features.net.fc.weight, loaded["fc.weight"])
    image = torch.rand(1, 3, 32, 32)
    quantised = (image * 255).round() / 255  # inputs are quantised like saved PNGs
    out = features(torch.cat([image, quantised]))
    assert out.shape == (2, 2048) and torch.isfinite(out).all() and out.abs().sum() > 0
    torch.testing.assert_close(out[0], out[1])
    with pytest.raises(FileNotFoundError, match=r"metrics\.fid_weights: file not found"):
        FIDScorer.inception(tmp_path / "missing.pth")


def toy_suite(tiny_clip_files) -> MetricSuite:
    model = open_clip.create_model("tiny-metrics-clip", pretrained=str(tiny_clip_files[1])).eval()
    torch.manual_seed(0)
    return MetricSuite(
        fid=FIDScorer(CLIPImageFeatures(model), batch_size=6),
        scorers={
            "clip": CLIPScorer(model, batch_size=6),
            "aesthetic": AestheticScorer(CLIPImageFeatures(model), AestheticPredictor(16).eval()),
        },
    )


def test_suite_scores_against_real_and_teacher(tiny_clip_files):
    suite = toy_suite(tiny_clip_files)
    model = suite.scorers["clip"].images.model
    names = list(COLOURS) * 4  # 32 images: more than the 16 feature dimensions
    real, prompts = squares(names, seed=1), captions(names)
    teacher = 0.6 * squares(names, seed=2)  # a darker world than the real one
    generated = 0.8 * squares(names, seed=3)
    suite.set_reference("real", real)
    suite.set_reference("teacher", teacher)
    out = suite.score(generated, prompts)
    assert set(out) == {"fid", "fid_teacher", "kid", "kid_teacher", "clip", "aesthetic"}
    tokenizer = open_clip.get_tokenizer("tiny-metrics-clip")
    feats, clip = open_clip_direct(model, generated, prompts, tokenizer)
    real_feats, _ = open_clip_direct(model, real, prompts, tokenizer)
    teacher_feats, _ = open_clip_direct(model, teacher, prompts, tokenizer)
    assert out["fid"] == pytest.approx(frechet_distance(feats, real_feats), rel=1e-3)
    assert out["fid_teacher"] == pytest.approx(frechet_distance(feats, teacher_feats), rel=1e-3)
    assert out["fid_teacher"] > 0 and abs(out["fid"] - out["fid_teacher"]) > 0.1
    assert out["kid"] == pytest.approx(kernel_distance(feats, real_feats), rel=1e-4)
    assert out["kid_teacher"] == pytest.approx(kernel_distance(feats, teacher_feats), rel=1e-4)
    assert out["clip"] == pytest.approx(float(clip.mean()), abs=1e-3)
    head = suite.scorers["aesthetic"].head
    aesthetic = head(F.normalize(feats, dim=-1).float()).mean()
    assert out["aesthetic"] == pytest.approx(float(aesthetic), abs=1e-4)
    suite.reset()  # streaming in batches gives the same numbers
    suite.update(generated[:5], prompts[:5])
    suite.update(generated[5:], prompts[5:])
    streamed = suite.compute()
    assert streamed == pytest.approx(out, rel=1e-5, abs=1e-6)
    assert set(suite.compute(references=["real"])) == {"fid", "kid", "clip", "aesthetic"}
    suite.reset()
    with pytest.raises(ValueError, match="no images scored|>= 2"):
        suite.compute()


def test_suite_without_fid_and_no_metrics(tiny_clip_files):
    suite = MetricSuite(scorers={"clip": toy_suite(tiny_clip_files).scorers["clip"]})
    names = list(COLOURS)
    assert set(suite.score(squares(names, 3), captions(names))) == {"clip"}
    with pytest.raises(RuntimeError, match="no FID scorer"):
        suite.set_reference("real", squares(names, 3))
    none = NoMetrics()
    assert none.enabled is False and MetricSuite.enabled is True
    assert none.score(squares(names, 3), captions(names)) == {}


def compose_metrics(option: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(overrides=[f"+metrics={option}", *overrides])


def real_overrides(tmp_path, tiny_clip_files, inception_file) -> dict[str, str]:
    head = tmp_path / "head.pth"
    torch.save(AestheticPredictor(embed_dim=16).state_dict(), head)
    return {
        "fid_weights": str(inception_file), "clip_model": str(tiny_clip_files[0]),
        "clip_checkpoint": str(tiny_clip_files[1]), "aesthetic_head": str(head),
    }


def test_every_metrics_config_is_tested():
    assert {p.stem for p in (CONF / "metrics").glob("*.yaml")} == {"none", "real", "toy"}


def test_config_none():
    assert instantiate(compose_metrics("none", []).metrics).enabled is False


def test_config_real_builds_and_scores(tmp_path, tiny_clip_files, inception_file, monkeypatch):
    no_downloads(monkeypatch)
    settings = real_overrides(tmp_path, tiny_clip_files, inception_file)
    cfg = compose_metrics("real", [f"metrics.{k}={v}" for k, v in settings.items()] + [
        "metrics.kid_subsets=7", "metrics.kid_subset_size=50", "metrics.sharpness_cutoff=0.4"])
    suite = instantiate(cfg.metrics)
    assert suite.enabled and isinstance(suite.fid.feature, InceptionFeatures)
    assert (suite.fid.kid_subsets, suite.fid.kid_subset_size) == (7, 50)
    assert suite.scorers["sharpness"].cutoff == 0.4
    assert suite.scorers["aesthetic"].encoder.model is suite.scorers["clip"].images.model
    assert suite.fid.feature.net.use_antialias is False
    names = ["red", "blue", "green"]  # scoring the 299x299 Inception is left to the FID tests
    images, prompts = squares(names, seed=2), captions(names)
    suite.set_scorer_reference(squares(names, seed=3))  # sharpness: relative to real images
    scores = {key: scorer(images, prompts) for key, scorer in suite.scorers.items()}
    assert scores["clip"].mean() > 50 and torch.isfinite(scores["aesthetic"]).all()


@pytest.mark.parametrize(
    "missing", ["fid_weights", "clip_checkpoint", "aesthetic_head", "aesthetic_clip_checkpoint"]
)
def test_config_real_missing_path_fails_before_loading(
    missing, tmp_path, tiny_clip_files, inception_file, monkeypatch
):
    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded before every path was checked")

    monkeypatch.setattr(suite_module, "load_clip", must_not_load)
    settings = real_overrides(tmp_path, tiny_clip_files, inception_file)
    settings[missing] = str(tmp_path / "absent.pth")
    cfg = compose_metrics("real", [f"metrics.{k}={v}" for k, v in settings.items()])
    message = rf"metrics\.{missing}: file not found: .*absent"
    with pytest.raises(InstantiationException, match=message):
        instantiate(cfg.metrics)


def test_config_real_unset_path_names_the_setting(tmp_path, tiny_clip_files, inception_file):
    settings = real_overrides(tmp_path, tiny_clip_files, inception_file)
    del settings["fid_weights"]
    cfg = compose_metrics("real", [f"metrics.{k}={v}" for k, v in settings.items()])
    with pytest.raises(MissingMandatoryValue, match=r"metrics\.fid_weights"):
        instantiate(cfg.metrics)


@pytest.fixture(scope="module")
def toy_evaluator_folder(tmp_path_factory) -> Path:
    """An untrained toy evaluator written exactly as the builder writes the shipped one."""
    folder = tmp_path_factory.mktemp("toy_evaluator")
    config = toy_clip.open_clip_config()
    torch.manual_seed(0)
    model, _ = toy_clip.create_clip(config)
    with torch.no_grad():  # untrained, every image-caption cosine is negative: CLIP score 0
        model.text_projection.neg_()  # flipped, the scores are 5-25 and a CLIP check can fail
    head = toy_evaluator.detail_head(config["model_cfg"]["embed_dim"])
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()},
              folder / toy_evaluator.CHECKPOINT)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()},
              folder / toy_evaluator.DETAIL_HEAD)
    return folder


def test_config_toy_matches_the_toy_evaluator(toy_evaluator_folder, monkeypatch):
    no_downloads(monkeypatch)
    cfg = compose_metrics("toy", [f"metrics.evaluator={toy_evaluator_folder}",
                                  "metrics.kid_subsets=3", "metrics.sharpness_cutoff=0.3"])
    suite = instantiate(cfg.metrics)
    assert suite.fid.kid_subsets == 3 and suite.scorers["sharpness"].cutoff == 0.3
    specs, _ = eval_scenes("val", 16)
    prompts = [spec.caption for spec in specs]
    real = reference_renders("val", 16)
    fake = reference_renders("val", 16, variant=1)
    suite.set_reference("real", real)
    out = suite.score(fake, prompts)
    assert set(out) == {"fid", "kid", "clip", "aesthetic", "attribute_acc", "sharpness"}
    # the same numbers straight from open_clip on the evaluator folder
    model = open_clip.create_model(f"local-dir:{toy_evaluator_folder}").eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{toy_evaluator_folder}")
    feats, clip = open_clip_direct(model, fake, prompts, tokenizer)
    real_feats, _ = open_clip_direct(model, real, prompts, tokenizer)
    assert out["fid"] == pytest.approx(frechet_distance(feats, real_feats), rel=1e-3)
    assert clip.min() > 1 and out["clip"] == pytest.approx(float(clip.mean()), abs=1e-3)
    head = toy_evaluator.detail_head(feats.shape[1])
    head.load_state_dict(load_file(toy_evaluator_folder / toy_evaluator.DETAIL_HEAD))
    assert out["aesthetic"] == pytest.approx(float(head(feats.float()).mean()), abs=1e-4)
    shared = suite.scorers["attribute_acc"].evaluator  # same text cache: no second encoding
    accuracy = shared.attribute_accuracy(fake, specs)["mean"]
    assert out["attribute_acc"] == pytest.approx(accuracy, abs=1e-6)


@pytest.mark.parametrize("option", ["toy", "real"])
@pytest.mark.parametrize("setting", ["kid_subsets=0", "kid_subset_size=1",
                                     "sharpness_cutoff=1.0"])
def test_config_bad_kid_or_sharpness_setting_fails_before_loading(
        tmp_path, option, setting, monkeypatch):
    """Checked before any file is read: the paths here do not even exist."""
    missing = {"evaluator": tmp_path / "none"} if option == "toy" else {
        k: tmp_path / "none" for k in ("fid_weights", "clip_checkpoint", "aesthetic_head")}
    cfg = compose_metrics(option, [f"metrics.{k}={v}" for k, v in missing.items()]
                          + [f"metrics.{setting}"])
    with pytest.raises(InstantiationException, match=rf"metrics\.{setting.split('=')[0]}="):
        instantiate(cfg.metrics)


def test_config_toy_missing_evaluator_names_the_setting(tmp_path):
    default = compose_metrics("toy", []).metrics.evaluator
    assert Path(default) == Path(asset_path("toy/evaluator"))
    cfg = compose_metrics("toy", [f"metrics.evaluator={tmp_path}"])
    with pytest.raises(InstantiationException, match=r"metrics\.evaluator: file not found"):
        instantiate(cfg.metrics)
