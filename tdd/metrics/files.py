"""Local weight files: every metric model comes from disk, never from the network."""

from __future__ import annotations

from pathlib import Path


def require_file(path: str | Path | None, setting: str) -> Path:
    """Return ``path`` as a Path, or raise FileNotFoundError naming the config ``setting``.

    Checked before any model is built, so a typo fails at start-up instead of after training,
    and a missing file is never an occasion to download something.
    """
    if path is None or str(path).strip() in ("", "???"):
        raise FileNotFoundError(f"{setting}: no file given (set it to a local path)")
    resolved = Path(str(path)).expanduser()
    if not resolved.is_file():
        raise FileNotFoundError(f"{setting}: file not found: {resolved}")
    return resolved
