"""A small, deterministic metric suite for evaluation tests (no shipped assets needed)."""

import torch
from torch import nn

from tdd.metrics import FIDScorer, MetricSuite


class MeanBrightness(nn.Module):
    """A per-image score that depends on the images only."""

    def forward(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


def tiny_suite() -> MetricSuite:
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                             nn.Flatten())
    return MetricSuite(fid=FIDScorer(features), scorers={"brightness": MeanBrightness()})
