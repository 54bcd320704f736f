"""Learning curves of a study: a metric against the training step, one line per arm (the mean
over seeds) with a band of one standard deviation, from the study's curve evaluations; and
side-by-side sample grids of the arms (the same prompts and image seeds in every arm).

    python -m tdd.plots experiments/<study> --metric fid --setting 4 --out curves.png
    python -m tdd.plots experiments/<study> --grids --eval final --setting 4 --out grids.png

Points come from the study's ``results/<arm>/seed<k>/curve_step<N>.json`` evaluations (one
per step) and from the evaluations a training run made every ``evaluation.every_n_steps``
(``train.json``'s logged ``val/<metric>@<setting>`` curve); ``--setting`` names an evaluated
setting (``4``, ``4_g1.7``, ``teacher25``).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from tdd.stats import is_number


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curve_points(root: str | Path, evaluation: str = "curve") -> list[dict]:
    """Every learning-curve point below ``root``, in path order: dicts with ``arm``, ``seed``,
    ``step`` and ``metrics`` (setting -> row). Two sources: the study's evaluation files
    ``results/<arm>/seed<k>/<evaluation>*.json`` (one step each), and the in-training
    evaluations a training run logged (``train.json``'s ``curve``: ``val/<metric>@<setting>``
    -> [step, value] pairs); an evaluation file wins where both have a value."""
    points: dict[tuple, dict] = {}
    files = sorted(Path(root).rglob("*.json"), key=lambda p: _natural(p.as_posix()))
    for path in (p for p in files if re.fullmatch(r"seed\d+", p.parent.name)):
        if path.stem != "train" and not path.stem.startswith(evaluation):
            continue
        record = json.loads(path.read_text())
        arm = record.get("arm", path.parent.parent.name)
        seed = record.get("seed", int(path.parent.name[4:]))
        if path.stem == "train":
            for key, pairs in (record.get("curve") or {}).items():
                match = re.fullmatch(r"val/(.+)@(.+)", key)
                for step, value in pairs if match else ():
                    point = _point(points, arm, seed, int(step))
                    point["metrics"].setdefault(match[2], {})[match[1]] = value
            continue
        if not isinstance(record.get("step"), int):
            raise ValueError(f"{path}: a curve evaluation needs its training 'step'")
        for setting, row in (record.get("metrics") or {}).items():
            _point(points, arm, seed, record["step"])["metrics"].setdefault(
                setting, {}).update(row)
    if not points:
        raise FileNotFoundError(f"no curve evaluations (results/<arm>/seed<k>/{evaluation}"
                                f"*.json, or val/ curves in train.json) below {root}")
    return list(points.values())


def _point(points: dict, arm: str, seed: int, step: int) -> dict:
    return points.setdefault((arm, seed, step), {"arm": arm, "seed": seed, "step": step,
                                                 "metrics": {}})


def _natural(text: str) -> list[tuple[int, int | str]]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", text) if p]


def curves(points: list[dict], metric: str, setting: str) -> dict[str, dict[str, np.ndarray]]:
    """Per arm: ``step``, ``mean``, ``std`` (0 with one seed) and ``n`` seeds per step. An
    unknown setting or metric is an error naming the valid ones."""
    settings = sorted({name for p in points for name in p["metrics"]}, key=_natural)
    if setting not in settings:
        raise ValueError(f"unknown setting {setting!r}: the curves hold {', '.join(settings)}")
    rows = [p["metrics"][setting] for p in points if setting in p["metrics"]]
    metrics = sorted({k for row in rows for k, v in row.items() if is_number(v)}
                     - {"steps", "guidance_scale", "eta"})
    if metric not in metrics:
        raise ValueError(f"unknown metric {metric!r}: setting {setting} holds "
                         f"{', '.join(metrics)}")
    values: dict[str, dict[int, list[float]]] = {}
    for p in points:
        value = p["metrics"].get(setting, {}).get(metric)
        if is_number(value):
            values.setdefault(p["arm"], {}).setdefault(p["step"], []).append(float(value))
    out = {}
    for arm, by_step in values.items():
        steps = sorted(by_step)
        out[arm] = {"step": np.array(steps),
                    "mean": np.array([np.mean(by_step[s]) for s in steps]),
                    "std": np.array([np.std(by_step[s], ddof=1) if len(by_step[s]) > 1
                                     else 0.0 for s in steps]),
                    "n": np.array([len(by_step[s]) for s in steps])}
    return out


def plot_curves(points: list[dict], metric: str, setting: str, path: str | Path) -> Path:
    """The learning curves as a PNG: mean over seeds, shaded +- one standard deviation."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    for arm, curve in sorted(curves(points, metric, setting).items()):
        n = "/".join(str(k) for k in sorted(set(curve["n"].tolist())))
        line, = axis.plot(curve["step"], curve["mean"], "o-", ms=3, label=f"{arm} (n={n})")
        axis.fill_between(curve["step"], curve["mean"] - curve["std"],
                          curve["mean"] + curve["std"], color=line.get_color(), alpha=0.2)
    axis.set_xlabel("training step")
    axis.set_ylabel(f"{metric} @ {setting}")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(figure)
    return Path(path)


def grid_files(root: str | Path, setting: str, evaluation: str = "final", seed: int = 0
               ) -> dict[str, Path]:
    """Per arm (in the study's order when it has a study.yaml, else by name) the sample grid of
    ``setting`` from its ``<evaluation>_step<N>`` results of training seed ``seed`` (the
    highest step); arms without one are left out."""
    root = Path(root)
    arms = sorted(p.name for p in (root / "results").glob("*") if p.is_dir())
    if (root / "study.yaml").is_file():
        from omegaconf import OmegaConf

        order = list(OmegaConf.to_container(OmegaConf.load(root / "study.yaml"))["arms"])
        arms = [a for a in order if a in arms] + [a for a in arms if a not in order]
    found = {}
    for arm in arms:
        folders = sorted((root / "results" / arm / f"seed{seed}").glob(f"{evaluation}_step*"),
                         key=lambda p: _natural(p.name))
        grids = [f / f"{setting}.png" for f in folders if (f / f"{setting}.png").is_file()]
        if grids:
            found[arm] = grids[-1]
    if not found:
        raise FileNotFoundError(f"no sample grid {setting}.png under {root}/results/<arm>/"
                                f"seed{seed}/{evaluation}_step*/")
    return found


def plot_grids(grids: dict[str, Path], path: str | Path, title: str = "") -> Path:
    """The arms' sample grids side by side, each titled by its arm."""
    from PIL import Image

    plt = pyplot()
    figure, axes = plt.subplots(1, len(grids), figsize=(2.6 * len(grids), 2.9), squeeze=False)
    for axis, (arm, file) in zip(axes[0], grids.items()):
        axis.imshow(Image.open(file).convert("RGB"))
        axis.set_title(arm, fontsize=9)
        axis.axis("off")
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(figure)
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="a study folder")
    parser.add_argument("--metric", default="fid")
    parser.add_argument("--setting", default="4", help="an evaluated setting, e.g. 4, 4_g1.7")
    parser.add_argument("--eval", default=None, help="the evaluations' name (default: curve; "
                        "with --grids: final)")
    parser.add_argument("--grids", action="store_true",
                        help="side-by-side sample grids of the arms instead of curves")
    parser.add_argument("--seed", type=int, default=0, help="training seed (--grids)")
    parser.add_argument("--out", default="curves.png")
    args = parser.parse_args(argv)
    if args.grids:
        evaluation = args.eval or "final"
        grids = grid_files(args.root, args.setting, evaluation, args.seed)
        title = f"{evaluation}, setting {args.setting}, training seed {args.seed}"
        print(f"plot: {plot_grids(grids, args.out, title)}")
        return
    points = curve_points(args.root, args.eval or "curve")
    print(f"plot: {plot_curves(points, args.metric, args.setting, args.out)}")


if __name__ == "__main__":
    main()
