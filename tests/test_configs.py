"""Every config option is instantiated; every strategy x guidance x student runs fast_dev_run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from hydra.errors import ConfigCompositionException

from run import train
from tdd.factory import build_recipe

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
STRATEGIES = ["tdd", "lcm", "tcd", "pcm"]
GUIDANCES = ["decoupled", "cfg", "w_embed", "none"]
STUDENTS = ["lora", "full"]
TINY = ["model=tiny", "data=dummy", "metrics=none"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["strategy", "guidance", "loss"])
def test_every_option_instantiates(make_cfg, group):
    for option in options(group):
        obj = hydra.utils.instantiate(make_cfg(f"{group}={option}")[group])
        assert obj.__class__.__module__.startswith("tdd.")


def source_overrides(tmp_path: Path) -> dict[str, list[str]]:
    """Generated files for the data options that read them."""
    from helpers_data import make_folder, shard_samples, write_shard

    make_folder(tmp_path / "folder", bad=False)
    write_shard(tmp_path / "shards" / "00000.tar", shard_samples(0, 8))
    return {"folder": [f"data.root={tmp_path / 'folder'}", "data.num_workers=0"],
            "webdataset": [f"data.urls={tmp_path / 'shards'}", "data.num_workers=0"]}


def test_every_student_data_trainer_callback_and_logger_instantiates(make_cfg, tiny_teacher,
                                                                      tmp_path):
    for option in options("student"):
        student = hydra.utils.instantiate(make_cfg(f"student={option}").student)
        assert student(unet=tiny_teacher.unet).trainable_state_dict()
    sources = source_overrides(tmp_path)
    for option in options("data"):
        cfg = make_cfg(f"data={option}", *sources.get(option, []))
        batch = next(iter(hydra.utils.instantiate(cfg.data).train_dataloader()))
        assert batch["pixel_values"].shape[1:] == (3, 32, 32) and len(batch["caption"])
    for option in options("trainer"):
        # GPU trainers are checked on CPU: only the device settings are swapped
        cpu = [] if torch.cuda.is_available() or "gpu" not in (CONF / "trainer" / f"{option}.yaml"
               ).read_text() else ["trainer.accelerator=cpu", "trainer.devices=1",
                                   "trainer.precision=32-true"]
        cfg = make_cfg(f"trainer={option}", *cpu)
        assert isinstance(hydra.utils.instantiate(cfg.trainer, logger=False), L.Trainer)
    for group in ("callbacks", "logger"):
        for option in options(group):
            cfg = make_cfg(f"{group}={option}")
            for entry in (cfg[group] or {}).values():
                assert hydra.utils.instantiate(entry) is not None


def test_model_options(make_cfg):
    assert hydra.utils.instantiate(make_cfg("model=tiny").model).resolution == 32
    for option in ("sd15", "sdxl"):
        with pytest.raises(ValueError, match="model.path is not set"):
            train(make_cfg(f"model={option}", "debug=fdr"))


@pytest.mark.parametrize("student", STUDENTS)
@pytest.mark.parametrize("guidance", GUIDANCES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fast_dev_run(make_cfg, strategy, guidance, student):
    cfg = make_cfg(f"strategy={strategy}", f"guidance={guidance}", f"student={student}",
                   "debug=fdr", "data.batch_size=2")
    if guidance == "w_embed" and student == "lora":
        with pytest.raises(ValueError, match="student=full"):
            train(cfg)
        return
    results = train(cfg)
    assert torch.isfinite(torch.tensor(results["train"]["train/loss"]))
    assert (Path(cfg.paths.output_dir) / "results.json").is_file()


@pytest.mark.parametrize(
    "override, setting",
    [
        ("strategy.k_min=9", "k_min"),
        ("strategy.eta_max=1.5", "eta_max"),
        ("strategy.window=-1", "window"),
        ("strategy=pcm strategy.num_phases=60", "num_phases"),
        ("guidance.empty_prompt_share=2", "empty_prompt_share"),
        ("ckpt_path=/nowhere.ckpt", "ckpt_path"),
    ],
)
def test_bad_settings_fail_before_any_model_loads(make_cfg, monkeypatch, override, setting):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the config was checked")

    monkeypatch.setattr("tdd.models.tiny.build_tiny", must_not_load)
    with pytest.raises((ValueError, FileNotFoundError), match=setting):
        train(make_cfg(*override.split(), "debug=fdr"))


def test_unknown_option_names_the_group(make_cfg):
    with pytest.raises(ConfigCompositionException, match="strategy"):
        make_cfg("strategy=dmd")


def test_lora_with_w_embed_is_a_config_error(make_cfg):
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        build_recipe(make_cfg("guidance=w_embed", "student=lora"))


@pytest.mark.parametrize("data", [
    ["data=dummy", "data.size=8"],  # an epoch is 2 steps: the resume starts a new one
    ["data=dummy", "data.size=16"],  # the resume lands mid-epoch
    ["data=shapes", "data.val_size=4"],  # the unlimited stream
], ids=["dummy-epoch-end", "dummy-mid-epoch", "shapes-stream"])
def test_resume_continues_the_same_run(make_cfg, tmp_path, data):
    """Stop after 2 steps, resume to 4: the same weights as 4 uninterrupted steps."""
    common = ["trainer=cpu", "logger=none", "data.batch_size=4", *data,
              "callbacks.checkpoint.every_n_train_steps=2", "student.rank=4", "student.alpha=4",
              "strategy=tcd", "trainer.deterministic=true"]
    straight = make_cfg(*common, "trainer.max_steps=4")
    train(straight)
    first = make_cfg(*common, "trainer.max_steps=2")
    first.paths.output_dir = str(tmp_path / "resumed")
    train(first)
    second = make_cfg(*common, "trainer.max_steps=4", "ckpt_path=last")
    second.paths.output_dir = str(tmp_path / "resumed")
    train(second)

    def weights(cfg):
        path = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        return torch.load(path, weights_only=False)["state_dict"]

    a, b = weights(straight), weights(second)
    assert a.keys() == b.keys() and all("lora_" in k for k in a)
    assert all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)


def test_multirun_sweeps_every_strategy(tmp_path):
    command = [sys.executable, "run.py", "-m", "strategy=tdd,lcm,tcd,pcm", "debug=fdr", *TINY,
               "data.batch_size=2", f"hydra.sweep.dir={tmp_path}",
               f"evaluation.cache_dir={tmp_path / 'cache' / 'fid'}"]  # a path: not in the names
    env = dict(os.environ, HYDRA_FULL_ERROR="1")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = sorted(tmp_path.glob("*/results.json"))
    targets = {json.loads(p.read_text())["config"]["strategy"]["_target_"] for p in results}
    assert len(results) == 4 and len(targets) == 4


#: Recipe groups the smoke run keeps exactly as the experiment file composes them.
RECIPE = ("strategy", "guidance", "student", "loss", "optimizer", "lr_scheduler", "sampler",
          "evaluation", "export", "module", "adversarial")


@pytest.mark.slow
@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_smoke_run(tmp_path, experiment):
    """Each published recipe runs as composed, with only what cannot run here swapped: the
    teacher (tiny, with two text encoders where the recipe's has them), the data (a generated
    folder through data=folder), the devices (one CPU, fp32) and the length (2 steps, at most
    2 accumulated micro-batches)."""
    from conftest import compose_defaults
    from helpers_data import make_folder

    recipe = compose_defaults([f"experiment={experiment}"], tmp_path)
    accumulate = min(int(recipe.trainer.get("accumulate_grad_batches", 1)), 2)
    # enough images for both steps in one epoch (an epoch end also steps the optimizer)
    make_folder(tmp_path / "data", good=2 * accumulate * recipe.data.batch_size)
    cfg = compose_defaults([
        f"experiment={experiment}", "logger=csv",
        "model=tiny", f"model.sdxl={recipe.model.dual_text_encoder}",
        "data=folder", f"data.root={tmp_path / 'data'}", "data.num_workers=0",
        "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true",
        "++trainer.strategy=auto", "trainer.max_steps=2",
        f"++trainer.accumulate_grad_batches={accumulate}"], tmp_path)
    for group in RECIPE:
        assert cfg.get(group) == recipe.get(group), group
    assert cfg.data.batch_size == recipe.data.batch_size
    results = train(cfg)
    assert torch.isfinite(torch.tensor(results["train"]["train/loss"]))
    assert results["timings"]["global_step"] == 2
    assert results["data"]["seen"] == 2 * accumulate * recipe.data.batch_size
    assert results["config"]["data"]["_target_"] == "tdd.data.folder.FolderDataModule"


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path):
    """The DDP code path (two gloo processes), launched the way users launch it."""
    command = [sys.executable, "run.py", "debug=default", "trainer=ddp_sim", "logger=none", *TINY,
               "trainer.max_steps=2", f"hydra.run.dir={tmp_path}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["timings"]["global_step"] == 2
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_shipped_defaults_are_the_toy_world(tmp_path):
    """`python run.py` with no overrides: the toy teacher, shapes data, toy metrics, W&B+CSV."""
    from conftest import compose_defaults

    cfg = compose_defaults([], tmp_path)
    assert cfg.model.path.endswith("assets/toy/pipeline")
    assert cfg.data._target_ == "tdd.data.shapes.ShapesDataModule"
    assert cfg.metrics._target_ == "tdd.metrics.toy.toy_metrics"
    assert set(cfg.logger) == {"csv", "wandb"} and cfg.logger.wandb.offline
    assert list(cfg.evaluation.teacher_steps) == [25, 4]  # the teacher's own 4-step row


def test_main_job_runs_one_batch_on_the_shipped_defaults(tmp_path):
    """The main job's composition end to end (fast_dev_run: one step, evaluation skipped)."""
    from conftest import compose_defaults

    cfg = compose_defaults(["strategy=tdd", "guidance=decoupled", "debug=fdr", "logger=csv",
                            "data.batch_size=4"], tmp_path)
    results = train(cfg)
    assert torch.isfinite(torch.tensor(results["train"]["train/loss"]))
    assert (tmp_path / "results.json").is_file()
