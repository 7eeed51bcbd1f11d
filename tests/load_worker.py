"""Run under torchrun by tests/test_sharded_load.py: build on the meta device, shard with FSDP2, fill each rank's
shards (from a checkpoint folder or freshly initialised), and write every parameter in full plus this rank's
counts of what it read."""

import argparse
import os

import torch

from mm_gmpo import distributed
from mm_gmpo.lora import add_lora
from mm_gmpo.models import CheckpointSource, RandomSource, empty_model, model_config
from mm_gmpo.policy import Policy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", required=True)
    ap.add_argument("--source", choices=("checkpoint", "random"), required=True)
    ap.add_argument("--lora", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    info = distributed.init_distributed()
    model = empty_model(model_config(args.folder), attn_implementation="sdpa")
    if args.lora:
        add_lora(model, rank=args.lora, alpha=2 * args.lora)
    source = CheckpointSource(model, args.folder, seed=5) if args.source == "checkpoint" else RandomSource(model, 5)
    policy = Policy(model)
    distributed.parallelize(policy, activation_checkpointing=False)
    stats = distributed.materialize(policy, source, "cpu")
    params = {n.removeprefix("model."): p.full_tensor() for n, p in policy.named_parameters()}
    shard_bytes = sum(p.to_local().numel() * p.element_size() for p in policy.parameters())
    buffers = {n.removeprefix("model."): b.clone() for n, b in policy.named_buffers()}
    ranks = [None] * info.world_size
    torch.distributed.all_gather_object(ranks, {**stats, "shard_bytes": shard_bytes})
    if info.is_main:
        torch.save({"params": params, "buffers": buffers, "ranks": ranks}, args.out)
    # as the other workers end: without this, gloo's threads can abort a rank at interpreter exit ("terminate
    # called without an active exception", exit -6) after its work is done
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
