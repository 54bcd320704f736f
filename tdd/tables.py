"""Paper-style tables and plots from the results.json files of many runs.

    python -m tdd.tables multirun/distill/2026-11-25_12-00-00 --metric fid --plot fid.png
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def collect(root: str | Path) -> list[dict]:
    """Every results.json below ``root`` (a run or multirun directory) in path order, numbers
    compared as numbers (multirun jobs 0, 1, 2, 10; dated run folders oldest first)."""
    paths = sorted(Path(root).rglob("results.json"), key=_path_order)
    if not paths:
        raise FileNotFoundError(f"no results.json below {root}")
    return [dict(json.loads(p.read_text()), path=str(p.parent)) for p in paths]


def _path_order(path: Path) -> list[tuple[int, int | str]]:
    parts = re.split(r"(\d+)", path.as_posix())
    return [(0, int(p)) if p.isdigit() else (1, p) for p in parts if p]


def _name(node: dict | None) -> str:
    target = (node or {}).get("_target_", "?")
    return target.rsplit(".", 1)[-1].replace("Target", "").replace("Guidance", "").lower()


def run_label(result: dict) -> str:
    """``strategy/guidance/student``, e.g. ``tdd/decoupled/lora``."""
    config = result["config"]
    student = _name(config.get("student")).replace("student", "")
    return f"{_name(config.get('strategy'))}/{_name(config.get('guidance'))}/{student}"


def table(results: list[dict], metric: str = "fid", guidance_scale: float = 1.0) -> str:
    """Markdown: one row per run, one column per step count (student rows at
    ``guidance_scale`` and the sampler's default eta), plus the teacher's reference rows."""
    columns: dict[str, None] = {}
    rows = []
    for result in results:
        cells = {}
        for name, row in result.get("metrics", {}).items():
            if row.get("teacher"):
                cells[f"teacher@{row['steps']}"] = row.get(metric)
            elif row.get("guidance_scale") == guidance_scale and "_eta" not in name:
                cells[f"{row['steps']} steps"] = row.get(metric)
        columns.update(dict.fromkeys(sorted(cells, key=_column_order)))
        rows.append((run_label(result), cells))
    if not any(isinstance(v, (int, float)) for _, cells in rows for v in cells.values()):
        raise ValueError(f"no evaluated metric {metric!r} at guidance scale {guidance_scale}")
    header = f"| run ({metric}) | " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for label, cells in rows:
        values = [_fmt(cells.get(c)) for c in columns]
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _column_order(column: str) -> tuple[int, int]:
    return (1, int(column.split("@")[1])) if column.startswith("teacher") else (
        0, int(column.split()[0]))


def _fmt(value) -> str:
    """A number to 3 decimals; ``-`` when missing, ``n/a`` when not computed (a reason)."""
    if value is None:
        return "-"
    return "n/a" if isinstance(value, str) else f"{value:.3f}"


def plot(results: list[dict], metric: str, path: str | Path, guidance_scale: float = 1.0):
    """Metric against sampling steps, one line per run; the teacher rows as dashed levels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.5))
    for result in results:
        rows = [r for n, r in result.get("metrics", {}).items() if not r.get("teacher")
                and r.get("guidance_scale") == guidance_scale and "_eta" not in n]
        rows.sort(key=lambda r: r["steps"])
        rows = [r for r in rows if isinstance(r.get(metric), (int, float))]
        line, = axis.plot([r["steps"] for r in rows], [r[metric] for r in rows], "o-",
                          label=run_label(result))
        for row in (r for r in result.get("metrics", {}).values() if r.get("teacher")):
            if isinstance(row.get(metric), (int, float)):
                axis.axhline(row[metric], color=line.get_color(), ls="--", lw=0.8)
    axis.set_xlabel("sampling steps")
    axis.set_ylabel(metric)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="a run or multirun directory")
    parser.add_argument("--metric", default="fid")
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--plot", help="also save a metric-vs-steps plot here")
    args = parser.parse_args(argv)
    results = collect(args.root)
    print(table(results, args.metric, args.guidance_scale))
    if args.plot:
        print(f"plot: {plot(results, args.metric, args.plot, args.guidance_scale)}")


if __name__ == "__main__":
    main()
