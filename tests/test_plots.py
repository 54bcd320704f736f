"""Learning curves from a study's curve evaluations."""

import json

import numpy as np
import pytest
from helpers_study import write_study_run

from tdd.plots import curve_points, curves, grid_files, main, plot_curves


def make_curves(study, arms=("lcm", "tdd"), seeds=(0, 1, 2), steps=(100, 200, 300)):
    """FID falls with training: ``50 - step / 10`` (+ 10 for lcm) + seed - 1."""
    for arm in arms:
        for seed in seeds:
            for step in steps:
                fid = 50 - step / 10 + (10 if arm == "lcm" else 0) + seed - 1
                write_study_run(study, arm, seed, [f"strategy={arm}"], {"fid": fid},
                                step=step, name="curve")
        write_study_run(study, arm, 0, [f"strategy={arm}"], {"fid": 0.0})  # final: not a point


def test_curves_are_the_mean_and_spread_over_seeds(tmp_path):
    make_curves(tmp_path)
    points = curve_points(tmp_path)
    assert len(points) == 2 * 3 * 3 and {p["step"] for p in points} == {100, 200, 300}
    result = curves(points, "fid", "4")
    assert sorted(result) == ["lcm", "tdd"]
    np.testing.assert_array_equal(result["tdd"]["step"], [100, 200, 300])
    np.testing.assert_allclose(result["tdd"]["mean"], [40, 30, 20])
    np.testing.assert_allclose(result["lcm"]["mean"], [50, 40, 30])
    np.testing.assert_allclose(result["tdd"]["std"], [1, 1, 1])  # seeds 0, 1, 2: -1, 0, +1
    np.testing.assert_array_equal(result["tdd"]["n"], [3, 3, 3])
    teacher = curves(points, "fid", "teacher25")["tdd"]
    np.testing.assert_allclose(teacher["mean"], [2, 2, 2])


def test_a_missing_seed_narrows_n_not_the_mean(tmp_path):
    make_curves(tmp_path, seeds=(0, 1))
    (tmp_path / "results" / "tdd" / "seed1" / "curve_step000300.json").unlink()
    result = curves(curve_points(tmp_path), "fid", "4")["tdd"]
    np.testing.assert_array_equal(result["n"], [2, 2, 1])
    assert result["mean"][2] == 19 and result["std"][2] == 0


def test_plot_is_written_and_regenerates_identically(tmp_path, capsys):
    make_curves(tmp_path / "study")
    main([str(tmp_path / "study"), "--metric", "fid", "--out", str(tmp_path / "a.png")])
    assert "a.png" in capsys.readouterr().out
    plot_curves(curve_points(tmp_path / "study"), "fid", "4", tmp_path / "b.png")
    first, second = (tmp_path / "a.png").read_bytes(), (tmp_path / "b.png").read_bytes()
    assert first[:8] == b"\x89PNG\r\n\x1a\n" and len(first) > 5000
    assert first == second


def test_unknown_setting_metric_or_no_curves_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no curve evaluations"):
        curve_points(tmp_path)
    make_curves(tmp_path)
    points = curve_points(tmp_path)
    with pytest.raises(ValueError, match=r"unknown setting '8': the curves hold 4, teacher25"):
        curves(points, "fid", "8")
    with pytest.raises(ValueError, match=r"unknown metric 'kid': setting 4 holds fid"):
        curves(points, "kid", "4")


def test_in_training_curves_of_train_json_are_points_too(tmp_path):
    """The runner's train.json keeps the CSV log: val/<metric>@<setting> per logged step."""
    for arm, offset in {"tdd": 0.0, "lcm": 10.0}.items():
        for seed in (0, 1):
            folder = tmp_path / "results" / arm / f"seed{seed}"
            folder.mkdir(parents=True)
            curve = {"train/loss": [[1, 0.5], [150, 0.1]],
                     "val/fid@4": [[150, 40 + offset + seed], [300, 30 + offset + seed]],
                     "val/clip@4": [[150, 80.0], [300, 81.0]]}
            (folder / "train.json").write_text(json.dumps(
                {"arm": arm, "seed": seed, "eval": None, "step": 300, "curve": curve}))
    result = curves(curve_points(tmp_path), "fid", "4")
    np.testing.assert_array_equal(result["lcm"]["step"], [150, 300])
    np.testing.assert_allclose(result["lcm"]["mean"], [50.5, 40.5])
    np.testing.assert_allclose(result["tdd"]["std"], [0.7071068, 0.7071068])
    assert curves(curve_points(tmp_path), "clip", "4")["tdd"]["mean"].tolist() == [80, 81]


def test_side_by_side_grids_follow_the_study_order_and_the_highest_step(tmp_path, capsys):
    import torch
    from PIL import Image
    from torchvision.utils import save_image

    (tmp_path / "study.yaml").write_text("arms: {tdd: [], lcm: [], tcd: []}\n")
    colours = {"tdd": 0.0, "lcm": 1.0}
    for arm, value in colours.items():
        for step in (600, 1200) if arm == "tdd" else (600,):
            folder = write_study_run(tmp_path, arm, 0, [], {"fid": 1.0}, step=step)
            grid = folder / f"final_step{step:06d}" / "4.png"
            grid.parent.mkdir(parents=True)
            save_image(torch.full((1, 3, 8, 8), value if step == 600 else 0.5), grid)
    found = grid_files(tmp_path, "4")
    assert list(found) == ["tdd", "lcm"]  # study order; tcd has no grid
    assert found["tdd"].parent.name == "final_step001200"
    out = tmp_path / "grids.png"
    main([str(tmp_path), "--grids", "--setting", "4", "--out", str(out)])
    assert Image.open(out).size[0] > Image.open(out).size[1]  # side by side
    with pytest.raises(FileNotFoundError, match="8.png"):
        grid_files(tmp_path, "8")
