"""A study folder's results as the study runner writes them."""

import json


def write_study_run(study, arm, seed, overrides, row, step=600, name="final"):
    """``results/<arm>/seed<k>/<name>_step<N>.json`` as the study runner writes it."""
    folder = study / "results" / arm / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    metrics = {"4": dict({"steps": 4, "guidance_scale": 1.0, "teacher": False}, **row),
               "teacher25": {"steps": 25, "guidance_scale": 4.5, "teacher": True, "fid": 2.0}}
    record = {"config": {"seed": seed}, "metrics": metrics, "overrides": overrides + [
        f"seed={seed}"], "arm": arm, "seed": seed, "eval": name, "step": step}
    (folder / f"{name}_step{step:06d}.json").write_text(json.dumps(record))
    return folder
