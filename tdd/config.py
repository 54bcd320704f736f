"""OmegaConf resolvers shared by run.py, tests and notebooks."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

ASSETS = Path(__file__).resolve().parent / "assets"


def asset_path(relative: str) -> str:
    """Absolute path of a file or folder shipped under ``tdd/assets/``."""
    return str(ASSETS / relative)


def register_resolvers() -> None:
    """``${asset:toy/pipeline}`` resolves to a path inside the installed package's assets;
    ``resume_dir`` and ``resume_subdir`` place Hydra's output in a resumed run (tdd.resume)."""
    from tdd.resume import hydra_output_subdir, hydra_run_dir

    for name, resolver in (("asset", asset_path), ("resume_dir", hydra_run_dir),
                           ("resume_subdir", hydra_output_subdir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


register_resolvers()
