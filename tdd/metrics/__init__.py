"""Evaluation metrics: FID, CLIP score, aesthetic score, sampling cost (DESIGN "Metrics").

Suites for ``conf/metrics``: ``NoMetrics`` (none), ``real_metrics`` (real) and
``tdd.metrics.toy.toy_metrics`` (toy; kept out of this namespace so that importing the metrics
does not import the toy world).
"""

from tdd.metrics.aesthetic import AestheticPredictor, AestheticScorer
from tdd.metrics.clip_model import CLIPImageFeatures, clip_config_name, clip_preprocess, load_clip
from tdd.metrics.clip_score import CLIPScorer, clip_score
from tdd.metrics.fid import FIDScorer, InceptionFeatures
from tdd.metrics.files import require_file
from tdd.metrics.suite import MetricSuite, NoMetrics, fid_key, real_metrics
from tdd.metrics.timing import SamplingCost, Stopwatch

__all__ = [
    "AestheticPredictor", "AestheticScorer", "CLIPImageFeatures", "CLIPScorer", "FIDScorer",
    "InceptionFeatures", "MetricSuite", "NoMetrics", "SamplingCost", "Stopwatch",
    "clip_config_name", "clip_preprocess", "clip_score", "fid_key", "load_clip", "real_metrics",
    "require_file",
]
