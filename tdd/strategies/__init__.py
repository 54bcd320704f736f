"""Target-timestep strategies: where each sample's consistency target lives."""

from tdd.strategies.base import TargetStrategy
from tdd.strategies.lcm import LCMTarget
from tdd.strategies.pcm import PCMTarget
from tdd.strategies.tcd import TCDTarget
from tdd.strategies.tdd import TDDTarget

__all__ = ["TargetStrategy", "TDDTarget", "LCMTarget", "TCDTarget", "PCMTarget"]
