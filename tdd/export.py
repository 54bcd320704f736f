"""Export a LoRA student so that stock tools load it unchanged.

``fmt="diffusers"``: ``pytorch_lora_weights.safetensors`` as written by diffusers'
``save_lora_weights`` (PEFT key names, ``unet.`` prefix), which
``pipe.load_lora_weights(directory)`` reads. The adapter's
``LoraConfig`` travels in the file's metadata, so loading restores ``lora_alpha`` and with it the
scale alpha / rank (the TDD SDXL recipe trains rank 64 with alpha 8: a loader that assumed
alpha = rank would apply the LoRA 8 times too strongly).
``fmt="kohya"``: ``tdd_lora_kohya.safetensors`` in the kohya / A1111 / ComfyUI layout, with the
trained alpha in every ``.alpha`` key (diffusers' converter writes alpha = rank there).
Next to the weights a small JSON records rank, alpha, scale and target modules.

Every export also carries its sampler (:func:`export_sampler`): ``scheduler/`` holds the
``scheduler_config.json`` of the run's evaluation sampler (its grid, eta, schedule options), so
``<SchedulerClass>.from_pretrained(<export>/scheduler)`` in a stock pipeline samples as the run
did, and ``sampling.json`` the pipeline call arguments of each evaluated step count (``eta``,
which pipelines otherwise set to 0, and custom ``timesteps`` such as PCM's phase edges).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from tdd.sampling import Sampler, build_scheduler
from tdd.schedule import FLOW_SCHEDULER_CLASSES

ADAPTER = "default"
WEIGHT_NAMES = {
    "diffusers": "pytorch_lora_weights.safetensors",
    "kohya": "tdd_lora_kohya.safetensors",
}


def lora_unet(student: nn.Module) -> nn.Module:
    """The UNet carrying the peft adapter of a LoRA student (or the UNet itself)."""
    unet = getattr(student, "unet", student)
    if ADAPTER not in (getattr(unet, "peft_config", None) or {}):
        raise ValueError(
            "export_lora needs a UNet with a peft LoRA adapter (student=lora); "
            f"{type(student).__name__} has none"
        )
    return unet


def lora_record(unet: nn.Module, fmt: str, weight_name: str) -> dict:
    """What the JSON next to the weights says about the adapter."""
    config = unet.peft_config[ADAPTER]
    return {
        "format": fmt,
        "weight_name": weight_name,
        "rank": config.r,
        "alpha": config.lora_alpha,
        "scale": config.lora_alpha / config.r,
        "target_modules": sorted(config.target_modules),
    }


def _peft_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _save_diffusers(unet: nn.Module, path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    from tdd.models.flow import is_transformer, pipeline_class

    if is_transformer(unet):  # keys prefixed ``transformer.``, read by the pipeline's loader
        pipeline_class(unet).save_lora_weights(
            path.parent, transformer_lora_layers=_peft_state(unet), weight_name=path.name,
            safe_serialization=True,
            transformer_lora_adapter_metadata=unet.peft_config[ADAPTER].to_dict(),
        )
        return

    # PEFT key names (lora_A / lora_B), which load_lora_weights reads natively. diffusers'
    # convert_state_dict_to_diffusers renames only the attention projections, so on the
    # resnet / conv targets of docs/methods.md it writes a mixed file whose attention LoRA the
    # loader then silently drops.
    StableDiffusionPipeline.save_lora_weights(
        path.parent, unet_lora_layers=_peft_state(unet),
        weight_name=path.name, safe_serialization=True,
        unet_lora_adapter_metadata=unet.peft_config[ADAPTER].to_dict(),
    )


def _save_kohya(unet: nn.Module, path: Path) -> None:
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    from tdd.models.flow import is_transformer

    if is_transformer(unet):
        raise ValueError("export fmt='kohya' is the UNet LoRA layout; a flow transformer's LoRA "
                         "exports as fmt='diffusers' (FluxPipeline / StableDiffusion3Pipeline "
                         ".load_lora_weights)")
    config = unet.peft_config[ADAPTER]
    if config.rank_pattern or config.alpha_pattern:
        raise ValueError("kohya export supports one rank and alpha for all modules")
    state = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in _peft_state(unet).items()})
    alpha = torch.tensor(float(config.lora_alpha))
    state = {k: (alpha.clone() if k.endswith(".alpha") else v) for k, v in state.items()}
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(config.r),
                "ss_network_alpha": str(config.lora_alpha)}
    save_file(state, str(path), metadata=metadata)


def export_lora(student: nn.Module, directory: str | Path, fmt: str = "diffusers") -> Path:
    """Write the student's LoRA to ``directory`` in ``fmt``; returns the weights file."""
    if fmt not in WEIGHT_NAMES:
        raise ValueError(f"export format {fmt!r}; expected one of {sorted(WEIGHT_NAMES)}")
    unet = lora_unet(student)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / WEIGHT_NAMES[fmt]
    (_save_diffusers if fmt == "diffusers" else _save_kohya)(unet, path)
    record = lora_record(unet, fmt, path.name)
    path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return path


SCHEDULER_DIR = "scheduler"
SAMPLING_FILE = "sampling.json"


def pipeline_call(sampler, scheduler, num_steps: int) -> dict:
    """Keyword arguments for a stock pipeline's ``__call__`` that make it sample ``num_steps``
    steps the way ``tdd.sampling.generate`` does with ``sampler``."""
    if type(scheduler).__name__ in FLOW_SCHEDULER_CLASSES:  # eta, schedule: in its config
        return {"num_inference_steps": num_steps}
    call = {"num_inference_steps": num_steps, **sampler.step_kwargs()}
    if type(sampler).set_timesteps is not Sampler.set_timesteps:  # a schedule of its own
        sampler.set_timesteps(scheduler, num_steps)
        call["timesteps"] = [int(t) for t in scheduler.timesteps]
    return call


def export_sampler(
    sampler,
    scheduler_config: Mapping,
    directory: str | Path,
    steps: Sequence[int],
    guidance_scales: Sequence[float] = (1.0,),
) -> Path:
    """Write ``<directory>/scheduler/scheduler_config.json`` for ``sampler`` and
    ``<directory>/sampling.json`` (scheduler class and the call arguments per step count)."""
    directory = Path(directory)
    scheduler = build_scheduler(sampler, scheduler_config)
    scheduler.save_pretrained(directory / SCHEDULER_DIR)
    cls = type(scheduler)
    record = {
        "scheduler": cls.__name__,
        "import": f"from {cls.__module__.split('.schedulers')[0]}.schedulers import "
                  f"{cls.__name__}",
        "guidance_scales": [float(g) for g in guidance_scales],
        "calls": {str(k): pipeline_call(sampler, scheduler, int(k)) for k in steps},
    }
    path = directory / SAMPLING_FILE
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def export_student(
    student: nn.Module,
    sampler,
    scheduler_config: Mapping,
    directory: str | Path,
    fmt: str = "diffusers",
    steps: Sequence[int] = (4,),
    guidance_scales: Sequence[float] = (1.0,),
) -> Path:
    """The distilled weights (``student.export``) and the sampler they were evaluated with."""
    weights = Path(student.export(directory, fmt))
    export_sampler(sampler, scheduler_config, directory, steps, guidance_scales)
    return weights


def load_trainable_state(
    student: nn.Module, state: Mapping[str, torch.Tensor], prefix: str = "student."
) -> None:
    """Load a training checkpoint's trainable state (LoRA, or student/EMA UNet) into ``student``.

    Checkpoints hold only trainable state, keyed ``<prefix>`` + the student's
    ``trainable_state_dict()`` keys; every one of them must be present, other entries are ignored.
    """
    expected = set(student.trainable_state_dict())
    own = {k[len(prefix):]: v for k, v in state.items()
           if k.startswith(prefix) and k[len(prefix):] in expected}
    missing = sorted(expected - own.keys())
    if missing or not expected:
        raise ValueError(
            f"checkpoint lacks {len(missing)} of the student's {len(expected)} trainable "
            f"tensors under prefix {prefix!r} (first: {missing[:3]}); rank/alpha or targets "
            "differ?"
        )
    student.load_state_dict(own, strict=False)


def export_run(run_dir: str | Path, checkpoint: str = "last", fmt: str = "diffusers") -> Path:
    """Export a run's checkpoint on demand: rebuild its teacher and student from the run's
    saved config (``.hydra/config.yaml``), load the trainable state, write ``export-<ckpt>/``."""
    import hydra
    from omegaconf import OmegaConf

    import tdd.config  # noqa: F401  (the ${asset:...} resolver)
    from tdd.factory import build_recipe

    run_dir = Path(run_dir)
    config_path = run_dir / ".hydra" / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: no .hydra/config.yaml")
    ckpt = run_dir / "checkpoints" / f"{checkpoint}.ckpt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"no checkpoint {ckpt}")
    cfg = OmegaConf.load(config_path)
    recipe = build_recipe(cfg)
    teacher = hydra.utils.instantiate(cfg.model)
    student = recipe.student(unet=teacher.unet,
                             guidance_embedding_dim=recipe.guidance.condition_dim)
    data = torch.load(ckpt, map_location="cpu", weights_only=False)
    load_trainable_state(student, data["state_dict"])
    scales = cfg.evaluation.guidance_scales or recipe.guidance.inference_scales
    return export_student(student, hydra.utils.instantiate(cfg.sampler),
                          teacher.scheduler_config, run_dir / f"export-{checkpoint}", fmt,
                          cfg.evaluation.steps, scales)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Export a run's checkpoint (LoRA or UNet).")
    parser.add_argument("run_dir")
    parser.add_argument("--checkpoint", default="last", help="checkpoint name without .ckpt")
    parser.add_argument("--fmt", default="diffusers", choices=["diffusers", "kohya"])
    args = parser.parse_args(argv)
    print(export_run(args.run_dir, args.checkpoint, args.fmt))


if __name__ == "__main__":
    main()
