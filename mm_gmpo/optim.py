"""The optimizer and its learning-rate schedule: AdamW (torch, torchao's 8-bit, optimi's compensated bf16), linear
warmup then constant or cosine decay, and the one place a resumed run's new learning rate is applied."""

from __future__ import annotations

import math

import torch
from torch import nn

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


def set_base_lr(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float) -> None:
    """A resumed run with a changed ``optim.lr``: the new base rate applies from here on, the restored schedule
    keeps its position (each group's current factor is kept)."""
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
        factor = float(group["lr"]) / base if base else 1.0
        group["initial_lr"] = lr
        if torch.is_tensor(group["lr"]):  # torchao keeps it as a tensor
            group["lr"].fill_(lr * factor)
        else:
            group["lr"] = lr * factor
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
