"""Offload between stages (EasyR1's offload_params / offload_optimizer): the trainer's parameter shards and
optimizer state wait on the CPU while the rollout engine generates (its KV cache gets the GPU memory) and come back
for the log-probs and the update. The ``Offloader`` owns every such move of a run."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from mm_gmpo.config import TrainerConfig
from mm_gmpo.distributed import local_shard
from mm_gmpo.metrics import StepTimer

CPU = torch.device("cpu")


def _moved_state(optimizer: torch.optim.Optimizer, device: torch.device) -> list[tuple[dict, str, torch.Tensor]]:
    """The optimizer's per-parameter tensors not on ``device``; scalars (AdamW's step) stay where the optimizer
    keeps them (the CPU unless fused)."""
    return [(state, k, v) for state in optimizer.state.values() for k, v in state.items()
            if torch.is_tensor(v) and v.ndim > 0 and v.device != device]


@torch.no_grad()
def move_train_state(policy: nn.Module, optimizer: torch.optim.Optimizer | None, device: torch.device, *,
                     params: bool = True, optimizer_state: bool = True) -> float:
    """Move this rank's parameter shards (``params``) and optimizer state (``optimizer_state``) to ``device``: the
    CPU while the rollout engine generates (its KV cache gets the GPU memory), back to the GPU for the log-probs
    and the update (EasyR1's offload_params / offload_optimizer). Returns the bytes moved. Gradients are freed
    after every update, so there are none to move."""
    moved = 0
    if params:
        moved += sum(local_shard(p).numel() * p.element_size() for p in policy.parameters() if p.device != device)
        policy.to(device)  # FSDP2 re-registers its sharded parameters after a move
    if optimizer_state and optimizer is not None:
        for state, k, v in _moved_state(optimizer, device):
            moved += local_shard(v).numel() * v.element_size()
            state[k] = v.to(device, non_blocking=True)
    if device.type == "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # hand the freed blocks back for the engine's wake-up
    return float(moved)


class Offloader:
    """Where the trainer's state is between stages, as ``trainer.offload_params`` / ``offload_optimizer`` say (both
    off: everything stays on the device and nothing moves). ``park()`` before the engine starts; ``on_device``
    around the log-probs and the update (``timing/reload_s``, ``timing/offload_s``, ``perf/offloaded_gb``);
    ``reference_on_device`` around the frozen KL reference's pass."""

    def __init__(self, t: TrainerConfig, policy: nn.Module, optimizer: torch.optim.Optimizer,
                 reference: nn.Module | None, device: torch.device):
        self.moves = {"params": t.offload_params, "optimizer_state": t.offload_optimizer}
        self.on = any(self.moves.values())
        self.policy, self.optimizer, self.reference, self.device = policy, optimizer, reference, device

    def park(self) -> None:
        """Everything that is offloaded to the CPU (the run's start: the engine sizes its KV cache without it)."""
        if self.on:
            move_train_state(self.policy, self.optimizer, CPU, **self.moves)
            if self.reference is not None and self.moves["params"]:
                move_train_state(self.reference, None, CPU, optimizer_state=False)

    @contextmanager
    def on_device(self, timer: StepTimer) -> Iterator[None]:
        """The policy's state on the device inside the block, back on the CPU after it (the engine then wakes)."""
        if self.on:
            with timer("reload"):
                move_train_state(self.policy, self.optimizer, self.device, **self.moves)
        yield
        if self.on:
            t0 = time.perf_counter()
            timer.values["perf/offloaded_gb"] = move_train_state(self.policy, self.optimizer, CPU, **self.moves) / 1e9
            timer.add("offload", time.perf_counter() - t0)

    @contextmanager
    def reference_on_device(self) -> Iterator[None]:
        moves = self.reference is not None and self.moves["params"]
        if moves:
            move_train_state(self.reference, None, self.device, optimizer_state=False)
        yield
        if moves:
            move_train_state(self.reference, None, CPU, optimizer_state=False)
