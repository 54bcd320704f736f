import json
import os

import pytest

from tdd.tables import collect, plot, run_label, table


def write_run(directory, strategy, fids):
    rows = {str(k): {"steps": k, "guidance_scale": 1.0, "teacher": False, "fid": v}
            for k, v in fids.items()}
    rows["4_g1.7"] = {"steps": 4, "guidance_scale": 1.7, "teacher": False, "fid": 99.0}
    rows["teacher25"] = {"steps": 25, "guidance_scale": 4.5, "teacher": True, "fid": 1.5}
    config = {"strategy": {"_target_": f"tdd.strategies.{strategy}Target"},
              "guidance": {"_target_": "tdd.guidance.DecoupledGuidance"},
              "student": {"_target_": "tdd.models.students.LoRAStudent"}}
    directory.mkdir(parents=True)
    (directory / "results.json").write_text(json.dumps({"config": config, "metrics": rows}))


def test_table_has_one_row_per_run_and_one_column_per_step(tmp_path):
    write_run(tmp_path / "0", "TDD", {2: 9.0, 4: 3.25})
    write_run(tmp_path / "1", "LCM", {2: 12.0, 4: 8.5})
    results = collect(tmp_path)
    assert run_label(results[0]) == "tdd/decoupled/lora"
    lines = table(results, "fid").splitlines()
    assert lines[0] == "| run (fid) | 2 steps | 4 steps | teacher@25 |"
    assert lines[2] == "| tdd/decoupled/lora | 9.000 | 3.250 | 1.500 |"
    assert lines[3] == "| lcm/decoupled/lora | 12.000 | 8.500 | 1.500 |"
    assert "99.000" in table(results, "fid", guidance_scale=1.7)
    assert plot(results, "fid", tmp_path / "fid.png").stat().st_size > 1000


def test_runs_are_ordered_by_path_not_by_modification_time(tmp_path):
    for job, strategy in [("10", "PCM"), ("2", "TCD"), ("1", "LCM"), ("0", "TDD")]:
        write_run(tmp_path / job, strategy, {4: 1.0})
    for age, job in enumerate(["0", "1", "2", "10"]):  # newest first
        os.utime(tmp_path / job / "results.json", (1e9 - age, 1e9 - age))
    labels = [run_label(r).split("/")[0] for r in collect(tmp_path)]
    assert labels == ["tdd", "lcm", "tcd", "pcm"]


def test_missing_results_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results.json"):
        collect(tmp_path)
    write_run(tmp_path / "0", "TDD", {4: 1.0})
    with pytest.raises(ValueError, match="clip"):
        table(collect(tmp_path), "clip", guidance_scale=3.0)
