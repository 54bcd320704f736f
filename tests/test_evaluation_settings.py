"""Every evaluation setting is checked when Evaluation is built, which run.py does before it
loads any model: a bad value fails in seconds, naming the setting, not after training."""

from __future__ import annotations

import hydra
import pytest
from hydra.errors import InstantiationException

from run import train

BAD = [
    ("evaluation.steps=[0]", "evaluation.steps"),
    ("evaluation.steps=[]", "evaluation.steps"),
    ("evaluation.steps=[2,-4]", "evaluation.steps"),
    ("evaluation.steps=[300]", "evaluation.steps"),   # beyond the TDD grid of 250
    ("evaluation.steps=[2.5]", "evaluation.steps"),
    ("evaluation.steps=4", "evaluation.steps"),
    ("evaluation.teacher_steps=[0]", "evaluation.teacher_steps"),
    ("evaluation.teacher_steps=[1001]", "evaluation.teacher_steps"),
    ("evaluation.batch_size=0", "evaluation.batch_size"),
    ("evaluation.num_images=1", "evaluation.num_images"),
    ("evaluation.num_images=2.5", "evaluation.num_images"),
    ("evaluation.guidance_scales=[1.0,-2.0]", "evaluation.guidance_scales"),
    ("evaluation.guidance_scales=[nan]", "evaluation.guidance_scales"),
    ("evaluation.teacher_guidance_scale=-1", "evaluation.teacher_guidance_scale"),
    ("evaluation.etas=[1.5]", "evaluation.etas"),
    ("evaluation.etas=[-0.1]", "evaluation.etas"),
    ("evaluation.every_n_steps=-5", "evaluation.every_n_steps"),
    ("evaluation.grid_images=0", "evaluation.grid_images"),
    ("evaluation.bootstrap_draws=-1", "evaluation.bootstrap_draws"),
    ("evaluation.bootstrap_draws=2.5", "evaluation.bootstrap_draws"),
]


@pytest.mark.parametrize("override, setting", BAD, ids=[b[0] for b in BAD])
def test_bad_setting_fails_when_evaluation_is_built(make_cfg, override, setting):
    cfg = make_cfg(override)
    with pytest.raises(InstantiationException, match=setting):
        hydra.utils.instantiate(cfg.evaluation)


def test_good_settings_build(make_cfg):
    cfg = make_cfg("evaluation.steps=[1,250]", "evaluation.teacher_steps=[]",
                   "evaluation.guidance_scales=[0,1,7.5]", "evaluation.etas=[null,0,1]",
                   "evaluation.every_n_steps=0", "evaluation.num_images=2",
                   "evaluation.bootstrap_draws=0")
    evaluation = hydra.utils.instantiate(cfg.evaluation)
    assert evaluation.bootstrap_draws == 0
    assert evaluation.steps == [1, 250] and evaluation.teacher_steps == []
    assert evaluation.guidance_scales == [0.0, 1.0, 7.5] and evaluation.etas == [None, 0.0, 1.0]


def test_eta_needs_a_sampler_with_eta(make_cfg):
    cfg = make_cfg("strategy=lcm", "evaluation.etas=[0.5]")
    with pytest.raises(InstantiationException, match="evaluation.etas"):
        hydra.utils.instantiate(cfg.evaluation)


def test_run_fails_before_loading_a_model(make_cfg, monkeypatch):
    """train() stops at the evaluation setting; the teacher is never built."""
    import tdd.models.tiny

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(tdd.models.tiny, "build_tiny", no_model)
    cfg = make_cfg("evaluation.steps=[0]", "trainer=cpu")
    with pytest.raises(InstantiationException, match=r"evaluation.steps=\[0\]"):
        train(cfg)
