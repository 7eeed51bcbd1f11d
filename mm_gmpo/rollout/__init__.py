"""Rollout engines behind one interface: vLLM (GPU), HF generate (CPU/tests), an oracle (pipeline checks)."""

from mm_gmpo.rollout.base import Rollout, RolloutEngine, SamplingParams

__all__ = ["Rollout", "RolloutEngine", "SamplingParams"]
