"""Rollout throughput: mm_gmpo's engine against bare vLLM on the same requests.

    python benchmarks/bench_rollout.py --model qwen2_5_vl_3b --prompts 32 --n 8 --max-tokens 512 --image 448
    python benchmarks/bench_rollout.py --backend hf --model tiny --prompts 4 --n 2 --max-tokens 8 --image 56  # CPU

vLLM: a random-weight model (``load_format="dummy"``) from the real config in one engine; bare ``LLM.generate``
on the prompts (text + one image each, ``n`` samples, sampling at temperature 1, ``ignore_eos`` so every sample
is ``max_tokens`` long, the sampled token's log-prob, as a user would write it) and mm_gmpo's
``VLLMEngine.generate`` on the same prompts, through the same ``LLM`` (so the same engine arguments: CUDA graphs
unless ``--eager``), each warmed up once, then timed alternately ``--repeats`` times. Reports the median seconds,
generated tokens/s and their ratio.
HF: mm_gmpo's transformers engine alone (slow path; CPU format check).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Timer, config_for, image_prompts, report

from mm_gmpo.data.processing import load_processor
from mm_gmpo.models import build_model, write_model_folder
from mm_gmpo.rollout.base import SamplingParams


def bench_vllm(args, prompts, folder) -> dict:
    """Bare vLLM and mm_gmpo's engine on one and the same ``LLM`` (same engine arguments, same KV cache, same
    compiled graphs), timed alternately ``--repeats`` times after a warm-up of each: the ratio of the medians is
    what mm_gmpo's request building and output handling cost or save, not a difference of engine settings."""
    import statistics

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import SamplingParams as VSP

    from mm_gmpo.rollout.vllm_engine import VLLMEngine, engine_request, vllm_sampling_kwargs

    device = torch.device("cuda")
    sampling = SamplingParams(n=args.n, temperature=1.0, max_tokens=args.max_tokens, seed=0, ignore_eos=True)
    eng = VLLMEngine(folder, load_format="dummy", dtype="bfloat16", gpu_memory_utilization=args.gpu_mem,
                     enforce_eager=args.eager, max_model_len=args.max_model_len, seed=0)
    # bare vLLM: what a user would write by hand (requests, per-token log-prob objects, detokenized text)
    reqs = [engine_request(p) for p in prompts]
    sp = VSP(**vllm_sampling_kwargs(sampling))

    def bare() -> int:
        outs = eng.llm.generate(reqs, sp, use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs)

    def ours() -> int:
        return sum(len(r.response_ids) for r in eng.generate(prompts, sampling))

    eng.llm.generate(reqs[:2], sp, use_tqdm=False)
    eng.generate(prompts[:2], sampling)
    times: dict[str, list[float]] = {"bare": [], "ours": []}
    tokens: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, fn in (("bare", bare), ("ours", ours)):
            with Timer(device) as t:
                tokens[name] = fn()
            times[name].append(t.s)
    med = {k: statistics.median(v) for k, v in times.items()}
    figures = {"repeats (alternating)": args.repeats,
               "bare vLLM s (median)": med["bare"], "bare vLLM tokens/s": tokens["bare"] / med["bare"],
               "mm_gmpo s (median)": med["ours"], "mm_gmpo tokens/s": tokens["ours"] / med["ours"],
               "mm_gmpo / bare (tokens/s, medians)": (tokens["ours"] / med["ours"]) / (tokens["bare"] / med["bare"]),
               "bare s, each": " ".join(f"{x:.2f}" for x in times["bare"]),
               "mm_gmpo s, each": " ".join(f"{x:.2f}" for x in times["ours"])}
    with Timer(device) as t:
        eng.sleep()
    figures["sleep s"] = t.s
    with Timer(device) as t:
        eng.wake_up()
    figures["wake_up s"] = t.s
    return figures


def bench_hf(args, prompts) -> dict:
    from mm_gmpo.rollout.hf import HFEngine

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = config_for(args.model)
    model = build_model(args.model, random_init=True, config=cfg,
                        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).to(device)
    eng = HFEngine(model, load_processor().tokenizer, device=device, batch_size=args.prompts * args.n)
    sampling = SamplingParams(n=args.n, temperature=1.0, max_tokens=args.max_tokens, seed=0)
    eng.generate(prompts[:1], sampling)
    with Timer(device) as t:
        rolls = eng.generate(prompts, sampling)
    tokens = sum(len(r.response_ids) for r in rolls)
    return {"HF generate s": t.s, "HF generate tokens/s": tokens / t.s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["vllm", "hf"], default="vllm")
    ap.add_argument("--model", default="qwen2_5_vl_3b")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--image", type=int, default=448)
    ap.add_argument("--gpu-mem", type=float, default=0.8)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--eager", action="store_true", help="enforce_eager (faster start, slower decode)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating timed calls of each (vLLM)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    proc = load_processor()
    prompts = image_prompts(args.prompts, args.image, proc)
    head = {"model": args.model, "prompts x n": f"{args.prompts} x {args.n}", "max tokens": args.max_tokens,
            "image": f"{args.image}x{args.image}", "prompt tokens": len(prompts[0].input_ids)}
    if args.backend == "vllm":
        with tempfile.TemporaryDirectory() as tmp:
            folder = write_model_folder(Path(tmp) / args.model, config_for(args.model))
            figures = bench_vllm(args, prompts, folder)
        device = torch.device("cuda")
    else:
        figures = bench_hf(args, prompts)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report(f"rollout ({args.backend})", head | figures, device, args.out)


if __name__ == "__main__":
    main()
