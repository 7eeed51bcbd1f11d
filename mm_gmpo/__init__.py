"""mm_gmpo: Geometric-Mean Policy Optimization for vision-language and text math models."""

from mm_gmpo.advantage import group_advantages
from mm_gmpo.loss import get_policy_loss, gmpo_loss, grpo_loss

__all__ = ["get_policy_loss", "gmpo_loss", "group_advantages", "grpo_loss"]
__version__ = "0.1.0"
