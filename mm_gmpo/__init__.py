"""mm_gmpo: Geometric-Mean Policy Optimization for vision-language and text math models.

Imports are lazy so that light modules (rewards, config) can be used without importing torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "gmpo_loss": "mm_gmpo.loss",
    "grpo_loss": "mm_gmpo.loss",
    "get_policy_loss": "mm_gmpo.loss",
    "group_advantages": "mm_gmpo.advantage",
    "score": "mm_gmpo.rewards",
    "score_batch": "mm_gmpo.rewards",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mm_gmpo' has no attribute {name!r}")
