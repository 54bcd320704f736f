import time

import tdd.sampling
from tdd.module import DistillationModule
from tdd.profile import SectionTimer, instrumented, table


def test_a_row_counts_its_own_time_not_that_of_the_timed_rows_it_calls():
    timer = SectionTimer()
    with timer.section("train/optimizer"):
        time.sleep(0.02)
        with timer.section("train/student backward"):
            time.sleep(0.05)
    own, inner = timer.seconds["train/optimizer"], timer.seconds["train/student backward"]
    assert 0.05 <= inner < 0.2 and 0.02 <= own < 0.05
    assert timer.calls == {"train/optimizer": 1, "train/student backward": 1}


def test_phases_and_opaque_rows():
    timer = SectionTimer()
    with timer.section("eval/sampling unet"):  # an evaluation piece during training: untimed
        pass
    with timer.section("text encode"):
        pass
    with timer.section("train/teacher"):  # the teacher's UNet call is the teacher's
        with timer.section("train/student forward"):
            pass
    with timer.evaluation():
        with timer.section("text encode"):
            pass
        with timer.section("train/data"):
            pass
    assert set(timer.seconds) == {"train/text encode", "train/teacher", "eval/text encode"}


def test_instrumentation_is_removed_afterwards():
    sample_batch = tdd.sampling._sample_batch
    with instrumented(SectionTimer()):
        assert tdd.sampling._sample_batch is not sample_batch
        assert "backward" in vars(DistillationModule)
    assert tdd.sampling._sample_batch is sample_batch
    assert "backward" not in vars(DistillationModule)  # inherited from LightningModule again


def test_table_lists_rows_by_scaled_time():
    report = {"seconds": {"train/teacher": 1.0, "eval/fid": 0.5},
              "scaled_seconds": {"train/teacher": 20.0, "eval/fid": 2.0},
              "scaled_wall_s": 22.0, "wall_s": 1.5}
    lines = table(report).splitlines()
    assert lines[1].startswith("train/teacher") and "90.9%" in lines[1]
    assert lines[2].startswith("eval/fid") and lines[-1].startswith("total")
