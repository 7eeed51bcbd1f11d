"""Weight sync FSDP2 -> rollout engine: seconds, bytes and the memory it needs.

    python benchmarks/bench_sync.py --model qwen2_5_vl_7b                     # one H100: FSDP2 policy -> vLLM
    python benchmarks/bench_sync.py --backend hf --model tiny --repeats 2     # CPU, format check

The policy is a random-weight model sharded with FSDP2 (bf16 compute); the engine is a colocated vLLM
(``load_format="dummy"``) or the transformers engine. ``sync_weights`` gathers one parameter at a time and
streams it into the engine, then the engine clears its caches; reported: median seconds over ``repeats``, GB
moved, the largest single tensor, and on a GPU the peak extra memory the sync allocated and the free memory left.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Timer, config_for, report

from mm_gmpo import distributed
from mm_gmpo.data.processing import load_processor
from mm_gmpo.models import build_model, write_model_folder
from mm_gmpo.policy import Policy
from mm_gmpo.weight_sync import sync_weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["vllm", "hf"], default="vllm")
    ap.add_argument("--model", default="qwen2_5_vl_7b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gpu-mem", type=float, default=0.3, help="vLLM gpu_memory_utilization")
    ap.add_argument("--cpu-offload", action="store_true", help="FSDP2 CPU offload of the policy")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    info = distributed.init_distributed()
    device = info.device
    cfg = config_for(args.model)
    gpu = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_model_folder(Path(tmp) / args.model, cfg)
        if args.backend == "vllm":
            from mm_gmpo.rollout.vllm_engine import VLLMEngine

            engine = VLLMEngine(folder, dtype="bfloat16", gpu_memory_utilization=args.gpu_mem, enforce_eager=True,
                                max_model_len=2048, load_format="dummy")
        else:
            from mm_gmpo.rollout.hf import HFEngine

            m = build_model(args.model, random_init=True, config=cfg, dtype=torch.bfloat16 if gpu else torch.float32,
                            device=device)
            engine = HFEngine(m.to(device), load_processor().tokenizer, device=device)
        torch.manual_seed(1)
        policy = Policy(build_model(args.model, random_init=True, config=cfg, dtype=torch.float32,
                                    device=None if args.cpu_offload else device))
        policy.to("cpu" if args.cpu_offload else device)
        distributed.parallelize(policy, param_dtype=torch.bfloat16 if gpu else None, activation_checkpointing=False,
                                cpu_offload=args.cpu_offload)
        dtype = torch.bfloat16 if (gpu or args.backend == "vllm") else torch.float32
        sync_weights(policy, engine, dtype=dtype)  # warm-up
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        times, last = [], {}
        for _ in range(args.repeats):
            with Timer(device) as t:
                last = sync_weights(policy, engine, dtype=dtype)
            times.append(t.s)
        figures = {
            "model": args.model, "engine": args.backend, "policy cpu offload": args.cpu_offload,
            "sync s (median)": sorted(times)[len(times) // 2], "GB moved": last["perf/weight_sync_gb"],
            "largest tensor GB": last["perf/weight_sync_max_tensor_gb"],
            "tensors": int(last["perf/weight_sync_tensors"]),
        }
        if gpu:
            free, total = torch.cuda.mem_get_info(device)
            figures["sync peak extra GiB"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
            figures["GPU free after GiB"] = free / 2**30
            figures["GPU total GiB"] = total / 2**30
        report("weight sync (FSDP2 -> engine)", figures, device, args.out)


if __name__ == "__main__":
    main()
