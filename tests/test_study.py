"""The study runner: what it plans, and a tiny study stopped twice and completed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tdd.study import Study, loss_curve, main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny", "data=shapes", "logger=csv", "trainer=cpu", "data.batch_size=2",
        "student.rank=4", "student.alpha=4", "export.enabled=false",
        "trainer.log_every_n_steps=1", "evaluation.num_images=4", "evaluation.batch_size=4",
        "evaluation.teacher_steps=[]", "evaluation.steps=[2]", "evaluation.guidance_scales=[1.0]"]


def write_study(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "study.yaml").write_text(text)
    return folder


STUDY = """
seeds: [0, 1]
common: [logger=csv]
train: [metrics=none]
arms:
  a: [strategy=tcd]
  b: [strategy=lcm]
evaluations:
  curve: {steps: [2, 4], overrides: [evaluation.num_images=8]}
  final: {steps: [4], arms: [b], seeds: [1], overrides: [evaluation.num_images=16]}
"""


def test_runs_go_seed_by_seed_each_training_before_its_evaluations(tmp_path):
    study = Study(write_study(tmp_path / "s", STUDY), tmp_path / "runs")
    names = [f"{r.arm}/{r.seed}/{r.name}" for r in study.runs()]
    assert names == [
        "a/0/train", "a/0/curve_step000002", "a/0/curve_step000004",
        "b/0/train", "b/0/curve_step000002", "b/0/curve_step000004",
        "a/1/train", "a/1/curve_step000002", "a/1/curve_step000004",
        "b/1/train", "b/1/curve_step000002", "b/1/curve_step000004", "b/1/final_step000004"]
    train = study.runs()[0]
    command = study.command(train)
    assert command[1] == str(ROOT / "run.py")
    # the arm, seed and study settings, checkpoints at every evaluated step, kept
    assert command[2:] == ["logger=csv", "strategy=tcd", "seed=0",
                           "callbacks.checkpoint.save_top_k=-1",
                           "callbacks.checkpoint.every_n_train_steps=2", "metrics=none",
                           f"hydra.run.dir={tmp_path / 'runs' / 's' / 'a' / 'seed0' / 'train'}"]
    final = study.runs()[-1]
    command = study.command(final)
    assert "metrics=none" not in command  # training-only settings stay out of evaluations
    assert command[-4:-2] == ["evaluation.num_images=16", "trainer.max_steps=4"]
    link = tmp_path / "runs" / "s" / "b" / "seed1" / "links" / "step000004.ckpt"
    assert command[-1] == f"ckpt_path={link}"  # outside checkpoints/: scored, not resumed into
    assert final.result == tmp_path / "s" / "results" / "b" / "seed1" / "final_step000004.json"


def test_an_interrupted_training_is_resumed_from_its_own_directory(tmp_path):
    study = Study(write_study(tmp_path / "s", STUDY), tmp_path / "runs")
    train = study.runs()[0]
    assert not any(c.startswith("ckpt_path=") for c in study.command(train))
    (train.directory / "checkpoints").mkdir(parents=True)
    (train.directory / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert train.partial and study.command(train)[-1] == f"ckpt_path={train.directory}"
    assert "partial  a/seed0/train" in study.status()


@pytest.mark.parametrize("text, message", [
    ("arms: {}\n", "`arms` must map"),
    ("arms: {a: [strategy=tcd]}\nsteps: 3\n", "unknown keys ['steps']"),
    ("arms: {a: [strategy]}\n", "overrides are `key=value`"),
    ("arms: {a: []}\nevaluations: {e: {overrides: []}}\n", "needs `steps`"),
    ("arms: {a: []}\nevaluations: {e: {steps: [2], arms: [z]}}\n", "the study's arms are"),
    ("arms: {a: []}\nevaluations: {e: {steps: [2], every: 3}}\n", "unknown evaluation keys"),
    ("arms: {a: []}\ntrain: [callbacks.checkpoint.every_n_train_steps=4]\n"
     "evaluations: {e: {steps: [6]}}\n", "need a checkpoint every 6"),
    ("arms: {a: []}\nevaluations: {e: {steps: {z: [2]}}}\n", "names arms ['z']"),
    ("arms: {a: []}\nevaluations: {e: {steps: {a: [0]}}}\n", "`evaluations.e.steps` must be"),
])
def test_a_bad_study_file_names_the_key(tmp_path, text, message):
    folder = write_study(tmp_path / "s", text)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Study(folder, tmp_path / "runs").runs()


def test_per_arm_steps_evaluate_each_arm_at_its_own_length(tmp_path):
    """Arms trained for different lengths (e.g. equal student updates) share one evaluation
    name, each scored at its own step; an arm the mapping leaves out is not evaluated."""
    text = ("seeds: [0]\narms: {short: [trainer.max_steps=6], long: [trainer.max_steps=12],"
            " other: []}\nevaluations: {final: {steps: {short: [6], long: [12]}}}\n")
    study = Study(write_study(tmp_path / "s", text), tmp_path / "runs")
    names = [f"{r.arm}/{r.name}" for r in study.runs()]
    assert names == ["short/train", "short/final_step000006", "long/train",
                     "long/final_step000012", "other/train"]
    assert study.checkpoint_every == 6
    final = study.runs()[3]
    assert final.checkpoint.name == "step000012.ckpt"
    assert "trainer.max_steps=12" in study.command(final)


def test_arm_and_evaluation_filters_are_checked(tmp_path):
    study = Study(write_study(tmp_path / "s", STUDY), tmp_path / "runs")
    with pytest.raises(ValueError, match="the study's arms are"):
        study.run(arms=["z"])
    with pytest.raises(ValueError, match=r"the study's evaluations are \['curve', 'final'\]"):
        study.run(evaluations=["fianl"])


def test_an_evaluation_filter_trains_only_what_those_evaluations_score(tmp_path, monkeypatch):
    """--evaluation final: `final` scores b at seed 1 only, so only b/seed1 is trained."""
    script = tmp_path / "fake_run.py"
    script.write_text(FAKE_RUN)
    started = []

    def command(self, run):
        started.append(f"{run.arm}/seed{run.seed}/{run.name}")
        return [sys.executable, str(script), str(run.directory), "2,4", "0"]

    monkeypatch.setattr(Study, "command", command)
    study = Study(write_study(tmp_path / "s", STUDY), tmp_path / "runs")
    assert study.run(evaluations=["final"], log=lambda m: None) == 0
    assert started == ["b/seed1/train", "b/seed1/final_step000004"]
    started.clear()
    assert study.run(evaluations=["curve"], arms=["a"], log=lambda m: None) == 0
    assert started == ["a/seed0/train", "a/seed0/curve_step000002", "a/seed0/curve_step000004",
                       "a/seed1/train", "a/seed1/curve_step000002", "a/seed1/curve_step000004"]


def test_no_study_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no study.yaml"):
        Study(tmp_path)


def test_loss_curve_reads_the_csv_log(tmp_path):
    log = tmp_path / "csv" / "version_0" / "metrics.csv"
    log.parent.mkdir(parents=True)
    log.write_text("epoch,step,train/loss,val/fid@4,val/teacher@4,lr\n0,0,0.5,,,1\n"
                   "0,1,0.25,,,1\n0,1,,30.5,False,\n")  # a logged flag is no curve
    assert loss_curve(tmp_path) == {"train/loss": [[0, 0.5], [1, 0.25]], "val/fid@4": [[1, 30.5]]}


TINY_STUDY = """
seeds: [0]
common: {common}
train: [metrics=none, trainer.max_steps=6, callbacks.checkpoint.every_n_train_steps=2,
        callbacks.progress.every_n_steps=1, callbacks.progress.only_without_terminal=false]
arms:
  tcd: [strategy=tcd]
  lcm: [strategy=lcm]
evaluations:
  final: {{steps: [6], overrides: [metrics=toy]}}
"""


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _runner(folder: Path, runs: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    return subprocess.Popen(
        [sys.executable, "-m", "tdd.study", "run", str(folder), "--runs-dir", str(runs)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)


@pytest.mark.slow  # six process starts: about 1.5 min on an idle 2-core machine
def test_a_study_stopped_mid_way_completes_without_rerunning_finished_runs(tmp_path):
    folder = write_study(tmp_path / "study", TINY_STUDY.format(common=json.dumps(TINY)))
    runs = tmp_path / "runs"
    # first call: the first arm only (trained and scored), as if stopped between runs
    assert main(["run", str(folder), "--runs-dir", str(runs), "--max-runs", "2"]) == 0
    first = folder / "results" / "tcd" / "seed0"
    done = _files(first)
    assert sorted(done) == ["final_step000006.json", "final_step000006.npz",
                            "final_step000006/2.png", "train.json"]
    final = json.loads(done["final_step000006.json"])
    assert final["arm"] == "tcd" and final["step"] == 6 and final["eval"] == "final"
    assert "strategy=tcd" in final["overrides"] and final["metrics"]["2"]["fid"] > 0
    assert [s for s, _ in json.loads(done["train.json"])["curve"]["train/loss"]] == list(range(6))

    # second call: stopped (SIGTERM) while the second arm trains, after its step-2 checkpoint
    process = _runner(folder, runs)
    checkpoint = runs / "study" / "lcm" / "seed0" / "train" / "checkpoints" / "step000002.ckpt"
    deadline = time.monotonic() + 300
    last = checkpoint.with_name("last.ckpt")
    while not (checkpoint.is_file() and last.is_file()) and time.monotonic() < deadline:
        if process.poll() is not None:
            break
        time.sleep(0.2)
    assert checkpoint.is_file() and last.is_file(), process.communicate()[0][-3000:]
    process.send_signal(signal.SIGTERM)  # to the runner alone: it passes the signal on
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "stopped lcm/seed0/train on signal" in output
    assert torch.load(last, weights_only=False)["global_step"] >= 2  # saved on the signal
    assert not (folder / "results" / "lcm").exists()

    # third call: the second arm resumes from its own checkpoint; the first is not rerun
    process = _runner(folder, runs)
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output[-3000:]
    assert "run tcd/" not in output and "run lcm/seed0/train" in output
    assert _files(first) == done
    trained = runs / "study" / "lcm" / "seed0" / "train"
    assert list((trained / ".hydra").glob("resume-*/config.yaml"))  # resumed, not restarted
    assert (folder / "results" / "lcm" / "seed0" / "final_step000006.json").is_file()
    assert "4 done, 0 partial, 0 failed, 0 pending" in Study(folder, runs).status()


def test_a_failed_run_is_recorded_and_never_becomes_a_result(tmp_path):
    folder = write_study(tmp_path / "s", "common: " + json.dumps(TINY) + "\n"
                         "arms: {bad: [strategy=tcd, student.rank=0, trainer.max_steps=2]}\n")
    assert main(["run", str(folder), "--runs-dir", str(tmp_path / "runs")]) == 1
    failure = folder / "results" / "bad" / "seed0" / "train.failed.txt"
    assert "student.rank=0" in failure.read_text() and "exit status 1" in failure.read_text()
    assert not (folder / "results" / "bad" / "seed0" / "train.json").exists()
    assert "failed   bad/seed0/train" in Study(folder, tmp_path / "runs").status()


STUDIES = sorted((ROOT / "experiments").glob("*/study.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=[p.parent.name for p in STUDIES])
def test_every_committed_study_composes_and_builds_each_run(path, tmp_path):
    """Every run of every committed study is a valid run.py command: its config composes
    with the shipped defaults, its recipe and evaluation settings instantiate."""
    import hydra
    from conftest import compose_defaults

    from tdd.factory import build_recipe

    study = Study(path.parent, tmp_path)
    runs = study.runs()
    assert runs and {r.arm for r in runs} == set(study.arms)
    for run in (r for r in runs if r.seed == study.seeds[0]):  # seeds differ by seed= only
        assert f"seed={run.seed}" in run.overrides
        cfg = compose_defaults(run.overrides, tmp_path)
        build_recipe(cfg)
        hydra.utils.instantiate(cfg.evaluation)
        if run.evaluation is not None:
            assert run.step % study.checkpoint_every == 0 and cfg.trainer.max_steps == run.step


FAKE_RUN = """
import json, os, sys, time
from pathlib import Path
directory, steps, nap = Path(sys.argv[1]), sys.argv[2].split(","), float(sys.argv[3])
begin = time.time()
time.sleep(nap)
for step in steps:  # a training saves the checkpoints its evaluations score
    (directory / "checkpoints").mkdir(exist_ok=True)
    (directory / "checkpoints" / f"step{int(step):06d}.ckpt").write_text("")
(directory / "results.json").write_text(json.dumps({
    "begin": begin, "end": time.time(), "threads": os.environ.get("OMP_NUM_THREADS"),
    "config": {"trainer": {"max_steps": 4}}}))
"""


def test_jobs_run_in_parallel_and_an_evaluation_waits_for_its_training(tmp_path, monkeypatch):
    """--jobs 2: the two arms' trainings overlap, each evaluation starts after its training
    ended, each run gets cores / 2 threads; the collected results are those of --jobs 1."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    script = tmp_path / "fake_run.py"
    script.write_text(FAKE_RUN)
    folder = write_study(tmp_path / "study", STUDY.replace("seeds: [0, 1]", "seeds: [0]"))

    def command(self, run):
        nap = "1.0" if run.evaluation is None else "0.1"
        return [sys.executable, str(script), str(run.directory), "2,4", nap]

    monkeypatch.setattr(Study, "command", command)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    study = Study(folder, tmp_path / "runs")
    assert study.run(jobs=2, log=lambda m: None) == 0
    results = {f"{r.arm}/{r.name}": json.loads(r.result.read_text()) for r in study.runs()}
    assert sorted(results) == ["a/curve_step000002", "a/curve_step000004", "a/train",
                               "b/curve_step000002", "b/curve_step000004", "b/train"]
    a, b = results["a/train"], results["b/train"]
    assert a["begin"] < b["end"] and b["begin"] < a["end"]  # the trainings overlapped
    for name, result in results.items():
        arm, _ = name.split("/")
        if name.endswith("train"):
            continue
        assert result["begin"] >= results[f"{arm}/train"]["end"]
    assert {r["threads"] for r in results.values()} == {"2"}
    with pytest.raises(ValueError, match="--jobs 0"):
        study.run(jobs=0)


SHARED = """
seeds: [0]
common: [logger=csv]
arms:
  base: [strategy=tdd]
  {other}: [strategy=tdd, {override}]
evaluations:
  {evaluation}: {{steps: [4]}}
"""


def test_a_training_two_studies_share_is_trained_once(tmp_path, monkeypatch):
    """Two studies with an arm of the very same overrides: the second study collects the
    first one's training and scores its checkpoints, training only its own other arm; a
    training another runner holds (live lock) is left alone."""
    script = tmp_path / "fake_run.py"
    script.write_text(FAKE_RUN)
    started = []

    def command(self, run):
        started.append((self.folder.name, run.arm, run.name))
        return [sys.executable, str(script), str(run.directory), "4", "0"]

    monkeypatch.setattr(Study, "command", command)
    runs = tmp_path / "runs"
    first = write_study(tmp_path / "first", SHARED.format(other="window0", override="a=1",
                                                          evaluation="final"))
    second = write_study(tmp_path / "second", SHARED.format(other="eta0", override="b=2",
                                                            evaluation="score"))
    assert Study(first, runs).run(log=lambda m: None) == 0
    assert Study(second, runs).run(log=lambda m: None) == 0
    assert started == [("first", "base", "train"), ("first", "base", "final_step000004"),
                       ("first", "window0", "train"), ("first", "window0", "final_step000004"),
                       ("second", "base", "score_step000004"), ("second", "eta0", "train"),
                       ("second", "eta0", "score_step000004")]
    shared = json.loads((second / "results" / "base" / "seed0" / "train.json").read_text())
    assert shared["overrides"] == json.loads(
        (first / "results" / "base" / "seed0" / "train.json").read_text())["overrides"]
    link = runs / "second" / "base" / "seed0" / "links" / "step000004.ckpt"
    assert link.resolve() == runs / "first" / "base" / "seed0" / "train" / "checkpoints" / \
        "step000004.ckpt"

    third = write_study(tmp_path / "third", SHARED.format(other="k2", override="c=3",
                                                          evaluation="final"))
    (runs / "third" / "k2" / "seed0" / "train").mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (runs / "third" / "k2" / "seed0" / "train" / "study.lock").write_text(f"{sleeper.pid}")
        messages = []
        Study(third, runs).run(log=messages.append)
        assert any(m.startswith("busy k2/seed0/train") for m in messages)
        assert ("third", "k2", "train") not in started
    finally:
        sleeper.kill()
