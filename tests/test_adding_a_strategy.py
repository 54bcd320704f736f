"""Adding a strategy touches ``tdd/strategies/<name>.py``, ``conf/strategy/<name>.yaml`` and a
test: a strategy written into a temporary module and a copy of ``conf/`` trains through
``train()``, gets the sampler its config names, and the benchmark finds it."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from run import train
from tdd.bench import strategy_configs

CONF = Path(__file__).resolve().parents[1] / "conf"
MODULE = "halfway_strategy"

STRATEGY_FILE = '''
"""Halfway: the target sits halfway between 0 and t_prev."""

import torch

from tdd.strategies.base import TargetStrategy


class HalfwayTarget(TargetStrategy):
    drawn: list = []

    def sample(self, source_index, generator=None):
        s = self.grid.previous(self._check_index(source_index)) // 2
        HalfwayTarget.drawn.append(s)
        return s
'''

STRATEGY_CONFIG = f"""
defaults:
  - override /sampler@_global_.sampler: tcd
  - _self_

_target_: {MODULE}.HalfwayTarget
num_train_timesteps: 1000
num_ddim_timesteps: 50
"""


@pytest.fixture
def conf_dir(tmp_path, monkeypatch) -> Path:
    """A copy of conf/ plus conf/strategy/halfway.yaml, and the strategy's module on sys.path."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf, ignore=shutil.ignore_patterns("local"))
    (conf / "strategy" / "halfway.yaml").write_text(STRATEGY_CONFIG)
    (tmp_path / f"{MODULE}.py").write_text(STRATEGY_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield conf
    sys.modules.pop(MODULE, None)


def compose_in(conf: Path, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_a_new_strategy_trains_with_the_sampler_its_config_names(conf_dir, tmp_path):
    cfg = compose_in(conf_dir, "strategy=halfway", "model=tiny", "data=dummy", "metrics=none",
                     "debug=fdr", "data.batch_size=2")
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    assert cfg.sampler._target_ == "tdd.sampling.TCDSampler"
    assert cfg.sampler.num_ddim_timesteps == 50  # the sampler follows the strategy's grid
    results = train(cfg)
    drawn = sys.modules[MODULE].HalfwayTarget.drawn
    assert drawn and all(torch.all(s >= 0) for s in drawn)  # the new strategy chose the targets
    assert torch.isfinite(torch.tensor(results["train"]["train/loss"]))
    assert results["config"]["strategy"]["_target_"] == f"{MODULE}.HalfwayTarget"


def test_the_sampler_group_still_overrides_a_strategys_choice(conf_dir):
    cfg = compose_in(conf_dir, "strategy=halfway", "sampler=pcm")
    assert type(hydra.utils.instantiate(cfg.sampler)).__name__ == "PCMSampler"
    for name in ("tdd", "lcm", "tcd", "pcm"):  # the shipped strategies keep their own samplers
        sampler = hydra.utils.instantiate(compose_in(conf_dir, f"strategy={name}").sampler)
        assert type(sampler).__name__ == f"{name.upper()}Sampler"


def test_the_benchmark_finds_every_strategy_config(conf_dir):
    configs = strategy_configs(conf_dir)
    assert set(configs) == {"tdd", "lcm", "tcd", "pcm", "halfway"}
    assert type(hydra.utils.instantiate(configs["halfway"])).__name__ == "HalfwayTarget"
    assert set(strategy_configs()) == {"tdd", "lcm", "tcd", "pcm"}  # the shipped conf/
