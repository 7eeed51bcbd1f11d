"""The update stage: optimizer, LR schedule and one policy update over a batch of rollouts.

Loss normalisation is global: the loss of every micro-batch on every rank is divided by the *global* count
(sequences for GMPO and ``seq_mean_token_mean``, valid tokens for GRPO ``token_mean``) and multiplied by the
world size to undo FSDP's gradient averaging, so the accumulated gradient equals the gradient of the loss of the
whole global batch, whatever the micro-batch split and the number of ranks.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mm_gmpo import distributed
from mm_gmpo.balance import balanced_micro_batches, micro_batches_needed
from mm_gmpo.loss import PolicyLossFn
from mm_gmpo.policy import PolicyBatch, split_by_token_budget


@dataclass
class UpdateBatch:
    """Everything the update needs for B sampled responses (this rank's share)."""

    batch: PolicyBatch
    old_logprobs: torch.Tensor  # (B, R)
    advantages: torch.Tensor  # (B,)
    ref_logprobs: torch.Tensor | None = None  # (B, R)
    is_weights: torch.Tensor | None = None  # (B, R) truncated importance weights (train/inference mismatch)

    def select(self, idx: list[int]) -> UpdateBatch:
        sub = self.batch.select(idx)
        R = sub.response_width

        def cut(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[idx, :R]

        return UpdateBatch(sub, self.old_logprobs[idx, :R], self.advantages[idx], cut(self.ref_logprobs),
                           cut(self.is_weights))

    def to(self, device: torch.device) -> UpdateBatch:
        def move(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(device)

        return UpdateBatch(self.batch.to(device), self.old_logprobs.to(device), self.advantages.to(device),
                           move(self.ref_logprobs), move(self.is_weights))


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
    counts only when tied to the LM head), the vision tower's over the ``vision_patches`` it encoded."""
    vision = text = 0
    untied_head = False
    for name, p in policy.named_parameters():  # a tied weight is listed once; FSDP2 DTensors report global numel
        if ".visual." in name:
            vision += p.numel()
        else:
            text += p.numel()
        untied_head |= name.endswith("lm_head.weight")  # listed only when it is not the input embedding
    if untied_head:
        text -= getattr(policy, "model", policy).get_input_embeddings().weight.numel()
    return 6.0 * text * tokens + 6.0 * vision * vision_patches


def _packed(policy: nn.Module) -> bool:
    """Whether the policy packs micro-batches (then the token budget counts real tokens, not padded rows)."""
    return bool(getattr(policy, "packed", False))


def _micro_groups(batch: PolicyBatch, max_tokens: int, device, packed: bool, group_size: int = 1) -> list[list[int]]:
    """The micro-batches of this rank's samples, as many on every rank (the collectives of each pass pair up).

    Packed: every rank makes as many micro-batches as the rank that needs the most (within ``max_tokens``) and
    splits its tokens evenly among them, whole prompt groups of ``group_size`` where possible (balanced_micro_batches):
    no rank runs a pass with nothing to do unless it has fewer samples than passes. Padded (eager attention, a
    pass costs count x longest): token-budget micro-batches of similar lengths, padded with empty passes."""
    lengths = [int(n) for n in batch.attention_mask.sum(-1).tolist()]
    if packed:
        need = micro_batches_needed(lengths, max_tokens, group_size)
        return balanced_micro_batches(lengths, int(distributed.all_reduce_max(float(need), device)), max_tokens,
                                      group_size)
    groups = split_by_token_budget(lengths, max_tokens)
    n_micro = int(distributed.all_reduce_max(float(len(groups)), device))
    return groups + [[] for _ in range(n_micro - len(groups))]


@torch.no_grad()
def compute_logprobs(policy: nn.Module, batch: PolicyBatch, *, max_tokens_per_micro_batch: int = 8192,
                     temperature: float = 1.0, allowed_token_ids: Sequence[int] | None = None,
                     device: torch.device | None = None, group_size: int = 1) -> torch.Tensor:
    """(B, R) log-probs of the responses under the current policy, micro-batched (the 'old log-probs' stage);
    ``group_size``: the samples of a prompt are that many adjacent rows (kept in one micro-batch if they fit)."""
    policy.eval()
    out = torch.zeros(batch.response_mask.shape, dtype=torch.float32)
    for idx in _micro_groups(batch, max_tokens_per_micro_batch, device, _packed(policy), group_size):
        mb = batch.select(idx if idx else [0])
        lp, _ = policy(mb.to(device) if device is not None else mb, temperature=temperature,
                       allowed_token_ids=allowed_token_ids)
        if idx:
            out[idx, :lp.shape[1]] = lp.float().cpu()
    return out


def group_minibatches(n_samples: int, group_size: int, n_mini: int, seed: int) -> list[list[int]]:
    """Sample indices of ``n_mini`` mini-batches made of whole prompt groups, the groups in a seeded random order.

    The ``group_size`` samples of a prompt are adjacent in a batch. Keeping them in one mini-batch (as verl and
    EasyR1 do) means every update sees all samples of its prompts, and a prompt's image goes through the vision
    tower once per micro-batch rather than once per sample. With fewer groups than mini-batches (tiny runs on
    many ranks), samples are shuffled individually instead.
    """
    n_groups = n_samples // group_size if group_size > 0 and n_samples % group_size == 0 else 0
    g = torch.Generator().manual_seed(seed)
    if n_groups < n_mini:
        order = torch.randperm(n_samples, generator=g).tolist()
        return [order[k * n_samples // n_mini:(k + 1) * n_samples // n_mini] for k in range(n_mini)]
    perm = torch.randperm(n_groups, generator=g).tolist()
    return [[q * group_size + s for q in perm[k * n_groups // n_mini:(k + 1) * n_groups // n_mini]
             for s in range(group_size)] for k in range(n_mini)]


def update_schedule(n_samples: int, group_size: int, n_mini: int, ppo_epochs: int, step: int) -> list[list[int]]:
    """The mini-batches of one step, in order: ``ppo_epochs`` passes over the batch, each split afresh by
    :func:`group_minibatches` (the first pass with seed ``step``)."""
    return [part for epoch in range(ppo_epochs)
            for part in group_minibatches(n_samples, group_size, n_mini, seed=step + 1_000_003 * epoch)]


OPTIMIZERS = ("adamw", "adamw_8bit", "adamw_bf16")


def master_dtype(optimizer_name: str) -> torch.dtype:
    """The dtype the trainer keeps its (sharded) weights in: bf16 for adamw_bf16, else fp32."""
    return torch.bfloat16 if optimizer_name == "adamw_bf16" else torch.float32


def build_optimizer(policy: nn.Module, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999),
                    eps: float = 1e-8, name: str = "adamw") -> torch.optim.Optimizer:
    """AdamW over trainable parameters (no decay on biases and norms).

    name: 'adamw' (torch, fp32 moments; fused kernels on CUDA) or 'adamw_8bit' (torchao's AdamW8bit: the moments of
    every tensor of >= 4096 values in 8 bits with a scale per 256, about 2 bytes per parameter instead of 8; the
    weights stay fp32, so updates at RL learning rates are kept) or 'adamw_bf16' (optimi's AdamW over bf16 weights:
    bf16 moments and a bf16 Kahan compensation per weight that carries the part of each update bf16 rounds away,
    so the updates of lr 1e-6 accumulate instead of vanishing; build the model in bf16, see master_dtype).
    """
    decay, no_decay = [], []
    for pname, p in policy.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in pname else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "adamw_8bit":
        from torchao.optim import AdamW8bit

        return AdamW8bit(groups, lr=lr, betas=betas, eps=eps)
    if name == "adamw_bf16":
        from optimi import AdamW

        if any(p.dtype != torch.bfloat16 for g in groups for p in g["params"]):
            raise ValueError("adamw_bf16 updates bf16 weights: build the model with dtype=torch.bfloat16")
        # triton=False: optimi's Triton kernels take plain tensors, FSDP2 hands it DTensors (foreach handles them)
        return AdamW(groups, lr=lr, betas=betas, eps=eps, kahan_sum=True, triton=False)
    if name != "adamw":
        raise ValueError(f"optimizer {name!r}: choose one of {OPTIMIZERS}")
    fused = all(p.is_cuda for p in decay + no_decay) and len(decay + no_decay) > 0
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, *, schedule: str, warmup_steps: int, total_steps: int,
                    min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then constant or cosine decay to ``min_lr_ratio`` x lr."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"lr schedule must be 'constant' or 'cosine', got {schedule!r}")

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    for group in optimizer.param_groups:  # torchao keeps lr as a tensor: schedule from a float, as after a resume
        if torch.is_tensor(group["lr"]):
            group.setdefault("initial_lr", float(group["lr"]))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def policy_update(
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: UpdateBatch,
    loss_fn: PolicyLossFn,
    *,
    loss_kwargs: dict | None = None,
    normalize_by: str = "sequences",
    max_tokens_per_micro_batch: int = 8192,
    max_grad_norm: float = 1.0,
    with_entropy: bool = False,
    temperature: float = 1.0,
    allowed_token_ids: Sequence[int] | None = None,
    device: torch.device | None = None,
    keep_grads: bool = False,
    group_size: int = 1,
) -> dict[str, float]:
    """One optimizer step over ``data`` (split into micro-batches by token budget); returns averaged metrics.

    ``normalize_by``: 'sequences' (GMPO, GRPO seq_mean_token_mean) or 'tokens' (GRPO token_mean).
    ``keep_grads``: leave the step's gradients in ``.grad`` (tests); by default they are freed after the step.
    ``group_size``: the samples of a prompt are that many adjacent rows (kept in one micro-batch if they fit).
    """
    t0 = time.perf_counter()
    loss_kwargs = dict(loss_kwargs or {})
    B = data.batch.batch_size
    local_tokens = float(data.batch.response_mask.sum())
    global_seqs, global_tokens = distributed.all_reduce_sum([float(B), local_tokens], device)
    normalizer = global_seqs if normalize_by == "sequences" else global_tokens
    scale = float(distributed.world_size())  # undo FSDP's mean over ranks: we normalise globally ourselves

    groups = _micro_groups(data.batch, max_tokens_per_micro_batch, device, _packed(policy), group_size)
    n_micro = len(groups)

    policy.train()
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = defaultdict(float)  # loss/*: already globally normalised, so they add up
    extremes: dict[str, float] = {}
    weighted: dict[str, float] = defaultdict(float)  # everything else: token-weighted mean
    weight = 0.0
    for idx in groups:
        empty = not idx
        mb = data.select(idx if idx else [0])
        if device is not None:
            mb = mb.to(device)
        logprobs, entropy = policy(mb.batch, with_entropy=with_entropy, temperature=temperature,
                                   allowed_token_ids=allowed_token_ids)
        loss, m = loss_fn(logprobs, mb.old_logprobs, mb.advantages, mb.batch.response_mask, normalizer=normalizer,
                          ref_logprobs=mb.ref_logprobs, entropy=entropy, is_weights=mb.is_weights, **loss_kwargs)
        if empty:  # a padding pass that keeps ranks in step: contributes no gradient
            loss = loss * 0.0
        (loss * scale).backward()
        if empty:
            continue
        sums["loss/total"] += loss.item()
        w = float(mb.batch.response_mask.sum())
        weight += w
        for k, v in m.items():
            if k.startswith("loss/"):
                sums[k] += v
            elif k.endswith("_min"):
                extremes[k] = min(extremes.get(k, v), v)
            elif k.endswith("_max"):
                extremes[k] = max(extremes.get(k, v), v)
            else:
                weighted[k] += v * w

    grad_norm = distributed.clip_grad_norm(policy.parameters(), max_grad_norm)
    if math.isfinite(grad_norm):
        optimizer.step()
        skipped = 0.0
    else:  # never apply a NaN/inf update; the step is reported and skipped
        skipped = 1.0
    if not keep_grads or skipped:
        # free the gradients now, not at the next update: held through the rollout they cost an fp32 copy of the
        # (sharded) model, memory vLLM needs to wake up (the 3B on one H100 ran out of it at step 2)
        optimizer.zero_grad(set_to_none=True)
    metrics = distributed.all_reduce_sum_metrics(dict(sums), device)  # over every rank's keys (see there)
    local = {k: v / max(weight, 1.0) for k, v in weighted.items()} | extremes
    metrics |= distributed.all_reduce_mean_metrics(local, device)
    metrics.update({
        "actor/grad_norm": grad_norm,
        "actor/skipped_step": skipped,
        "actor/lr": optimizer.param_groups[0]["lr"],
        "actor/micro_batches": float(n_micro),
        "timing/update_s": time.perf_counter() - t0,
    })
    return metrics
