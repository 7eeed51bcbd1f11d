"""The run's owner of validation: before training (``trainer.val_before_train``), every ``trainer.eval_every``
steps and at the last step, on this engine group's share of the validation prompts."""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from mm_gmpo import distributed
from mm_gmpo.config import Config
from mm_gmpo.data.processing import EncodedPrompt
from mm_gmpo.logger import MetricsLogger
from mm_gmpo.rewards.custom import RewardFunction
from mm_gmpo.rewards.pending import reward_tensors, score_rollouts
from mm_gmpo.rollout.base import SamplingParams
from mm_gmpo.rollout.layout import RolloutLayout


def pass_counts(accuracy: torch.Tensor, k: int) -> float:
    """How many prompts (k adjacent samples each) have at least one correct sample."""
    return accuracy.view(-1, k).max(-1).values.gt(0).float().sum().item()


class Validator:
    """``rollout.val_n`` answers per prompt at ``rollout.val_temperature`` (greedy by default); each rank scores
    its own part (every ``tp``-th prompt of its engine group's share); global means, mean@k / pass@k when
    val_n > 1, and a few sample records in samples.jsonl."""

    def __init__(self, cfg: Config, engine, prompts: list[EncodedPrompt], rf: RewardFunction | None,
                 info: distributed.DistInfo, layout: RolloutLayout, log: MetricsLogger,
                 allowed: tuple[int, ...] | None):
        r = cfg.rollout
        self.cfg, self.engine, self.prompts, self.rf, self.info, self.layout, self.log = (
            cfg, engine, prompts, rf, info, layout, log)
        self.sampling = SamplingParams(n=r.val_n, temperature=r.val_temperature, top_p=r.val_top_p,
                                       max_tokens=r.max_tokens, allowed_token_ids=allowed)

    def before_training(self, step: int) -> None:
        """``trainer.val_before_train`` on a fresh run, logged as step 0. Every engine group evaluates, also one
        whose share is empty (the others wait for it in the sums), unless no group has any."""
        has_val = distributed.all_reduce_max(float(bool(self.prompts)), self.info.device) > 0
        if not (self.cfg.trainer.val_before_train and step == 0 and has_val):
            return
        metrics = self.run(0, seed=self.cfg.trainer.seed)
        self.log.log(0, metrics)
        if self.info.is_main:
            print(f"before training: eval/accuracy {metrics['eval/accuracy']:.3f}")

    def maybe_run(self, step: int, total_steps: int) -> dict[str, float]:
        every = self.cfg.trainer.eval_every
        if not every or (step % every and step != total_steps):
            return {}
        return self.run(step, seed=self.cfg.trainer.seed * 100_003 + step)

    def run(self, step: int, seed: int) -> dict[str, float]:
        """Generate, score, reduce over ranks; logs the sample records under ``step``; returns eval/* metrics and
        ``timing/eval_s``."""
        t0 = time.perf_counter()
        k, prompts, lay = self.sampling.n, self.prompts, self.layout
        rollouts, rewards, sums = [], torch.zeros(0), [0.0] * 6
        if prompts:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                rollouts = self.engine.generate(prompts, self.sampling)
            if lay.tp > 1:  # this rank's part: every tp-th prompt of the group's share
                prompts = prompts[lay.tp_rank::lay.tp]
                rollouts = [replace(x, prompt_index=x.prompt_index // lay.tp) for x in rollouts
                            if x.prompt_index % lay.tp == lay.tp_rank]
        if prompts:
            scores, _ = score_rollouts([e.prompt for e in prompts], rollouts,
                                       format_weight=self.cfg.algorithm.format_weight,
                                       workers=self.cfg.trainer.reward_workers, reward_function=self.rf)
            rewards, accuracy = reward_tensors(scores)
            sums = [float(rewards.sum()), float(accuracy.sum()), float(sum(len(x.response_ids) for x in rollouts)),
                    float(len(rollouts)), pass_counts(accuracy, k), float(len(prompts))]
        total_r, total_acc, total_len, n, n_pass, n_prompts = distributed.all_reduce_sum(sums, self.info.device)
        metrics = {"eval/reward_mean": total_r / max(n, 1), "eval/accuracy": total_acc / max(n, 1),
                   "eval/response_len_mean": total_len / max(n, 1), "eval/prompts": n_prompts}
        if k > 1:
            metrics |= {f"eval/mean@{k}": total_acc / max(n, 1), f"eval/pass@{k}": n_pass / max(n_prompts, 1)}
        self.log.samples(step, [{"id": prompts[x.prompt_index].prompt.id, "images": len(prompts[x.prompt_index].images),
                                 "ground_truth": prompts[x.prompt_index].prompt.ground_truth, "response": x.text,
                                 "reward": float(rewards[i])}
                                for i, x in enumerate(rollouts[:self.cfg.logging.sample_generations])])
        return metrics | {"timing/eval_s": time.perf_counter() - t0}

