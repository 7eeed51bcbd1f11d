"""The rollout stage: a step's prompts rolled out, in rounds when online filtering drops groups without signal,
until the batch is full; and the trainer's batch made of the result."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from mm_gmpo import distributed
from mm_gmpo.advantage import groups_in_band
from mm_gmpo.config import Config
from mm_gmpo.data.processing import EncodedPrompt, encode_prompts
from mm_gmpo.data.prompts import DataError, Prompt
from mm_gmpo.inputs import PromptSampler
from mm_gmpo.metrics import SUMMED_REWARD_KEYS, StepTimer
from mm_gmpo.policy import PolicyBatch, collate
from mm_gmpo.rewards.custom import RewardFunction
from mm_gmpo.rewards.pending import reward_tensors, score_rollouts
from mm_gmpo.rollout.base import Rollout, SamplingParams
from mm_gmpo.rollout.layout import RolloutLayout

Group = tuple[EncodedPrompt, list[Rollout], torch.Tensor | None]  # a prompt, its n rollouts, their rewards


@dataclass
class Generated:
    """The rollout stage's hand-off: this rank's prompt groups to train on, their responses and (when online
    filtering had to score them to choose the groups) their rewards."""

    prompts: list[EncodedPrompt]
    rollouts: list[Rollout]  # n per prompt, prompt-major; prompt_index into prompts
    rewards: torch.Tensor | None  # (N,); None: not scored yet (PendingRewards scores them)
    metrics: dict[str, float] = field(default_factory=dict)  # data/*, filter/*; reward/* once scored


class BatchFiller:
    """Owner of the rollout stage and of online filtering (``algorithm.online_filtering``): groups whose mean
    accuracy (or reward) is outside [filter_low, filter_high] are dropped and further rounds of prompts are rolled
    out until the global batch holds rollout_batch_size groups or max_filter_rounds is reached; each rank then
    keeps at most its share (and at least one group, so that every rank takes part in the update).

    ``layout``: the ranks of one tensor-parallel engine submit their group's prompts together, with the group's
    seed, and each keeps its own slice of the outputs."""

    def __init__(self, cfg: Config, engine, sampler: PromptSampler, prompts: list[Prompt], processor,
                 sampling: SamplingParams, rf: RewardFunction | None, info: distributed.DistInfo,
                 layout: RolloutLayout):
        self.cfg, self.engine, self.sampler, self.prompts, self.processor = cfg, engine, sampler, prompts, processor
        self.sampling, self.rf, self.info, self.layout = sampling, rf, info, layout
        self.per_rank = cfg.trainer.rollout_batch_size // info.world_size

    def round(self, step: int, round_no: int, timer: StepTimer) -> tuple[list[EncodedPrompt], list[Rollout], dict]:
        """One round: the step's next prompts (the same global batch on every rank; this engine group's contiguous
        slice, encoded rank slice by rank slice, so that what each drops as too long is the same on every rank of
        the group), rolled out with the group's seed; this rank's prompts, their rollouts, data/* metrics."""
        d, lay, n = self.cfg.data, self.layout, self.per_rank
        idx = self.sampler.next(self.cfg.trainer.rollout_batch_size)[lay.group_slice(n)]
        with timer("prompts"):
            parts = [encode_prompts([self.prompts[i] for i in idx[j * n:(j + 1) * n]], self.processor,
                                    max_prompt_length=d.max_prompt_length, min_pixels=d.min_pixels,
                                    max_pixels=d.max_pixels) for j in range(lay.tp)]
        encoded, data_metrics = parts[lay.tp_rank]
        offset = sum(len(p) for p, _ in parts[:lay.tp_rank])
        with timer("rollout"), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.trainer.seed * 100_003 + step * 101 + lay.dp_rank + 7_919 * round_no)
            outputs = self.engine.generate([e for p, _ in parts for e in p], self.sampling)
        rollouts = [replace(x, prompt_index=x.prompt_index - offset) for x in outputs
                    if offset <= x.prompt_index < offset + len(encoded)]
        return encoded, rollouts, data_metrics

    def fill(self, step: int, timer: StepTimer) -> Generated:
        """This rank's prompt groups of one step (see the class)."""
        n = self.cfg.rollout.n
        if not self.cfg.algorithm.online_filtering:  # scored later, beside the old-log-prob pass (PendingRewards)
            encoded, rollouts, data_metrics = self.round(step, 0, timer)
            return self._finish(step, [(e, rollouts[g * n:(g + 1) * n], None) for g, e in enumerate(encoded)],
                                data_metrics)
        return self._filtered(step, timer)

    def _filtered(self, step: int, timer: StepTimer) -> Generated:
        alg, n = self.cfg.algorithm, self.cfg.rollout.n
        kept: list[Group] = []
        sums: dict[str, float] = {}
        n_sampled, dropped, groups, rounds = 0, 0, [], 0
        while True:
            encoded, rollouts, data_metrics = self.round(step, rounds, timer)
            rounds += 1
            with timer("reward"):  # online filtering needs the rewards now, to choose the groups
                scores, metrics = score_rollouts([e.prompt for e in encoded], rollouts,
                                                 format_weight=alg.format_weight,
                                                 workers=self.cfg.trainer.reward_workers, reward_function=self.rf)
                rewards, accuracy = reward_tensors(scores)
            for k, v in metrics.items():
                if k.startswith("reward/"):
                    sums[k] = sums.get(k, 0.0) + (v if k in SUMMED_REWARD_KEYS else v * len(rollouts))
            n_sampled += len(rollouts)
            keep = groups_in_band(accuracy if alg.filter_key == "accuracy" else rewards, n, alg.filter_low,
                                  alg.filter_high)
            groups = [(e, rollouts[g * n:(g + 1) * n], rewards[g * n:(g + 1) * n]) for g, e in enumerate(encoded)]
            kept += [grp for grp, k in zip(groups, keep.tolist(), strict=True) if k]
            dropped += int((~keep).sum())
            total = distributed.all_reduce_sum([float(len(kept))], self.info.device)[0]
            if total >= self.cfg.trainer.rollout_batch_size or rounds >= alg.max_filter_rounds:
                break
        fallback = 0
        if not kept and groups:  # nothing in the band on this rank: one group of the last round (mostly A = 0)
            kept, fallback = groups[:1], 1
        gen = self._finish(step, kept, data_metrics)
        kept_n, dropped_n, fallback_n = distributed.all_reduce_sum(
            [float(len(gen.prompts)), float(dropped), float(fallback)], self.info.device)
        gen.metrics |= {k: (v if k in SUMMED_REWARD_KEYS else v / max(n_sampled, 1)) for k, v in sums.items()}
        gen.metrics |= {"filter/trained_groups": kept_n, "filter/dropped_groups": dropped_n,
                        "filter/rounds": float(rounds), "filter/fallback_groups": fallback_n}
        return gen

    def _finish(self, step: int, kept: list[Group], data_metrics: dict) -> Generated:
        # a rank left with no prompt at all (every one longer than data.max_prompt_length) stops every rank alike
        if distributed.all_reduce_max(0.0 if kept else 1.0, self.info.device):
            raise DataError(f"step {step}: every prompt of some rank's share is longer than data.max_prompt_length="
                            f"{self.cfg.data.max_prompt_length} tokens (images included), so that rank has nothing "
                            "to train on; raise data.max_prompt_length or lower data.max_pixels")
        kept = kept[:self.per_rank]
        rollouts = [replace(x, prompt_index=i) for i, (_, rs, _) in enumerate(kept) for x in rs]
        rewards = torch.cat([rw for _, _, rw in kept]) if kept[0][2] is not None else None
        return Generated([enc for enc, _, _ in kept], rollouts, rewards, dict(data_metrics))


def to_batch(prompts: list[EncodedPrompt], rollouts: list[Rollout], pad_id: int) -> tuple[PolicyBatch, torch.Tensor]:
    """The trainer's batch of ``rollouts`` (their prompt_index into ``prompts``) and the sampler's log-probs."""
    batch = collate([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts], pad_id=pad_id,
                    pixel_values=[prompts[r.prompt_index].pixel_values for r in rollouts],
                    image_grid_thw=[prompts[r.prompt_index].image_grid_thw for r in rollouts],
                    image_ids=[prompts[r.prompt_index].image_keys for r in rollouts])
    sampler_lp = torch.zeros(batch.response_mask.shape)
    for i, r in enumerate(rollouts):
        if r.logprobs:
            sampler_lp[i, :len(r.logprobs)] = torch.tensor(r.logprobs)
    return batch, sampler_lp
