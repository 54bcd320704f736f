import open_clip
import pytest
import torch
from diffusers import StableDiffusionPipeline

from tdd.models.students import FullStudent, LoRAStudent
from tdd.models.teacher import check_teacher_dir, load_teacher, save_pipeline
from tdd.models.tiny import build_tiny
from tdd.models.tokenizer import clip_tokenizer


def perturb_lora(unet, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def inputs(teacher, n=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, 8, 8, generator=g)
    return x, torch.tensor([10, 700])[:n], teacher.text(["a red circle", "a blue square"][:n])


def test_tokenizer_uses_the_real_clip_vocabulary():
    text = "a large red striped circle at the top left on a black background"
    ours = clip_tokenizer()(text).input_ids
    theirs = open_clip.tokenize([text])[0]
    assert ours == theirs[: len(ours)].tolist()
    assert ours[0] == 49406 and ours[-1] == 49407


def test_tiny_teacher_shapes(tiny_teacher):
    x, t, cond = inputs(tiny_teacher)
    assert cond.hidden.shape == (2, 16, 16)
    assert tiny_teacher.unet(x, t, **cond.unet_kwargs()).sample.shape == x.shape
    latents = tiny_teacher.vae.encode(torch.zeros(2, 3, 32, 32)).latent_dist.mean
    assert latents.shape == (2, 4, 8, 8)
    sdxl = build_tiny(sdxl=True)
    cond = sdxl.text(["a", "b"])
    assert set(cond.added) == {"text_embeds", "time_ids"}
    assert sdxl.unet(x, t, **cond.unet_kwargs()).sample.shape == x.shape


def test_lora_student_shares_the_teacher_unet(tiny_teacher):
    x, t, cond = inputs(tiny_teacher)
    reference = tiny_teacher.unet(x, t, **cond.unet_kwargs()).sample
    student = LoRAStudent(tiny_teacher.unet, rank=4, alpha=4)
    assert torch.allclose(student.online(x, t, cond), reference)  # lora_B starts at zero
    perturb_lora(student.unet)
    assert not torch.allclose(student.online(x, t, cond), reference, atol=1e-3)
    assert torch.allclose(student.teacher(x, t, cond), reference)
    assert torch.equal(student.target(x, t, cond), student.online(x, t, cond).detach())
    state = student.trainable_state_dict()
    assert state and all("lora_" in k for k in state)
    trainable = {n for n, p in student.unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    modules = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert {"to_q", "conv1", "time_emb_proj", "proj_in"} <= modules


def test_lora_sampling_merges_adapters_and_restores_the_weights_exactly(tiny_teacher):
    x, t, cond = inputs(tiny_teacher)
    reference = tiny_teacher.unet(x, t, **cond.unet_kwargs()).sample.detach()
    student = LoRAStudent(tiny_teacher.unet, rank=4, alpha=4)
    perturb_lora(student.unet)
    unmerged = student.online(x, t, cond).detach()
    state = {k: v.clone() for k, v in student.unet.state_dict().items()}
    calls = []
    with student.sampling() as unet:
        for name, module in unet.named_modules():  # the forward no longer runs the adapters
            if name.endswith("lora_A.default"):
                module.register_forward_hook(lambda *a: calls.append(1))
        with torch.no_grad():
            merged = unet(x, t, **cond.unet_kwargs()).sample
        changed = [k for k, v in unet.state_dict().items()
                   if "lora_" not in k and not torch.equal(v, state[k])]
    assert not calls and changed  # base weights carry the update while sampling
    assert torch.allclose(merged, unmerged, atol=1e-5)
    assert (merged - reference).abs().max() > 1e-3
    after = student.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())  # bit for bit
    assert torch.equal(student.online(x, t, cond), unmerged)
    with pytest.raises(RuntimeError, match="inside"), student.sampling():
        raise RuntimeError("inside")
    assert all(torch.equal(student.unet.state_dict()[k], v) for k, v in state.items())


def test_lora_sampling_leaves_half_precision_base_weights_unmerged():
    teacher = build_tiny(dtype="bfloat16")
    student = LoRAStudent(teacher.unet, rank=4, alpha=4)
    perturb_lora(student.unet)
    state = {k: v.clone() for k, v in student.unet.state_dict().items()}
    with student.sampling() as unet:
        assert all(torch.equal(unet.state_dict()[k], v) for k, v in state.items())


def test_lora_student_refuses_guidance_embedding(tiny_teacher):
    with pytest.raises(ValueError, match="student=full"):
        LoRAStudent(tiny_teacher.unet, guidance_embedding_dim=256)


def test_full_student_starts_at_the_teacher_and_tracks_ema(tiny_teacher):
    x, t, cond = inputs(tiny_teacher)
    student = FullStudent(tiny_teacher.unet, ema_decay=0.5, guidance_embedding_dim=256)
    w_embedding = torch.randn(2, 256)
    assert torch.allclose(student.online(x, t, cond, w_embedding), student.teacher(x, t, cond))
    with torch.no_grad():
        for p in student.unet.parameters():
            p.add_(0.01)
    before = next(student.ema.parameters()).clone()
    student.update_target()
    after, online = next(student.ema.parameters()), next(student.unet.parameters())
    assert torch.allclose(after, 0.5 * before + 0.5 * online)
    assert set(k.split(".")[0] for k in student.trainable_state_dict()) == {"unet", "ema"}
    assert all(not p.requires_grad for p in student.teacher_unet.parameters())
    with pytest.raises(ValueError, match="ema_decay"):
        FullStudent(build_tiny().unet, ema_decay=1.0)


def test_pipeline_layout_round_trip(tiny_teacher, tmp_path):
    save_pipeline(tiny_teacher, tmp_path / "teacher")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "teacher")
    assert pipe.unet.config.cross_attention_dim == 16
    loaded = load_teacher(str(tmp_path / "teacher"), resolution=32)
    x, t, cond = inputs(tiny_teacher)
    ours = tiny_teacher.unet(x, t, **cond.unet_kwargs()).sample
    theirs = loaded.unet(x, t, **loaded.text(["a red circle", "a blue square"]).unet_kwargs())
    assert torch.allclose(ours, theirs.sample, atol=1e-6)
    assert loaded.scaling_factor == tiny_teacher.scaling_factor
    assert not any(p.requires_grad for p in loaded.unet.parameters())


def test_missing_teacher_directory_names_the_setting(tmp_path):
    with pytest.raises(ValueError, match="model.path is not set"):
        check_teacher_dir("???")
    with pytest.raises(FileNotFoundError, match="model.path"):
        load_teacher(str(tmp_path / "nowhere"), resolution=32)
