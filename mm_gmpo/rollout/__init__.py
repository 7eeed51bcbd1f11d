"""Rollout engines behind one interface: HF generate (CPU/tests), an oracle (pipeline checks); vLLM to come."""

from mm_gmpo.rollout.base import Rollout, RolloutEngine, SamplingParams

__all__ = ["Rollout", "RolloutEngine", "SamplingParams"]
