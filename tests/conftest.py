"""Shared fixtures: the composed config and tiny teachers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

import tdd.config  # noqa: F401  (registers resolvers)
from tdd.models.tiny import build_tiny

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def compose_config(overrides: list[str], output_dir: Path | str) -> DictConfig:
    """The real config, composed the way run.py does, with output written to ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg(*overrides)``: a composed config writing into this test's tmp dir."""
    return lambda *overrides: compose_config(list(overrides), tmp_path)


@pytest.fixture
def tiny_teacher():
    return build_tiny()
