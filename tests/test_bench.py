import json
import random

import pytest
import torch

from tdd.bench import (
    SPREAD_LIMIT,
    interleaved_seconds,
    main,
    ratio,
    run,
    scripts_target,
    unstable,
)
from tdd.models.config_teacher import published_configs
from tdd.strategies import TDDTarget


def test_scripts_target_selection_has_the_same_support_as_the_vectorised_one():
    """Per source index, both select from the same set of target timesteps, with the same
    share of s = 0 overall."""
    strategy = TDDTarget(num_ddim_timesteps=250, eta_max=0.0)  # s = tau: a finite support
    index = torch.arange(250).repeat(40)
    ours = strategy.sample(index, generator=torch.Generator().manual_seed(0))
    theirs = scripts_target(strategy, index, random.Random(0))
    t_prev = strategy.grid.previous(index)
    assert torch.all(theirs <= t_prev) and torch.all(theirs >= 0)
    for i in (0, 1, 30, 62, 100, 187, 249):
        support = {int(v) for v in ours[index == i].unique()}
        assert support == {int(v) for v in theirs[index == i].unique()}, i
    # the window written out: M in [max(u - 260, 0), u], u = max{m in M: m <= t_prev}
    # (i = 249: t_prev = 995, u = 875; i = 62: t = 251, t_prev = 247, u = 199)
    assert set(theirs[index == 249].tolist()) == {627, 667, 715, 751, 799, 835, 859, 875}
    assert set(theirs[index == 62].tolist()) == {0, 127, 143, 167, 199}
    with_offset = TDDTarget(num_ddim_timesteps=250)
    ours = with_offset.sample(index, generator=torch.Generator().manual_seed(0))
    theirs = scripts_target(with_offset, index, random.Random(0))
    assert abs((theirs == 0).double().mean() - (ours == 0).double().mean()) < 0.03


def test_every_callable_is_warmed_up_before_any_is_timed_and_the_order_rotates():
    calls = []
    fns = {key: (lambda key=key: calls.append(key)) for key in "abc"}
    times = interleaved_seconds(fns, "cpu", repeats=3, warmup=2)
    assert calls[:6] == list("abcabc")  # warm-up: all of them, before any timed run
    assert calls[6:] == list("abc" "bca" "cab")  # each repeat starts one further along
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for v in times.values() for t in v)


def test_ratios_are_per_repeat_and_a_wide_spread_is_flagged():
    steady = ratio([2.0, 4.0, 3.0], [1.0, 2.0, 1.5])  # load doubles both sides: ratio holds
    assert steady == {"min": 2.0, "median": 2.0, "max": 2.0, "spread": 1.0}
    shaky = ratio([2.0, 3.0, 2.0], [1.0, 1.0, 1.0])
    assert shaky["median"] == 2.0 and shaky["spread"] == pytest.approx(1.5)
    report = {"steps": {"tdd": {"framework_over_floor": shaky, "framework_s": {"min": 1.0}},
                        "lcm": {"framework_over_floor": steady}},
              "sampling_speedup_vs_teacher": {"tdd@4": ratio([5.0], [1.0])}}
    assert unstable(report) == ["steps/tdd/framework_over_floor"]
    edge = ratio([1.0, SPREAD_LIMIT], [1.0, 1.0])
    assert unstable({"r": edge}) == []  # exactly at the limit: not flagged


@pytest.mark.slow
def test_benchmark_reports_every_ratio():
    report = run("tiny", batch_size=2, repeats=2, images=2, device="cpu")
    assert set(report["steps"]) == {"tdd", "lcm", "tcd", "pcm"}
    for row in report["steps"].values():
        for variant in ("framework_s", "floor_s", "reference_s"):
            figure = row[variant]
            assert 0 < figure["min"] <= figure["median"] <= figure["max"]
        assert row["framework_over_floor"]["spread"] >= 1.0
    assert set(report["sampling_speedup_vs_teacher"]) == {"tdd@4", "tdd@8", "tcd@4"}
    assert report["peak_memory_mb"] > 0 and report["teacher_load_s"]["min"] > 0
    assert report["cpu_s"] > 0 and isinstance(report["unstable"], list)


def test_benchmark_of_one_strategy_is_quick_and_names_a_bad_one():
    report = run("tiny", batch_size=1, repeats=1, images=1, device="cpu", warmup=0,
                 strategies=["lcm"])
    assert list(report["steps"]) == ["lcm"] and report["repeats"] == 1
    with pytest.raises(SystemExit, match="--strategies.*nope"):
        run("tiny", batch_size=1, repeats=1, images=1, device="cpu", strategies=["nope"])


def tiny_published_configs():
    """The SD1.5 configurations with every width shrunk: the sd15-config code path on a CPU."""
    configs = published_configs("sd15")
    configs["unet"].update(block_out_channels=[8, 8, 16, 16], norm_num_groups=4,
                           attention_head_dim=2, cross_attention_dim=16, layers_per_block=1)
    configs["vae"].update(block_out_channels=[4, 4, 8, 8], norm_num_groups=4, layers_per_block=1)
    configs["text_encoder"].update(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, projection_dim=16)
    return configs


def test_published_configs_are_sd15(monkeypatch):
    configs = published_configs("sd15")
    assert configs["unet"]["block_out_channels"] == [320, 640, 1280, 1280]
    assert configs["vae"]["scaling_factor"] == 0.18215
    assert configs["text_encoder"]["hidden_size"] == configs["unet"]["cross_attention_dim"]
    with pytest.raises(FileNotFoundError, match="nope-config"):
        published_configs("nope")


@pytest.mark.slow
def test_config_model_bench_runs_bf16_with_and_without_checkpointing(monkeypatch, capsys):
    """``--model sd15-config`` (bf16 under autocast, checkpointing off and on,
    the TDD strategy) on shrunken configurations at 64 px."""
    import tdd.models.config_teacher as config_teacher

    monkeypatch.setattr(config_teacher, "published_configs", lambda name: tiny_published_configs())
    main(["--model", "sd15-config", "--device", "cpu", "--resolution", "64", "--batch-size", "1",
          "--repeats", "1", "--warmup", "0", "--images", "1", "--rank", "4"])
    report = json.loads(capsys.readouterr().out)
    assert report["dtype"] == "bfloat16" and report["lora_rank"] == 4
    assert report["resolution"] == 64 and report["batch_size"] == 1
    assert set(report["steps"]) == {"tdd", "tdd+checkpointing"}
    for row in report["steps"].values():
        assert set(row["steps_per_s"]) == {"framework", "floor", "reference"}
        assert all(v > 0 for v in row["steps_per_s"].values())


@pytest.mark.slow
def test_adversarial_benchmark_reports_the_step_time_ratios():
    from tdd.bench_adversarial import run as run_adversarial

    report = run_adversarial("tiny", batch_size=2, steps=6, device="cpu")
    assert report["plain_step_s"] > 0 and report["discriminator_step_s"] > 0
    ratio = (report["discriminator_step_s"] + report["student_step_s"]) / 2
    assert report["adversarial_over_plain"] == pytest.approx(ratio / report["plain_step_s"])
    assert report["per_student_update_over_plain"] == pytest.approx(
        2 * report["adversarial_over_plain"])


@pytest.mark.slow  # three spawned processes, each importing torch and building a module
def test_threads_benchmark_compares_one_process_with_one_process_per_core():
    from tdd.bench_threads import run as run_threads

    report = run_threads("tiny", batch_size=2, steps=2, warmup=1, rounds=1, cores=2)
    assert report["configurations"] == {"one_process": {"processes": 1, "threads": 2},
                                        "per_core": {"processes": 2, "threads": 1}}
    rates = {k: v["median"] for k, v in report["steps_per_s"].items()}
    assert all(rate > 0 for rate in rates.values())
    assert report["per_core_over_one_process"]["median"] == pytest.approx(
        rates["per_core"] / rates["one_process"])


def test_precision_benchmark_times_float32_against_bf16_autocast(monkeypatch):
    import tdd.bench_steps
    from tdd.bench_precision import run as run_precision

    seen, step = set(), tdd.bench_steps.framework_step

    def recording(module, batch, optimizer):
        seen.add((module.teacher.unet.dtype, torch.is_autocast_enabled("cpu")))
        return step(module, batch, optimizer)

    monkeypatch.setattr(tdd.bench_steps, "framework_step", recording)
    report = run_precision("tiny", batch_size=2, repeats=2, warmup=0)
    assert seen == {(torch.float32, False), (torch.bfloat16, True)}
    assert set(report["step_s"]) == {"float32", "bfloat16"}
    assert report["bfloat16_speedup"]["median"] > 0
