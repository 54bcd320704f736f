"""Memory of one LoRA distillation step on the published UNets, without a download.

    python -m tdd.bench memory --models sd15 --resolutions 256 512
    python -m tdd.bench memory --models sdxl --resolutions 1024 --dtype bfloat16 --device cuda

The SD1.5 and SDXL UNets are built from their published configurations
(``tdd/models/configs/*_unet.json``) with random weights. One step is what the framework runs:
the frozen teacher on conditional and unconditional inputs (2b), the target without gradient,
the LoRA student forward and backward, an AdamW step. Each setting runs in a fresh process, so
the peak is its own. Printed per setting (JSON):

- ``peak_mb``: CUDA ``max_memory_allocated``; CPU the peak resident set size (``ru_maxrss``);
- ``step_peak_mb``: that peak minus the memory held just before the step (weights, optimizer);
- ``saved_activations_mb``: the tensors autograd keeps for the backward pass (parameters
  excluded), counted with saved-tensor hooks, and ``largest_block_mb``, the most that one
  top-level UNet block saves (with checkpointing: what its recompute holds at once in the
  backward pass, measured with it off). Counts, not allocator figures: the same on any device,
  so ``--device meta`` gives them for settings too large to run here (no compute, no memory;
  run in this process). Views are counted in full and SDPA's math kernel (CPU, meta) keeps
  the attention weights that CUDA's fused kernels recompute, so they bound from above.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import time
from pathlib import Path

import torch

from tdd.models.conditioning import Conditioning
from tdd.models.students import LoRAStudent
from tdd.models.teacher import resolve_dtype

CONFIGS = Path(__file__).parent / "models" / "configs"
TEXT_TOKENS = 77


def build_unet(config: dict, dtype: torch.dtype, device: str):
    """A UNet2DConditionModel of ``config`` with random weights (on ``meta``: shapes only)."""
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel.from_config(config)
    return unet.to(dtype)


def step_inputs(config: dict, batch: int, resolution: int, device: str):
    """Latents, timesteps and a text conditioning of the shapes ``config`` takes."""
    g = torch.Generator().manual_seed(0)
    size = resolution // 8  # the Stable Diffusion VAE downsamples by 8
    x = torch.randn(batch, config["in_channels"], size, size, generator=g).to(device)
    hidden = torch.randn(batch, TEXT_TOKENS, config["cross_attention_dim"], generator=g)
    added = {}
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config[
            "addition_time_embed_dim"]
        added = {"text_embeds": torch.randn(batch, pooled, generator=g).to(device),
                 "time_ids": torch.tensor([[resolution] * 2 + [0, 0] + [resolution] * 2] * batch,
                                          dtype=torch.float32, device=device)}
    t = torch.full((batch,), 499, device=device)
    return x, t, Conditioning(hidden.to(device), added)


class SavedActivations:
    """Bytes of the non-parameter tensors autograd saves for backward inside the block."""

    def __init__(self, module: torch.nn.Module, blocks: list[torch.nn.Module] = ()):
        self.parameters = {id(p) for p in module.parameters()}
        self.bytes = self.largest_block = 0
        for block in blocks:  # bytes saved from a block's start to its end
            block.register_forward_pre_hook(self._block_start)
            block.register_forward_hook(self._block_end)

    def _block_start(self, *_):
        self._start = self.bytes

    def _block_end(self, *_):
        self.largest_block = max(self.largest_block, self.bytes - self._start)

    def pack(self, tensor: torch.Tensor):
        if id(tensor) not in self.parameters:
            self.bytes += tensor.numel() * tensor.element_size()
        return tensor

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def _memory_mb(device: torch.device) -> tuple[float, float]:
    """(current, peak) in MiB: CUDA allocator figures, or the process's RSS on CPU."""
    if device.type == "cuda":
        return (torch.cuda.memory_allocated(device) / 2**20,
                torch.cuda.max_memory_allocated(device) / 2**20)
    if device.type == "meta":
        return 0.0, 0.0
    rss = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    return rss / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(model: str, resolution: int, batch_size: int, dtype: str, checkpointing: bool,
            device: str, rank: int = 64, config: dict | None = None) -> dict:
    """One training step of a LoRA student on ``model``'s UNet; its memory figures."""
    torch.manual_seed(0)
    config = config or json.loads((CONFIGS / f"{model}_unet.json").read_text())
    unet = build_unet(config, resolve_dtype(dtype), device)
    student = LoRAStudent(unet, rank=rank, alpha=rank, gradient_checkpointing=checkpointing)
    student.unet.train()
    optimizer = torch.optim.AdamW(student.trainable_parameters(), lr=1e-6)
    x, t, cond = step_inputs(config, batch_size, resolution, device)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    before, _ = _memory_mb(dev)
    start = time.perf_counter()
    with torch.no_grad():
        student.teacher(x.repeat(2, 1, 1, 1), t.repeat(2), cond.cat(cond))
        student.target(x, t, cond)
    unet = student.unet
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    with SavedActivations(student, blocks) as saved:
        loss = student.online(x, t, cond).float().pow(2).mean()
    loss.backward()
    optimizer.step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    _, peak = _memory_mb(dev)
    params = sum(p.numel() for p in student.unet.parameters())
    trainable = sum(p.numel() for p in student.trainable_parameters())
    return {
        "model": model, "resolution": resolution, "batch_size": batch_size, "dtype": dtype,
        "gradient_checkpointing": checkpointing, "device": device, "lora_rank": rank,
        "params_m": params / 1e6, "trainable_params_m": trainable / 1e6,
        "saved_activations_mb": saved.bytes / 2**20,
        "largest_block_mb": saved.largest_block / 2**20,
        "peak_mb": peak, "step_peak_mb": peak - before if dev.type != "meta" else None,
        "seconds": seconds if dev.type != "meta" else None,
    }


def _child(queue, kwargs):
    try:
        queue.put(measure(**kwargs))
    except Exception as error:  # reported as the setting's result
        queue.put({**{k: v for k, v in kwargs.items() if k != "config"},
                   "error": f"{type(error).__name__}: {error}"})


def measure_in_child(**kwargs) -> dict:
    """:func:`measure` in a fresh process, so the peak is this setting's alone (on ``meta``,
    which has no peak, in this one)."""
    if kwargs["device"] == "meta":
        return measure(**kwargs)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, kwargs))
    process.start()
    result = queue.get()
    process.join()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tdd.bench memory",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["sd15", "sdxl"],
                        help="names of tdd/models/configs/<name>_unet.json")
    parser.add_argument("--resolutions", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", default="float32", help="the frozen UNet's dtype")
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"],
                        choices=["off", "on"])
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", help="a UNet config.json instead of --models")
    args = parser.parse_args(argv)
    resolve_dtype(args.dtype)
    models = {Path(args.config).stem: json.loads(Path(args.config).read_text())} \
        if args.config else {m: None for m in args.models}
    for name in models:
        if models[name] is None and not (CONFIGS / f"{name}_unet.json").is_file():
            raise SystemExit(f"--models: no {CONFIGS / (name + '_unet.json')}")
    rows = []
    for name, config in models.items():
        for resolution in args.resolutions:
            for mode in args.checkpointing:
                rows.append(measure_in_child(
                    model=name, config=config, resolution=resolution,
                    batch_size=args.batch_size, dtype=args.dtype, checkpointing=mode == "on",
                    device=args.device, rank=args.rank))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress
    print(json.dumps(rows, indent=2))
