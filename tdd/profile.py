"""Where the main job's time goes: ``python -m tdd.bench profile`` (``make profile``).

Runs the main job (``run.py``'s ``train``, the default config plus any overrides) for a few
steps and a reduced evaluation, with a wall-clock timer around each piece of the module, the
sampler and the metrics, and prints JSON plus a short table::

    python -m tdd.bench profile --steps 30 --images 64 --out profile.json [strategy=lcm ...]

Each piece's time is its *own* time: time spent in a timed piece it calls is that piece's (the
optimizer row is the optimizer step, clipping and EMA update without the training step and the
backward pass Lightning runs inside it). ``other`` is the rest of the wall time (Lightning's
loop, callbacks, setup). The ``scaled`` figures estimate the main job: training rows times
``max_steps / steps``, evaluation rows times ``num_images / images`` (both taken from the
composed config); setup, export and ``other`` are not scaled.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from functools import wraps
from pathlib import Path

import torch

#: The configs of the source checkout (as the benchmark reads them).
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

#: (module, attribute path, row) of every timed piece; "eval/" rows are timed in evaluation.
PIECES = (
    ("torch.utils.data.dataloader", "_BaseDataLoaderIter.__next__", "train/data"),
    ("tdd.models.conditioning", "TextConditioner.forward", "text encode"),
    ("tdd.module", "DistillationModule.encode_images", "train/vae encode"),
    ("tdd.module", "DistillationModule.teacher_step", "train/teacher"),
    ("tdd.models.students", "Student.online", "train/student forward"),
    ("tdd.models.students", "LoRAStudent.target", "train/target"),
    ("tdd.models.students", "FullStudent.target", "train/target"),
    ("tdd.module", "DistillationModule.backward", "train/student backward"),
    ("tdd.module", "DistillationModule.optimizer_step", "train/optimizer"),
    ("tdd.module", "DistillationModule.training_step", "train/step (rest)"),
    ("tdd.module", "DistillationModule.log_loss", "train/logging"),
    ("lightning.pytorch.loggers", "CSVLogger.log_metrics", "logging"),
    ("lightning.pytorch.loggers", "WandbLogger.log_metrics", "logging"),
    ("tdd.callbacks", "Checkpoint._save_checkpoint", "train/checkpoint"),
    ("tdd.evaluation", "Evaluation.evaluate", "eval/other"),
    ("tdd.evaluation", "Evaluation._prepare", "eval/real renders + reference"),
    ("tdd.sampling", "_sample_batch", "eval/sampling (scheduler)"),
    ("diffusers", "UNet2DConditionModel.forward", "eval/sampling unet"),
    ("diffusers", "AutoencoderKL.decode", "eval/vae decode"),
    ("tdd.metrics.clip_model", "CLIPImageFeatures.forward", "eval/feature extraction"),
    ("tdd.metrics.fid", "FIDScorer.compute", "eval/fid"),
    ("tdd.metrics.clip_score", "CLIPScorer.forward", "eval/clip (text)"),
    ("tdd.metrics.toy", "AttributeAccuracy.forward", "eval/attribute acc (text)"),
    ("tdd.models.students", "LoRAStudent.export", "export"),
    ("tdd.models.students", "FullStudent.export", "export"),
    ("tdd.models.teacher", "load_teacher", "setup/load teacher"),
    ("tdd.metrics.toy", "toy_metrics", "setup/load metrics"),
)
#: Pieces whose callees are theirs (the target network's forward is not the student's).
OPAQUE = {"train/teacher", "train/target"}


class SectionTimer:
    """Own wall time per row: a row's time minus the time of the timed rows it calls."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.settings: dict[str, float] = {}
        self.phase = "train"
        self._stack: list[list] = []  # [row, seconds of timed callees]

    @contextmanager
    def section(self, row: str):
        other_phase = row.startswith(("train/", "eval/")) and not row.startswith(self.phase)
        if other_phase or (self._stack and self._stack[-1][0] in OPAQUE):
            yield  # an evaluation piece during training (or the reverse), or inside an opaque one
            return
        if row in ("text encode", "logging"):
            row = f"{self.phase}/{row}"
        self._stack.append([row, 0.0])
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            _, inner = self._stack.pop()
            self.seconds[row] += elapsed - inner
            self.calls[row] += 1
            if self._stack:
                self._stack[-1][1] += elapsed

    def wrap(self, function, row: str):
        @wraps(function)
        def timed(*args, **kwargs):
            with self.section(row):
                return function(*args, **kwargs)
        return timed

    @contextmanager
    def evaluation(self):
        """Rows timed inside here count as evaluation, not training."""
        previous, self.phase = self.phase, "eval"
        try:
            yield
        finally:
            self.phase = previous


def _resolve(module_name: str, path: str):
    import importlib

    owner = importlib.import_module(module_name)
    *parents, attribute = path.split(".")
    for name in parents:
        owner = getattr(owner, name)
    return owner, attribute


@contextmanager
def instrumented(timer: SectionTimer):
    """Every piece of :data:`PIECES` timed (class attributes patched, restored on exit)."""
    from tdd.evaluation import Evaluation

    with ExitStack() as stack:
        for module_name, path, row in PIECES:
            owner, attribute = _resolve(module_name, path)
            own = vars(owner).get(attribute)
            setattr(owner, attribute, timer.wrap(getattr(owner, attribute), row))
            if own is not None:
                stack.callback(setattr, owner, attribute, own)
            else:  # inherited: remove the override
                stack.callback(delattr, owner, attribute)
        evaluate, score = Evaluation.evaluate, Evaluation._score

        def timed_evaluate(self, *args, **kwargs):
            with timer.evaluation():
                return evaluate(self, *args, **kwargs)

        def timed_score(self, unet, sampler, setting, *args, **kwargs):
            start = time.perf_counter()
            try:
                return score(self, unet, sampler, setting, *args, **kwargs)
            finally:
                timer.settings[setting.name] = time.perf_counter() - start

        Evaluation.evaluate, Evaluation._score = timed_evaluate, timed_score
        stack.callback(setattr, Evaluation, "evaluate", evaluate)
        stack.callback(setattr, Evaluation, "_score", score)
        yield timer


def profile(overrides: list[str], steps: int, images: int, output_dir: str | Path) -> dict:
    """Run the main job with ``overrides`` for ``steps`` steps and ``images`` evaluation
    images; the time of every piece, measured and scaled to the configured job."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    import tdd.config  # noqa: F401  (the ${asset:...} resolver)

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        full = compose("config", overrides=overrides)
    job_steps, job_images = int(full.trainer.max_steps), int(full.evaluation.num_images)
    cfg = full.copy()
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.trainer.max_steps = steps
        cfg.evaluation.num_images = images
    sys.path.insert(0, str(CONF_DIR.parent))
    from run import train

    timer = SectionTimer()
    start, cpu = time.perf_counter(), time.process_time()
    with instrumented(timer):
        train(cfg)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    rows = dict(timer.seconds)
    rows["other"] = wall - sum(rows.values())
    factors = {"train": job_steps / steps, "eval": job_images / images}
    scaled = {k: v * factors.get(k.split("/")[0], 1.0) for k, v in rows.items()}
    return {
        "overrides": overrides, "steps": steps, "images": images, "threads":
        torch.get_num_threads(), "wall_s": wall, "cpu_s": cpu, "seconds": rows,
        "calls": dict(timer.calls), "eval_settings_s": timer.settings,
        "scaled_to": {"max_steps": job_steps, "num_images": job_images},
        "scaled_seconds": scaled, "scaled_wall_s": sum(scaled.values()),
    }


def table(report: dict) -> str:
    """Measured and scaled seconds per row, largest scaled first, with shares."""
    scaled, total = report["scaled_seconds"], report["scaled_wall_s"]
    lines = [f"{'piece':34s} {'measured s':>10s} {'scaled s':>9s} {'share':>6s}"]
    for row in sorted(scaled, key=scaled.get, reverse=True):
        lines.append(f"{row:34s} {report['seconds'][row]:10.2f} {scaled[row]:9.1f} "
                     f"{scaled[row] / total:6.1%}")
    lines.append(f"{'total':34s} {report['wall_s']:10.2f} {total:9.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tdd.bench profile",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps to run")
    parser.add_argument("--images", type=int, default=64, help="evaluation images per setting")
    parser.add_argument("--out", help="write the JSON here too")
    parser.add_argument("--dir", default="outputs/profile", help="the run's output directory")
    parser.add_argument("overrides", nargs="*", help="run.py overrides (key=value)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.images < 2:
        raise SystemExit("--steps must be >= 1 and --images >= 2 (FID needs 2 images)")
    report = profile(args.overrides, args.steps, args.images, args.dir)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    print(table(report), file=sys.stderr)
