"""Which ranks share a rollout engine: vLLM's tensor-parallel groups."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RolloutLayout:
    """How the ranks share out rollouts when each engine spans ``tp`` ranks (vLLM tensor parallelism).

    The ``tp`` ranks of one group run one engine together (under vLLM's ``external_launcher`` each of them runs
    its own scheduler), so they must submit the same prompts with the same sampling seed; each then trains on its
    own part of the group's outputs. Groups are contiguous ranks (vLLM's TP groups): group ``dp_rank`` of
    ``dp_size``, position ``tp_rank`` in it. ``tp=1``: every rank is its own group."""

    dp_rank: int
    dp_size: int
    tp_rank: int
    tp: int

    def group_slice(self, n_per_rank: int) -> slice:
        """The items (of a global list with ``n_per_rank`` per rank) that this rank's engine group generates."""
        return slice(self.dp_rank * n_per_rank * self.tp, (self.dp_rank + 1) * n_per_rank * self.tp)


def rollout_layout(rank: int, world_size: int, tp: int = 1) -> RolloutLayout:
    if tp < 1 or world_size % tp:
        raise ValueError(f"tensor-parallel size {tp} must divide the number of ranks ({world_size})")
    return RolloutLayout(rank // tp, world_size // tp, rank % tp, tp)
