"""Paper-style tables from the results of many runs: one row per arm (the runs that differ
only by seed), labelled by the settings that differ between the arms, with mean +- std over
seeds and a marker where an arm differs from a baseline beyond the interval.

    python -m tdd.tables experiments/<study> --metric fid kid --baseline tdd
    python -m tdd.tables multirun/distill/2026-11-25_12-00-00 --metric fid --plot fid.png

A study folder (``python -m tdd.study``) holds ``results/<arm>/seed<k>/<eval>_step<N>.json``
(a run's results.json plus its ``overrides``, ``arm``, ``seed``, ``eval`` and ``step``; the
highest step is read); a planned seed without the file is reported as failed (its
``.failed.txt``), crashed or not finished. Plain run and multirun directories are read through
their ``results.json`` and ``.hydra/overrides.yaml``.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tdd.stats import compare_seeds, intervals_overlap, is_number, paired_images, summarize

#: Settings that tell replicate runs apart: runs differing only in these share a row.
SEED_KEYS = ("seed", "evaluation.seed")
#: Row entries that describe the setting rather than score it.
NOT_METRICS = ("steps", "guidance_scale", "eta", "teacher")
#: Config parts that differ between runs without being a setting of the experiment.
IGNORED = ("paths", "hydra", "evaluation.sampler", "evaluation.metrics", "logger", "callbacks")


def collect(root: str | Path, evaluation: str = "final") -> list[dict]:
    """Every run below ``root`` in path order (numbers compared as numbers: multirun jobs 0, 1,
    2, 10; dated run folders oldest first): its ``results.json``, or in a study folder its
    ``results/<arm>/seed<k>/<evaluation>.json``; a seed folder without that file gives a
    record with ``missing`` (the reason) and no metrics."""
    root = Path(root)
    records = []
    for path in sorted(root.rglob("results.json"), key=_path_order):
        overrides = path.parent / ".hydra" / "overrides.yaml"
        record = dict(json.loads(path.read_text()), path=str(path.parent))
        if "overrides" not in record and overrides.is_file():
            record["overrides"] = _read_overrides(overrides)
        records.append(record)
    seed_dirs = [p for p in root.rglob("seed*") if p.is_dir() and re.fullmatch(r"seed\d+", p.name)]
    planned = _planned(root, evaluation)
    evaluated_arms = {f.parent.parent for f in root.rglob(f"seed*/{evaluation}*")}
    for folder in sorted(seed_dirs, key=_path_order):
        base = {"arm": folder.parent.name, "seed": int(folder.name[4:]), "path": str(folder)}
        if (base["arm"], base["seed"]) not in planned if planned is not None else (
                folder.parent not in evaluated_arms):
            continue  # this evaluation is not planned for the arm (or seed)
        file, missing = _study_file(folder, evaluation)
        if file is None:
            records.append(dict(base, missing=missing))
            continue
        try:
            records.append(dict(base, **json.loads(file.read_text()), file=str(file)))
        except json.JSONDecodeError as error:
            records.append(dict(base, missing=f"{file.name} unreadable ({error.msg})"))
    seen = {(r["arm"], r["seed"]) for r in records if "arm" in r}
    for arm, seed in sorted((planned or set()) - seen):
        records.append({"arm": arm, "seed": seed, "path": str(root / "results" / arm),
                        "missing": f"no {evaluation} result (not run yet)"})
    if not records:
        raise FileNotFoundError(f"no results.json, and no results/<arm>/seed<k>/{evaluation}.json,"
                                f" below {root}")
    return records


def _study_file(folder: Path, evaluation: str) -> tuple[Path | None, str | None]:
    """The seed folder's ``<evaluation>_step<N>.json`` of the highest step (or
    ``<evaluation>.json``), else why there is none."""
    files = sorted(folder.glob(f"{evaluation}_step*.json"), key=_path_order)
    files += [f for f in [folder / f"{evaluation}.json"] if f.is_file()]
    if files:
        return files[-1], None
    failed = sorted(folder.glob(f"{evaluation}*.failed.txt"), key=_path_order)
    if failed:
        return None, f"failed (see {failed[-1].name})"
    return None, f"no {evaluation} result (crashed or not finished)"


def _planned(root: Path, evaluation: str) -> set[tuple[str, int]] | None:
    """(arm, seed) pairs the study file plans ``evaluation`` for; None without a study file
    (then every arm that has the evaluation for some seed is expected to have it for all)."""
    from omegaconf import OmegaConf

    path = root / "study.yaml" if (root / "study.yaml").is_file() else root.parent / "study.yaml"
    if not path.is_file():
        return None
    study = OmegaConf.to_container(OmegaConf.load(path))
    plan = (study.get("evaluations") or {}).get(evaluation)
    if plan is None:
        return None
    arms = plan.get("arms") or list(study.get("arms") or {})
    if isinstance(plan.get("steps"), dict):  # per-arm steps: only those arms
        arms = [arm for arm in arms if arm in plan["steps"]]
    seeds = plan.get("seeds") or study.get("seeds") or []
    return {(arm, int(seed)) for arm in arms for seed in seeds}


def _read_overrides(path: Path) -> list[str]:
    from omegaconf import OmegaConf

    return [str(item) for item in OmegaConf.to_container(OmegaConf.load(path))]


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


# -- arms: runs that differ only by seed ------------------------------------------------------
@dataclass
class Arm:
    """One table row: the runs of one arm, the settings they share and the row label."""

    name: str | None
    settings: dict[str, str]
    runs: list[dict] = field(default_factory=list)
    label: str = ""


def settings_of(record: dict, from_overrides: bool) -> dict[str, str]:
    """The run's settings without the seed: its overrides (``key=value``), or else the
    resolved config flattened to dotted keys, a config group shown by its class name."""
    if from_overrides:
        pairs = (o.lstrip("+~").split("=", 1) for o in record.get("overrides") or [])
        settings = {p[0]: p[1] if len(p) > 1 else "(removed)" for p in pairs}
    else:
        settings = _flatten(record.get("config") or {}, record)
    return {k: v for k, v in settings.items() if k not in SEED_KEYS}


def _flatten(config: dict, record: dict, prefix: str = "") -> dict[str, str]:
    output_dir = str((record.get("config") or {}).get("paths", {}).get("output_dir", "\0"))
    out: dict[str, str] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if any(dotted == i or dotted.startswith(i + ".") for i in IGNORED):
            continue
        if isinstance(value, dict):
            if "_target_" in value:
                out[dotted] = _name(value)
                continue  # the group's own settings come with its choice
            out.update(_flatten(value, record, dotted + "."))
        elif output_dir not in str(value):
            out[dotted] = json.dumps(value) if isinstance(value, list) else str(value)
    return out


def group(records: list[dict]) -> list[Arm]:
    """Arms in order of first appearance: a study's ``arm``, or else the runs' settings; each
    labelled ``key=value, ...`` by the settings that are not the same in every arm."""
    from_overrides = all("overrides" in r for r in records if "missing" not in r)
    arms: dict[tuple, Arm] = {}
    for record in records:
        settings = {} if "missing" in record else settings_of(record, from_overrides)
        key = ("arm", record["arm"]) if "arm" in record else tuple(sorted(settings.items()))
        arm = arms.setdefault(key, Arm(record.get("arm"), settings))
        arm.settings = arm.settings or settings
        arm.runs.append(record)
    arms_list = list(arms.values())
    known = [arm for arm in arms_list if arm.settings]  # an arm with no finished run: unknown
    keys = sorted({k for arm in known for k in arm.settings})
    differing = [k for k in keys if len({arm.settings.get(k) for arm in known}) > 1]
    for arm in arms_list:
        arm.label = ", ".join(f"{k}={arm.settings[k]}" for k in differing if k in arm.settings)
        arm.label = (arm.label or "-") if arm.settings else "(no finished run)"
    configs = [r["config"] for r in arms_list[0].runs if "strategy" in r.get("config", {})]
    if len(known) == 1 and len(arms_list) == 1:  # one arm: its strategy/guidance/student
        arms_list[0].label = run_label({"config": configs[0]}) if configs else "-"
    return arms_list


# -- the table --------------------------------------------------------------------------------
def _cells(record: dict, metric: str, guidance_scale: float,
           settings: list[str] | None = None) -> dict[str, object]:
    """Column -> value of one run (student rows at ``guidance_scale`` and the sampler's own
    eta; the teacher rows), with the ``[low, high]`` interval under ``<column>/ci``. With
    ``settings`` the columns are those evaluated settings by name (``4_eta0.5``, ``4_g1.5``,
    ``teacher25``; ``["all"]``: every one)."""
    cells: dict[str, object] = {}
    for name, row in (record.get("metrics") or {}).items():
        if settings is not None:
            if name not in settings and settings != ["all"]:
                continue
            column = name
        elif row.get("teacher"):
            column = f"teacher@{row['steps']}"
        elif row.get("guidance_scale") == guidance_scale and "_eta" not in name:
            column = f"{row['steps']} steps"
        else:
            continue
        cells[column] = row.get(metric)
        if f"{metric}_ci" in row:
            cells[f"{column}/ci"] = row[f"{metric}_ci"]
    return cells


def check_request(records: list[dict], metric: str, guidance_scale: float,
                  settings: list[str] | None = None) -> None:
    """An unknown metric, guidance scale or setting is an error that names the valid ones."""
    rows = [row for r in records for row in (r.get("metrics") or {}).values()]
    if settings is not None:
        names = sorted({n for r in records for n in (r.get("metrics") or {})},
                       key=_setting_order)
        unknown = [n for n in settings if n not in names and n != "all"]
        if unknown:
            raise ValueError(f"--settings {unknown}: the evaluated settings are "
                             f"{', '.join(names)}")
    metrics = sorted({k for row in rows for k, v in row.items()
                      if k not in NOT_METRICS and (is_number(v) or isinstance(v, str))
                      and k != "grid"})
    if metric not in metrics:
        raise ValueError(f"unknown metric {metric!r}: the results hold {', '.join(metrics)}")
    scales = sorted({row.get("guidance_scale") for row in rows if not row.get("teacher")})
    if settings is None and guidance_scale not in scales:
        raise ValueError(f"no student rows at guidance scale {guidance_scale:g}: evaluated "
                         f"scales are {', '.join(f'{s:g}' for s in scales)}")
    if not any(is_number(row.get(metric)) for row in rows):
        raise ValueError(f"no evaluated metric {metric!r}: every value is missing or not "
                         "computed")


def table(records: list[dict], metric: str = "fid", guidance_scale: float = 1.0,
          baseline: str | None = None, settings: list[str] | None = None) -> str:
    """Markdown: one row per arm, one column per step count plus the teacher's rows; cells
    ``mean ± std (n)`` over seeds (one run: the value and its interval over images, when the
    run has one), ``*`` where the arm differs from ``baseline`` beyond the interval; notes on
    every missing value below."""
    check_request(records, metric, guidance_scale, settings)
    arms = group(records)
    cells = [[_cells(run, metric, guidance_scale, settings) for run in arm.runs]
             for arm in arms]
    present = {c for arm in cells for run in arm for c in run if "/" not in c}
    if settings is None:
        columns = sorted(present, key=_column_order)
    elif settings == ["all"]:
        columns = sorted(present, key=_setting_order)
    else:
        columns = [c for c in settings if c in present]
    base = _find_baseline(arms, baseline) if baseline else None
    named = any(arm.name for arm in arms)
    header = [f"arm ({metric})", "differs by"] if named else [f"run ({metric})"]
    lines = ["| " + " | ".join(header + columns) + " |", "|" + "---|" * (len(header)
                                                                        + len(columns))]
    notes = {f"{_run_name(arm, run)}: {run['missing']}" for arm in arms for run in arm.runs
             if "missing" in run}
    for i, arm in enumerate(arms):
        name = (arm.name or "") + (" (baseline)" if i == base else "")
        row = [name, arm.label] if named else [arm.label]
        for column in columns:
            text, missing = _cell(arm, cells[i], column)
            notes.update(missing)
            if base is not None and i != base and _differs(arms[base], cells[base], arm,
                                                           cells[i], column):
                text += " *"
            row.append(text)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines + _legend(metric, baseline, base is not None, notes))


def _run_name(arm: Arm, run: dict) -> str:
    who = arm.name or arm.label or run.get("path", "?")
    return f"{who} seed {run['seed']}" if "seed" in run else f"{who} ({run.get('path', '?')})"


def _values(arm: Arm, cells: list[dict], column: str) -> dict[str, object]:
    return {_run_name(arm, run): run.get("missing") or c.get(column)
            for run, c in zip(arm.runs, cells)}


def _cell(arm: Arm, cells: list[dict], column: str) -> tuple[str, list[str]]:
    """The arm's cell and its notes: a reason a run gives for a missing value ("not
    computed: ..."), or a run without the value where other runs of the arm have it (crashed
    runs are noted once, by the table)."""
    values = {_run_name(arm, run): None if "missing" in run else c.get(column)
              for run, c in zip(arm.runs, cells)}
    s = summarize(values)
    total = len(values)
    notes = [f"{column}: {m}" for m in s.missing
             if isinstance(values[m.split(": ", 1)[0]], str) or (
                 s.n and m.split(": ", 1)[0] in _present(arm))]
    if s.n == 0:
        return ("n/a" if any(isinstance(v, str) for v in values.values()) else "-"), notes
    count = f"{s.n}" if s.n == total else f"{s.n}/{total}"
    if s.n > 1:
        return f"{_fmt(s.mean)} ± {_fmt(s.std)} ({count})", notes
    # one run has the value: it, with its interval over images when it has one
    (ci,) = [c.get(f"{column}/ci") for run, c in zip(arm.runs, cells)
             if "missing" not in run and c.get(column) is not None and not isinstance(
                 c.get(column), str)]
    text = _fmt(s.mean) + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "")
    return (text + f" ({count})" if total > 1 else text), notes


def _present(arm: Arm) -> set[str]:
    """The arm's runs that finished (crashed ones are noted once, by the table)."""
    return {_run_name(arm, run) for run in arm.runs if "missing" not in run}


def _differs(base: Arm, base_cells: list[dict], arm: Arm, cells: list[dict], column) -> bool:
    """Seeds on both sides: a t interval on the difference; one run each: the runs' intervals
    over images do not overlap. Anything else is not tested."""
    def by_seed(a, c):
        return {run.get("seed", k): c_[column] for k, (run, c_) in enumerate(zip(a.runs, c))
                if "missing" not in run and is_number(c_.get(column))}
    x, y = by_seed(base, base_cells), by_seed(arm, cells)
    if min(len(x), len(y)) >= 2:
        return compare_seeds(x, y).differs
    ci_x = [c.get(f"{column}/ci") for c in base_cells if c.get(f"{column}/ci")]
    ci_y = [c.get(f"{column}/ci") for c in cells if c.get(f"{column}/ci")]
    if len(x) == len(y) == len(ci_x) == len(ci_y) == 1:
        return not intervals_overlap(ci_x[0], ci_y[0])
    return False


def _find_baseline(arms: list[Arm], baseline: str) -> int:
    """The arm named ``baseline``, or labelled so, or with one setting of that value."""
    def matches(arm: Arm) -> bool:
        return baseline in (arm.name, arm.label) or (
            not any(a.name == baseline or a.label == baseline for a in arms)
            and baseline in [part.split("=", 1)[-1] for part in arm.label.split(", ")])
    found = [i for i, arm in enumerate(arms) if matches(arm)]
    if len(found) != 1:
        names = "; ".join(arm.name or arm.label for arm in arms)
        raise ValueError(f"--baseline {baseline!r} matches {len(found)} rows; rows: {names}")
    return found[0]


def _legend(metric: str, baseline: str | None, marked: bool, notes: set[str]) -> list[str]:
    lines = ["", "Cells: mean ± std over training seeds (number of seeds; k/n when only k of "
             "n runs have a value); a single run: the value and, for FID/KID, its 95 % "
             "bootstrap interval over images."]
    if marked:
        lines.append(f"`*`: differs from the baseline `{baseline}` beyond the 95 % interval "
                     "(paired t over matched seeds, Welch t otherwise; single runs: "
                     "intervals over images that do not overlap).")
    if notes:
        lines += ["", f"Missing values ({metric}):"] + [f"- {n}" for n in sorted(notes)]
    return lines


# -- paired per-image comparisons -------------------------------------------------------------
def per_image_file(record: dict) -> Path:
    """A run's per-image scores: the ``.npz`` beside a study's result file, else the run
    directory's ``per_image.npz``."""
    if "file" in record:
        return Path(record["file"]).with_suffix(".npz")
    return Path(record["path"]) / "per_image.npz"


def paired_table(records: list[dict], metric: str, setting: str, baseline: str) -> str:
    """Markdown: every arm against ``baseline`` on the per-image ``metric`` of one evaluated
    ``setting``, image by image over the seeds both arms ran (same prompts and per-image seeds
    required): the mean difference, its 95 % paired bootstrap interval and the sign-flip
    p-value; ``*`` where the interval excludes 0. The interval is over images, for these
    trained runs: the spread between training seeds is in the seed table, not here."""
    arms = group(records)
    base = _find_baseline(arms, baseline)
    key = f"{setting}/{metric}"
    lines = [f"| arm ({metric} @ {setting}, paired with `{baseline}`) | differs by | mean "
             "difference | 95 % interval | p (sign flips) | images (seeds) |",
             "|---|---|---|---|---|---|"]
    notes: set[str] = set()
    for i, arm in enumerate(arms):
        if i == base:
            continue
        a, b, seeds = _paired_scores(arms[base], arm, key, notes)
        if not seeds:
            lines.append(f"| {arm.name or ''} | {arm.label} | - | - | - | 0 |")
            continue
        c = paired_images(a, b, generator=torch.Generator().manual_seed(0))
        mark = " *" if c.differs else ""
        lines.append(f"| {arm.name or ''} | {arm.label} | {_fmt(c.difference)}{mark} | "
                     f"[{_fmt(c.interval[0])}, {_fmt(c.interval[1])}] | {c.p_value:.3g} | "
                     f"{c.n} ({len(seeds)}) |")
    return "\n".join(lines + ([""] + [f"- {n}" for n in sorted(notes)] if notes else []))


def _paired_scores(base: Arm, arm: Arm, key: str, notes: set[str]):
    """The two arms' per-image scores, concatenated over the seeds both have."""
    def runs(a: Arm) -> dict:
        return {r.get("seed"): r for r in a.runs if "missing" not in r}
    x, y = runs(base), runs(arm)
    a, b, seeds = [], [], []
    for seed in sorted(set(x) & set(y), key=str):
        files = [per_image_file(x[seed]), per_image_file(y[seed])]
        if not all(f.is_file() for f in files):
            notes.add(f"seed {seed}: no per-image scores ({', '.join(map(str, files))})")
            continue
        first, second = (np.load(f, allow_pickle=False) for f in files)
        if key not in first.files or key not in second.files:
            valid = sorted(k for k in first.files if "/" in k)
            raise ValueError(f"no per-image {key!r} in {files[0]} or {files[1]}; per-image "
                             f"scores: {', '.join(valid)}")
        if not (np.array_equal(first["prompts"], second["prompts"])
                and np.array_equal(first["seeds"], second["seeds"])):
            notes.add(f"seed {seed}: {arm.name or arm.label} was evaluated on other prompts "
                      "or per-image seeds: not paired")
            continue
        a.append(first[key])
        b.append(second[key])
        seeds.append(seed)
    return (np.concatenate(a) if a else None), (np.concatenate(b) if b else None), seeds


def _column_order(column: str) -> tuple[int, int]:
    return (1, int(column.split("@")[1])) if column.startswith("teacher") else (
        0, int(column.split()[0]))


def _setting_order(name: str) -> tuple:
    """Evaluated settings by name: the student's by steps then variant, the teacher's last."""
    teacher = name.startswith("teacher")
    steps = name.removeprefix("teacher").split("_")[0]
    return (teacher, int(steps) if steps.isdigit() else 0, name)


def _fmt(value) -> str:
    """A number to 3 decimals (3 significant digits below 0.1); ``-`` when missing, ``n/a``
    when not computed (a reason)."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return "n/a"
    return f"{value:.3g}" if 0 < abs(value) < 0.1 else f"{value:.3f}"


def plot(records: list[dict], metric: str, path: str | Path, guidance_scale: float = 1.0):
    """Metric against sampling steps, one line per arm (mean over seeds); the teacher rows
    as dashed levels."""
    from tdd.plots import pyplot

    plt = pyplot()
    check_request(records, metric, guidance_scale)
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for arm in group(records):
        points: dict[int, list[float]] = {}
        teacher: list[float] = []
        for run in arm.runs:
            for name, row in (run.get("metrics") or {}).items():
                if not is_number(row.get(metric)):
                    continue
                if row.get("teacher"):
                    teacher.append(row[metric])
                elif row.get("guidance_scale") == guidance_scale and "_eta" not in name:
                    points.setdefault(row["steps"], []).append(row[metric])
        steps = sorted(points)
        line, = axis.plot(steps, [sum(points[k]) / len(points[k]) for k in steps], "o-",
                          label=arm.name or arm.label)
        for level in sorted(set(teacher)):
            axis.axhline(level, color=line.get_color(), ls="--", lw=0.8)
    axis.set_xlabel("sampling steps")
    axis.set_ylabel(metric)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="a study folder, or a run or multirun directory")
    parser.add_argument("--metric", nargs="+", default=["fid"])
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--baseline", help="the arm the others are compared with")
    parser.add_argument("--eval", default="final", help="the study's evaluation name")
    parser.add_argument("--paired", metavar="SETTING",
                        help="also compare every arm with --baseline image by image at this "
                        "evaluated setting (e.g. 4), for per-image metrics")
    parser.add_argument("--settings", nargs="+", metavar="SETTING",
                        help="columns = these evaluated settings by name (4_eta0.5, 4_g1.5, "
                        "teacher25; 'all': every one) instead of one per step count")
    parser.add_argument("--plot", help="also save a metric-vs-steps plot here")
    args = parser.parse_args(argv)
    if args.paired and not args.baseline:
        parser.error("--paired needs --baseline")
    records = collect(args.root, args.eval)
    tables = [table(records, m, args.guidance_scale, args.baseline, args.settings)
              for m in args.metric]
    if args.paired:
        tables += [paired_table(records, m, args.paired, args.baseline) for m in args.metric]
    print("\n\n".join(tables))
    if args.plot:
        print(f"plot: {plot(records, args.metric[0], args.plot, args.guidance_scale)}")


if __name__ == "__main__":
    main()
