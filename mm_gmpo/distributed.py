"""The process group, collectives, FSDP2 sharding (``parallelize``, sharded loading) and gathering full tensors.

Everything also works in a single process without ``torchrun`` (world size 1, no process group).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None, timeout_s: int = 1800, *, cpu_collectives: bool = False) -> DistInfo:
    """Start the process group when launched by torchrun (NCCL on GPU, gloo on CPU); a no-op otherwise.

    ``cpu_collectives``: on GPU, also a gloo backend for CPU tensors (``cpu:gloo,cuda:nccl``), which FSDP2's
    CPU offload needs: its sharded parameters and gradients live on the CPU, and gradient clipping, the weight
    sync and checkpoints run collectives on them that NCCL cannot (torchtitan does the same)."""
    if "RANK" not in os.environ and not dist.is_initialized():
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return DistInfo(0, 1, 0, device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if backend is None:
        backend = ("cpu:gloo,cuda:nccl" if cpu_collectives else "nccl") if use_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if use_cuda else None)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device | None = None) -> list[float]:
    """Sum floats over ranks (one collective for the whole list)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device or _comm_device())
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: float, device: torch.device | None = None) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device or _comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def all_reduce_sum_metrics(metrics: dict[str, float], device: torch.device | None = None) -> dict[str, float]:
    """Sum a metrics dict over ranks, over the union of every rank's keys (a missing key counts 0): ranks may
    produce different keys (one whose micro-batches were all padding), and a reduction over different key lists
    would pair unrelated values or hang."""
    keys = union_keys(list(metrics))
    return dict(zip(keys, all_reduce_sum([float(metrics.get(k, 0.0)) for k in keys], device), strict=True))


def all_reduce_mean_metrics(metrics: dict[str, float], device: torch.device | None = None) -> dict[str, float]:
    """Average a metrics dict over ranks (``*_min`` / ``*_max`` keys take the min / max), over the union of every
    rank's keys: a key is averaged over the ranks that report it (mismatch metrics exist only where the engine
    reported log-probs), never paired with another key's value."""
    if not dist.is_initialized():
        return dict(metrics)
    keys = union_keys(list(metrics))
    dev = device or _comm_device()
    have = torch.tensor([k in metrics for k in keys], dtype=torch.float64, device=dev)
    vals = torch.tensor([float(metrics.get(k, 0.0)) for k in keys], dtype=torch.float64, device=dev)
    inf = torch.full_like(vals, float("inf"))
    total = torch.stack([vals * have, have])
    lo = torch.where(have.bool(), vals, inf)
    hi = torch.where(have.bool(), vals, -inf)
    dist.all_reduce(total)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    out = {}
    for i, k in enumerate(keys):
        mean = (total[0, i] / total[1, i].clamp(min=1)).item()
        out[k] = lo[i].item() if k.endswith("_min") else hi[i].item() if k.endswith("_max") else mean
    return out


def union_keys(keys: list[str]) -> list[str]:
    """The sorted union of every rank's ``keys`` (metric names that only some ranks produced)."""
    return sorted({k for ks in all_gather_objects(sorted(set(keys))) for k in ks})


def gather_dicts(part: dict) -> dict:
    """The union of every rank's dict (same on all ranks)."""
    return {k: v for p in all_gather_objects(part) for k, v in p.items()}


def all_gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order (pickled host data between the job's own ranks: small lists, the
    prompt groups one rank hands another)."""
    if not dist.is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _comm_device() -> torch.device:
    """Where collectives on tensors of no particular device run: the GPU when the group has NCCL (also under
    ``cpu:gloo,cuda:nccl``, where the GPU is the fast path), else the CPU."""
    if dist.is_initialized() and "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------- FSDP2


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    lm = getattr(model.model, "language_model", model.model)
    return list(lm.layers)


def _vision_blocks(model: nn.Module) -> list[nn.Module]:
    visual = getattr(model.model, "visual", None)
    return list(visual.blocks) if visual is not None else []


def parallelize(
    policy: nn.Module,
    *,
    param_dtype: torch.dtype | None = torch.bfloat16,
    reduce_dtype: torch.dtype | None = torch.float32,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    activation_checkpointing: bool = True,
    checkpoint_every: int = 1,
    freeze_vision: bool = False,
) -> nn.Module:
    """Shard a :class:`mm_gmpo.policy.Policy` with FSDP2 (``fully_shard``) in place and return it.

    One FSDP unit per decoder layer and per vision block, one for the vision tower (patch embed + merger), and the
    root (embeddings, final norm, LM head; tied weights stay in one unit). Parameters are cast to ``param_dtype``
    for compute with gradients reduced in ``reduce_dtype``; ``cpu_offload`` keeps sharded parameters and optimizer
    state on the CPU. Works with world size 1 too (the same code path as multi-GPU).

    ``activation_checkpointing`` recomputes each decoder layer's and vision block's activations in backward;
    ``checkpoint_every=k`` only those of every k-th of them (transformers' ``every_n_layers``: the vision blocks and
    then the decoder layers counted together from 0), keeping the others' activations: less recompute for more
    memory (torchtitan's selective per-layer checkpointing).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if cpu_offload and not torch.cuda.is_available():
        raise ValueError("cpu_offload keeps sharded parameters on the CPU and computes on a GPU; this machine has "
                         "no CUDA device, so set trainer.cpu_offload=false")
    model = policy.model
    if freeze_vision:
        visual = getattr(model.model, "visual", None)
        if visual is not None:
            visual.requires_grad_(False)
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every={checkpoint_every}: use 1 (every layer) or more (every k-th layer)")
    if activation_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x names it so
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=checkpoint_every)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False},
                                                every_n_layers=checkpoint_every)
        model.config.use_cache = False
    if not dist.is_initialized():
        # fully_shard needs a device mesh; a single process gets a 1-rank group of its own
        _init_single_process_group()
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kw = {"mp_policy": mp}
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for block in _vision_blocks(model):
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kw)
    visual = getattr(model.model, "visual", None)
    if visual is not None:
        fully_shard(visual, reshard_after_forward=reshard_after_forward, **kw)
        # every rank must all-gather (and reduce-scatter) the vision shards in every micro-batch, also when its
        # micro-batch holds only text-only prompts: the policy then runs the tower on a blank patch, weighted 0
        policy.always_run_vision = True
    for layer in _decoder_layers(model):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(policy, reshard_after_forward=reshard_after_forward, **kw)
    return policy


def local_rows(param: torch.Tensor) -> slice:
    """The rows of the full tensor that this rank's shard of ``param`` holds (FSDP2: Shard(0), chunked as
    ``torch.chunk``: ceil(rows / ranks) each, the last ranks shorter or empty); all rows of a plain tensor."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return slice(None)
    if tuple(param.placements) != (Shard(0),):
        raise ValueError(f"materialize reads row shards; this parameter is placed as {param.placements}")
    n, ranks, me = param.shape[0], param.device_mesh.size(), param.device_mesh.get_local_rank()
    chunk = -(-n // ranks)
    return slice(min(me * chunk, n), min((me + 1) * chunk, n))


@torch.no_grad()
def materialize(policy: nn.Module, source, device: torch.device | str) -> dict[str, float]:
    """Give a policy built on the meta device (``mm_gmpo.models.empty_model``) and sharded by :func:`parallelize`
    its memory on ``device`` and fill this rank's shards from ``source`` (``read(name, rows)``: a
    ``CheckpointSource`` or ``RandomSource`` over the inner model's parameter names). No rank ever holds more
    than its shards and one slice being read; returns {'bytes_read', 'largest_held'} of this rank's source."""

    buffers = dict(policy.named_buffers())  # real CPU tensors (rotary tables): to_empty would discard them
    policy.to_empty(device=device)
    for name, b in policy.named_buffers():
        b.copy_(buffers[name])
    for name, p in policy.named_parameters():
        local = local_shard(p)
        rows = local_rows(p)
        part = source.read(name.removeprefix("model."), rows)
        if part.shape != local.shape:
            raise ValueError(f"{name}: the source gives {tuple(part.shape)} for rows {rows}, the shard is "
                             f"{tuple(local.shape)}")
        local.copy_(part)
    return {"bytes_read": float(source.bytes_read), "largest_held": float(source.largest_held)}


def _init_single_process_group() -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    dist.init_process_group("gloo", rank=0, world_size=1)


def clip_grad_norm(params, max_norm: float) -> float:
    """Global gradient-norm clipping over (possibly sharded DTensor) parameters; returns the pre-clip norm."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def local_shard(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (every rank calls it, in the same order), also when the shard was moved
    to the CPU between stages and the process group is NCCL: it then travels through the GPU one tensor at a
    time."""
    if not hasattr(param, "full_tensor"):
        return param
    comm = _comm_device()
    if param.device != comm:
        from torch.distributed.tensor import DTensor

        param = DTensor.from_local(param.to_local().to(comm), param.device_mesh, param.placements,
                                   shape=param.shape, stride=param.stride())
    return param.full_tensor()


# ---------------------------------------------------------------- full tensors


def full_model_state_dict(policy: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) HF-model state dict on CPU, on rank 0 (empty dict on other ranks). Gathered one
    tensor at a time from wherever the shards are (the CPU with ``trainer.offload_params``: a rank never holds
    more than one full tensor on its GPU, where a colocated engine may be awake). Tied weights stay one tensor."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}  # a tensor already gathered (a tied weight) -> its first name
    main = rank() == 0
    for name, t in policy.model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            if main:
                out[name] = out[seen[id(t)]]
            continue
        seen[id(t)] = name
        full = full_tensor(t.detach())  # every rank, in the same order
        if main:
            out[name] = full.to("cpu", copy=True)
    return out
