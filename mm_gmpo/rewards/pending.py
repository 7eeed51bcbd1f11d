"""Scoring rollouts against their prompts: ``score_rollouts`` (the trainer's filter, its validation and the
evaluation command use it alike) and ``PendingRewards``, a step's scoring running beside the old-log-prob pass."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from mm_gmpo.data.prompts import Prompt
from mm_gmpo.metrics import StepTimer
from mm_gmpo.rewards.batch import score_batch
from mm_gmpo.rewards.custom import RewardFunction
from mm_gmpo.rewards.score import RewardScore
from mm_gmpo.rollout.base import Rollout


def score_rollouts(prompts: Sequence[Prompt], rollouts: Sequence[Rollout], *, format_weight: float,
                   workers: int | None = None, reward_function: RewardFunction | None = None
                   ) -> tuple[list[RewardScore], dict[str, float]]:
    """Each rollout scored against ``prompts[rollout.prompt_index]`` (built-in verifiers or the user's function)."""
    ps = [prompts[r.prompt_index] for r in rollouts]
    return score_batch([r.text for r in rollouts], [p.ground_truth for p in ps], task=[p.task for p in ps],
                       choices=[p.choices for p in ps], choice_values=[p.choice_values for p in ps],
                       format_weight=format_weight, workers=workers, reward_function=reward_function,
                       response_lengths=[len(r.response_ids) for r in rollouts])


def reward_tensors(scores: Sequence[RewardScore]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards (N,), accuracy (N,)) of scored rollouts."""
    return (torch.tensor([s["overall"] for s in scores]), torch.tensor([float(s["accuracy"]) for s in scores]))


class PendingRewards:
    """A step's scoring, started as soon as its rollouts exist. With reward worker processes (``workers`` > 0) a
    background thread feeds them and waits, so the old-log-prob pass runs meanwhile; in-process scoring runs at
    once (its per-item deadline is a SIGALRM, which only the main thread may set). ``scored``: rewards already
    computed (online filtering scores while it chooses the groups); its time is the rollout stage's.

    ``result(timer)`` gives (rewards, metrics) and records ``timing/reward_busy_s`` (the scoring's own wall time)
    and ``timing/reward_s`` (how long the caller was held up by it)."""

    def __init__(self, prompts: Sequence[Prompt], rollouts: Sequence[Rollout], *, format_weight: float,
                 workers: int, reward_function: RewardFunction | None, scored: torch.Tensor | None = None):
        def job() -> tuple[torch.Tensor, dict, float]:
            t0 = time.perf_counter()
            scores, metrics = score_rollouts(prompts, rollouts, format_weight=format_weight, workers=workers,
                                             reward_function=reward_function)
            return reward_tensors(scores)[0], metrics, time.perf_counter() - t0

        self._executor = self._done = None
        if scored is not None:
            self._done = (scored, {}, None)
        elif workers > 0:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(1, thread_name_prefix="mm_gmpo-rewards")
            self._future = self._executor.submit(job)
        else:  # the caller waits for all of it
            self._done = job()

    def result(self, timer: StepTimer) -> tuple[torch.Tensor, dict[str, float]]:
        if self._executor is None:
            rewards, metrics, busy = self._done
            if busy is None:  # scored by the filter: its time is already in timing/reward_s
                busy = timer.seconds("reward")
            else:
                timer.set("reward", busy)
            timer.set("reward_busy", busy)
            return rewards, metrics
        t0 = time.perf_counter()
        try:
            rewards, metrics, busy = self._future.result()
        finally:
            self._executor.shutdown(wait=True)
        timer.set("reward_busy", busy)
        timer.set("reward", time.perf_counter() - t0)
        return rewards, metrics
