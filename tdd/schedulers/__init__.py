"""Diffusers-compatible schedulers shipped with the framework."""

from tdd.schedulers.tdd_flow_scheduler import TDDFlowScheduler, TDDFlowSchedulerOutput
from tdd.schedulers.tdd_scheduler import TDDScheduler, TDDSchedulerOutput

__all__ = ["TDDScheduler", "TDDSchedulerOutput", "TDDFlowScheduler", "TDDFlowSchedulerOutput"]
