"""Studies: a list of runs (arms x seeds) trained, evaluated and collected by one command that
can be stopped and called again any number of times.

    python -m tdd.study run experiments/<study>       # runs whatever is not yet done
    python -m tdd.study status experiments/<study>    # what is done, partial, failed, pending
    python -m tdd.study run experiments/<study> --jobs 2   # two runs at once

``experiments/<study>/study.yaml``::

    seeds: [0, 1, 2]
    common: [logger=csv, export.enabled=false]   # every run (training and evaluation)
    train: [metrics=none]                        # training runs only
    arms:                                        # name -> the overrides that define the arm
      tdd: [strategy=tdd]
      lcm: [strategy=lcm]
    evaluations:                                 # scored from the checkpoints of each training
      curve: {steps: [100, 200, 300], overrides: [evaluation.num_images=128]}
      final: {steps: [300], overrides: [evaluation.num_images=1000]}
      teacher: {steps: [300], arms: [tdd], seeds: [0], overrides: [...]}  # a subset only
      equal: {steps: {tdd: [600], tdd_adv: [1200]}}   # per-arm steps (those arms only)

Each training run is ``python run.py <common> <train> <arm> seed=<k>`` in
``<runs dir>/<study>/<arm>/seed<k>/train``, saving a checkpoint at every evaluated step; an
interrupted one is resumed from its own ``last.ckpt``. Each evaluation re-opens a checkpoint of
that step (``ckpt_path=<file> trainer.max_steps=<step>``: no step is trained, the checkpoint is
scored) in its own directory. A finished run's ``results.json`` is copied, with its overrides,
arm, seed, evaluation and step, into ``experiments/<study>/results/<arm>/seed<k>/`` (the
training run as ``train.json``, with its logged loss curve), beside its ``per_image.npz`` when
it wrote one and, in a folder of the same name, its sample grids (the first images of every
setting, the same prompts and seeds in every arm): tables, plots and side-by-side comparisons
regenerate from these committed files alone. SIGTERM/SIGINT/SIGUSR1 are passed on to the
running run, which saves a checkpoint; the next call resumes it. A run that fails
is recorded as ``<name>.failed.txt`` (its command and the end of its log) and retried on the
next call; it never becomes a result. A training with the very overrides (in order) of one
another study started under the same runs dir is that training: it is collected and its
checkpoints scored, not trained again (``<runs dir>/trainings/<key>`` links to its directory; a
``study.lock`` holding a live pid keeps a second runner off a run).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("seeds", "common", "train", "arms", "evaluations", "description")


@dataclass
class Run:
    """One process of a study: a training run or one evaluation of one checkpoint."""

    arm: str
    seed: int
    name: str  # "train" or "<evaluation>_step<N>"
    directory: Path  # where run.py writes
    overrides: list[str]
    result: Path  # the committed copy of its results.json
    step: int | None = None
    evaluation: str | None = None
    checkpoint: Path | None = None  # the training checkpoint an evaluation scores
    needs: list[Path] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.result.is_file()

    @property
    def partial(self) -> bool:
        return not self.done and (self.directory / "checkpoints" / "last.ckpt").is_file()

    @property
    def failure(self) -> Path:
        return self.result.with_name(f"{self.name}.failed.txt")


class Study:
    """A study folder and the runs its ``study.yaml`` lists (see the module docstring)."""

    def __init__(self, folder: str | Path, runs_dir: str | Path = "outputs/studies"):
        self.folder = Path(folder).resolve()
        path = self.folder / "study.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no study.yaml in the study folder")
        spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        unknown = sorted(set(spec) - set(KEYS))
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; a study has {list(KEYS)}")
        self.seeds = [int(s) for s in _list(spec.get("seeds", [0]), path, "seeds")]
        self.common = _overrides(spec.get("common", []), path, "common")
        self.train = _overrides(spec.get("train", []), path, "train")
        arms = spec.get("arms") or {}
        if not isinstance(arms, dict) or not arms:
            raise ValueError(f"{path}: `arms` must map each arm's name to its overrides")
        self.arms = {str(k): _overrides(v, path, f"arms.{k}") for k, v in arms.items()}
        self.evaluations = {}
        for name, entry in (spec.get("evaluations") or {}).items():
            if not isinstance(entry, dict) or not entry.get("steps"):
                raise ValueError(f"{path}: evaluations.{name} needs `steps` (checkpoint steps)")
            steps = _steps(entry["steps"], list(self.arms), path, f"evaluations.{name}.steps")
            extra = _overrides(entry.get("overrides", []), path, f"evaluations.{name}.overrides")
            only_arms = entry.get("arms")
            if only_arms is not None and not set(only_arms) <= set(self.arms):
                raise ValueError(f"{path}: evaluations.{name}.arms {only_arms}: the study's "
                                 f"arms are {list(self.arms)}")
            if isinstance(entry["steps"], dict):  # per-arm steps: only those arms
                only_arms = [a for a in (only_arms or self.arms) if a in entry["steps"]]
            only_seeds = entry.get("seeds")
            self.evaluations[str(name)] = (steps, extra, only_arms, only_seeds)
        unknown = {k for e in (spec.get("evaluations") or {}).values() if isinstance(e, dict)
                   for k in e} - {"steps", "overrides", "arms", "seeds"}
        if unknown:
            raise ValueError(f"{path}: unknown evaluation keys {sorted(unknown)}")
        self.runs_dir = Path(runs_dir).resolve() / self.folder.resolve().name
        self._children: list[subprocess.Popen] = []  # the runs in progress
        self.stopped: int | None = None  # the signal that stopped the study, if any

    def stop(self, signum: int, frame=None) -> None:
        """Signal handler: pass SIGTERM/SIGINT/SIGUSR1 on to the running runs (each saves a
        checkpoint and exits, tdd.callbacks.StopOnSignal) and start no further run."""
        self.stopped = signum
        for child in self._children:
            if child.poll() is None:
                child.send_signal(signum)

    @property
    def checkpoint_every(self) -> int | None:
        """Every evaluated step gets a checkpoint: their greatest common divisor."""
        steps = [s for steps, *_ in self.evaluations.values() for arm in steps.values()
                 for s in arm]
        return math.gcd(*steps) if steps else None

    def _keep_checkpoints(self) -> list[str]:
        """Overrides that make training save (and keep) a checkpoint at every evaluated step;
        the study's own ``train`` interval is kept when every evaluated step is a multiple."""
        if not self.checkpoint_every:
            return []
        key = "callbacks.checkpoint.every_n_train_steps"
        chosen = [o for o in self.train if o.split("=", 1)[0] == key]
        keep = ["callbacks.checkpoint.save_top_k=-1"]
        if not chosen:
            return keep + [f"{key}={self.checkpoint_every}"]
        interval = int(chosen[-1].split("=", 1)[1])
        if self.checkpoint_every % interval:
            raise ValueError(f"{self.folder / 'study.yaml'}: train sets {key}={interval}, but "
                             f"the evaluated steps need a checkpoint every "
                             f"{self.checkpoint_every}")
        return keep

    def runs(self) -> list[Run]:
        """Every run, seed by seed (all arms of the first seed before the second seed's), each
        training run followed by its evaluations: a study stopped early is still balanced."""
        runs = []
        for seed in self.seeds:
            for arm, arm_overrides in self.arms.items():
                base = self.runs_dir / arm / f"seed{seed}"
                results = self.folder / "results" / arm / f"seed{seed}"
                recipe = [*self.common, *arm_overrides, f"seed={seed}"]
                keep = self._keep_checkpoints()
                train = self._shared(Run(arm, seed, "train", base / "train",
                                         [*recipe, *keep, *self.train], results / "train.json"))
                runs.append(train)
                for evaluation, (steps, extra, arms, seeds) in self.evaluations.items():
                    if (arms is not None and arm not in arms) or (
                            seeds is not None and seed not in seeds):
                        continue
                    for step in steps[arm]:
                        name = f"{evaluation}_step{step:06d}"
                        checkpoint = train.directory / "checkpoints" / f"step{step:06d}.ckpt"
                        runs.append(Run(arm, seed, name, base / name,
                                        [*recipe, *extra, f"trainer.max_steps={step}"],
                                        results / f"{name}.json", step, evaluation, checkpoint,
                                        needs=[train.result]))
        return runs

    # -- trainings shared between studies -------------------------------------------------------
    def _pool_entry(self, run: Run) -> Path:
        """``<runs dir>/trainings/<key>``: the training directory of these exact overrides."""
        key = hashlib.sha1("\n".join(run.overrides).encode()).hexdigest()[:16]
        return self.runs_dir.parent / "trainings" / key

    def _shared(self, run: Run) -> Run:
        """A training another study already started or finished with the very same overrides
        (in the same order) is this training: ``run`` is pointed at its directory instead of
        training it again. A training with a directory of its own registers it."""
        entry = self._pool_entry(run)
        if run.directory.is_dir():
            self._register(run)
        elif entry.is_symlink() and entry.resolve().is_dir():
            run.directory = entry.resolve()
        return run

    def _register(self, run: Run, starting: bool = False) -> None:
        """Enter a training directory that holds a run (or is about to) into the pool."""
        if not (starting or (run.directory / "results.json").is_file()
                or (run.directory / "checkpoints").is_dir()):
            return
        entry = self._pool_entry(run)
        entry.parent.mkdir(parents=True, exist_ok=True)
        try:
            entry.symlink_to(run.directory.resolve(), target_is_directory=True)
        except FileExistsError:
            pass

    def _lock(self, run: Run, log) -> bool:
        """Take ``<run dir>/study.lock`` (this process's pid); False while a live process of
        another runner holds it (a training shared by two studies is trained by one)."""
        lock = run.directory / "study.lock"
        try:
            holder = int(lock.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            holder = 0
        if holder and holder != os.getpid() and _alive(holder):
            log(f"busy {run.arm}/seed{run.seed}/{run.name}: {run.directory} is being run by "
                f"process {holder} (another study's runner); call again when it is done")
            return False
        lock.write_text(f"{os.getpid()}\n")
        return True

    def command(self, run: Run) -> list[str]:
        """``python run.py ...`` for ``run``: a resume when its directory holds a checkpoint."""
        extra = [f"hydra.run.dir={run.directory}"]
        if run.checkpoint is not None:  # a link outside checkpoints/: scored, not resumed into
            extra.append(f"ckpt_path={run.directory.parent / 'links' / run.checkpoint.name}")
        elif run.partial:
            extra.append(f"ckpt_path={run.directory}")
        return [sys.executable, str(ROOT / "run.py"), *run.overrides, *extra]

    # -- execution -------------------------------------------------------------------------------
    def execute(self, run: Run, log=print, threads: int | None = None) -> bool:
        """Run one process; on success copy its results into the study folder."""
        started = self.start(run, log, threads)
        if isinstance(started, bool):
            return started
        return self.finish(run, started, log)

    def start(self, run: Run, log=print, threads: int | None = None
              ) -> bool | subprocess.Popen:
        """Start ``run``'s process (with ``threads`` torch CPU threads when given), or say at
        once whether it is done (True: finished before, now collected) or cannot run (False)."""
        missing = [str(p) for p in run.needs if not p.is_file()]
        if missing:
            log(f"skip {run.arm}/seed{run.seed}/{run.name}: waiting for {missing}")
            return False
        if (run.directory / "results.json").is_file():  # finished, not yet collected
            self.collect(run)
            run.failure.unlink(missing_ok=True)
            return True
        if run.checkpoint is not None:
            if not run.checkpoint.is_file():
                return self._fail(run, [], f"no checkpoint {run.checkpoint}: the training run "
                                  "saved none at this step", log)
            link = run.directory.parent / "links" / run.checkpoint.name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(run.checkpoint.resolve())
            if run.directory.exists():  # an interrupted evaluation restarts from scratch
                shutil.rmtree(run.directory)
        run.directory.mkdir(parents=True, exist_ok=True)
        if not self._lock(run, log):
            return False
        command = self.command(run)
        if run.evaluation is None:
            self._register(run, starting=True)
        log(f"run {run.arm}/seed{run.seed}/{run.name}: {shlex.join(command[1:])}")
        env = None
        if threads is not None:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads),
                   "MKL_NUM_THREADS": str(threads)}
        with open(run.directory / "study.log", "a") as out:
            child = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                     env=env)
        child.command, child.started = command, time.monotonic()
        self._children.append(child)
        return child

    def finish(self, run: Run, child: subprocess.Popen, log=print) -> bool:
        """Wait for ``run``'s process; collect its results, or record its failure."""
        returncode = child.wait()
        self._children.remove(child)
        (run.directory / "study.lock").unlink(missing_ok=True)
        if self.stopped is not None:  # the run checkpointed on the forwarded signal
            log(f"stopped {run.arm}/seed{run.seed}/{run.name} on signal {self.stopped}: "
                "call again to continue")
            return False
        produced = run.directory / "results.json"
        if returncode != 0 or not produced.is_file():
            tail = (run.directory / "study.log").read_text(errors="replace")[-4000:]
            return self._fail(run, child.command, f"exit status {returncode}\n{tail}", log)
        self.collect(run)
        run.failure.unlink(missing_ok=True)
        log(f"done {run.arm}/seed{run.seed}/{run.name} in "
            f"{time.monotonic() - child.started:.0f} s")
        return True

    def collect(self, run: Run) -> None:
        """Copy a finished run's results.json (+ per_image.npz) into the study folder."""
        results = json.loads((run.directory / "results.json").read_text())
        results.update(overrides=run.overrides, arm=run.arm, seed=run.seed,
                       eval=run.evaluation, step=run.step)
        if run.evaluation is None:
            results["step"] = int(results.get("config", {}).get("trainer", {})
                                  .get("max_steps", 0)) or None
            results["curve"] = loss_curve(run.directory)
        run.result.parent.mkdir(parents=True, exist_ok=True)
        run.result.write_text(json.dumps(_portable(results), indent=1, sort_keys=True) + "\n")
        per_image = run.directory / "per_image.npz"
        if per_image.is_file():
            shutil.copyfile(per_image, run.result.with_suffix(".npz"))
        grids = sorted(run.directory.glob("samples/step*/*.png"))  # same prompts in every arm
        for grid in grids if run.evaluation is not None else ():
            target = run.result.with_suffix("") / grid.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(grid, target)

    def _fail(self, run: Run, command: list[str], why: str, log) -> bool:
        run.failure.parent.mkdir(parents=True, exist_ok=True)
        run.failure.write_text(f"{shlex.join(command)}\n{why}\n")
        log(f"FAILED {run.arm}/seed{run.seed}/{run.name}: {why.splitlines()[0]} "
            f"(see {run.failure})")
        return False

    def run(self, max_runs: int | None = None, arms: list[str] | None = None, log=print,
            trainings_only: bool = False, evaluations: list[str] | None = None,
            jobs: int = 1) -> int:
        """Run every pending run (or the first ``max_runs``); the number that failed.
        ``evaluations``: only these evaluations (and the trainings they need). ``jobs`` > 1
        runs that many processes at once, in the same order, an evaluation only once its
        training is done, each with cores / jobs torch threads (unless OMP_NUM_THREADS is set):
        small networks on a CPU gain little from a second thread, much from a second run."""
        unknown = sorted(set(arms or []) - set(self.arms))
        if unknown:
            raise ValueError(f"--arm {unknown}: the study's arms are {list(self.arms)}")
        unknown = sorted(set(evaluations or []) - set(self.evaluations))
        if unknown:
            raise ValueError(f"--evaluation {unknown}: the study's evaluations are "
                             f"{list(self.evaluations)}")
        if jobs < 1:
            raise ValueError(f"--jobs {jobs} must be >= 1")
        pending = [run for run in self.runs() if not (
            run.done or (arms and run.arm not in arms) or (
                run.evaluation is not None and (trainings_only or (
                    evaluations and run.evaluation not in evaluations))))]
        if evaluations:  # of the trainings, only those a chosen evaluation still scores
            needed = {(r.arm, r.seed) for r in pending if r.evaluation is not None}
            pending = [r for r in pending if r.evaluation is not None
                       or (r.arm, r.seed) in needed]
        if max_runs is not None:
            pending = pending[:max(max_runs, 0)]
        threads = None
        if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
            threads = max(1, (os.cpu_count() or 1) // jobs)
        failed, running = 0, []
        while (pending or running) and self.stopped is None:
            while len(running) < jobs and self.stopped is None:
                producing = {r.result for r in pending} | {r.result for r, _ in running}
                ready = next((r for r in pending
                              if not any(p in producing for p in r.needs)), None)
                if ready is None:
                    break
                pending.remove(ready)
                started = self.start(ready, log, threads)
                if isinstance(started, bool):
                    failed += not started
                else:
                    running.append((ready, started))
            if not running:
                break
            finished = self._wait_any([child for _, child in running])
            for run, child in [(r, c) for r, c in running if c is finished]:
                running.remove((run, child))
                failed += not self.finish(run, child, log)
        for run, child in running:  # stopped: the runs save a checkpoint and exit
            self.finish(run, child, log)
        return failed

    def _wait_any(self, children: list[subprocess.Popen]) -> subprocess.Popen:
        """The first of ``children`` to exit (polled; a signal interrupts the sleep)."""
        while True:
            for child in children:
                if child.poll() is not None:
                    return child
            time.sleep(0.2)

    def status(self) -> str:
        lines = []
        for run in self.runs():
            state = ("done" if run.done else "failed" if run.failure.is_file()
                     else "partial" if run.partial else "pending")
            lines.append(f"{state:8s} {run.arm}/seed{run.seed}/{run.name}")
        counts = {s: sum(line.startswith(s) for line in lines)
                  for s in ("done", "partial", "failed", "pending")}
        return "\n".join(lines + [", ".join(f"{v} {k}" for k, v in counts.items())])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def loss_curve(run_dir: Path) -> dict[str, list[list[float]]]:
    """The training loss and any in-training evaluation (``val/...``) per logged step, as
    [step, value] pairs, from the run's CSV log (empty without one)."""
    curve: dict[str, dict[int, float]] = {}
    for path in sorted(run_dir.glob("csv/**/metrics.csv")):
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                step = row.get("step")
                for key, value in row.items():
                    if (key.startswith(("train/loss", "val/")) and value not in ("", None)
                            and step and _number(value)):
                        curve.setdefault(key, {})[int(step)] = float(value)
    return {key: [[s, v] for s, v in sorted(values.items())] for key, values in curve.items()}


def _number(text: str) -> bool:
    """A logged value that is a number (not a flag such as "False")."""
    try:
        float(text)
    except ValueError:
        return False
    return text not in ("True", "False")


def _portable(value):
    """JSON with run-specific absolute paths kept (they say where a run lived) but NaN as null."""
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _list(value, path: Path, key: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{path}: `{key}` must be a list, got {value!r}")
    return value


def _steps(value, arms: list[str], path: Path, key: str) -> dict[str, list[int]]:
    """Checkpoint steps per arm: a list (every arm) or a mapping arm -> list (arms that train
    for different lengths, e.g. to compare at equal student updates)."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(arms))
        if unknown:
            raise ValueError(f"{path}: `{key}` names arms {unknown}; the study's arms are {arms}")
        per_arm = {str(a): _list(v, path, f"{key}.{a}") for a, v in value.items()}
    else:
        per_arm = dict.fromkeys(arms, _list(value, path, key))
    per_arm = {a: [int(s) for s in v] for a, v in per_arm.items()}
    if any(s < 1 for v in per_arm.values() for s in v):
        raise ValueError(f"{path}: `{key}` must be >= 1: {value}")
    return per_arm


def _overrides(value, path: Path, key: str) -> list[str]:
    value = _list(value or [], path, key)
    bad = [v for v in value if not isinstance(v, str) or "=" not in v]
    if bad:
        raise ValueError(f"{path}: `{key}` holds {bad}: overrides are `key=value` strings")
    return list(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tdd.study",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["run", "status"])
    parser.add_argument("folder", help="the study folder (holding study.yaml)")
    parser.add_argument("--runs-dir", default="outputs/studies",
                        help="where the runs' own directories go (checkpoints, logs)")
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many runs")
    parser.add_argument("--arm", action="append", default=None, help="only these arms")
    parser.add_argument("--trainings-only", action="store_true",
                        help="train every run first; evaluate on a later call")
    parser.add_argument("--evaluation", action="append", default=None,
                        help="only these evaluations (and the trainings they need)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once, each with cores / jobs threads (default 1)")
    args = parser.parse_args(argv)
    study = Study(args.folder, args.runs_dir)
    if args.action == "status":
        print(study.status())
        return 0
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, study.stop)
    failed = study.run(args.max_runs, args.arm, log=lambda m: print(m, flush=True),
                       trainings_only=args.trainings_only, evaluations=args.evaluation,
                       jobs=args.jobs)
    print(study.status().splitlines()[-1])
    if study.stopped is not None:
        return 128 + study.stopped
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
