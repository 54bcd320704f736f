import json
import os

import numpy as np
import pytest
import torch
from helpers_study import write_study_run

from tdd.evaluation import write_per_image
from tdd.tables import collect, group, main, paired_table, plot, run_label, table

NOISE = {0: -1.0, 1: 0.0, 2: 1.0}  # per training seed: mean 0, std 1


def write_run(directory, strategy, fids, overrides=None):
    rows = {str(k): {"steps": k, "guidance_scale": 1.0, "teacher": False, "fid": v}
            for k, v in fids.items()}
    rows["4_g1.7"] = {"steps": 4, "guidance_scale": 1.7, "teacher": False, "fid": 99.0}
    rows["teacher25"] = {"steps": 25, "guidance_scale": 4.5, "teacher": True, "fid": 1.5}
    config = {"strategy": {"_target_": f"tdd.strategies.{strategy}Target"},
              "guidance": {"_target_": "tdd.guidance.DecoupledGuidance"},
              "student": {"_target_": "tdd.models.students.LoRAStudent"},
              "paths": {"output_dir": str(directory)}, "seed": 0}
    directory.mkdir(parents=True)
    (directory / "results.json").write_text(json.dumps({"config": config, "metrics": rows}))
    if overrides is not None:
        (directory / ".hydra").mkdir()
        (directory / ".hydra" / "overrides.yaml").write_text(
            "".join(f"- {o}\n" for o in overrides))


def make_study(study, shifts=None, seeds=(0, 1, 2)):
    """Three arms x three seeds; FID = shift + a seed effect shared by the arms (std 1) + a
    small jitter of each run (tdd_w260: its seeds' effects in another order)."""
    arms = {"tdd": ["strategy=tdd"], "lcm": ["strategy=lcm"],
            "tdd_w260": ["strategy=tdd", "strategy.window=260"]}
    shifts = shifts or {"tdd": 30.0, "lcm": 35.0, "tdd_w260": 30.2}
    jitter = {"tdd": (0.0, 0.0, 0.0), "lcm": (0.02, -0.01, -0.01), "tdd_w260": (0, 0, 0)}
    for arm, overrides in arms.items():
        for seed in seeds:
            effect = NOISE[(seed + 1) % 3] if arm == "tdd_w260" else NOISE[seed]
            fid = shifts[arm] + effect + jitter[arm][seed]
            write_study_run(study, arm, seed, overrides, {"fid": fid, "kid": 0.01 * (seed + 1)})


def test_table_has_one_row_per_run_and_one_column_per_step(tmp_path):
    write_run(tmp_path / "0", "TDD", {2: 9.0, 4: 3.25})
    write_run(tmp_path / "1", "LCM", {2: 12.0, 4: 8.5})
    results = collect(tmp_path)
    assert run_label(results[0]) == "tdd/decoupled/lora"
    lines = table(results, "fid").splitlines()
    assert lines[0] == "| run (fid) | 2 steps | 4 steps | teacher@25 |"
    assert lines[2] == "| strategy=tdd | 9.000 | 3.250 | 1.500 |"  # labelled by what differs
    assert lines[3] == "| strategy=lcm | 12.000 | 8.500 | 1.500 |"
    assert "99.000" in table(results, "fid", guidance_scale=1.7)
    assert plot(results, "fid", tmp_path / "fid.png").stat().st_size > 1000


def test_runs_are_ordered_by_path_not_by_modification_time(tmp_path):
    for job, strategy in [("10", "PCM"), ("2", "TCD"), ("1", "LCM"), ("0", "TDD")]:
        write_run(tmp_path / job, strategy, {4: 1.0})
    for age, job in enumerate(["0", "1", "2", "10"]):  # newest first
        os.utime(tmp_path / job / "results.json", (1e9 - age, 1e9 - age))
    labels = [run_label(r).split("/")[0] for r in collect(tmp_path)]
    assert labels == ["tdd", "lcm", "tcd", "pcm"]
    assert [arm.label for arm in group(collect(tmp_path))] == [
        "strategy=tdd", "strategy=lcm", "strategy=tcd", "strategy=pcm"]


def test_missing_results_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results.json"):
        collect(tmp_path)
    write_run(tmp_path / "0", "TDD", {4: 1.0})
    with pytest.raises(ValueError, match="clip"):
        table(collect(tmp_path), "clip", guidance_scale=3.0)


def test_unknown_metric_or_guidance_scale_names_the_valid_ones(tmp_path):
    write_run(tmp_path / "0", "TDD", {4: 1.0})
    results = collect(tmp_path)
    with pytest.raises(ValueError, match=r"unknown metric 'clip': the results hold fid"):
        table(results, "clip")
    with pytest.raises(ValueError, match=r"guidance scale 3: evaluated scales are 1, 1.7"):
        table(results, "fid", guidance_scale=3.0)


def test_multirun_seeds_share_a_row_labelled_by_the_overrides_that_differ(tmp_path):
    """Hydra's overrides.yaml: the lr sweep is in the label, the seed is not."""
    jobs = [("strategy=tdd", "optimizer.lr=1e-4", "seed=0"), ("strategy=tdd",
            "optimizer.lr=1e-4", "seed=1"), ("strategy=tdd", "optimizer.lr=3e-4", "seed=0"),
            ("strategy=tdd", "optimizer.lr=3e-4", "seed=1")]
    for job, overrides in enumerate(jobs):
        write_run(tmp_path / str(job), "TDD", {4: 10.0 + job}, list(overrides))
    lines = table(collect(tmp_path), "fid").splitlines()
    assert lines[2] == "| optimizer.lr=1e-4 | 10.500 ± 0.707 (2) | 1.500 ± 0.000 (2) |"
    assert lines[3] == "| optimizer.lr=3e-4 | 12.500 ± 0.707 (2) | 1.500 ± 0.000 (2) |"


def test_study_rows_are_arms_with_seed_means_and_baseline_markers(tmp_path):
    make_study(tmp_path)
    text = table(collect(tmp_path), "fid", baseline="tdd")
    lines = text.splitlines()
    assert lines[0] == "| arm (fid) | differs by | 4 steps | teacher@25 |"
    rows = {line.split(" | ")[0][2:]: line for line in lines[2:5]}
    # sorted by path: lcm, tdd, tdd_w260; labels name only the overrides that differ
    assert list(rows) == ["lcm", "tdd (baseline)", "tdd_w260"]
    assert rows["lcm"] == "| lcm | strategy=lcm | 35.000 ± 0.985 (3) * | 2.000 ± 0.000 (3) |"
    assert rows["tdd (baseline)"].startswith("| tdd (baseline) | strategy=tdd | 30.000 ± 1.000")
    # a 0.2 shift within the seed spread is not marked, a 5 point shift is
    assert rows["tdd_w260"].startswith(
        "| tdd_w260 | strategy=tdd, strategy.window=260 | 30.200 ± 1.000 (3) |")
    assert "`*`: differs from the baseline `tdd`" in text
    kid = table(collect(tmp_path), "kid")
    assert "0.02 ± 0.01 (3)" in kid


def test_a_constant_shift_within_matched_seeds_is_marked(tmp_path):
    make_study(tmp_path, shifts={"tdd": 30.0, "lcm": 30.3, "tdd_w260": 30.0})
    rows = table(collect(tmp_path), "fid", baseline="tdd").splitlines()
    assert rows[2].startswith("| lcm | strategy=lcm | 30.300 ± 0.985 (3) * |")  # paired seeds
    assert " * " not in rows[4]  # tdd_w260: the same values as the baseline


def test_crashed_runs_and_missing_metrics_are_reported_not_invented(tmp_path):
    make_study(tmp_path)
    (tmp_path / "results" / "lcm" / "seed2" / "final_step000600.json").unlink()  # crashed
    no_kid = tmp_path / "results" / "tdd" / "seed1" / "final_step000600.json"
    record = json.loads(no_kid.read_text())
    del record["metrics"]["4"]["kid"]
    no_kid.write_text(json.dumps(record))
    fid = table(collect(tmp_path), "fid", baseline="tdd")
    assert "| lcm | strategy=lcm | 34.505 ± 0.686 (2/3) * |" in fid
    assert "- lcm seed 2: no final result (crashed or not finished)" in fid
    assert "teacher@25: lcm seed 2" not in fid  # one note per crashed run
    kid = table(collect(tmp_path), "kid")
    assert "| tdd | strategy=tdd | 0.02 ± 0.0141 (2/3) |" in kid
    assert ("- 4 steps: tdd seed 1: no value (crashed, not run, or metric not recorded)"
            in kid)


def test_single_runs_show_their_image_intervals_and_compare_by_them(tmp_path):
    write_study_run(tmp_path, "tdd", 0, ["strategy=tdd"], {"fid": 30.0, "fid_ci": [29.0, 31.0]})
    write_study_run(tmp_path, "lcm", 0, ["strategy=lcm"], {"fid": 33.0, "fid_ci": [32.0, 34.0]})
    write_study_run(tmp_path, "tcd", 0, ["strategy=tcd"], {"fid": 31.5, "fid_ci": [30.5, 32.5]})
    lines = table(collect(tmp_path), "fid", baseline="tdd").splitlines()
    assert lines[2] == "| lcm | strategy=lcm | 33.000 [32.000, 34.000] * | 2.000 |"
    assert lines[3] == "| tcd | strategy=tcd | 31.500 [30.500, 32.500] | 2.000 |"
    with pytest.raises(ValueError, match="--baseline 'xyz' matches 0 rows; rows: lcm; tcd"):
        table(collect(tmp_path), "fid", baseline="xyz")


def test_regenerating_is_byte_identical_whatever_the_write_order(tmp_path, capsys):
    make_study(tmp_path / "a")
    make_study(tmp_path / "b", seeds=(2, 0, 1))  # other creation order and times
    for path in (tmp_path / "b").rglob("final_step*.json"):
        os.utime(path, (1e9, 1e9))
    outputs = []
    for study in ("a", "a", "b"):
        main([str(tmp_path / study), "--metric", "fid", "kid", "--baseline", "tdd"])
        outputs.append(capsys.readouterr().out.encode())
    assert outputs[0] == outputs[1] == outputs[2]
    assert b"| arm (kid) |" in outputs[0]


def test_paired_per_image_comparison_flags_a_small_constant_shift(tmp_path, capsys):
    """CLIP per image: prompts differ a lot (std 3), arms by 0.3 on every image (lcm) or not
    at all (tdd_w260): image by image, only lcm is marked."""
    rng = np.random.default_rng(0)
    prompts = [f"prompt {k}" for k in range(128)]
    prompt_effect = rng.normal(30, 3, 128)
    for arm, shift in {"tdd": 0.0, "lcm": 0.3, "tdd_w260": 0.0}.items():
        for seed in (0, 1):
            scores = prompt_effect + shift + rng.normal(0, 0.2, 128)
            folder = write_study_run(tmp_path, arm, seed, [f"strategy={arm}"],
                                     {"clip": float(scores.mean())})
            write_per_image(folder / "final_step000600.npz", prompts, range(128),
                            {"4/clip": torch.tensor(scores)})
    main([str(tmp_path), "--metric", "clip", "--baseline", "tdd", "--paired", "4"])
    text = capsys.readouterr().out
    lines = text.split("| arm (clip @ 4, paired with `tdd`)")[1].splitlines()
    assert lines[2].startswith("| lcm | strategy=lcm | 0.3") and " * | [0.2" in lines[2]
    assert lines[2].endswith("| 256 (2) |")  # 128 images x 2 matched seeds
    assert lines[3].startswith("| tdd_w260 |") and " * " not in lines[3]
    records = collect(tmp_path)
    with pytest.raises(ValueError, match=r"no per-image '4/sharpness'.*scores: 4/clip"):
        paired_table(records, "sharpness", "4", "tdd")
    # other prompts are not paired: reported, not compared
    write_per_image(tmp_path / "results" / "lcm" / "seed1" / "final_step000600.npz", prompts[::-1],
                    range(128), {"4/clip": torch.zeros(128)})
    text = paired_table(collect(tmp_path), "clip", "4", "tdd")
    assert "| 128 (1) |" in text
    assert "- seed 1: lcm was evaluated on other prompts or per-image seeds: not paired" in text


def test_failed_runs_and_the_study_plan(tmp_path):
    """A failure file is named; an evaluation planned for some arms and seeds only (the study
    file) expects exactly those; without the file, arms that never had it are left out."""
    make_study(tmp_path)
    failed = tmp_path / "results" / "tdd" / "seed2"
    (failed / "final_step000600.json").unlink()
    (failed / "final_step000600.failed.txt").write_text("exit status 1")
    write_study_run(tmp_path, "tdd", 0, ["strategy=tdd"], {"fid": 3.0}, name="teacher")
    text = table(collect(tmp_path), "fid")
    assert "- tdd seed 2: failed (see final_step000600.failed.txt)" in text
    teacher = table(collect(tmp_path, "teacher"), "fid")  # no study file: arm tdd only
    assert teacher.splitlines()[2] == "| tdd | - | 3.000 (1/3) | 2.000 (1/3) |"
    assert "- tdd seed 1: no teacher result (crashed or not finished)" in teacher
    (tmp_path / "study.yaml").write_text(
        "seeds: [0, 1, 2]\narms: {tdd: [strategy=tdd], lcm: [strategy=lcm]}\n"
        "evaluations: {teacher: {steps: [600], arms: [tdd, lcm], seeds: [0]}}\n")
    teacher = table(collect(tmp_path, "teacher"), "fid")
    assert "- lcm seed 0: no teacher result (crashed or not finished)" in teacher
    assert "tdd seed 1" not in teacher  # not planned
    assert "| lcm | (no finished run) | - | - |" in teacher
    assert "| tdd | - | 3.000 | 2.000 |" in teacher  # nothing to compare with: lcm unknown
    (tmp_path / "study.yaml").write_text(
        "seeds: [0, 1, 2]\narms: {tdd: [strategy=tdd], new: [strategy=tcd]}\n"
        "evaluations: {final: {steps: [600]}}\n")
    fid = table(collect(tmp_path), "fid")
    assert "- new seed 2: no final result (not run yet)" in fid  # planned, never started


def test_per_arm_steps_plan_only_the_arms_they_name(tmp_path):
    """An evaluation with per-arm steps (arms of different lengths) expects those arms only."""
    make_study(tmp_path)
    (tmp_path / "study.yaml").write_text(
        "seeds: [0, 1, 2]\narms: {tdd: [strategy=tdd], lcm: [strategy=lcm], new: [a=b]}\n"
        "evaluations: {final: {steps: {tdd: [600], lcm: [600]}}}\n")
    fid = table(collect(tmp_path), "fid")
    assert "new" not in fid
    (tmp_path / "study.yaml").write_text(
        "seeds: [0, 1, 2]\narms: {tdd: [strategy=tdd], lcm: [strategy=lcm], new: [a=b]}\n"
        "evaluations: {final: {steps: {tdd: [600], new: [1200]}}}\n")
    fid = table(collect(tmp_path), "fid")
    assert "- new seed 0: no final result (not run yet)" in fid


def test_settings_columns_show_eta_and_guidance_variants(tmp_path):
    """--settings: one column per evaluated setting by name, so an eta or guidance sweep of
    one evaluation is a row of the table; an unknown setting names the evaluated ones."""
    for seed in (0, 1):
        folder = write_study_run(tmp_path, "tdd", seed, ["strategy=tdd"], {"fid": 30.0 + seed},
                                 name="eta")
        record = json.loads((folder / "eta_step000600.json").read_text())
        record["metrics"]["4_eta0.5"] = {"steps": 4, "guidance_scale": 1.0, "eta": 0.5,
                                         "teacher": False, "fid": 20.0 + seed}
        (folder / "eta_step000600.json").write_text(json.dumps(record))
    records = collect(tmp_path, "eta")
    text = table(records, "fid", settings=["4_eta0.5", "4"])
    assert text.splitlines()[0] == "| arm (fid) | differs by | 4_eta0.5 | 4 |"
    assert "| 20.500 ± 0.707 (2) | 30.500 ± 0.707 (2) |" in text
    every = table(records, "fid", settings=["all"])
    assert every.splitlines()[0].endswith("| 4 | 4_eta0.5 | teacher25 |")
    assert "4_eta0.5" not in table(records, "fid")  # by steps: the sampler's own eta only
    with pytest.raises(ValueError, match="the evaluated settings are 4, 4_eta0.5, teacher25"):
        table(records, "fid", settings=["4_eta0.3"])


def test_a_lone_finished_seed_shows_its_interval_over_images(tmp_path):
    (tmp_path / "study.yaml").write_text(
        "seeds: [0, 1, 2]\narms: {tdd: [strategy=tdd]}\nevaluations: {final: {steps: [600]}}\n")
    write_study_run(tmp_path, "tdd", 0, ["strategy=tdd"], {"fid": 34.2, "fid_ci": [31.7, 37.9]})
    text = table(collect(tmp_path), "fid")
    assert "| 34.200 [31.700, 37.900] (1/3) |" in text
    assert "- tdd seed 1: no final result (not run yet)" in text
