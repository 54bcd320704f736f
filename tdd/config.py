"""OmegaConf resolvers shared by run.py, tests and notebooks."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

ASSETS = Path(__file__).resolve().parent / "assets"


def asset_path(relative: str) -> str:
    """Absolute path of a file or folder shipped under ``tdd/assets/``."""
    return str(ASSETS / relative)


def register_resolvers() -> None:
    """``${asset:toy/pipeline}`` resolves to a path inside the installed package's assets."""
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", asset_path)


register_resolvers()
