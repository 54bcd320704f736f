"""`python -m tdd.bench memory`: the published UNet configs, and one step's memory figures."""

import json

import pytest
import torch

from tdd.bench import main as bench_main
from tdd.bench_memory import CONFIGS, measure

TINY_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4,
    "out_channels": 4, "layers_per_block": 1, "block_out_channels": [16, 32],
    "norm_num_groups": 8, "cross_attention_dim": 16, "attention_head_dim": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
}
FIELDS = {"model", "resolution", "batch_size", "dtype", "gradient_checkpointing", "device",
          "lora_rank", "params_m", "trainable_params_m", "saved_activations_mb",
          "largest_block_mb", "peak_mb", "step_peak_mb", "seconds"}


def test_published_unet_configs_have_their_parameter_counts():
    """Built on the meta device (no memory): SD1.5 860M and SDXL 2.57B parameters."""
    from diffusers import UNet2DConditionModel

    counts = {}
    for name in ("sd15", "sdxl"):
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(
                json.loads((CONFIGS / f"{name}_unet.json").read_text()))
        counts[name] = sum(p.numel() for p in unet.parameters())
    assert counts == {"sd15": 859_520_964, "sdxl": 2_567_463_684}


def test_memory_bench_prints_every_setting(tmp_path, capsys):
    config = tmp_path / "tiny_unet.json"
    config.write_text(json.dumps(TINY_UNET))
    bench_main(["memory", "--config", str(config), "--resolutions", "64", "128", "--rank", "4",
                "--device", "meta"])
    rows = json.loads(capsys.readouterr().out)
    assert [(r["resolution"], r["gradient_checkpointing"]) for r in rows] == [
        (64, False), (64, True), (128, False), (128, True)]
    assert all(FIELDS <= set(r) and r["model"] == "tiny_unet" for r in rows)
    assert rows[2]["saved_activations_mb"] > 3 * rows[0]["saved_activations_mb"]  # 4x pixels
    with pytest.raises(SystemExit, match="--models"):
        bench_main(["memory", "--models", "sd3"])


def test_gradient_checkpointing_keeps_fewer_activations():
    """A real CPU step: same trainable size, far fewer saved activations with checkpointing;
    a block's own activations bound what its recompute holds."""
    plain, saving = (measure("tiny", 128, 2, "float32", mode, "cpu", rank=4, config=TINY_UNET)
                     for mode in (False, True))
    assert plain["trainable_params_m"] == saving["trainable_params_m"] > 0
    assert saving["saved_activations_mb"] < 0.5 * plain["saved_activations_mb"]
    assert 0 < plain["largest_block_mb"] < plain["saved_activations_mb"]
    assert plain["seconds"] > 0 and plain["peak_mb"] >= plain["step_peak_mb"]
