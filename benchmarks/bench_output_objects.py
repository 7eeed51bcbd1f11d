"""Host time of vLLM's per-token output objects, the part of a rollout that runs in Python between decode steps.

    python benchmarks/bench_output_objects.py                                   # vLLM installed
    python benchmarks/bench_output_objects.py --logprobs-py /path/to/vllm/logprobs.py   # a CPU machine

For every sampled token vLLM's output processor appends the sampled token's log-prob to a per-request container
and feeds the token to an incremental detokenizer. This replays that work for ``prompts x n`` sequences of
``tokens`` random tokens with vLLM's own container code (``vllm/logprobs.py``; on a machine without vLLM, that
file from the wheel: ``pip download --no-deps vllm==VERSION`` and unzip it) and the Qwen2.5-VL tokenizer:

- a dict and a ``Logprob`` per token (vLLM's default) against ``FlatLogprobs`` columns (``flat_logprobs=True``),
  each followed by mm_gmpo's read-out of the sampled log-probs (``sampled_logprobs``);
- incremental detokenization (tokenizers' ``DecodeStream``, what vLLM uses with a fast tokenizer) against one
  ``decode`` per finished response (``detokenize=False``, what mm_gmpo's engine does).
The GPU-side cost is not included: this is the host work a colocated, in-process engine adds to a rollout.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import itertools
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report

from mm_gmpo.data.processing import load_processor
from mm_gmpo.rollout.vllm_engine import sampled_logprobs


def vllm_logprobs_module(path: str | None):
    if path is None:
        import vllm.logprobs

        return vllm.logprobs
    spec = importlib.util.spec_from_file_location("vllm_logprobs", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def containers(vlp, ids: list[list[int]], flat: bool) -> tuple[float, float]:
    """Seconds to fill one container per sequence, step by step as the engine does, then to read them out."""
    conts = [vlp.create_sample_logprobs(flat) for _ in ids]
    gc.collect()
    t0 = time.perf_counter()
    for step in range(len(ids[0])):
        for c, seq in zip(conts, ids, strict=True):
            vlp.append_logprobs_for_next_position(c, [seq[step]], [-1.5], itertools.repeat(None), 3, 0)
    t1 = time.perf_counter()
    for c, seq in zip(conts, ids, strict=True):
        sampled_logprobs(c, seq)
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--logprobs-py", default=None, help="vllm/logprobs.py from a vLLM wheel, when vLLM is not installed")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    vlp = vllm_logprobs_module(args.logprobs_py)
    tok = load_processor().tokenizer
    rng = random.Random(0)
    ids = [[rng.randrange(150_000) for _ in range(args.tokens)] for _ in range(args.prompts * args.n)]
    nested_fill, nested_read = containers(vlp, ids, flat=False)
    flat_fill, flat_read = containers(vlp, ids, flat=True)

    from tokenizers.decoders import DecodeStream

    t0 = time.perf_counter()
    for seq in ids:
        stream = DecodeStream(skip_special_tokens=True)
        for t in seq:
            stream.step(tok.backend_tokenizer, t)
    incremental = time.perf_counter() - t0
    t0 = time.perf_counter()
    for seq in ids:
        tok.decode(seq, skip_special_tokens=True)
    once = time.perf_counter() - t0

    figures = {
        "sequences x tokens": f"{len(ids)} x {args.tokens}",
        "dict + Logprob per token: fill s": nested_fill, "dict + Logprob per token: read s": nested_read,
        "FlatLogprobs: fill s": flat_fill, "FlatLogprobs: read s": flat_read,
        "incremental detokenization s": incremental, "one decode per response s": once,
        "host s saved per rollout": (nested_fill + nested_read + incremental) - (flat_fill + flat_read + once),
    }
    report("vLLM per-token output objects (host)", figures, torch.device("cpu"), args.out)


if __name__ == "__main__":
    main()
