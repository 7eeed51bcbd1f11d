"""Training-step throughput of the GMPO update: tokens/s, MFU and peak memory.

    python benchmarks/bench_update.py --model qwen2_5_vl_3b --batch 8 --seq 1024 --image 448        # one H100
    python benchmarks/bench_update.py --model qwen2_5_vl_7b --batch 8 --seq 1024 --image 448 --cpu-offload
    python benchmarks/bench_update.py --model qwen2_5_vl_3b --batch 8 --seq 1024 --min-seq 384 --layout packed
    python benchmarks/bench_update.py --model qwen2_5_vl_3b --batch 8 --seq 1024 --image 448 --profile runs/prof
    python benchmarks/bench_update.py --model tiny --batch 2 --seq 96 --image 56 --steps 2           # CPU, format

One optimizer step = forward + backward of the policy's response log-probs (chunked LM head, GMPO loss) over
``batch`` sequences of ``seq`` tokens, each with one ``image`` x ``image`` picture, under FSDP2 (world size 1 here,
the same code path as multi-GPU) with bf16 compute, fp32 gradients reduction and activation checkpointing, then
AdamW. MFU counts model FLOPs as the trainer's ``perf/mfu`` does (``metrics.training_flops``): 6 x language-model
parameters x tokens plus 6 x vision parameters x the patches the vision tower encoded (``--group``: sequences
sharing one image, encoded once), over the GPU's dense bf16 peak. ``--profile DIR`` runs one more step under the
torch profiler and splits its time into matmul / attention / optimizer / FSDP / copies / other ops.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Timer, config_for, image_prompts, report

from mm_gmpo import distributed
from mm_gmpo.attention import use_grouped_vision_attention
from mm_gmpo.data.processing import load_processor
from mm_gmpo.lora import add_lora
from mm_gmpo.loss import gmpo_loss
from mm_gmpo.metrics import peak_bf16_flops, training_flops
from mm_gmpo.models import build_model, compile_blocks, resolve_attention
from mm_gmpo.optim import build_optimizer, master_dtype
from mm_gmpo.policy import Policy, collate, use_packing
from mm_gmpo.profiling import profiled, write_profile
from mm_gmpo.update import UpdateBatch, policy_update


def make_batch(n: int, seq: int, side: int, processor, vocab: int, min_seq: int | None = None, group: int = 1):
    """n sequences of one image prompt + random response tokens; sequence lengths spread evenly over
    [min_seq, seq] (all ``seq`` by default), as sampled responses of different lengths are. ``group`` consecutive
    sequences share a prompt (a prompt's samples), so its image once. Returns the batch and its distinct patches."""
    prompts = image_prompts(-(-n // group), side, processor)
    enc = [prompts[i // group] for i in range(n)]
    g = torch.Generator().manual_seed(0)
    lo = seq if min_seq is None else min_seq
    lengths = [round(lo + (seq - lo) * i / max(1, n - 1)) for i in range(n)]
    prompt_ids, resp_ids = [], []
    for e, length in zip(enc, lengths, strict=True):
        n_resp = max(1, length - len(e.input_ids))
        prompt_ids.append(e.input_ids)
        resp_ids.append(torch.randint(0, min(vocab, 150000), (n_resp,), generator=g).tolist())
    b = collate(prompt_ids, resp_ids, pad_id=151643, pixel_values=[e.pixel_values for e in enc],
                image_grid_thw=[e.image_grid_thw for e in enc])
    return b, sum(int(e.pixel_values.shape[0]) for e in prompts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2_5_vl_3b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--min-seq", type=int, default=None,
                    help="shortest sequence: lengths spread evenly from it to --seq (default: all --seq long)")
    ap.add_argument("--image", type=int, default=448)
    ap.add_argument("--group", type=int, default=1, help="consecutive sequences per prompt (rollout n): they share "
                    "one image, which the policy encodes once per micro-batch")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    ap.add_argument("--micro-tokens", type=int, default=8192, help="token budget per micro-batch")
    ap.add_argument("--no-ac", action="store_true", help="no activation checkpointing")
    ap.add_argument("--cpu-offload", action="store_true")
    ap.add_argument("--optim", default="adamw", choices=["adamw", "adamw_8bit", "adamw_bf16"],
                    help="optim.name (adamw_bf16 keeps bf16 weights)")
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank (model.lora.rank); 0 = full fine-tuning")
    ap.add_argument("--freeze-vision", action="store_true")
    ap.add_argument("--attn", default="auto", help="auto (flash_attention_2 when installed), sdpa or flash_attention_2")
    ap.add_argument("--layout", default="auto", choices=["auto", "packed", "padded"],
                    help="micro-batch layout; auto = packed unless --attn eager")
    ap.add_argument("--vision-attention", default="grouped", choices=["transformers", "grouped"],
                    help="vision tower attention without flash-attn (mm_gmpo/attention.py)")
    ap.add_argument("--chunk", type=int, default=1024, help="log-prob chunk size (tokens)")
    ap.add_argument("--ac-every", type=int, default=1,
                    help="with activation checkpointing, recompute every k-th layer/block only (1 = all)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the MLPs and norms (policy.compile_blocks)")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="profile one more step (torch profiler): where its time went, to DIR/profile.md and .json")
    ap.add_argument("--trace", action="store_true", help="with --profile: also DIR/trace.json.gz (Chrome trace)")
    ap.add_argument("--out", default=None, help="results.jsonl to append to")
    args = ap.parse_args()

    info = distributed.init_distributed()
    device = info.device
    cfg = config_for(args.model)
    bf16 = device.type == "cuda"
    torch.manual_seed(0)
    attn = resolve_attention(args.attn)
    packed = use_packing(args.layout, attn)
    model = build_model(args.model, random_init=True, config=cfg, dtype=master_dtype(args.optim),
                        attn_implementation=attn, device=None if args.cpu_offload else device)
    if args.lora:
        add_lora(model, rank=args.lora, alpha=2 * args.lora)
    grouped = args.vision_attention == "grouped" and use_grouped_vision_attention(model)
    if args.compile:
        compile_blocks(model)
    policy = Policy(model, chunk_size=args.chunk, packed=packed).to(device if not args.cpu_offload else "cpu")
    distributed.parallelize(policy, param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32,
                            activation_checkpointing=not args.no_ac, checkpoint_every=args.ac_every, cpu_offload=args.cpu_offload,
                            freeze_vision=args.freeze_vision)
    opt = build_optimizer(policy, lr=1e-6, name=args.optim)
    batch, n_patches = make_batch(args.batch, args.seq, args.image, load_processor(), cfg.text_config.vocab_size
                                  if hasattr(cfg, "text_config") else cfg.vocab_size, min_seq=args.min_seq, group=args.group)
    g = torch.Generator().manual_seed(1)
    data = UpdateBatch(batch, torch.zeros(batch.response_mask.shape) - 2.0, torch.randn(args.batch, generator=g))
    tokens = int(batch.attention_mask.sum())

    def step():
        return policy_update(policy, opt, data, gmpo_loss, max_tokens_per_micro_batch=args.micro_tokens,
                             device=device)

    step()  # warm-up (allocator, kernels)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    patches_before = policy.vision_patches
    times = []
    for _ in range(args.steps):
        with Timer(device) as t:
            m = step()
        times.append(t.s)
    dt = sorted(times)[len(times) // 2]  # median
    patches = (policy.vision_patches - patches_before) / args.steps  # what the vision tower encoded per step
    flops = training_flops(policy, tokens, patches)  # the trainer's perf/mfu formula
    n_lm, n_vis = training_flops(policy, 1, 0) / 6, training_flops(policy, 0, 1) / 6
    peak = peak_bf16_flops(device)
    figures = {
        "model": args.model, "batch x seq": f"{args.batch} x {args.seq}"
        + (f" (from {args.min_seq})" if args.min_seq else ""), "image": f"{args.image}x{args.image}",
        "sequences per image": args.group, "patches per image": n_patches // -(-args.batch // args.group),
        "tokens per step": tokens, "vision patches encoded per step": patches,
        "activation checkpointing": "none" if args.no_ac else "all" if args.ac_every == 1
        else f"1 in {args.ac_every} layers", "cpu offload": args.cpu_offload, "attention": attn,
        "layout": "packed" if packed else "padded", "compiled MLPs and norms": args.compile,
        "vision attention": "grouped" if grouped else "transformers",
        "step s (median)": dt, "tokens/s": tokens / dt,
        "LM params (B)": n_lm / 1e9, "vision params (B)": n_vis / 1e9, "TFLOP per step": flops / 1e12,
        "micro-batches": m["actor/micro_batches"],
    }
    if peak:
        figures["MFU"] = flops / dt / peak
        figures["MFU (LM only)"] = 6 * n_lm * tokens / dt / peak
    if device.type == "cuda":
        figures["peak memory GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        # what the caching allocator held at its peak: what the GPU had to give (the plan's figure to compare)
        figures["peak reserved GiB"] = torch.cuda.max_memory_reserved(device) / 2**30
    if args.profile:
        with profiled(device, trace=Path(args.profile) / "trace.json.gz" if args.trace else None) as prof:
            step()
        write_profile(prof, Path(args.profile) / "profile")
        figures["profiled busy / wall"] = prof["busy_s"] / prof["wall_s"]
        figures["matmul share of busy"] = prof["categories"]["matmul"] / prof["busy_s"]
        figures["matmul TFLOP/s (own time)"] = prof["matmul TFLOP/s"]
    report("update step (FSDP2, GMPO)", figures, device, args.out)


if __name__ == "__main__":
    main()
