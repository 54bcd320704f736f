"""data=webdataset: tar shards streamed exactly, bad samples and shards skipped and counted,
rank/worker split, resume from the position reached, and a tiny-teacher run."""

import json
import logging
from itertools import islice
from pathlib import Path

import pytest
from helpers_data import bad_samples, shard_samples, write_shard

from run import train
from tdd.data.webdataset import WebDataModule

RES, MIN = 16, 24
GOOD_SHARDS = {0: range(0, 5), 1: range(5, 10), 2: range(10, 12)}  # shard -> good samples


def make_shards(root: Path, caption_key: str = "txt") -> dict[str, int]:
    """s0, s1: good; s2: 2 good + one bad sample per reason + one without image; s3: s1 cut
    inside its first member; s4: not a tar; s5: missing. Returns the planted counts."""
    for shard, good in GOOD_SHARDS.items():
        samples = shard_samples(good.start, len(good), caption_key)
        if shard == 2:
            for k, (_, _, data, text) in enumerate(bad_samples(MIN)):
                members = {"jpg": data}
                if text is not None and caption_key == "txt":
                    members["txt"] = text.encode()
                elif text is not None:
                    members["json"] = json.dumps({caption_key: text}).encode()
                samples.append((f"bad{k}", members))
            samples.append(("noimage", {"txt": b"a caption without its image"}))
        write_shard(root / f"s{shard}.tar", samples)
    (root / "s3.tar").write_bytes((root / "s1.tar").read_bytes()[:700])
    (root / "s4.tar").write_bytes(b"definitely not a tar archive " * 40)
    planted = {reason: 1 for reason, *_ in bad_samples(MIN)}
    return {**planted, "missing_image": 1, "bad_shard": 3}


def module(root: Path, **kwargs) -> WebDataModule:
    options = dict(batch_size=3, resolution=RES, min_size=MIN, shuffle_buffer=1, seed=0)
    return WebDataModule(str(root / "s{0..5}.tar"), **{**options, **kwargs})


def captions_of(shards) -> list[str]:
    return [f"caption number {k}" for s in shards if s in GOOD_SHARDS for k in GOOD_SHARDS[s]]


def test_first_pass_is_exact_and_every_bad_kind_is_counted(tmp_path, caplog):
    planted = make_shards(tmp_path)
    dm = module(tmp_path)
    order = dm.dataset.epoch_order(0)
    assert sorted(order) == list(range(6)) and order != list(range(6))
    assert order == module(tmp_path).dataset.epoch_order(0) != dm.dataset.epoch_order(1)
    # the item after the first pass carries that pass's last reports: start epoch 1 on a
    # good shard, so that it carries nothing of epoch 1
    seed = next(s for s in range(100) if module(tmp_path, seed=s).dataset.epoch_order(1)[0]
                in GOOD_SHARDS and module(tmp_path, seed=s).dataset.epoch_order(0)[-1] != 2)
    dm = module(tmp_path, seed=seed, batch_size=1)
    with caplog.at_level(logging.WARNING, logger="tdd.data.webdataset"):
        batches = list(islice(iter(dm.train_dataloader()), 13))
    for batch in batches:
        dm.on_before_batch_transfer(batch, 0)
    captions = [b["caption"][0] for b in batches]
    assert captions[:12] == captions_of(dm.dataset.epoch_order(0))  # shard order, tar order
    assert captions[12] == captions_of(dm.dataset.epoch_order(1))[0]
    assert dm.report() == {"seen": 12 + 7 + 1, "skipped": dict(sorted(planted.items()))}
    assert sum(f"{tmp_path / 's3.tar'}" in r.message and "after 0 samples" in r.message
               for r in caplog.records) == 1  # the truncated shard, reported with its path


def test_caption_from_a_json_field_and_every_image_mode(tmp_path):
    make_shards(tmp_path, caption_key="caption")
    dm = module(tmp_path, caption_key="caption", batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    assert all(c.startswith("caption number") for c in batch["caption"])
    assert batch["pixel_values"].shape == (4, 3, RES, RES)
    assert batch["original_size"].shape == (4, 2) and batch["crop_top_left"].shape == (4, 2)


@pytest.mark.parametrize("shards", [6, 1], ids=["split-by-shard", "split-by-sample"])
def test_ranks_read_disjoint_shares_that_cover_the_pass(tmp_path, shards):
    make_shards(tmp_path)
    urls = str(tmp_path / "s{0..5}.tar") if shards == 6 else str(tmp_path / "s0.tar")
    passes = []
    for rank in (0, 1):
        dataset = WebDataModule(urls, resolution=RES, min_size=MIN, shuffle_buffer=1).dataset
        dataset.rank, dataset.world_size = rank, 2
        order = dataset.epoch_order(0)
        share = (captions_of(order[rank::2]) if shards == 6
                 else captions_of([0])[rank::2])  # one shard: every other sample
        assert [item["caption"] for item in islice(iter(dataset), len(share))] == share
        passes.append(share)
    assert not set(passes[0]) & set(passes[1])
    assert sorted(passes[0] + passes[1]) == sorted(captions_of(range(6) if shards == 6 else [0]))


def test_resume_continues_from_the_position_reached(tmp_path):
    make_shards(tmp_path)
    fresh = iter(module(tmp_path).train_dataloader())
    batches = [next(fresh)["caption"] for _ in range(9)]  # crosses into the second pass
    first = module(tmp_path)
    loader = iter(first.train_dataloader())
    for _ in range(5):
        first.on_before_batch_transfer(next(loader), 0)
    state = first.state_dict()
    resumed = module(tmp_path)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint stores it
    again = iter(resumed.train_dataloader())
    assert [next(again)["caption"] for _ in range(4)] == batches[5:]
    assert resumed.report()["seen"] == first.report()["seen"]


def test_resume_with_two_workers_continues_each_workers_stream(tmp_path):
    for shard in range(6):
        write_shard(tmp_path / f"s{shard}.tar", shard_samples(3 * shard, 3))
    fresh = iter(module(tmp_path, num_workers=2).train_dataloader())
    batches = [next(fresh)["caption"] for _ in range(7)]
    first = module(tmp_path, num_workers=2)
    loader = iter(first.train_dataloader())
    for _ in range(5):  # workers 0, 1, 0, 1, 0
        first.on_before_batch_transfer(next(loader), 0)
    resumed = module(tmp_path, num_workers=2)
    resumed.load_state_dict(first.state_dict())
    again = iter(resumed.train_dataloader())
    assert [next(again)["caption"] for _ in range(2)] == [batches[6], batches[5]]


def test_unreadable_sources_fail_fast_and_never_hang(make_cfg, monkeypatch, tmp_path):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the data source was checked")

    monkeypatch.setattr("tdd.models.tiny.build_tiny", must_not_load)
    for urls in (str(tmp_path / "nothing{0..3}.tar"), str(tmp_path)):
        with pytest.raises(Exception, match="data.urls=.*no tar shard found"):
            train(make_cfg("data=webdataset", f"data.urls='{urls}'", "debug=fdr"))
    with pytest.raises(Exception, match="data.urls"):
        train(make_cfg("data=webdataset", "debug=fdr"))  # not set at all
    (tmp_path / "junk.tar").write_bytes(b"not a tar")
    with pytest.raises(RuntimeError, match="read no sample, e.g. .*junk.tar"):
        next(iter(WebDataModule(str(tmp_path / "junk.tar"), resolution=RES).train_dataloader()))


def test_too_many_bad_samples_stop_with_the_commonest_reason(tmp_path):
    junk = [(f"j{k:02d}", {"jpg": b"not an image", "txt": b"a caption"}) for k in range(20)]
    write_shard(tmp_path / "a.tar", shard_samples(0, 5) + junk)
    dm = WebDataModule(str(tmp_path / "a.tar"), resolution=RES, shuffle_buffer=1)
    with pytest.raises(RuntimeError, match=r"'not_an_image' \(1[5-9]\), e.g. .*a.tar:j\d\d"):
        list(islice(iter(dm.train_dataloader()), 10))


def test_shuffle_buffer_reorders_reproducibly(tmp_path):
    make_shards(tmp_path)

    def first(seed, buffer, n=12):
        loader = module(tmp_path, seed=seed, shuffle_buffer=buffer, batch_size=1)
        return [b["caption"][0] for b in islice(iter(loader.train_dataloader()), n)]

    shuffled = first(0, 4)
    assert shuffled == first(0, 4) and shuffled != first(0, 1) and shuffled != first(1, 4)
    assert set(shuffled) <= set(first(0, 1, 12 + 3))  # a buffer of 4 delays by 3 at most


def test_tiny_teacher_trains_on_shards_until_max_steps(make_cfg, tmp_path):
    make_shards(tmp_path / "shards")
    cfg = make_cfg("data=webdataset", f"data.urls={tmp_path / 'shards'}", "data.num_workers=0",
                   f"data.min_size={MIN}", "data.batch_size=2", "data.shuffle_buffer=4",
                   "trainer=cpu", "trainer.max_steps=7", "callbacks=none", "logger=none",
                   "student.rank=4")
    results = train(cfg)  # 14 samples: more than one pass of the 12 good ones
    assert results["timings"]["global_step"] == 7
    saved = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert saved["data"]["seen"] >= 14 and saved["data"]["skipped"]["bad_shard"] >= 1
