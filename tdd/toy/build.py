"""``python -m tdd.toy.build {vae,evaluator,teacher,flow,all}``: rebuild the shipped toy assets.

Each builder resumes from its state under ``--work``, writes its files under ``--out``
(default ``tdd/assets/toy``) and its measured quality into ``quality.json`` there.
The order for ``all`` is vae -> evaluator (uses the VAE for robustness) -> teacher -> flow
(the rectified-flow teacher, written beside ``--out`` into ``toy_flow``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tdd.toy.common import ASSETS, BuildSettings

STAGES = ("vae", "evaluator", "teacher", "flow")


def run_stage(stage: str, settings: BuildSettings) -> None:
    if stage == "vae":
        from tdd.toy.vae import build_vae
        build_vae(settings)
    elif stage == "evaluator":
        from tdd.toy.build_evaluator import build_evaluator
        build_evaluator(settings)
    elif stage == "teacher":
        from tdd.toy.build_teacher import build_teacher
        build_teacher(settings)
    elif stage == "flow":
        from tdd.toy.build_flow_teacher import build_flow_teacher
        build_flow_teacher(settings)
    else:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES} or 'all'")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=(*STAGES, "all"))
    parser.add_argument("--work", type=Path, default=Path(".toy-work"),
                        help="resumable training state (default .toy-work)")
    parser.add_argument("--out", type=Path, default=ASSETS, help="asset folder")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps of each stage (default: the stage's own)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="training batch of each stage (default: the stage's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-size", type=int, default=2000,
                        help="held-out prompts used for the quality record")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = BuildSettings(work=args.work, out=args.out, steps=args.steps,
                             batch_size=args.batch_size, seed=args.seed,
                             eval_size=args.eval_size, log_every=args.log_every)
    for stage in STAGES if args.stage == "all" else (args.stage,):
        print(f"== toy assets: {stage} ==", flush=True)
        run_stage(stage, settings)


if __name__ == "__main__":
    main()
