"""What bf16 autocast buys on this device: the framework's training step with the frozen
networks in float32 against bfloat16 weights under bf16 autocast (``model.dtype=bfloat16
trainer.precision=bf16-mixed``), interleaved in one process. Prints JSON.

    python -m tdd.bench precision --model toy --batch-size 32 --repeats 8
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch


def run(model: str, batch_size: int, repeats: int, warmup: int, strategy: str = "tdd",
        device: str = "cpu") -> dict:
    from tdd.bench_steps import (
        build,
        framework_step,
        interleaved_seconds,
        mixed_precision,
        ratio,
        spread,
        strategy_configs,
        teacher_factory_of,
    )

    device_ = torch.device(device)
    config, fns = strategy_configs()[strategy], {}
    for dtype in ("float32", "bfloat16"):
        module, optimizer = build(teacher_factory_of(model, None, dtype, device_), config,
                                  device_)
        size = module.teacher.resolution
        batch = {"pixel_values": torch.rand(batch_size, 3, size, size,
                                            generator=torch.Generator().manual_seed(0)
                                            ).to(device_) * 2 - 1,
                 "caption": ["a red striped circle at the top left"] * batch_size}
        fns[dtype] = mixed_precision(partial(framework_step, module, batch, optimizer),
                                     device_, module.student.unet.dtype)
    times = interleaved_seconds(fns, device_, repeats, warmup)
    return {"model": model, "batch_size": batch_size, "strategy": strategy,
            "device": device, "threads": torch.get_num_threads(), "repeats": repeats,
            "step_s": {k: spread(v) for k, v in times.items()},
            "bfloat16_speedup": ratio(times["float32"], times["bfloat16"])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tdd.bench precision",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--strategy", default="tdd")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.model, args.batch_size, args.repeats, args.warmup,
                         args.strategy, args.device), indent=2))


if __name__ == "__main__":
    main()
