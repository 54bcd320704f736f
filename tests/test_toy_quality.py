"""Quality gates of the shipped toy assets, re-measured from the files (slow: minutes on CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from tdd.data.shapes import ATTRIBUTES, eval_scenes
from tdd.toy.common import ASSETS, BuildSettings

pytestmark = pytest.mark.slow
N = 2000


@pytest.fixture(scope="module")
def record() -> dict:
    path = ASSETS / "quality.json"
    if not path.exists():
        pytest.fail("tdd/assets/toy/quality.json missing: run `make toy-assets`")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> BuildSettings:
    return BuildSettings(work=tmp_path_factory.mktemp("work"), out=ASSETS, eval_size=N)


def test_teacher_loads_from_the_shipped_pipeline():
    """The shipped toy teacher loads frozen (its load time is `python -m tdd.bench --model toy`'s
    ``teacher_load_s``)."""
    from tdd.models.teacher import load_teacher

    teacher = load_teacher(str(ASSETS / "pipeline"), resolution=32)
    assert teacher.resolution == 32 and teacher.prediction_type == "epsilon"
    for module in teacher.frozen_modules():
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())


def test_vae_gate(record):
    from diffusers import AutoencoderKL

    from tdd.toy.vae import PSNR_GATE, measure_vae

    vae = AutoencoderKL.from_pretrained(ASSETS / "pipeline" / "vae")
    measured = measure_vae(vae, N)
    assert measured["psnr_db"] == pytest.approx(record["vae"]["psnr_db"], abs=0.05)
    assert measured["psnr_db"] >= PSNR_GATE
    assert min(measured["psnr_db_by_texture"].values()) >= PSNR_GATE - 1


def test_evaluator_gates(record, settings):
    from diffusers import AutoencoderKL

    from tdd.toy.build_evaluator import GATES, measure_evaluator

    vae = AutoencoderKL.from_pretrained(ASSETS / "pipeline" / "vae")
    measured = measure_evaluator(settings, vae)
    assert measured["real"]["mean"] == pytest.approx(record["evaluator"]["real"]["mean"],
                                                     abs=0.005)
    assert min(measured["real"][a] for a in ATTRIBUTES) >= GATES["real_each"]
    assert measured["vae_reconstructions"]["mean"] >= GATES["vae_mean"]
    assert measured["detail_spearman"] >= GATES["detail_spearman"]


def test_teacher_gates(record):
    from tdd.metrics.toy import load_toy_evaluator
    from tdd.toy.build_teacher import GATES
    from tdd.toy.measure_teacher import load_pipeline, sample

    pipe = load_pipeline(ASSETS / "pipeline")
    evaluator = load_toy_evaluator()
    specs, _ = eval_scenes("val", N)
    images = sample(pipe, [s.caption for s in specs], record["teacher"]["guidance_scale"])
    accuracy = evaluator.attribute_accuracy(images, specs)
    assert accuracy["mean"] == pytest.approx(record["teacher"]["teacher"]["mean"], abs=0.01)
    assert accuracy["mean"] >= GATES["mean_attribute_accuracy"]
    assert accuracy["all"] >= GATES["all_attributes"]
    assert torch.isfinite(images).all()
