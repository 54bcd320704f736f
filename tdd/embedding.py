"""Guidance-scale embedding: w as a student input (full-model LCM, Luo et al. 2023)."""

from __future__ import annotations

import math

import torch


def guidance_embedding(w: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """Sinusoidal embedding of ``w * 1000`` (the timestep-embedding recipe of Ho et al. 2020)."""
    if dim % 2:
        raise ValueError(f"guidance.embedding_dim={dim} must be even")
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) / (half - 1) * torch.arange(half, dtype=torch.float32))
    angles = (w.float() * 1000.0)[:, None] * freqs.to(w.device)[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)
