"""Stopping and resuming as users do it: run directories, signals, checkpoints, logs, SLURM."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from run import train
from tdd.callbacks import Checkpoint, Interrupted, ProgressLog
from tdd.guidance import DecoupledGuidance
from tdd.loggers import AppendingCSVLogger, WandbLogger
from tdd.models.students import FullStudent, LoRAStudent
from tdd.models.tiny import build_tiny
from tdd.module import CheckpointMismatch, DistillationModule
from tdd.strategies import LCMTarget, TCDTarget

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny", "data=dummy", "metrics=none", "logger=csv"]
COMMON = ["trainer=cpu", "data.batch_size=2", "data.size=64", "student.rank=4", "student.alpha=4",
          "strategy=tcd", "trainer.deterministic=true", "trainer.log_every_n_steps=1"]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_resume_into_the_run_directory(make_cfg, tmp_path):
    """A resume from a file in a run's checkpoints/ writes into that run: one last.ckpt, CSV
    rows appended, results.json rewritten with the timings of both segments, new lr applied."""
    run, elsewhere = tmp_path / "run", tmp_path / "new"
    first = make_cfg(*COMMON, "trainer.max_steps=2", "callbacks.checkpoint.every_n_train_steps=2",
                     "callbacks.checkpoint.save_top_k=-1")
    first.paths.output_dir = str(run)
    train(first)
    seconds_first = json.loads((run / "results.json").read_text())["timings"]["seconds"]
    step2 = run / "checkpoints" / "step000002.ckpt"  # no `=`: ckpt_path=<file> as typed
    second = make_cfg(*COMMON, "trainer.max_steps=4", "callbacks.checkpoint.every_n_train_steps=2",
                      "callbacks.checkpoint.save_top_k=-1", f"ckpt_path={step2}",
                      "optimizer.lr=5e-5")
    second.paths.output_dir = str(elsewhere)
    results = train(second)

    assert not elsewhere.exists()
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step000002.ckpt", "step000004.ckpt"]
    last = load(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4
    # the new optimizer.lr ran, and the recorded config says so
    assert last["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(5e-5)
    saved = json.loads((run / "results.json").read_text())
    assert saved["config"]["optimizer"]["lr"] == pytest.approx(5e-5)
    assert saved["timings"]["global_step"] == 4 and results["checkpoint"].endswith("last.ckpt")
    segments = saved["timings"]["segments"]
    assert [s["steps"] for s in segments] == [[0, 2], [2, 4]]
    assert saved["timings"]["seconds"] == pytest.approx(sum(s["seconds"] for s in segments))
    assert saved["timings"]["seconds"] > seconds_first
    with open(run / "csv" / "metrics.csv") as file:
        steps = [int(row["step"]) for row in csv.DictReader(file) if row.get("train/loss")]
    assert steps == [0, 1, 2, 3]


def test_export_reads_a_checkpoint_by_its_plain_name(make_cfg, tmp_path):
    from tdd.export import main as export_main

    cfg = make_cfg(*COMMON, "trainer.max_steps=2", "callbacks.checkpoint.every_n_train_steps=1",
                   "callbacks.checkpoint.save_top_k=-1", "export.enabled=false")
    train(cfg)
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")
    export_main([str(tmp_path), "--checkpoint", "step000001"])
    assert (tmp_path / "export-step000001" / "pytorch_lora_weights.safetensors").is_file()


def _module(student, guidance=None, strategy=None):
    return DistillationModule(build_tiny(), student, strategy or TCDTarget(),
                              guidance or DecoupledGuidance(), torch.nn.functional.mse_loss,
                              partial(torch.optim.AdamW, lr=1e-4))


def _saved(module) -> dict:
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    return checkpoint


@pytest.mark.parametrize("other, named", [
    (partial(LoRAStudent, rank=8, alpha=8), "student.rank"),
    (partial(FullStudent), "'LoRAStudent' in the checkpoint, 'FullStudent' now"),
])
def test_resume_with_another_student_fails_with_the_difference(other, named):
    checkpoint = _saved(_module(partial(LoRAStudent, rank=4, alpha=4)))
    with pytest.raises(CheckpointMismatch, match=named):
        _module(other).on_load_checkpoint(checkpoint)


def test_a_checkpoint_missing_trainable_tensors_is_refused():
    module = _module(partial(LoRAStudent, rank=4, alpha=4))
    checkpoint = _saved(module)
    dropped = sorted(checkpoint["state_dict"])[0]
    del checkpoint["state_dict"][dropped]
    with pytest.raises(CheckpointMismatch, match="1 trainable tensors of this model are missing"):
        module.on_load_checkpoint(checkpoint)
    other = _saved(_module(partial(LoRAStudent, rank=4, alpha=4), strategy=LCMTarget()))
    module.on_load_checkpoint(other)  # same tensors: another strategy is the user's choice


def test_resume_with_another_recipe_names_the_settings_before_loading(make_cfg, tmp_path,
                                                                    monkeypatch):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 2}, run / "checkpoints" / "last.ckpt")
    (run / ".hydra").mkdir()
    OmegaConf.save(make_cfg(*COMMON), run / ".hydra" / "config.yaml")
    (run / ".hydra" / "overrides.yaml").write_text("- strategy=tcd\n- student.rank=4\n")
    monkeypatch.setattr("tdd.models.tiny.build_tiny", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ValueError, match=r"student.rank: 4 in the run, 8 now") as error:
        train(make_cfg(*COMMON, "student.rank=8", f"ckpt_path={run}"))
    assert f"python run.py strategy=tcd student.rank=4 ckpt_path={run}" in str(error.value)


def test_a_corrupt_checkpoint_is_named_with_the_newest_intact_one(make_cfg, tmp_path,
                                                                 monkeypatch):
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save({"global_step": 1}, checkpoints / "step000001.ckpt")
    torch.save({"global_step": 2}, checkpoints / "step000002.ckpt")
    (checkpoints / "last.ckpt").write_bytes(b"PK\x03\x04 cut off by a kill")
    os.utime(checkpoints / "step000001.ckpt", (time.time() - 60,) * 2)
    monkeypatch.setattr("tdd.models.tiny.build_tiny", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ValueError, match="step000002.ckpt") as error:
        train(make_cfg(f"ckpt_path={tmp_path / 'run'}"))
    assert f"{checkpoints / 'last.ckpt'} is unreadable" in str(error.value)
    with pytest.raises(FileNotFoundError, match="pass the run directory"):
        train(make_cfg("ckpt_path=last"))


def test_a_non_finite_state_is_never_checkpointed(tmp_path):
    callback = Checkpoint(dirpath=tmp_path)
    poisoned = torch.nn.Linear(2, 2)
    with torch.no_grad():
        poisoned.weight[0, 0] = float("nan")
    trainer = SimpleNamespace(lightning_module=poisoned, global_step=3)
    with pytest.warns(UserWarning, match="not finite"):
        callback._save_checkpoint(trainer, str(tmp_path / "last.ckpt"))
    assert not list(tmp_path.iterdir()) and callback.last_saved_step is None


def test_non_finite_loss_says_which_checkpoint_exists(make_cfg, monkeypatch):
    calls = iter(range(100))

    def diverging(pred, target):  # finite for two steps, then NaN
        loss = ((pred - target) ** 2).flatten(1).mean(1)
        return loss * float("nan") if next(calls) >= 2 else loss

    monkeypatch.setattr("tdd.losses.PseudoHuberLoss.__call__", lambda self, p, t: diverging(p, t))
    cfg = make_cfg(*COMMON, "trainer.max_steps=5", "callbacks.checkpoint.every_n_train_steps=1")
    with pytest.raises(FloatingPointError, match=r"newest checkpoint is .*last.ckpt \(step 2\)"):
        train(cfg)
    assert load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")["global_step"] == 2
    module = _module(partial(LoRAStudent, rank=4, alpha=4))
    with pytest.raises(FloatingPointError, match="no checkpoint was saved"):
        module.log_loss(torch.tensor([float("nan")]), torch.tensor([10]))


class SendSignal(L.Callback):
    """Sends ``signum`` to this process after ``step`` steps (as a scheduler would)."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("name", ["SIGINT", "SIGUSR1"])
def test_sigint_and_sigusr1_checkpoint_and_exit_non_zero(make_cfg, tmp_path, capsys, name):
    signum = getattr(signal, name)
    cfg = make_cfg(*COMMON, "trainer.max_steps=50", "callbacks.checkpoint.every_n_train_steps=40")
    OmegaConf.update(cfg, "callbacks.signal", {"_target_": "test_resume.SendSignal",
                                               "signum": int(signum), "step": 2}, force_add=True)
    with pytest.raises(Interrupted) as stop:
        train(cfg)
    assert stop.value.code == 128 + signum
    assert load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert f"{name}: stopped at step 2" in capsys.readouterr().out
    assert signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL)


def _start(args: list[str], run_dir: Path, env: dict | None = None) -> subprocess.Popen:
    command = [sys.executable, "run.py", *TINY, *COMMON, *args, f"hydra.run.dir={run_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), **(env or {}))
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(process: subprocess.Popen, text: str, seconds: float = 300) -> list[str]:
    lines, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        lines.append(line)
        if text in line:
            return lines
    process.kill()
    raise AssertionError(f"no {text!r} in the output:\n{''.join(lines)[-3000:]}")


def test_sigterm_checkpoints_and_exits_non_zero_with_the_resume_command(tmp_path):
    process = _start(["trainer.max_steps=100000", "callbacks.progress.every_n_steps=1"], tmp_path)
    _wait_for(process, "step 2/")
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    step = load(tmp_path / "checkpoints" / "last.ckpt")["global_step"]
    assert step >= 2 and f"SIGTERM: stopped at step {step}" in output
    assert "resume with: python run.py model=tiny" in output and f"ckpt_path={tmp_path}" in output
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow  # two process starts and 8 + 8 steps
def test_sigkill_resumes_from_the_last_periodic_checkpoint_with_the_same_weights(make_cfg,
                                                                                 tmp_path):
    steps = ["trainer.max_steps=8", "callbacks.checkpoint.every_n_train_steps=2"]
    killed = tmp_path / "killed"
    process = _start([*steps, "callbacks.progress.every_n_steps=1"], killed)
    _wait_for(process, "step 3/")
    process.kill()
    process.wait(timeout=60)
    at = load(killed / "checkpoints" / "last.ckpt")["global_step"]
    assert at % 2 == 0 and 2 <= at < 8
    resumed = subprocess.run(
        [sys.executable, "run.py", *TINY, *COMMON, *steps, f"ckpt_path={killed}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert list((killed / ".hydra").glob("resume-*/config.yaml"))  # the resume's own config
    straight = make_cfg(*COMMON, *steps)
    train(straight)
    a = load(tmp_path / "checkpoints" / "last.ckpt")
    b = load(killed / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 8
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.allclose(a["state_dict"][k], b["state_dict"][k], atol=1e-6)
               for k in a["state_dict"])


def test_loggers_continue_the_run(tmp_path):
    ids = {WandbLogger(save_dir=str(tmp_path), offline=True)._wandb_init["id"] for _ in range(2)}
    assert len(ids) == 1 and (tmp_path / "wandb_run_id").is_file()
    assert WandbLogger(save_dir=str(tmp_path), offline=True)._wandb_init["resume"] == "allow"
    for step in (0, 1):
        logger = AppendingCSVLogger(save_dir=str(tmp_path), name="csv", version="")
        logger.log_metrics({"train/loss": 1.0 + step}, step=step)
        logger.finalize("success")
    with open(tmp_path / "csv" / "metrics.csv") as file:
        assert [row["step"] for row in csv.DictReader(file)] == ["0", "1"]


def test_progress_lines_without_a_terminal(capsys):
    progress = ProgressLog(every_n_steps=2)
    trainer = SimpleNamespace(global_step=0, max_steps=10, is_global_zero=True,
                              callback_metrics={"train/loss": torch.tensor(0.5)})
    progress.on_train_start(trainer, None)
    for step in (1, 2, 3, 4):
        trainer.global_step = step
        progress.on_train_batch_end(trainer, None, None, None, step)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["2/10", "4/10"]
    assert "loss 0.5000" in lines[0] and "it/s" in lines[0] and "ETA" in lines[0]


def _hydra_config(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def test_slurm_launcher_composes():
    cfg = _hydra_config(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
                         "hydra.launcher.partition=gpu"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.tasks_per_node == launcher.gpus_per_node == 4
    assert launcher.partition == "gpu" and launcher.timeout_min > 0
    assert launcher.additional_parameters.signal.startswith("USR1@")


def test_hydra_writes_a_resume_into_the_run_directory(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("{}\n")
    resumed = _hydra_config([f"ckpt_path={tmp_path}"]).hydra
    assert resumed.run.dir == str(tmp_path)
    assert resumed.output_subdir.startswith(".hydra/resume-")
    fresh = _hydra_config([]).hydra
    assert fresh.run.dir.startswith("outputs/distill/") and fresh.output_subdir == ".hydra"


def test_scoring_a_finished_checkpoint_writes_a_new_directory_and_keeps_the_run(make_cfg,
                                                                                tmp_path):
    """ckpt_path=<a file in a run's checkpoints/> at trainer.max_steps trains nothing: its
    scores go to this invocation's own directory, and the run's results.json is kept."""
    run, elsewhere = tmp_path / "run", tmp_path / "scored"
    first = make_cfg(*COMMON, "trainer.max_steps=2", "callbacks.checkpoint.every_n_train_steps=2",
                     "callbacks.checkpoint.save_top_k=-1")
    first.paths.output_dir = str(run)
    train(first)
    kept = (run / "results.json").read_bytes()
    step2 = run / "checkpoints" / "step000002.ckpt"
    again = make_cfg(*COMMON, "trainer.max_steps=2", f"ckpt_path={step2}")
    again.paths.output_dir = str(elsewhere)
    results = train(again)
    assert (run / "results.json").read_bytes() == kept
    assert json.loads((elsewhere / "results.json").read_text())["timings"] == results["timings"]
    for ckpt_path in (step2, run):  # the file, or the run directory (its last.ckpt)
        assert _hydra_config([f"ckpt_path={ckpt_path}", "trainer.max_steps=2"]
                             ).hydra.run.dir.startswith("outputs/distill/")
        assert _hydra_config([f"ckpt_path={ckpt_path}", "trainer.max_steps=4"]
                             ).hydra.run.dir == str(run)  # steps left: resumed into the run
