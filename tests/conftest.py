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


#: Tests run on the tiny random teacher unless they choose otherwise (the default is the toy).
TEST_DEFAULTS = ("model=tiny", "data=dummy", "metrics=none", "logger=csv")


def compose_config(overrides: list[str], output_dir: Path | str) -> DictConfig:
    """The real config, composed the way run.py does, with output written to ``output_dir``.

    Groups in ``TEST_DEFAULTS`` that ``overrides`` does not choose are set to the tiny setup;
    :func:`compose_defaults` composes the shipped defaults instead.
    """
    chosen = {o.split("=")[0].lstrip("+~") for o in overrides}
    overrides = [o for o in TEST_DEFAULTS if o.split("=")[0] not in chosen] + list(overrides)
    return compose_defaults(overrides, output_dir)


def compose_defaults(overrides: list[str], output_dir: Path | str) -> DictConfig:
    """The config exactly as ``python run.py <overrides>`` composes it, writing into
    ``output_dir``; the teacher sample cache starts empty there (unless an override sets it),
    so no test reads another's (or an earlier session's) teacher rows."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        if not any(o.startswith("evaluation.teacher_cache_dir=") for o in overrides):
            cfg.evaluation.teacher_cache_dir = str(Path(output_dir) / "teacher_cache")
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg(*overrides)``: a composed config writing into this test's tmp dir."""
    return lambda *overrides: compose_config(list(overrides), tmp_path)


@pytest.fixture
def tiny_teacher():
    return build_tiny()


@pytest.fixture
def one_thread():
    """Many tiny tensor operations: one thread (two cost many times more on a loaded machine).
    Test modules of such operations use it with ``pytestmark = usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
