"""Worker for tests/test_distributed.py: run under `torchrun --nproc_per_node N` (gloo) or plain python.

Modes
    step    one GMPO update of a tiny Qwen2.5-VL (--model: another tiny family) on a fixed 4-sample batch; --fsdp 0
            runs it without FSDP.
    train   --steps N updates, checkpoint after --save-at, HF export at the end.
    resume  load the latest checkpoint in --ckpt and continue to --steps.
Rank 0 writes a torch file to --out: per-step losses, RNG draws, final full state dict, final log-probs.
Each rank takes its contiguous share of the global batch, so any world size sees the same global batch.
"""

from __future__ import annotations

import argparse
import os

import torch

from mm_gmpo import distributed
from mm_gmpo.checkpoint import TrainerState, export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from mm_gmpo.loss import gmpo_loss
from mm_gmpo.models import build_model, processor_source, random_model_config
from mm_gmpo.optim import build_optimizer, build_scheduler
from mm_gmpo.policy import Policy, collate
from mm_gmpo.update import UpdateBatch, policy_update

VISION_START, IMAGE_PAD, VISION_END, PAD = 151652, 151655, 151653, 151643
GLOBAL_B = 4


def make_global_batch(step: int, patch: int = 14):
    """A deterministic global batch for a step: 4 image prompts of different lengths, responses, old log-probs;
    ``patch``: the vision tower's patch size (14, Qwen3-VL 16)."""
    g = torch.Generator().manual_seed(1000 + step)
    prompts, responses, pvs, grids = [], [], [], []
    for i in range(GLOBAL_B):
        text = torch.randint(0, 150000, (3 + i,), generator=g).tolist()
        prompts.append([151644, 872, 198, VISION_START] + [IMAGE_PAD] * 4 + [VISION_END] + text)
        responses.append(torch.randint(0, 150000, (4 + 3 * i,), generator=g).tolist())
        pvs.append(torch.randn(16, 3 * 2 * patch * patch, generator=g))
        grids.append(torch.tensor([[1, 4, 4]]))
    batch = collate(prompts, responses, pad_id=PAD, pixel_values=pvs, image_grid_thw=grids)
    # near a random model's log-probs (log 1/151936 = -11.93) so ratios are O(1) and some tokens clip
    old = (-11.93 + 0.3 * torch.randn(batch.response_mask.shape, generator=g)) * batch.response_mask
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    return UpdateBatch(batch, old, adv)


def local_share(data: UpdateBatch) -> UpdateBatch:
    w, r = distributed.world_size(), distributed.rank()
    per = GLOBAL_B // w
    return data.select(list(range(r * per, (r + 1) * per)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["step", "train", "resume", "sync"], required=True)
    ap.add_argument("--fsdp", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--save-at", type=int, default=0)
    ap.add_argument("--ckpt", default="")
    ap.add_argument("--export", default="")
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="<= 0: no clipping")
    ap.add_argument("--packed", type=int, default=0, help="1: padding-free packed micro-batches")
    ap.add_argument("--model", default="tiny-random", help="a tiny random model of any family")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    info = distributed.init_distributed(backend="gloo")

    config = random_model_config(args.model)
    patch = config.vision_config.patch_size
    model = build_model("tiny", random_init=True, config=config, dtype=torch.float32, seed=0)
    policy = Policy(model, chunk_size=8, packed=bool(args.packed))
    if args.fsdp:
        distributed.parallelize(policy, param_dtype=None, reduce_dtype=None, activation_checkpointing=True)
    optimizer = build_optimizer(policy, lr=1e-4, weight_decay=0.01)
    scheduler = build_scheduler(optimizer, schedule="cosine", warmup_steps=1, total_steps=10)
    state = TrainerState()
    if args.mode == "resume":
        path = latest_checkpoint(args.ckpt)
        state = load_checkpoint(path, policy, optimizer, scheduler)

    torch.manual_seed(1234 + info.rank) if args.mode != "resume" else None
    losses, draws, grad_norms = {}, {}, {}
    for step in range(state.step + 1, args.steps + 1):
        data = local_share(make_global_batch(step, patch))
        # a tiny token budget forces several micro-batches, and a different number on each rank
        m = policy_update(policy, optimizer, data, gmpo_loss, max_tokens_per_micro_batch=40,
                           max_grad_norm=args.max_grad_norm, keep_grads=True)
        scheduler.step()
        losses[step] = m["loss/total"]
        grad_norms[step] = m["actor/grad_norm"]
        draws[step] = torch.rand(1).item()  # consumes the global RNG: resume must restore it
        state.step = step
        state.data_position = {"next_step": step + 1}
        if step == args.save_at and args.ckpt:
            save_checkpoint(args.ckpt, policy, optimizer, scheduler, state, keep_last=2)

    # gradients of the last update (left in .grad after the step): the sharp check, Adam's first step is ~sign(g)
    grads = {}
    for name, p in policy.named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name] = g.detach().clone()
    full = distributed.full_model_state_dict(policy) if args.fsdp else {k: v.detach().clone() for k, v in
                                                                        model.state_dict().items()}
    policy.eval()
    with torch.no_grad():
        lp, _ = policy(make_global_batch(99, patch).batch)
    if args.mode == "sync":  # every rank: a fresh HF engine with other weights, then sync from the FSDP policy
        from transformers import AutoTokenizer

        from mm_gmpo.rollout.hf import HFEngine
        from mm_gmpo.weight_sync import sync_weights

        other = build_model("tiny", random_init=True, config=random_model_config(args.model), dtype=torch.float32,
                            seed=7)
        engine = HFEngine(other, AutoTokenizer.from_pretrained(processor_source(args.model)))
        probe = make_global_batch(99, patch).batch
        with torch.no_grad():
            before, _ = Policy(other)(probe)
        sync_metrics = sync_weights(policy, engine)
        with torch.no_grad():
            after, _ = Policy(other)(probe)
        gathered = distributed.all_reduce_sum([(after - lp).abs().max().item(), (before - lp).abs().max().item()])
        if info.rank == 0:
            torch.save({"after_max_diff_sum": gathered[0], "before_max_diff_sum": gathered[1],
                        "metrics": sync_metrics, "world_size": info.world_size}, args.out)
        distributed.barrier()
        torch.distributed.destroy_process_group() if torch.distributed.is_initialized() else None
        os._exit(0)
    if args.export:
        from mm_gmpo.data.processing import load_processor

        export_hf(policy, args.export, processor=load_processor(processor_source(args.model)))
    if info.rank == 0:
        torch.save({"losses": losses, "draws": draws, "grads": grads, "grad_norms": grad_norms, "state_dict": full, "logprobs": lp,
                    "lr": optimizer.param_groups[0]["lr"], "world_size": info.world_size}, args.out)
    distributed.barrier()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
