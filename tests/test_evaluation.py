"""Evaluation end to end on the tiny teacher: results.json, CSV and the W&B run agree."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from helpers_wandb import read_history
from omegaconf import open_dict

from run import train
from tdd.evaluation import Setting, read_per_image, summary_table


def test_setting_names():
    assert Setting(4).name == "4"
    assert Setting(4, 1.7).name == "4_g1.7"
    assert Setting(6, 1.0, 0.5).name == "6_eta0.5"
    assert Setting(25, 4.5, teacher=True).name == "teacher25"


def test_run_logs_the_same_numbers_everywhere(make_cfg):
    cfg = make_cfg("trainer=cpu", "trainer.max_steps=2", "logger=default", "data.batch_size=2",
                   "callbacks=none", "student.rank=4", "student.alpha=4",
                   "evaluation.steps=[2,4]", "evaluation.teacher_steps=[3]",
                   "evaluation.num_images=4")  # decoupled: evaluated at g = 1 and 1.7
    with open_dict(cfg):
        cfg.metrics = {"_target_": "helpers_metrics.tiny_suite"}
    results = train(cfg)
    out = Path(cfg.paths.output_dir)
    saved = json.loads((out / "results.json").read_text())
    rows = saved["metrics"]
    assert set(rows) == {"teacher3", "2", "4", "2_g1.7", "4_g1.7"}
    assert rows["4"]["nfe"] == 4 and rows["4_g1.7"]["nfe"] == 8 and rows["teacher3"]["nfe"] == 6
    assert rows["teacher3"]["guidance_scale"] == pytest.approx(4.5)  # 1 + w of decoupled
    assert "fid_teacher" in rows["4"] and "fid_teacher" not in rows["teacher3"]
    assert all(Path(row["grid"]).is_file() for row in rows.values())
    assert results["metrics"] == rows
    assert Path(saved["export"]).is_file()

    expected = {f"val/{k}@{name}": v for name, row in rows.items() for k, v in row.items()
                if isinstance(v, float) and not isinstance(v, bool)}
    text = (out / "csv" / "metrics.csv").read_text()
    logged = [r for r in csv.DictReader(text.splitlines()) if r.get("val/fid@4")]
    assert len(logged) == 1, text[:2000]
    for key, value in expected.items():
        assert float(logged[0][key]) == pytest.approx(value, rel=1e-6), key
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    history = [row for row in read_history(run_dir) if "val/fid@4" in row]
    assert len(history) == 1
    for key, value in expected.items():
        assert history[0][key] == pytest.approx(value, rel=1e-6), key
    assert "fid" in summary_table(rows) and "teacher3" in summary_table(rows)


@pytest.mark.parametrize("module", ["dummy", "shapes"])
def test_evaluation_sets_are_fixed_and_held_out(make_cfg, module):
    import hydra
    import torch

    data = hydra.utils.instantiate(make_cfg(f"data={module}").data)
    prompts, images = data.evaluation_set(6)
    again_prompts, again = data.evaluation_set(6)
    assert len(prompts) == 6 and images.shape == (6, 3, 32, 32)
    assert prompts == again_prompts and torch.equal(images, again)
    assert images.min() >= 0 and images.max() <= 1
    train = next(iter(data.train_dataloader()))["pixel_values"] * 0.5 + 0.5
    assert not any(torch.allclose(train[0], image) for image in images)


def test_every_n_steps_etas_guidance_scales_and_teacher_scale(make_cfg):
    """Rows and keys as configured; the teacher row is sampled at the configured scale; the
    evaluation also runs every 2 steps."""
    import hydra
    import torch

    from tdd.models.tiny import build_tiny
    from tdd.sampling import DDIMSampler, generate

    cfg = make_cfg("trainer=cpu", "trainer.max_steps=4", "logger=csv", "data.batch_size=2",
                   "callbacks=none", "student.rank=4", "student.alpha=4", "export.enabled=false",
                   "evaluation.steps=[2]", "evaluation.teacher_steps=[3]",
                   "evaluation.num_images=4", "evaluation.every_n_steps=2",
                   "evaluation.etas=[null,0.5]", "evaluation.guidance_scales=[1.0,2.0]",
                   "evaluation.teacher_guidance_scale=3.0", "evaluation.bootstrap_draws=30")
    with open_dict(cfg):
        cfg.metrics = {"_target_": "helpers_metrics.tiny_suite"}
    rows = train(cfg)["metrics"]
    assert set(rows) == {"teacher3", "2", "2_eta0.5", "2_g2", "2_g2_eta0.5"}
    assert [rows[n]["eta"] for n in ("2", "2_eta0.5", "2_g2", "2_g2_eta0.5")] == [
        pytest.approx(cfg.sampler.eta), 0.5, pytest.approx(cfg.sampler.eta), 0.5]
    assert [rows[n]["nfe"] for n in ("2", "2_g2", "teacher3")] == [2, 4, 6]
    assert rows["2_g2"]["guidance_scale"] == 2.0 and rows["teacher3"]["guidance_scale"] == 3.0
    assert len({rows[n]["brightness"] for n in ("2", "2_eta0.5", "2_g2")}) == 3
    # the teacher row is the tiny teacher's DDIM at g = 3 on the evaluation prompts and seeds
    prompts, _ = hydra.utils.instantiate(cfg.data).evaluation_set(4)
    teacher = build_tiny()
    images = generate(teacher.unet, teacher, DDIMSampler(), prompts, [cfg.seed + k for k in
                      range(4)], 3, 3.0).images
    assert rows["teacher3"]["brightness"] == pytest.approx(images.mean().item(), rel=1e-5)
    # every_n_steps = 2 of 4: evaluated at steps 2 and 4, each logged with its step
    out = Path(cfg.paths.output_dir)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step2", "step4"]
    text = (out / "csv" / "metrics.csv").read_text()
    logged = {int(r["step"]) for r in csv.DictReader(text.splitlines())
              if r.get("val/brightness@2_g2_eta0.5")}
    assert logged == {2, 4}
    assert torch.isfinite(torch.tensor(rows["2_eta0.5"]["fid"]))

    # per-image scores: every setting's images in prompt order, the row's mean among them
    scores = read_per_image(out / "per_image.npz")
    assert list(scores["prompts"]) == prompts and list(scores["seeds"]) == [cfg.seed + k
                                                                            for k in range(4)]
    assert set(scores) == {"prompts", "seeds"} | {f"{n}/brightness" for n in rows}
    for name, row in rows.items():
        assert scores[f"{name}/brightness"].dtype == np.float32
        assert float(scores[f"{name}/brightness"].mean()) == pytest.approx(row["brightness"],
                                                                           rel=1e-5)
        low, high = row["fid_ci"]  # bootstrap intervals over the images, around the estimate
        assert low <= row["fid"] <= high and row["kid_ci"][0] <= row["kid"] <= row["kid_ci"][1]
    assert "fid_teacher_ci" in rows["2"] and "kid_teacher" in rows["2"]
    assert scores["teacher3/brightness"] == pytest.approx(images.mean(dim=(1, 2, 3)).numpy(),
                                                          rel=1e-5)  # image by image
    step2 = read_per_image(out / "samples" / "step2" / "per_image.npz")
    assert set(step2) == set(scores)
    assert not np.array_equal(step2["2/brightness"], scores["2/brightness"])  # trained on


@pytest.mark.parametrize("precision, autocast", [("32-true", False), ("bf16-mixed", True)])
def test_sampling_runs_at_the_training_precision(make_cfg, monkeypatch, precision, autocast):
    """bf16-mixed samples under bf16 autocast like its training step; the scores stay fp32."""
    import torch

    import tdd.evaluation

    seen = []
    generate = tdd.evaluation.generate

    def recording(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and
                    torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return generate(*args, **kwargs)

    monkeypatch.setattr(tdd.evaluation, "generate", recording)
    cfg = make_cfg("trainer=cpu", "trainer.max_steps=1", f"trainer.precision={precision}",
                   "data.batch_size=2", "callbacks=none", "evaluation.steps=[2]",
                   "evaluation.teacher_steps=[2]", "evaluation.guidance_scales=[1.0]",
                   "evaluation.num_images=4", "export.enabled=false")
    with open_dict(cfg):
        cfg.metrics = {"_target_": "helpers_metrics.tiny_suite"}
    rows = train(cfg)["metrics"]
    assert seen == [autocast, autocast]  # the teacher's row and the student's
    assert all(isinstance(row["fid"], float) and np.isfinite(row["fid"]) for row in rows.values())


def test_teacher_rows_are_sampled_once_then_read_from_the_cache(tmp_path, monkeypatch):
    """A second run with the same teacher, prompts and seeds reads the teacher row's images
    (and scores them identically); another teacher or other prompts sample it again."""
    import torch
    from conftest import compose_config

    import tdd.evaluation

    calls = []
    generate = tdd.evaluation.generate

    def recording(unet, pipeline, sampler, prompts, seeds, num_steps, *args, **kwargs):
        calls.append(num_steps)
        return generate(unet, pipeline, sampler, prompts, seeds, num_steps, *args, **kwargs)

    monkeypatch.setattr(tdd.evaluation, "generate", recording)
    cache = tmp_path / "cache"

    def run(name, *overrides):
        cfg = compose_config(["trainer=cpu", "trainer.max_steps=1", "data.batch_size=2",
                              "callbacks=none", "evaluation.steps=[2]",
                              "evaluation.teacher_steps=[3]", "evaluation.guidance_scales=[1.0]",
                              "evaluation.num_images=4", "export.enabled=false",
                              f"evaluation.teacher_cache_dir={cache}", *overrides],
                             tmp_path / name)
        with open_dict(cfg):
            cfg.metrics = {"_target_": "helpers_metrics.tiny_suite"}
        calls.clear()
        return train(cfg)["metrics"], list(calls)

    first, sampled = run("a")
    assert sampled == [3, 2] and first["teacher3"]["cached"] is False
    assert len(list(cache.glob("*.pt"))) == 1
    second, sampled = run("b")
    assert sampled == [2] and second["teacher3"]["cached"] is True  # the student only
    for name in first:  # every score equal; the teacher row also keeps the first timing
        for key, value in first[name].items():
            if key not in ("grid", "cached") and (key != "sec_per_image" or name == "teacher3"):
                assert second[name][key] == value, (name, key)
    saved = torch.load(next(cache.glob("*.pt")), weights_only=True)["images"]
    assert saved.dtype == torch.float32 and saved.shape == (4, 3, 32, 32)
    for name, overrides in [("c", ["model.seed=1"]), ("d", ["evaluation.num_images=6"]),
                            ("e", ["evaluation.seed=5"]), ("f", ["guidance.uncond=zeros"])]:
        assert run(name, *overrides)[1] == [3, 2], overrides  # a new key: sampled again
    assert run("g", "evaluation.teacher_cache_dir=null")[1] == [3, 2]


def test_evaluating_during_training_leaves_the_training_unchanged(tmp_path):
    """In-training evaluations sample the LoRA student with merged adapters; its weights are
    restored bit for bit, so the trained adapters equal those of a run that never evaluated."""
    import torch
    from conftest import compose_config
    from safetensors.torch import load_file

    def exported(name, every):
        cfg = compose_config(["trainer=cpu", "trainer.max_steps=4", "data.batch_size=2",
                              "callbacks=none", "student.rank=4", "student.alpha=4",
                              "evaluation.steps=[2]", "evaluation.teacher_steps=[]",
                              "evaluation.guidance_scales=[1.0,1.7]",
                              "evaluation.num_images=4", f"evaluation.every_n_steps={every}"],
                             tmp_path / name)
        with open_dict(cfg):
            cfg.metrics = {"_target_": "helpers_metrics.tiny_suite"}
        path = Path(train(cfg)["export"])
        assert (tmp_path / name / "samples" / "step2").is_dir() == (every == 2)
        return load_file(path)

    plain, evaluated = exported("plain", 0), exported("evaluated", 2)
    assert plain.keys() == evaluated.keys() and plain
    assert all(torch.equal(plain[k], evaluated[k]) for k in plain)
    assert any(v.abs().max() > 0 for k, v in plain.items() if "lora_B" in k or "up" in k)
