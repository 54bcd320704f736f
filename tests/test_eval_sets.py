"""Evaluation sets from files (folder, JSONL, COCO layout, prompts only) and the on-disk cache
of reference FID statistics."""

from __future__ import annotations

import json
import os
from pathlib import Path

import hydra
import pytest
import torch
from helpers_metrics import tiny_suite
from hydra.errors import InstantiationException
from omegaconf import open_dict
from PIL import Image

from run import train
from tdd.evaluation import NO_REFERENCE, summary_table
from tdd.metrics import FIDScorer
from tdd.metrics.eval_sets import load_evaluation_set, load_image
from tdd.metrics.reference_stats import (
    ReferenceStatistics,
    cache_key,
    extractor_identity,
    reference_statistics,
)

#: Images through the FID feature extractor of the current ``counting_suite``, per call.
SEEN: list[int] = []


def counting_suite():
    """The tests' tiny metric suite, counting what its FID feature extractor encodes."""
    suite = tiny_suite()
    suite.fid.feature.register_forward_hook(lambda module, args, out: SEEN.append(len(out)))
    return suite


def write_image(path: Path, seed: int, size=(40, 48)) -> Path:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[0], size[1], 3), generator=generator, dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.numpy()).save(path)
    return path


def write_coco(root: Path, count: int = 6) -> Path:
    """COCO layout: annotations/captions_val2014.json + val2014/, two captions per image."""
    images, annotations = [], []
    for k in range(count):
        name = f"COCO_val2014_{k:012d}.jpg"
        write_image(root / "val2014" / name, k)
        images.append({"id": 100 + k, "file_name": name, "height": 40, "width": 48})
        annotations += [{"id": 2 * k, "image_id": 100 + k, "caption": f"photo {k} a"},
                        {"id": 2 * k + 1, "image_id": 100 + k, "caption": f"photo {k} b"}]
    path = root / "annotations" / "captions_val2014.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


# -- loaders ---------------------------------------------------------------------------------
def test_coco_layout_one_seeded_caption_per_image(tmp_path):
    path = write_coco(tmp_path)
    full = load_evaluation_set(tmp_path, 6, seed=0)  # the folder finds annotations/
    assert [p.name for p in full.images] == [f"COCO_val2014_{k:012d}.jpg" for k in range(6)]
    assert [p.split()[1] for p in full.prompts] == [str(k) for k in range(6)]
    assert {p.rsplit(" ", 1)[1] for p in full.prompts} == {"a", "b"}  # drawn, not the first
    subset = load_evaluation_set(path, 4, seed=0)
    assert subset == load_evaluation_set(path, 4, seed=0) and len(subset.prompts) == 4
    assert all(f"photo {p.name[-5]}" in q for p, q in zip(subset.images, subset.prompts))
    others = [load_evaluation_set(path, 4, seed=s).images for s in range(1, 6)]
    assert any(images != subset.images for images in others)
    (tmp_path / "val2014" / "COCO_val2014_000000000003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="evaluation.dataset: 1 reference images"):
        load_evaluation_set(path, 6)


def test_folder_with_captions_and_metadata(tmp_path):
    for k in range(3):
        write_image(tmp_path / "a" / "sub" / f"{k}.png", k)
        (tmp_path / "a" / "sub" / f"{k}.txt").write_text(f"caption {k}\n")
    write_image(tmp_path / "a" / "uncaptioned.png", 9)
    folder = load_evaluation_set(tmp_path / "a", 3)
    assert folder.prompts == ["caption 0", "caption 1", "caption 2"] and folder.has_images
    write_image(tmp_path / "b" / "x.webp", 1)
    (tmp_path / "b" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "x.webp", "text": "an x"}) + "\n")
    assert load_evaluation_set(tmp_path / "b", 1).prompts == ["an x"]
    listing = tmp_path / "set.jsonl"
    listing.write_text("\n".join(json.dumps({"image": f"a/sub/{k}.png", "caption": f"c{k}"})
                                 for k in range(3)))
    pairs = load_evaluation_set(listing, 2, seed=3)
    assert len(pairs.images) == 2 and all(p.is_file() for p in pairs.images)


def test_prompts_only_files(tmp_path):
    lines = tmp_path / "prompts.txt"
    lines.write_text("a cat\n\n  a dog  \na bird\n")
    assert load_evaluation_set(lines, 3).prompts == ["a cat", "a dog", "a bird"]
    parti = tmp_path / "PartiPrompts.tsv"
    parti.write_text("Prompt\tCategory\tChallenge\tNote\nbright sun\tWorld\tBasic\t\n"
                     "a red cube\tArtifacts\tColors\t\n")
    parti_set = load_evaluation_set(parti, 2)
    assert parti_set.prompts == ["bright sun", "a red cube"] and not parti_set.has_images


@pytest.mark.parametrize("content, suffix, message", [
    (None, ".txt", "does not exist"),
    ("one prompt\n", ".txt", "evaluation.num_images=2"),
    ("Text\tCategory\nx\ty\n", ".tsv", "no 'Prompt' column"),
    ('{"file_name": "missing.png", "text": "t"}\n', ".jsonl", "no image"),
    ("{}", ".csv", "not a folder"),
])
def test_bad_sets_fail_naming_the_setting(tmp_path, content, suffix, message):
    path = tmp_path / f"set{suffix}"
    if content is not None:
        path.write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as error:
        load_evaluation_set(path, 2)
    assert "evaluation." in str(error.value)


def test_a_bad_dataset_fails_when_evaluation_is_built(make_cfg, tmp_path):
    cfg = make_cfg(f"evaluation.dataset={tmp_path / 'nowhere'}")
    with pytest.raises(InstantiationException, match="evaluation.dataset"):
        hydra.utils.instantiate(cfg.evaluation)


def test_reference_images_are_resized_and_centre_cropped(tmp_path):
    path = write_image(tmp_path / "wide.png", 0, size=(20, 60))
    image = load_image(path, 10)
    assert image.shape == (3, 10, 10) and 0 <= image.min() and image.max() <= 1


# -- reference statistics ---------------------------------------------------------------------
def test_statistics_restore_the_same_fid_as_the_images():
    generator = torch.Generator().manual_seed(0)
    real = torch.rand(12, 3, 16, 16, generator=generator)
    fake = torch.rand(10, 3, 16, 16, generator=generator) * 0.8
    direct = tiny_suite().fid
    direct.set_reference(real)
    restored: FIDScorer = tiny_suite().fid
    stats = ReferenceStatistics.of(restored.feature(chunk) for chunk in real.split(5))
    assert torch.allclose(stats.cov, torch.cov(restored.feature(real).double().T))
    restored.set_reference_statistics(stats.mean, stats.cov, stats.num_samples)
    assert restored.score(fake) == pytest.approx(direct.score(fake), rel=1e-9)


def test_cache_key_follows_files_resolution_and_extractor(tmp_path):
    paths = [write_image(tmp_path / f"{k}.png", k) for k in range(3)]
    feature = tiny_suite().fid.feature
    identity = extractor_identity(feature)
    key = cache_key(paths, 16, identity)
    assert key == cache_key(paths, 16, extractor_identity(tiny_suite().fid.feature))
    assert key != cache_key(paths, 32, identity)
    assert key != cache_key(paths[:2], 16, identity)
    with torch.no_grad():
        feature[0].weight[0, 0, 0, 0] += 1e-3
    assert extractor_identity(feature) != identity
    stat = paths[0].stat()
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cache_key(paths, 16, identity) != key


def test_cache_is_read_then_invalidated(tmp_path):
    paths = [write_image(tmp_path / f"{k}.png", k) for k in range(4)]
    feature = counting_suite().fid.feature
    SEEN.clear()
    first, cache, cached = reference_statistics(paths, feature, 16, tmp_path / "cache", 3)
    assert not cached and cache.is_file() and sum(SEEN) == 4
    second, same, cached = reference_statistics(paths, feature, 16, tmp_path / "cache", 3)
    assert cached and same == cache and sum(SEEN) == 4  # not encoded again
    assert torch.equal(first.mean, second.mean) and torch.equal(first.cov, second.cov)
    write_image(paths[1], 7)  # new content, new size/mtime: recomputed under a new key
    third, other, cached = reference_statistics(paths, feature, 16, tmp_path / "cache", 3)
    assert not cached and other != cache and sum(SEEN) == 8
    assert not torch.equal(third.mean, first.mean)


# -- end to end ---------------------------------------------------------------------------------
def run(make_cfg, dataset: Path, cache: Path, *overrides: str) -> dict:
    cfg = make_cfg("trainer=cpu", "trainer.max_steps=1", "callbacks=none", "logger=none",
                   "data.batch_size=2", "student.rank=2", "student.alpha=2",
                   "export.enabled=false", "evaluation.steps=[2]",
                   "evaluation.teacher_steps=[2]", "evaluation.guidance_scales=[1.0]",
                   "evaluation.num_images=4", "evaluation.batch_size=4",
                   f"evaluation.dataset={dataset}", f"evaluation.cache_dir={cache}", *overrides)
    with open_dict(cfg):
        cfg.metrics = {"_target_": "test_eval_sets.counting_suite"}
    return train(cfg)["metrics"]


def test_second_coco_evaluation_reads_the_cached_reference(make_cfg, tmp_path):
    coco = write_coco(tmp_path / "coco")
    SEEN.clear()
    first = run(make_cfg, coco, tmp_path / "cache")
    encoded_first = sum(SEEN)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    SEEN.clear()
    second = run(make_cfg, coco, tmp_path / "cache")
    # 4 references, the teacher row twice (its images also set the teacher reference), the
    # student row; the second run encodes everything but the references
    assert encoded_first == 4 + 2 * 4 + 4 and sum(SEEN) == encoded_first - 4
    for name in ("teacher2", "2"):
        assert isinstance(first[name]["fid"], float)
        assert second[name]["fid"] == pytest.approx(first[name]["fid"], rel=1e-9)
    assert second["2"]["fid_teacher"] == pytest.approx(first["2"]["fid_teacher"], rel=1e-9)


def test_prompts_only_set_scores_without_fid_against_real_images(make_cfg, tmp_path):
    parti = tmp_path / "PartiPrompts.tsv"
    parti.write_text("Prompt\tCategory\n" + "".join(f"prompt {k}\tWorld\n" for k in range(6)))
    rows = run(make_cfg, parti, tmp_path / "cache")
    assert rows["teacher2"]["fid"] == rows["2"]["fid"] == NO_REFERENCE
    assert isinstance(rows["2"]["fid_teacher"], float)  # vs the teacher's samples: real
    assert isinstance(rows["2"]["brightness"], float)
    assert not (tmp_path / "cache").exists()
    table = summary_table(rows)
    assert "n/a" in table and f"fid: {NO_REFERENCE}" in table


def test_tables_show_a_metric_that_was_not_computed_as_n_a():
    from tdd.tables import table

    config = {"strategy": {"_target_": "tdd.strategies.TDDTarget"},
              "guidance": {"_target_": "tdd.guidance.DecoupledGuidance"},
              "student": {"_target_": "tdd.models.students.LoRAStudent"}}
    parti = {"4": {"steps": 4, "guidance_scale": 1.0, "fid": NO_REFERENCE, "clip": 30.0}}
    coco = {"4": {"steps": 4, "guidance_scale": 1.0, "fid": 12.5, "clip": 29.0}}
    runs = [{"config": dict(config, evaluation={"dataset": "parti.tsv"}), "metrics": parti},
            {"config": dict(config, evaluation={"dataset": "coco"}), "metrics": coco}]
    text = table(runs)
    assert "| evaluation.dataset=parti.tsv | n/a |" in text
    assert "| evaluation.dataset=coco | 12.500 |" in text
    assert "30.000" in table([{"config": config, "metrics": parti}], "clip")
    with pytest.raises(ValueError, match="no evaluated metric 'fid'"):
        table([{"config": config, "metrics": parti}], "fid")
