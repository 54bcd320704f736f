"""Mixed precision as the published scripts do it, and the memory savers: gradient checkpointing,
SDPA attention, VAE slicing and a separate VAE, the caption cache."""

import csv
from functools import partial
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from run import train
from tdd.guidance import DecoupledGuidance
from tdd.losses import PseudoHuberLoss
from tdd.models.students import FullStudent, LoRAStudent
from tdd.models.teacher import load_teacher, save_pipeline
from tdd.models.tiny import build_tiny, tiny_vae
from tdd.module import DistillationModule
from tdd.sampling import TCDSampler, generate
from tdd.strategies import TCDTarget

BATCH = {
    "pixel_values": torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1,
    "caption": ["a red circle", "a blue square", "a red circle", "two shapes"],
}


def build_module(student, dtype="float32", cache_text=0, seed=3):
    return DistillationModule(build_tiny(dtype=dtype), student, TCDTarget(),
                              DecoupledGuidance(empty_prompt_share=0.25), PseudoHuberLoss(),
                              partial(torch.optim.AdamW, lr=1e-4), seed=seed,
                              cache_text=cache_text)


def distill(make_cfg, steps, *overrides, size=None):
    cfg = make_cfg("trainer=cpu", "logger=csv", "data=dummy", f"data.size={size or 4 * steps}",
                   "data.batch_size=4", f"trainer.max_steps={steps}", "export.enabled=false",
                   "trainer.log_every_n_steps=1", "student.rank=4", "student.alpha=4",
                   f"callbacks.checkpoint.every_n_train_steps={steps}", *overrides)
    train(cfg)
    out = Path(cfg.paths.output_dir)
    rows = csv.DictReader(open(out / "csv" / "metrics.csv"))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    return losses, checkpoint["state_dict"]


HALF = [
    pytest.param("bfloat16", "bf16-mixed", id="bf16-mixed"),
    pytest.param("float16", "32-true", id="fp16-teacher"),
    pytest.param("float16", "16-mixed", id="16-mixed", marks=pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="fp16 autocast needs CUDA: Lightning runs 16-mixed as bf16-mixed on a CPU")),
]


@pytest.mark.parametrize("dtype, precision", HALF)
def test_half_precision_teacher_trains_fp32_weights(make_cfg, dtype, precision):
    """A few steps: finite losses, the trainable tensors fp32, the frozen teacher in dtype."""
    accelerator = "gpu" if precision == "16-mixed" else "cpu"
    losses, state = distill(make_cfg, 3, f"model.dtype={dtype}",
                            f"trainer.precision={precision}", f"trainer.accelerator={accelerator}")
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert state and {v.dtype for v in state.values()} == {torch.float32}


@pytest.mark.slow
def test_bf16_mixed_loss_falls_over_50_steps(make_cfg):
    """One fixed batch of 4 images, 50 steps."""
    losses, state = distill(make_cfg, 50, "model.dtype=bfloat16", "trainer.precision=bf16-mixed",
                            "optimizer.lr=1e-3", size=4)
    assert sum(losses[-10:]) < 0.9 * sum(losses[:10])
    assert {v.dtype for v in state.values()} == {torch.float32}


@pytest.mark.parametrize("student", [partial(LoRAStudent, rank=4, alpha=4),
                                     partial(FullStudent, guidance_embedding_dim=8)],
                         ids=["lora", "full"])
def test_frozen_networks_in_dtype_trainable_ones_in_fp32(student):
    module = build_module(student, "bfloat16")
    trainable = list(module.student.trainable_parameters())
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    frozen = [p for p in module.parameters() if not p.requires_grad]
    teacher_unet = getattr(module.student, "teacher_unet", module.student.unet)
    assert all(p.dtype == torch.bfloat16 for p in teacher_unet.parameters() if not p.requires_grad)
    assert all(p.dtype == torch.bfloat16 for p in module.text.parameters())
    assert frozen and all(p.dtype == torch.bfloat16 for p in module.vae.parameters())
    loss = module.training_step(BATCH, 0)  # fp32 latents meet the bf16 UNet: no dtype error
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)


def recomputes(module) -> int:
    """Forward passes of one student resnet during a training step and its backward."""
    calls = []
    resnet = module.student.unet.down_blocks[1].resnets[0]
    # a pre-hook: the recompute stops as soon as backward has what it needs
    handle = resnet.register_forward_pre_hook(lambda *_: calls.append(1))
    module.training_step(BATCH, 0).backward()
    handle.remove()
    return len(calls)


@pytest.mark.parametrize("student", [partial(LoRAStudent, rank=4, alpha=4), FullStudent],
                         ids=["lora", "full"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(student):
    plain = build_module(student)
    saving = build_module(partial(student, gradient_checkpointing=True))
    saving.student.load_state_dict(plain.student.state_dict())
    with torch.no_grad():  # a student away from its teacher
        g = torch.Generator().manual_seed(0)
        for a, b in zip(plain.student.trainable_parameters(),
                        saving.student.trainable_parameters()):
            a.add_(torch.randn(a.shape, generator=g) * 0.02), b.copy_(a)
    calls_plain, calls_saving = recomputes(plain), recomputes(saving)
    # online, teacher (LoRA: the same UNet) and target passes, plus the recompute in backward
    assert calls_saving == calls_plain + 1
    grads = {}
    for name, module in (("plain", plain), ("saving", saving)):
        module.generator.manual_seed(11)
        module.student.zero_grad()
        loss = module.training_step(BATCH, 0)
        loss.backward()
        grads[name] = (loss, [p.grad for p in module.student.trainable_parameters()])
    (loss_a, grad_a), (loss_b, grad_b) = grads["plain"], grads["saving"]
    assert torch.allclose(loss_a, loss_b, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in grad_b)  # gradients pass the frozen checkpointed base
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(grad_a, grad_b))


@pytest.mark.parametrize("student", [partial(LoRAStudent, rank=4, alpha=4), FullStudent],
                         ids=["lora", "full"])
def test_attention_runs_through_pytorch_sdpa(student):
    module = build_module(student)
    processors = module.student.unet.attn_processors
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values())


def test_caption_cache_encodes_each_caption_once_and_changes_nothing():
    plain = build_module(partial(LoRAStudent, rank=4, alpha=4))
    cached = build_module(partial(LoRAStudent, rank=4, alpha=4), cache_text=2)
    cached.student.load_state_dict(plain.student.state_dict())
    assert torch.allclose(plain.training_step(BATCH, 0), cached.training_step(BATCH, 0))
    encoded = []
    cache = cached.text_cache
    cache.text = lambda captions: encoded.extend(captions) or plain.text(captions)
    cache.clear()
    captions = ["a red circle", "a blue square", "a red circle"]
    assert torch.allclose(cache(captions).hidden, plain.text(captions).hidden, atol=1e-6)
    assert encoded == ["a red circle", "a blue square"]
    cache(["a blue square", "a red circle"])
    assert len(encoded) == 2  # both cached
    cache(["two shapes"])  # evicts the least recently used, "a blue square"
    cache(["a red circle", "a blue square"])
    assert encoded == ["a red circle", "a blue square", "two shapes", "a blue square"]
    with pytest.raises(ValueError, match="module.cache_text"):
        build_module(partial(LoRAStudent, rank=4, alpha=4), cache_text=-1)


@pytest.fixture
def pipeline_dir(tmp_path):
    return save_pipeline(build_tiny(), tmp_path / "pipeline")


def test_separate_vae_and_vae_dtype(pipeline_dir, tmp_path):
    torch.manual_seed(1)
    other = tiny_vae()
    other.save_pretrained(tmp_path / "vae_fp16_fix")
    teacher = load_teacher(str(pipeline_dir), 32, dtype="float16",
                           vae_path=str(tmp_path / "vae_fp16_fix"))
    weight = teacher.vae.encoder.conv_in.weight
    assert weight.dtype == torch.float16
    assert torch.equal(weight.float(), other.encoder.conv_in.weight.half().float())
    assert teacher.unet.dtype == torch.float16
    stock = load_teacher(str(pipeline_dir), 32, dtype="float16")
    assert stock.vae.dtype == torch.float32  # the stock VAE overflows in fp16
    assert load_teacher(str(pipeline_dir), 32, dtype="bfloat16").vae.dtype == torch.bfloat16
    with pytest.raises(FileNotFoundError, match="model.vae_path"):
        load_teacher(str(pipeline_dir), 32, vae_path=str(tmp_path / "missing"))


def test_evaluation_decodes_one_image_at_a_time_with_slicing(pipeline_dir):
    teacher = load_teacher(str(pipeline_dir), 32, vae_slicing=True)
    batches = []
    handle = teacher.vae.decoder.register_forward_hook(
        lambda module, args, out: batches.append(args[0].shape[0]))
    generate(teacher.unet, teacher, TCDSampler(), ["a", "b", "c"], [0, 1, 2], 1,
             guidance_scale=2.0, batch_size=3)
    handle.remove()
    assert batches == [1, 1, 1]
