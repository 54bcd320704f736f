"""Resuming a run: which checkpoint, which run directory, and whether the config still fits.

``ckpt_path`` is ``last`` (``<paths.output_dir>/checkpoints/last.ckpt``), a run directory (its
``checkpoints/last.ckpt``) or a checkpoint file. A run directory, or a file in its
``checkpoints/``, is resumed *into*: checkpoints, logs, samples, export and results.json go to
that directory. A checkpoint that already reached ``trainer.max_steps`` trains nothing: it is
scored (evaluated and exported again, e.g. with other evaluation settings) into this
invocation's own output directory, and the run it came from keeps its results. Hydra's own
run directory follows (``${resume_dir:...}`` in conf/hydra), and the resumed segment's config
lands in ``<run dir>/.hydra/resume-<time>/`` beside the original one.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

#: Groups that must be the same when a run is resumed (the trained state depends on them).
RECIPE_GROUPS = ("model", "student", "strategy", "guidance", "loss", "data")
LAST = "last.ckpt"


@dataclass
class Resume:
    checkpoint: Path
    run_dir: Path | None  # None: a checkpoint outside any run directory


def run_dir_of(ckpt_path: str | None, max_steps: int | None = None) -> Path | None:
    """The run directory that ``ckpt_path`` names (itself, or the parent of its checkpoints/);
    None when its checkpoint already reached ``max_steps`` (> 0): scoring it writes elsewhere."""
    if ckpt_path in (None, "", "last"):
        return None
    path = Path(ckpt_path)
    if finished(path / "checkpoints" / LAST if path.is_dir() else path, max_steps):
        return None
    if path.is_dir():
        return path if (path / "checkpoints").is_dir() else None
    return path.parent.parent if path.parent.name == "checkpoints" else None


def finished(checkpoint: Path, max_steps: int | None) -> bool:
    """Whether ``checkpoint`` (a Lightning file) is at ``max_steps`` (> 0) or beyond."""
    if max_steps is None or int(max_steps) <= 0 or not checkpoint.is_file():
        return False
    try:
        state = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=False)
    except Exception:  # noqa: BLE001 (an unreadable file is reported by check_readable)
        return False
    return int(state.get("global_step", 0)) >= int(max_steps)


def find_resume(cfg: DictConfig) -> Resume | None:
    """The checkpoint to resume from and the run directory to resume into; fails early with
    the setting named when there is no readable checkpoint."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path in (None, ""):
        return None
    if ckpt_path == "last":
        run_dir = Path(cfg.paths.output_dir)
        checkpoint = run_dir / "checkpoints" / LAST
        hint = ("; `last` looks in this run's own directory: pass the run directory instead, "
                "ckpt_path=outputs/<task>/<time>")
    elif Path(ckpt_path).is_dir():
        run_dir, checkpoint = Path(ckpt_path), Path(ckpt_path) / "checkpoints" / LAST
        hint = ""
    else:
        run_dir, checkpoint, hint = run_dir_of(ckpt_path), Path(ckpt_path), ""
    if run_dir is not None and finished(checkpoint, cfg.trainer.get("max_steps")):
        run_dir = None  # scored, not resumed: this invocation's own output directory
    if not checkpoint.is_file():
        newest = newest_intact(checkpoint.parent)
        hint += f"; the newest checkpoint there is {newest}" if newest else ""
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: no checkpoint at {checkpoint}{hint}")
    check_readable(checkpoint, ckpt_path)
    return Resume(checkpoint, run_dir)


def _readable(path: Path) -> Exception | None:
    try:
        torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as error:  # noqa: BLE001 (any failure means: not usable)
        return error
    return None


def newest_intact(directory: Path, skip: Path | None = None) -> Path | None:
    """The most recently written readable checkpoint in ``directory``."""
    if not directory.is_dir():
        return None
    candidates = sorted(directory.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    return next((p for p in candidates if p != skip and _readable(p) is None), None)


def check_readable(checkpoint: Path, setting: str) -> None:
    error = _readable(checkpoint)
    if error is None:
        return
    newest = newest_intact(checkpoint.parent, skip=checkpoint)
    advice = (f"the newest intact checkpoint is {newest}: resume with ckpt_path={newest}"
              if newest else f"no intact checkpoint in {checkpoint.parent}")
    raise ValueError(f"ckpt_path={setting!r}: checkpoint {checkpoint} is unreadable "
                     f"({type(error).__name__}: {str(error)[:200]}); {advice}")


def _flat(node, prefix: str) -> dict:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}.{key}")
                .items()}
    return {prefix: node}


def check_run_config(cfg: DictConfig, run_dir: Path) -> None:
    """Refuse a resume whose recipe (model, student, strategy, guidance, loss, data) differs
    from the one the run was started with (``<run_dir>/.hydra/config.yaml``)."""
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        return
    old, new = OmegaConf.load(saved), cfg
    differences = []
    for group in RECIPE_GROUPS:
        a = _flat(OmegaConf.to_container(old[group]) if group in old else None, group)
        b = _flat(OmegaConf.to_container(new[group]) if group in new else None, group)
        differences += [f"{key}: {a.get(key)!r} in the run, {b.get(key)!r} now"
                        for key in sorted(a.keys() | b.keys()) if a.get(key) != b.get(key)]
    if differences:
        overrides = run_overrides(run_dir)
        raise ValueError(
            f"ckpt_path: the run in {run_dir} was trained with other settings:\n  "
            + "\n  ".join(differences[:10])
            + f"\nresume with the run's own overrides: python run.py {overrides} "
              f"ckpt_path={shlex.quote(str(run_dir))}"
        )


def run_overrides(run_dir: Path) -> str:
    """The command-line overrides a run was started with (from its .hydra/overrides.yaml)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    overrides = list(OmegaConf.load(path)) if path.is_file() else []
    return " ".join(shlex.quote(o) for o in overrides if not o.startswith("ckpt_path="))


def resume_command(output_dir: str) -> str:
    """``python run.py <this run's overrides> ckpt_path=<output_dir>``."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not started by Hydra's command line
        return ""
    kept = [shlex.quote(o) for o in overrides if not o.startswith(("ckpt_path=", "hydra."))]
    return " ".join(["python run.py", *kept, f"ckpt_path={shlex.quote(output_dir)}"])


def hydra_run_dir(ckpt_path: str | None, max_steps, default: str) -> str:
    """Resolver for ``hydra.run.dir``: a resumed run's own directory, else ``default``."""
    run_dir = run_dir_of(ckpt_path, max_steps)
    return str(run_dir) if run_dir is not None else default


def hydra_output_subdir(ckpt_path: str | None, run_dir: str, stamp: str) -> str:
    """Resolver for ``hydra.output_subdir``: ``.hydra``, or ``.hydra/resume-<stamp>`` when a
    resume writes into a run directory that already has its config."""
    resumed = ckpt_path not in (None, "") and (Path(run_dir) / ".hydra" / "config.yaml").is_file()
    return f".hydra/resume-{stamp}" if resumed else ".hydra"
