"""What a step reports beyond its stages' own metrics: stage times, memory, train/inference mismatch, MFU,
sample records, and the assembly of one step's metrics (means over ranks, sums where they count)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from mm_gmpo import distributed
from mm_gmpo.data.processing import EncodedPrompt
from mm_gmpo.policy import PolicyBatch
from mm_gmpo.rollout.base import Rollout


class StepTimer:
    """One step's stage times: ``with timer("rollout"):`` adds the block's seconds to ``timing/rollout_s`` (a stage
    entered twice, as the rollout rounds of online filtering, adds up); ``metrics()`` adds ``timing/step_s``."""

    def __init__(self, *stages: str):
        self.start = time.perf_counter()
        self.values: dict[str, float] = {f"timing/{s}_s": 0.0 for s in stages}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def add(self, stage: str, seconds: float) -> None:
        key = f"timing/{stage}_s"
        self.values[key] = self.values.get(key, 0.0) + seconds

    def set(self, stage: str, seconds: float) -> None:
        self.values[f"timing/{stage}_s"] = seconds

    def seconds(self, stage: str) -> float:
        return self.values.get(f"timing/{stage}_s", 0.0)

    def metrics(self) -> dict[str, float]:
        return {**self.values, "timing/step_s": time.perf_counter() - self.start}


def sample_records(prompts: list[EncodedPrompt], rollouts: list[Rollout], rewards: torch.Tensor,
                  advantages: torch.Tensor, k: int) -> list[dict]:
    """The first ``k`` rollouts of this rank's batch as samples.jsonl records: prompt text, response, reward,
    advantage."""
    return [{"id": prompts[x.prompt_index].prompt.id, "images": prompts[x.prompt_index].n_images,
             "prompt": prompts[x.prompt_index].text, "response": x.text, "reward": float(rewards[i]),
             "advantage": float(advantages[i])} for i, x in enumerate(rollouts[:k])]


def gpu_used_gib(device: torch.device) -> float:
    """Memory in use on this rank's GPU, whoever holds it (torch's allocator and vLLM's pool alike); 0 on a CPU."""
    if device.type != "cuda":
        return 0.0
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / 2**30


def memory_metrics(device: torch.device, rollout_used_gib: float = 0.0) -> dict[str, float]:
    """Peak GPU memory allocated and reserved by torch since start, the GPU's use at the end of the rollout (vLLM
    awake beside the trainer's resident state: the binding phase on one GPU), each the largest over ranks, and
    the largest host RSS of any rank."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux reports KiB
    out = {"perf/host_rss_gib": distributed.all_reduce_max(rss, device)}
    if device.type == "cuda":
        for key, value in (("perf/max_memory_allocated_gib", torch.cuda.max_memory_allocated(device) / 2**30),
                           ("perf/max_memory_reserved_gib", torch.cuda.max_memory_reserved(device) / 2**30),
                           ("perf/rollout_gpu_used_gib", rollout_used_gib)):
            out[key] = distributed.all_reduce_max(value, device)
    return out


def mismatch_metrics(sampler_lp: torch.Tensor, trainer_lp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """|log p_sampler - log p_trainer| over response tokens: the train/inference mismatch."""
    m = mask.bool()
    if not m.any() or not (sampler_lp[m] != 0).any():
        return {}
    d = (sampler_lp - trainer_lp)[m].abs()
    return {"rollout/logprob_diff_mean": d.mean().item(), "rollout/logprob_diff_max": d.max().item()}


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense bf16 FLOP/s


def peak_bf16_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the GPU for MFU; None on a CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def training_flops(policy: nn.Module, tokens: float, vision_patches: float) -> float:
    """Model FLOPs of a forward + backward, 6 x parameters x inputs (activation recompute not counted, as MFU
    conventionally does): the language model's parameters over ``tokens`` (its input embedding is a lookup, so it
    counts only when tied to the LM head), the vision tower's over the ``vision_patches`` it encoded. A mixture of
    experts counts the experts each token uses (top-k of E), not all of them."""
    vision = text = 0
    untied_head = False
    config = getattr(getattr(policy, "model", policy), "config", None)
    text_cfg = getattr(config, "text_config", config)
    experts, used = getattr(text_cfg, "num_experts", 0), getattr(text_cfg, "num_experts_per_tok", 0)
    for name, p in policy.named_parameters():  # a tied weight is listed once; FSDP2 DTensors report global numel
        if ".visual." in name:
            vision += p.numel()
        elif experts and ".mlp.experts." in name:
            text += p.numel() * used / experts
        else:
            text += p.numel()
        untied_head |= name.endswith("lm_head.weight")  # listed only when it is not the input embedding
    if untied_head:
        text -= getattr(policy, "model", policy).get_input_embeddings().weight.numel()
    return 6.0 * text * tokens + 6.0 * vision * vision_patches


SUMMED_REWARD_KEYS = ("reward/errors", "reward/killed_for_time")  # summed over rounds and ranks; other reward/* averaged


def batch_metrics(batch: PolicyBatch, rollouts: list[Rollout], sampler_lp: torch.Tensor,
                  trainer_lp: torch.Tensor) -> dict[str, float]:
    """This rank's response lengths, truncations and train/inference mismatch."""
    return {"rollout/response_len_mean": batch.response_mask.sum(-1).float().mean().item(),
            "rollout/truncated_frac": sum(x.finish_reason == "length" for x in rollouts) / len(rollouts),
            **mismatch_metrics(sampler_lp, trainer_lp, batch.response_mask)}


def perf_metrics(policy: nn.Module, batch: PolicyBatch, *, update_s: float, update_patches: float, ppo_epochs: int,
                 device: torch.device, rollout_used_gib: float) -> dict[str, float]:
    """Update throughput and MFU, memory, and the step's pixel data: its batch (each picture once), what the
    forwards were given since the policy's counters were reset (old log-probs and updates), and what a copy per
    sample would have added to that. ``update_patches``: vision patches the update encoded, over every rank."""
    tokens, held, moved, saved = distributed.all_reduce_sum(
        [float(batch.n_tokens()) * ppo_epochs, float(batch.pixel_bytes()[0]), float(policy.pixel_bytes_in),
         float(policy.pixel_bytes_saved)], device)
    out = {"perf/update_tokens_per_s": tokens / max(update_s, 1e-9), "perf/update_vision_patches": update_patches,
           **memory_metrics(device, rollout_used_gib),
           "perf/pixel_mb_held": held / 1e6, "perf/pixel_mb_moved": moved / 1e6, "perf/pixel_mb_dedup_saved": saved / 1e6}
    peak = peak_bf16_flops(device)
    if peak:
        flops = training_flops(policy, tokens, update_patches)
        out["perf/mfu"] = flops / update_s / (peak * distributed.world_size())
    return out


def step_metrics(local: dict[str, float], scored: dict[str, float], *, online_filtering: bool,
                 device: torch.device) -> dict[str, float]:
    """One step's rank-local metrics (``local``, and the reward/*, data/* of ``scored``, the rollout stage's and
    the scorer's metrics) as means over ranks, the counted reward/* as sums; filter/* are already global."""
    reward_keys = distributed.union_keys([k for k in scored if k.startswith("reward/")
                                          and k not in SUMMED_REWARD_KEYS and k != "reward/overall"])
    sums = distributed.all_reduce_sum([scored.get(k, 0.0) for k in SUMMED_REWARD_KEYS], device)
    local = {**local, **{k: scored.get(k, 0.0) for k in reward_keys},
             **({"reward/sampled_mean": scored["reward/overall"]} if online_filtering else {}),
             **{k: v for k, v in scored.items() if k.startswith("data/")}}
    return {**distributed.all_reduce_mean_metrics(local, device), **dict(zip(SUMMED_REWARD_KEYS, sums, strict=True)),
            **{k: v for k, v in scored.items() if k.startswith("filter/")}}
