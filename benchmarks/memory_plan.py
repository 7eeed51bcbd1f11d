"""Memory plan: will this config fit, per GPU, before launching it?

    python benchmarks/memory_plan.py --config configs/geo3k_qwen2_5_vl_7b_gmpo.yaml --gpus 8 --gpu-gib 80
    python benchmarks/memory_plan.py --config configs/geo3k_qwen2_5_vl_7b_gmpo.yaml --gpus 1 --gpu-gib 141 \\
        model.lora.rank=64

Counts, per GPU, for the trainer as it is built (parameters sharded by FSDP2 over --gpus ranks, bf16 compute):
parameters, gradients and AdamW state of what trains (LoRA: the adapters only), the bf16 units FSDP2 gathers at a
time, activations of one micro-batch (``trainer.max_tokens_per_micro_batch`` tokens; bytes per token per decoder
layer and per patch per vision block measured exactly by ``activation_memory.py``'s method, and what
``model.checkpoint_every`` keeps), the LM-head chunk, and vLLM's share (``rollout.gpu_memory_utilization`` of the
GPU: bf16 weights, the rest KV cache). The update and the rollout happen at different times: while vLLM generates,
the trainer keeps its parameters and optimizer state (gradients are freed after each update); while the trainer
updates, vLLM sleeps (weights on the host, KV cache freed). The verdict takes the larger of the two phases.
Parameter counts are exact (the model is built on the meta device); ``trainer.cpu_offload`` moves parameters,
gradients and optimizer state to the host for the whole run; ``trainer.offload_params`` / ``offload_optimizer``
only while vLLM generates (the rollout phase), so vLLM may take a larger ``gpu_memory_utilization``.
``optim.name=adamw_bf16`` keeps weights and gradients in bf16 (2 bytes each) and its state in 6 bytes.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from activation_memory import per_unit_bytes

from mm_gmpo.config import Config, load_config
from mm_gmpo.families import bundled_name, family_of
from mm_gmpo.models import is_random_model, loads_sharded, model_config, random_model_config

GIB = 2**30
CUDA_CONTEXT = 1.0 * GIB  # CUDA context, NCCL buffers, a sleeping vLLM's residue
VLLM_OVERHEAD = 2.0 * GIB  # vLLM's profiled activations and CUDA graphs inside its budget
LOGIT_COPIES = 3  # fp32 logits of a chunk, their softmax, their gradient


def hf_config(cfg: Config):
    """The model's transformers config: random:/tiny-random*, a bundled copy of a published hub name
    (Qwen/Qwen3-VL-8B-Instruct, ...: ``mm_gmpo.families``), or a folder/hub."""
    return random_model_config(cfg.model.path) or model_config(bundled_name(cfg.model.path) or cfg.model.path)


@dataclass
class Counts:
    """Exact parameter counts of the configured model (and its LoRA adapters)."""

    total: int
    trainable: int
    trainable_tensors: int
    trainable_numels: list[int]  # per trainable tensor (8-bit optimizer state depends on each size)
    largest_layer: int  # parameters of the largest FSDP unit (a decoder layer or vision block)
    root: int  # parameters outside the layers and blocks (embeddings, LM head, norms, patch embed, merger)
    vocab: int
    hidden: int
    layers: int
    vision_depth: int
    kv_bytes_per_token: int  # vLLM KV cache, bf16


def count(cfg: Config) -> Counts:
    """Build the model on the meta device (no memory) with the config's LoRA, and count."""
    from mm_gmpo.lora import add_lora
    from mm_gmpo.models import build_model

    hf_cfg = hf_config(cfg)
    model = build_model("plan", random_init=True, config=hf_cfg, dtype=torch.float32, attn_implementation="sdpa",
                        device="meta")
    lo = cfg.model.lora
    if lo.rank:
        add_lora(model, rank=lo.rank, alpha=lo.alpha or 2 * lo.rank, target_modules=lo.target_modules,
                 vision=lo.vision, modules_to_save=lo.modules_to_save)
    elif cfg.model.freeze_vision:
        model.model.visual.requires_grad_(False)
    params = list(model.parameters())  # tied weights once
    trainable = [p for p in params if p.requires_grad]
    lm = model.model.language_model
    units = [*lm.layers, *model.model.visual.blocks]
    unit_sizes = [sum(p.numel() for p in u.parameters()) for u in units]
    text = hf_cfg.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return Counts(
        total=sum(p.numel() for p in params), trainable=sum(p.numel() for p in trainable),
        trainable_tensors=len(trainable), trainable_numels=[p.numel() for p in trainable], largest_layer=max(unit_sizes),
        root=sum(p.numel() for p in params) - sum(unit_sizes), vocab=text.vocab_size, hidden=text.hidden_size,
        layers=text.num_hidden_layers, vision_depth=hf_cfg.vision_config.depth,
        kv_bytes_per_token=2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2,
    )


def optimizer_bytes(numels: list[int], name: str) -> float:
    """AdamW state bytes: fp32 m and v and a 4-byte step per tensor; adamw_8bit (torchao AdamW8bit) keeps m and v of
    tensors with >= 4096 values (and a multiple of its 256-value block) as 8-bit codes, an fp32 scale per block
    and a 256-entry fp32 code map each; adamw_bf16 (optimi) bf16 m, v and Kahan compensation, its step a float."""
    total = 0
    for n in numels:
        if name == "adamw_bf16":
            total += 6 * n
            continue
        if name == "adamw_8bit" and n >= 4096 and n % 256 == 0:
            total += 2 * (n + 4 * (n // 256) + 4 * 256)
        else:
            total += 8 * n
        total += 4
    return float(total)


def clip_patches(cfg: Config, patch_size: int = 14) -> float:
    """Vision patches of one clip at its largest: data.video_max_frames frames at data.video_max_pixels, or fewer
    pixels when the prompt's token budget (90% of data.max_prompt_length) is the tighter (the loader's rule)."""
    d = cfg.data
    frames = d.video_max_frames
    factor = 2 * patch_size
    per_frame = max(min(d.video_max_pixels, 0.9 * d.max_prompt_length * factor ** 2 / frames * 2), d.video_min_pixels)
    return frames * per_frame / (patch_size * patch_size)


def default_patches_per_token(cfg: Config, patch_size: int = 14, clips: int = 0) -> float:
    """Vision patches per trained token, for images at data.min_pixels (Geometry3K diagrams are upscaled to it)
    and ``clips`` clips per prompt at their largest (:func:`clip_patches`): one prompt's patches shared by its n
    samples, over a sample of prompt + half the response (a clip's tokens are its patches / 8: 2x2 merged, 2 frames
    per patch)."""
    pictures = cfg.data.min_pixels / (patch_size * patch_size) if cfg.data.max_images else 0.0
    video = clips * clip_patches(cfg, patch_size)
    sample_tokens = pictures / 4 + video / 8 + 128 + cfg.rollout.max_tokens / 2
    return (pictures + video) / cfg.rollout.n / sample_tokens


def plan(cfg: Config, gpus: int, gpu_gib: float, *, patches_per_token: float | None = None,
         unit_bytes: tuple[float, float] | None = None, counts: Counts | None = None, clips: int = 0) -> dict:
    """Bytes per GPU of each part, for the update and the rollout phase, and the verdict (see module doc)."""
    c = counts or count(cfg)
    hf_cfg = hf_config(cfg)
    text_b, vis_b = unit_bytes or per_unit_bytes(hf_cfg, sample=128)
    offload = cfg.trainer.cpu_offload
    ppt = default_patches_per_token(cfg, hf_cfg.vision_config.patch_size, clips) if patches_per_token is None else \
        patches_per_token
    vh = family_of(hf_cfg).vision_block_width(hf_cfg.vision_config)

    wbytes, wname = (2, "bf16") if cfg.optim.name == "adamw_bf16" else (4, "fp32")  # optim.master_dtype
    state = {
        f"parameters ({wname}, sharded)": wbytes * c.total / gpus,
        f"gradients ({wname}, sharded)": wbytes * c.trainable / gpus,
        f"optimizer ({cfg.optim.name} state)": optimizer_bytes(c.trainable_numels, cfg.optim.name) / gpus,
    }
    on_gpu = {k: 0.0 if offload else v for k, v in state.items()}
    gathered = 2 * (c.root + 2 * c.largest_layer) + 2 * c.largest_layer  # bf16: root + 2 layers, a layer's grads

    def activations(tokens: float) -> float:
        patches = tokens * ppt
        k, depth, layers = cfg.model.checkpoint_every, c.vision_depth, c.layers
        if not cfg.model.activation_checkpointing:
            kept_v, kept_l = depth, layers
        else:  # transformers' every_n_layers: vision blocks then decoder layers, counted together
            kept_v = sum(i % k != 0 for i in range(depth))
            kept_l = sum(i % k != 0 for i in range(depth, depth + layers))
        full = kept_l * text_b * tokens + kept_v * vis_b * patches
        inputs = (layers - kept_l) * 2 * c.hidden * tokens + (depth - kept_v) * 2 * vh * patches
        recompute = (text_b * tokens + vis_b * patches) if cfg.model.activation_checkpointing else 0.0
        return full + inputs + recompute

    tokens = cfg.trainer.max_tokens_per_micro_batch
    chunk = LOGIT_COPIES * 4 * c.vocab * min(cfg.model.logprob_chunk_size, tokens)
    update = {**on_gpu, "FSDP2 gathered units (bf16)": float(gathered),
              f"activations ({tokens} tokens, {tokens * ppt:.0f} patches)": activations(tokens),
              "LM-head chunk (fp32 logits)": float(chunk), "CUDA context, sleeping vLLM": CUDA_CONTEXT}
    vllm_budget = cfg.rollout.gpu_memory_utilization * gpu_gib * GIB if cfg.rollout.backend == "vllm" else 0.0
    vllm_weights = 2 * c.total / max(cfg.rollout.tensor_parallel_size, 1)
    kv = max(vllm_budget - vllm_weights - VLLM_OVERHEAD, 0.0) if vllm_budget else 0.0
    t = cfg.trainer  # offload between stages: on the host while vLLM generates, on the GPU for the update
    kept_params = 0.0 if t.offload_params else on_gpu[f"parameters ({wname}, sharded)"]
    kept_optim = 0.0 if t.offload_optimizer else on_gpu[f"optimizer ({cfg.optim.name} state)"]
    resident = kept_params + kept_optim
    rollout = {"trainer parameters + optimizer (resident)": resident,
               "vLLM weights (bf16)": vllm_weights if vllm_budget else 0.0,
               "vLLM KV cache": kv, "vLLM activations, graphs": VLLM_OVERHEAD if vllm_budget else 0.0}
    peak_update, peak_rollout = sum(update.values()), max(sum(rollout.values()), resident + vllm_budget)
    limit = gpu_gib * GIB
    per_token = activations(1.0) - activations(0.0)
    room = limit - (peak_update - update[f"activations ({tokens} tokens, {tokens * ppt:.0f} patches)"])
    best = int(max(room, 0) / per_token) // 1024 * 1024 if per_token > 0 else 0
    between = (state[f"parameters ({wname}, sharded)"] if t.offload_params else 0.0) + \
        (state[f"optimizer ({cfg.optim.name} state)"] if t.offload_optimizer else 0.0)
    host = (sum(state.values()) if offload else between) * gpus
    max_util = max(limit - resident - CUDA_CONTEXT, 0.0) / limit  # the largest vLLM share beside the resident state
    # loading: model.load=full builds the whole fp32 model on every rank's host first; sharded reads each rank's
    # rows of one tensor at a time (bf16 on disk; the largest is the embedding), random models one fp32 module
    sharded = loads_sharded(cfg.model.load, cfg.model.path)
    random = is_random_model(cfg.model.path)
    largest = (4 * c.vocab * c.hidden) if random else 2 * c.vocab * c.hidden / gpus
    load_host = gpus * (largest if sharded else 4 * c.total)
    return {
        "counts": c, "update": update, "rollout": rollout, "peak_update": peak_update, "peak_rollout": peak_rollout,
        "fits": max(peak_update, peak_rollout) <= limit and (not vllm_budget or kv > 0),
        "kv_tokens": kv / c.kv_bytes_per_token if vllm_budget else 0.0, "largest_micro_batch_tokens": best,
        "host_state_gib_per_node": host / GIB, "patches_per_token": ppt,
        "host_load_gib_per_node": load_host / GIB, "load": "sharded" if sharded else "full",
        "max_gpu_memory_utilization": max_util if vllm_budget else None,
    }


def render(p: dict, gpus: int, gpu_gib: float, label: str) -> str:
    c = p["counts"]
    lines = [f"## {label}: {gpus} x {gpu_gib:g} GiB", "",
             f"{c.total / 1e9:.2f}B parameters, {c.trainable / 1e9:.3f}B trainable; patches per token "
             f"{p['patches_per_token']:.3f}", "", "| phase | part | GiB per GPU |", "|---|---|---|"]
    for phase in ("update", "rollout"):
        for k, v in p[phase].items():
            lines.append(f"| {phase} | {k} | {v / GIB:.2f} |")
        lines.append(f"| {phase} | **total** | **{p['peak_' + phase] / GIB:.2f}** |")
    lines += ["", f"verdict: {'FITS' if p['fits'] else 'DOES NOT FIT'} (larger phase "
              f"{max(p['peak_update'], p['peak_rollout']) / GIB:.1f} of {gpu_gib:g} GiB); vLLM KV cache holds "
              f"{p['kv_tokens']:,.0f} tokens; largest micro-batch that fits the update: "
              f"{p['largest_micro_batch_tokens']:,} tokens"]
    lines.append(f"loading (model.load={p['load']}): at most {p['host_load_gib_per_node']:.1f} GiB of host memory per "
                 f"node for the weights being read")
    if p["max_gpu_memory_utilization"] is not None:
        lines.append(f"largest rollout.gpu_memory_utilization beside the trainer's resident state: "
                     f"{p['max_gpu_memory_utilization']:.2f}")
    if p["host_state_gib_per_node"]:
        lines.append(f"host memory for offloaded state: {p['host_state_gib_per_node']:.1f} GiB per node")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--gpus", type=int, default=8, help="ranks (GPUs) the model is sharded over")
    ap.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU (H100 80, H200 141)")
    ap.add_argument("--patches-per-token", type=float, default=None,
                    help="vision patches per trained token (default: estimated from data.min_pixels, the clips and "
                    "rollout.n)")
    ap.add_argument("--clips-per-prompt", type=int, default=0,
                    help="video clips per prompt, counted at their largest (data.video_max_frames frames within "
                    "data.video_max_pixels and the prompt's token budget)")
    ap.add_argument("overrides", nargs="*", help="key.sub=value, as for train_mm.py")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    p = plan(cfg, args.gpus, args.gpu_gib, patches_per_token=args.patches_per_token, clips=args.clips_per_prompt)
    print(render(p, args.gpus, args.gpu_gib, f"{Path(args.config).stem} {' '.join(args.overrides)}".strip()))


if __name__ == "__main__":
    main()
