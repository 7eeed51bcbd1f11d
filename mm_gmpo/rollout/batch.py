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
    out until the ranks hold rollout_batch_size in-band groups in all or max_filter_rounds is reached. Then every
    rank trains its share of exactly rollout_batch_size groups (ranks that found more hand groups to those that
    found fewer, :func:`share_groups`); when the rounds ran out, all that were found, spread evenly, and a rank
    left with none trains one out-of-band group (``filter/fallback_groups``) so that it takes part in the update.

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
        n_sampled, groups, rounds = 0, [], 0
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
            counts = distributed.all_gather_objects(len(kept))  # in-band groups each rank holds so far
            if sum(counts) >= self.cfg.trainer.rollout_batch_size or rounds >= alg.max_filter_rounds:
                break
        share, surplus = share_groups(counts, self.per_rank)
        mine = self._gather(kept, share, counts)
        fallback = 0
        if not mine and groups:  # nothing in the band for this rank: one group of the last round (mostly A = 0)
            mine, fallback = groups[:1], 1
        gen = self._finish(step, mine, data_metrics)
        sampled_n, trained_n, fallback_n = distributed.all_reduce_sum(
            [float(n_sampled // n), float(len(gen.prompts)), float(fallback)], self.info.device)
        gen.metrics |= {k: (v if k in SUMMED_REWARD_KEYS else v / max(n_sampled, 1)) for k, v in sums.items()}
        # every sampled group is counted once: trained (in the band, or a fallback), dropped (out of the band, not
        # trained) or surplus (in the band, beyond the batch)
        gen.metrics |= {"filter/sampled_groups": sampled_n, "filter/trained_groups": trained_n,
                        "filter/dropped_groups": sampled_n - sum(counts) - fallback_n,
                        "filter/surplus_groups": float(len(surplus)), "filter/fallback_groups": fallback_n,
                        "filter/rounds": float(rounds)}
        return gen

    def _gather(self, kept: list[Group], share: list[list[tuple[int, int]]], counts: list[int]) -> list[Group]:
        """This rank's share of the in-band groups: its own, and those other ranks hand it (``share_groups``)."""
        me = self.info.rank
        if all(src == r for r, part in enumerate(share) for src, _ in part):
            return [kept[i] for _, i in share[me]]  # nothing moves: no collective (every rank sees the same plan)
        taker = {g: r for r, part in enumerate(share) for g in part}
        outgoing = {(me, i): (kept[i][0].for_training(), *kept[i][1:]) for i in range(counts[me])
                    if taker.get((me, i), me) != me}
        arriving = distributed.gather_dicts(outgoing)
        return [kept[i] if src == me else arriving[(src, i)] for src, i in share[me]]

    def _finish(self, step: int, kept: list[Group], data_metrics: dict) -> Generated:
        # a rank left with no prompt at all (every one longer than data.max_prompt_length) stops every rank alike
        if distributed.all_reduce_max(0.0 if kept else 1.0, self.info.device):
            raise DataError(f"step {step}: every prompt of some rank's share is longer than data.max_prompt_length="
                            f"{self.cfg.data.max_prompt_length} tokens (images included), so that rank has nothing "
                            "to train on; raise data.max_prompt_length or lower data.max_pixels")
        rollouts = [replace(x, prompt_index=i) for i, (_, rs, _) in enumerate(kept) for x in rs]
        rewards = torch.cat([rw for _, _, rw in kept]) if kept[0][2] is not None else None
        return Generated([enc for enc, _, _ in kept], rollouts, rewards, dict(data_metrics))


def share_groups(counts: list[int], per_rank: int) -> tuple[list[list[tuple[int, int]]], list[tuple[int, int]]]:
    """Which in-band groups each rank trains, given how many each found (``counts[r]``; a group is (rank, index)).

    With at least ``per_rank`` x ranks in all, every rank trains exactly ``per_rank``: its own first, then groups
    that ranks with more than their share hand over (in rank order); what is left over is the surplus, returned
    second. With fewer (the rounds ran out), every group is trained, spread as evenly as possible (shares differ
    by at most one; the larger ones go to the ranks that found the most, so fewer groups travel)."""
    world, total = len(counts), sum(counts)
    if total >= per_rank * world:
        quota = [per_rank] * world
    else:
        base, extra = divmod(total, world)
        quota = [base] * world
        for r in sorted(range(world), key=lambda r: (-counts[r], r))[:extra]:
            quota[r] += 1
    share = [[(r, i) for i in range(min(counts[r], quota[r]))] for r in range(world)]
    free = [(r, i) for r in range(world) for i in range(quota[r], counts[r])]
    for r in range(world):
        take = quota[r] - len(share[r])
        share[r] += free[:take]
        free = free[take:]
    return share, free


def vision_inputs(encs: list[EncodedPrompt]) -> dict:
    """``collate``'s vision arguments for samples of these prompts (each distinct picture and clip held once)."""
    return {"pixel_values": [e.pixel_values for e in encs], "image_grid_thw": [e.image_grid_thw for e in encs],
            "image_ids": [e.image_keys for e in encs],
            "pixel_values_videos": [e.pixel_values_videos for e in encs],
            "video_grid_thw": [e.video_grid_thw for e in encs], "video_ids": [e.video_keys for e in encs],
            "video_seconds": [e.video_seconds for e in encs]}


def to_batch(prompts: list[EncodedPrompt], rollouts: list[Rollout], pad_id: int) -> tuple[PolicyBatch, torch.Tensor]:
    """The trainer's batch of ``rollouts`` (their prompt_index into ``prompts``) and the sampler's log-probs."""
    batch = collate([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts], pad_id=pad_id,
                    **vision_inputs([prompts[r.prompt_index] for r in rollouts]))
    sampler_lp = torch.zeros(batch.response_mask.shape)
    for i, r in enumerate(rollouts):
        if r.logprobs:
            sampler_lp[i, :len(r.logprobs)] = torch.tensor(r.logprobs)
    return batch, sampler_lp
