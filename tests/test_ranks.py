"""Several ranks, one run: per-rank random streams, the shapes stream split by rank, one writer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tdd.data.samplers import EpochShuffleSampler
from tdd.data.shapes import ShapesDataModule
from tdd.distributed import rank_seed

ROOT = Path(__file__).resolve().parents[1]


def test_rank_seeds_keep_rank_zero_and_differ_elsewhere():
    assert rank_seed(7, 0) == 7
    seeds = {rank_seed(7, rank) for rank in range(8)} | {rank_seed(8, 1)}
    assert len(seeds) == 9 and all(0 <= s < 2**63 for s in seeds)
    assert rank_seed(7, 3) == rank_seed(7, 3)


@pytest.mark.parametrize("world_size, drawn", [(1, 0), (1, 3), (2, 0), (2, 6), (3, 9)])
def test_stream_split_reads_the_single_process_order(world_size, drawn):
    """The ranks together read the stream as one process does, from a resumed position."""
    batch = 4

    def stream(rank, world, drawn=0):  # as ResumableData.train_sampler builds it for shapes
        sampler = EpochShuffleSampler(10_000, 0, False, rank, world, batch)
        sampler.skip(drawn // world * batch)
        return sampler

    ranks = [list(stream(rank, world_size, drawn)) for rank in range(world_size)]
    steps = min(len(r) for r in ranks) // batch
    interleaved = [i for step in range(steps) for r in ranks
                   for i in r[step * batch:(step + 1) * batch]]
    single = list(stream(0, 1, drawn))
    assert interleaved == single[:len(interleaved)] and interleaved[0] == drawn * batch
    per_rank = 10_000 // batch // world_size * batch
    assert len(stream(0, world_size)) == per_rank


def test_shapes_stream_is_not_listed_under_ddp():
    """Lightning wraps (and lists) any sampler but a DistributedSampler: 2^31 indices."""

    class Trainer:  # what the data module reads of a two-rank trainer
        global_rank, world_size = 1, 2

    data = ShapesDataModule(batch_size=4, val_size=4)
    data.trainer = Trainer()
    sampler = data.train_dataloader().sampler
    assert isinstance(sampler, torch.utils.data.DistributedSampler)
    assert next(iter(sampler)) == 4 and len(sampler) == (2**31 - 1) // 4 // 2 * 4


def ddp_run(output_dir: Path, *overrides: str) -> dict:
    """``run.py`` on two gloo processes, tiny teacher, shapes data; the draws of each rank."""
    command = [sys.executable, "run.py", "trainer=ddp_sim", "model=tiny", "data=shapes",
               "data.val_size=4", "data.batch_size=2", "metrics=none", "logger=none",
               "student.rank=4", "student.alpha=4", "strategy=tcd", "trainer.log_every_n_steps=1",
               "callbacks.checkpoint.every_n_train_steps=2", "export.enabled=false",
               "+callbacks.record._target_=helpers_ranks.RecordDraws",
               f"+callbacks.record.directory={output_dir}", f"hydra.run.dir={output_dir}",
               *overrides]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"), OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {rank: torch.load(output_dir / f"draws_rank{rank}.pt") for rank in (0, 1)}


def same_draws(a: dict, b: dict) -> bool:
    return (a["captions"] == b["captions"] and torch.equal(a["s"], b["s"])
            and all(torch.equal(x, y) for x, y in zip(a["noise"], b["noise"], strict=True)))


@pytest.mark.slow
def test_two_ranks_draw_apart_reproducibly_and_resume_both_streams(tmp_path):
    """Two DDP processes: different timesteps, noise and data per rank; a rerun draws the
    same; a stop after 2 steps and a resume to 4 continue both ranks' streams; results.json
    is written by rank 0 only."""
    straight = ddp_run(tmp_path / "straight", "trainer.max_steps=4")
    for a, b in zip(straight[0], straight[1], strict=True):
        assert not torch.equal(a["s"], b["s"]) and a["captions"] != b["captions"]
        assert all(not torch.equal(x, y) for x, y in zip(a["noise"], b["noise"], strict=True))
    assert [len(straight[r]) for r in (0, 1)] == [4, 4]

    checkpoint = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt",
                            weights_only=False)
    states = checkpoint["generator_states"]
    assert len(states) == 2 and not torch.equal(states[0], states[1])
    results = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert results["timings"]["global_step"] == 4
    writes = {r: (tmp_path / "straight" / f"writes_rank{r}.txt").read_text().split()
              for r in (0, 1)}
    assert "results.json" in writes[0] and "rank1.started" in writes[1]
    assert "results.json" not in writes[1]

    first = ddp_run(tmp_path / "resumed", "trainer.max_steps=2")
    resumed = ddp_run(tmp_path / "resumed", "trainer.max_steps=4", "ckpt_path=last")
    for rank in (0, 1):
        assert all(same_draws(a, b) for a, b in zip(first[rank], straight[rank][:2], strict=True))
        assert [d["step"] for d in resumed[rank]] == [2, 3]
        assert all(same_draws(a, b) for a, b in zip(resumed[rank], straight[rank][2:],
                                                    strict=True))
