"""Activation memory of the update: bytes autograd keeps per token per decoder layer and per patch per vision block,
and what ``model.checkpoint_every`` k leaves on the GPU for a given micro-batch. Runs on a CPU (the count is exact
and device-independent: it is what autograd saves for backward, in the compute dtype).

    python benchmarks/activation_memory.py --model qwen2_5_vl_3b --tokens 8192 --patches 8192
    python benchmarks/activation_memory.py --model qwen2_5_vl_7b --tokens 16384 --patches 16384 --out r.jsonl

One decoder layer (and one vision block) of the real width is run forward on ``--sample`` tokens in bf16 under
``torch.autograd.graph.saved_tensors_hooks``; the storages it saves (not parameters, not its input) are summed.
A checkpointed layer keeps only its input (hidden size x 2 bytes per token); the others keep everything. Which layers
are checkpointed follows ``model.checkpoint_every`` (transformers' ``every_n_layers``: the vision blocks, then the
decoder layers, counted together).
Not counted: the LM-head chunk (``model.logprob_chunk_size`` x vocab x 4 bytes, one at a time), the gradient
buffers of backward, and the allocator's fragmentation.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import config_for, report

from mm_gmpo.families import family_of
from mm_gmpo.models import build_model


def _saved_bytes(fn, exclude: list[torch.Tensor]) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    return sum(v for k, v in seen.items() if k not in skip)


def per_unit_bytes(cfg, sample: int = 512) -> tuple[float, float]:
    """(bytes saved per token by one decoder layer, bytes per patch by one vision block), in bf16."""
    cfg = copy.deepcopy(cfg)  # one layer and one block of it
    cfg.text_config.num_hidden_layers = 1
    cfg.vision_config.depth = 1
    cfg.vision_config.fullatt_block_indexes = [0]  # Qwen2.5-VL: the one block attends in full (others ignore it)
    if hasattr(cfg.vision_config, "deepstack_visual_indexes"):
        cfg.vision_config.deepstack_visual_indexes = [0]  # Qwen3-VL: one DeepStack merger, after the one block
    m = build_model("measure", random_init=True, config=cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    lm, visual = m.model.language_model, m.model.visual
    h = cfg.text_config.hidden_size
    x = torch.randn(1, sample, h, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(sample)[None]
    rot = lm.rotary_emb(x, pos.expand(3, 1, sample))
    layer = lm.layers[0]
    text = _saved_bytes(lambda: layer(x, position_embeddings=rot, attention_mask=None, position_ids=pos),
                        [x, *rot, *layer.parameters()])
    vc = cfg.vision_config
    width = family_of(cfg).vision_block_width(vc)
    v = torch.randn(sample, width, dtype=torch.bfloat16, requires_grad=True)
    head = width // vc.num_heads
    vrot = (torch.randn(sample, head), torch.randn(sample, head))
    blk = visual.blocks[0]
    vis = _saved_bytes(lambda: blk(v, cu_seqlens=torch.tensor([0, sample], dtype=torch.int32),
                                   position_embeddings=vrot), [v, *vrot, *blk.parameters()])
    return text / sample, vis / sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2_5_vl_3b")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per micro-batch")
    ap.add_argument("--patches", type=int, default=8192, help="vision patches encoded per micro-batch")
    ap.add_argument("--sample", type=int, default=512, help="tokens/patches the measurement runs on")
    ap.add_argument("--every", default="1,2,3,4,6,0", help="checkpoint_every values to tabulate (0 = none)")
    ap.add_argument("--out", default=None, help="results.jsonl to append to")
    args = ap.parse_args()

    cfg = config_for(args.model)
    n_layers, depth = cfg.text_config.num_hidden_layers, cfg.vision_config.depth
    h, vh = cfg.text_config.hidden_size, family_of(cfg).vision_block_width(cfg.vision_config)
    text, vis = per_unit_bytes(cfg, args.sample)
    figures = {"model": args.model, "decoder layers": n_layers, "vision blocks": depth,
               "saved KB per token per decoder layer (bf16)": text / 1e3,
               "saved KB per patch per vision block (bf16)": vis / 1e3,
               "tokens": args.tokens, "patches": args.patches}
    for k in (int(s) for s in args.every.split(",")):
        # transformers' every_n_layers: vision blocks 0..depth-1, then decoder layers, one count; k=0: none
        kept_v = depth if k == 0 else sum(i % k != 0 for i in range(depth))
        kept_l = n_layers if k == 0 else sum(i % k != 0 for i in range(depth, depth + n_layers))
        full = kept_l * text * args.tokens + kept_v * vis * args.patches
        inputs = (n_layers - kept_l) * 2 * h * args.tokens + (depth - kept_v) * 2 * vh * args.patches
        label = "no checkpointing" if k == 0 else (f"checkpoint_every={k} ({n_layers - kept_l}/{n_layers} layers, "
                                                    f"{depth - kept_v}/{depth} blocks recomputed)")
        figures[f"activations GiB, {label}"] = (full + inputs) / 2**30
    report("activation memory of the update", figures, torch.device("cpu"), args.out)


if __name__ == "__main__":
    main()
