"""data=folder: exact seeded order, bad files skipped and counted, rank split, resume, runs."""

import json
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch
from helpers_data import make_folder
from torch.utils.data import DistributedSampler

from run import train
from tdd.data.folder import FolderDataModule
from tdd.data.samplers import EpochShuffleSampler

RES, MIN = 16, 24  # planted "too small" images are 20 px on their short side


def all_images(root: Path) -> list[str]:
    suffixes = (".jpg", ".jpeg", ".png", ".webp")
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.suffix in suffixes)


def drain(dm: FolderDataModule, batches: int | None = None) -> list[str]:
    """The good captions in the order the loader gives them (filled-in slots left out), each
    batch counted by the data module as Lightning would."""
    good = []
    for k, batch in enumerate(dm.train_dataloader()):
        if batches is not None and k == batches:
            break
        assert len(batch["caption"]) == dm.batch_size  # bad slots are filled, never dropped
        bad = len(batch["_report"]["skipped"])
        dm.on_before_batch_transfer(batch, 0)
        good += batch["caption"][:dm.batch_size - bad]
    return good


def expected(root: Path, seed: int, epoch: int = 0, count: int | None = None):
    """Good captions and bad names in the documented order: randperm(seed + epoch)."""
    names = all_images(root)
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed + epoch))
    good, bad = [], []
    for index in order.tolist()[:count]:
        name = names[index]
        if name.startswith("sub"):
            good.append(f"caption number {int(name.split('_')[1].split('.')[0])}")
        else:
            bad.append(name)
    return good, bad


@pytest.mark.parametrize("metadata", [False, True], ids=["txt", "metadata.jsonl"])
def test_good_samples_come_out_exactly_and_bad_ones_are_counted(tmp_path, metadata):
    captions, planted = make_folder(tmp_path / "data", good=8, metadata=metadata, min_size=MIN)
    dm = FolderDataModule(str(tmp_path / "data"), batch_size=2, resolution=RES, seed=3,
                          min_size=MIN)
    good = drain(dm)  # 14 files, 7 batches: one whole epoch
    assert good == expected(tmp_path / "data", seed=3)[0]
    assert sorted(good) == sorted(captions)  # every good pair once
    assert dm.report() == {"seen": 14, "skipped": dict(sorted(planted.items()))}
    assert dm.data_report.examples["corrupt_image"].endswith("bad_truncated.jpg")


def test_order_depends_on_seed_and_epoch_and_workers_change_nothing(tmp_path):
    make_folder(tmp_path, good=12, bad=False)
    first = drain(FolderDataModule(str(tmp_path), batch_size=3, resolution=RES, seed=0))
    assert first == expected(tmp_path, seed=0)[0]
    assert first != drain(FolderDataModule(str(tmp_path), batch_size=3, resolution=RES, seed=1))
    dm = FolderDataModule(str(tmp_path), batch_size=3, resolution=RES, seed=0, num_workers=2)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)  # what Lightning does at each epoch start
    second = [c for batch in loader for c in batch["caption"]]
    assert second == expected(tmp_path, seed=0, epoch=1)[0] != first


def test_a_batch_of_bad_files_only_keeps_its_size(tmp_path):
    make_folder(tmp_path, good=1, min_size=MIN)  # 1 good file, 6 bad
    dm = FolderDataModule(str(tmp_path), batch_size=7, resolution=RES, min_size=MIN)
    batch = next(iter(dm.train_dataloader()))
    assert batch["caption"] == ["caption number 0"] * 7
    assert batch["_report"]["seen"] == 7 and len(batch["_report"]["skipped"]) == 6
    (tmp_path / "sub0" / "good_000.webp").write_bytes(b"")  # now nothing is good
    with pytest.raises(ValueError, match="none of its 7 images"):
        next(iter(FolderDataModule(str(tmp_path), batch_size=7, resolution=RES,
                                   min_size=MIN).train_dataloader()))


def test_too_many_bad_files_stop_with_the_commonest_reason(tmp_path):
    make_folder(tmp_path, good=8, bad=False)
    for k in range(20):
        (tmp_path / f"junk_{k:02d}.jpg").write_text("not an image")
        (tmp_path / f"junk_{k:02d}.txt").write_text("a caption")
    dm = FolderDataModule(str(tmp_path), batch_size=4, resolution=RES)
    with pytest.raises(RuntimeError, match=r"not_an_image.*junk_\d\d\.jpg"):
        drain(dm)
    assert dm.data_report.seen >= 20  # it read enough to judge, and no more than an epoch
    lenient = FolderDataModule(str(tmp_path), batch_size=4, resolution=RES, max_bad_fraction=0.8)
    drain(lenient)
    assert lenient.report()["skipped"] == {"not_an_image": 20}


def test_ranks_draw_disjoint_shares_and_resume_mid_epoch(tmp_path):
    order = torch.randperm(11, generator=torch.Generator().manual_seed(5)).tolist()
    ranks = [list(EpochShuffleSampler(11, seed=5, rank=r, world_size=2)) for r in (0, 1)]
    assert ranks == [order[0:10:2], order[1:10:2]]  # 5 each, the odd one left out
    # in batches of 2: rank 0 takes global batches 0 and 2, rank 1 batches 1 and 3
    pairs = [list(EpochShuffleSampler(11, seed=5, rank=r, world_size=2, batch_size=2))
             for r in (0, 1)]
    assert pairs == [order[0:2] + order[4:6], order[2:4] + order[6:8]]
    unshuffled = EpochShuffleSampler(2**31 - 1, shuffle=False, rank=1, world_size=4,
                                     batch_size=3)
    unshuffled.skip(3)  # one batch of this rank already drawn; nothing is listed
    assert list(islice(iter(unshuffled), 4)) == [15, 16, 17, 27]  # global batches 5, 9
    make_folder(tmp_path, good=12, bad=False)
    dm = FolderDataModule(str(tmp_path), batch_size=2, resolution=RES, seed=4)
    assert isinstance(dm.train_dataloader().sampler, DistributedSampler)  # Lightning keeps it
    fresh = drain(dm)
    resumed = FolderDataModule(str(tmp_path), batch_size=2, resolution=RES, seed=4)
    resumed.load_state_dict({"batches_drawn": 4})  # a checkpoint after 4 steps
    assert drain(resumed) == fresh[8:]


def test_an_empty_source_fails_before_any_model_loads(make_cfg, monkeypatch, tmp_path):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the data source was checked")

    monkeypatch.setattr("tdd.models.tiny.build_tiny", must_not_load)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "caption.txt").write_text("text without an image")
    for root, error, match in [(tmp_path / "missing", "FileNotFoundError", "not a directory"),
                               (tmp_path / "empty", "ValueError", "holds no")]:
        with pytest.raises(Exception, match=f"{error}.*data.root=.*{root.name}.*{match}"):
            train(make_cfg("data=folder", f"data.root={root}", "debug=fdr"))
    with pytest.raises(Exception, match="data.root"):
        train(make_cfg("data=folder", "debug=fdr"))  # not set at all


def test_a_run_resumed_mid_epoch_continues_with_the_same_samples(make_cfg, tmp_path):
    """A tiny-teacher run on a folder with bad files, stopped after 2 steps and resumed to 4,
    ends with the weights and the data report of 4 uninterrupted steps."""
    make_folder(tmp_path / "data", good=12, min_size=MIN)
    common = ["data=folder", f"data.root={tmp_path / 'data'}", "data.num_workers=0",
              f"data.min_size={MIN}", "data.batch_size=2", "data.crop=random", "data.flip=true",
              "trainer=cpu", "trainer.log_every_n_steps=1", "student.rank=4",
              "student.alpha=4", "strategy=tcd", "trainer.deterministic=true",
              "callbacks.checkpoint.every_n_train_steps=2"]
    straight = make_cfg(*common, "trainer.max_steps=4")
    results = train(straight)
    _, bad = expected(tmp_path / "data", seed=straight.seed, count=8)
    saved = json.loads((Path(straight.paths.output_dir) / "results.json").read_text())
    assert saved["data"] == results["data"] and results["data"]["seen"] == 8
    assert sum(results["data"]["skipped"].values()) == len(bad) > 0
    metrics = next(Path(straight.paths.output_dir).rglob("metrics.csv")).read_text()
    assert "data/skipped_" in metrics.splitlines()[0]

    first = make_cfg(*common, "trainer.max_steps=2", "logger=none")
    first.paths.output_dir = str(tmp_path / "resumed")
    train(first)
    second = make_cfg(*common, "trainer.max_steps=4", "ckpt_path=last", "logger=none")
    second.paths.output_dir = str(tmp_path / "resumed")
    assert train(second)["data"] == results["data"]  # counts before the stop are kept

    def weights(cfg):
        path = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        return torch.load(path, weights_only=False)["state_dict"]

    a, b = weights(straight), weights(second)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)


@pytest.mark.slow
def test_two_ddp_processes_share_the_folder_and_report_both(tmp_path):
    """trainer=ddp_sim (two gloo processes): Lightning keeps the rank-split sampler (no
    DistributedSamplerWrapper) and results.json counts both ranks' samples."""
    make_folder(tmp_path / "data", good=12, bad=False)
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "run.py", "debug=default", "trainer=ddp_sim", "logger=none",
               "model=tiny", "metrics=none", "data=folder", f"data.root={tmp_path / 'data'}",
               "data.num_workers=0", "trainer.max_steps=2", "trainer.devices=2",
               f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["data"] == {"seen": 2 * 2 * 2, "skipped": {}}  # steps x batch x ranks
