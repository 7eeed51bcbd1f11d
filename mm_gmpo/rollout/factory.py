"""The one rollout-engine factory, for the trainer's colocated engine and for evaluation alike."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from mm_gmpo.models import build_model, random_model_config, torch_dtype, write_model_folder

BACKENDS = ("vllm", "hf", "oracle", "oracle-wrong")


def make_engine(backend: str, model: str, *, processor, dtype: torch.dtype | str = "auto",
                device: torch.device | None = None, seed: int = 0, batch_size: int = 16, progress: bool = False,
                attn_implementation: str = "auto", **vllm_options):
    """A rollout engine: 'vllm' (``vllm_options`` go to :class:`VLLMEngine`), 'hf' (transformers generate, on
    ``device``) or 'oracle' / 'oracle-wrong' (the ground truth, or a wrong answer: for tests and dry runs).

    ``model``: an HF-format folder, a hub name, or a random-weight model ('tiny-random', 'random:NAME'); vLLM then
    starts from a folder holding its config with dummy weights (``load_format='dummy'``), for a trainer whose
    weights replace them at the first sync. ``dtype``: a torch dtype or 'auto' (the model's, on vLLM)."""
    if backend in ("oracle", "oracle-wrong"):
        from mm_gmpo.rollout.oracle import OracleEngine

        return OracleEngine("correct" if backend == "oracle" else "wrong")
    rand = random_model_config(model)
    if backend == "vllm":
        from mm_gmpo.rollout.vllm_engine import VLLMEngine

        if rand is not None:  # a weightless folder (config + tokenizer)
            model = str(write_model_folder(Path(tempfile.mkdtemp(prefix="mm_gmpo_model_")), rand))
        name = {torch.bfloat16: "bfloat16", torch.float32: "float32"}.get(dtype, "auto")
        return VLLMEngine(model, dtype=name, seed=seed, progress=progress, **vllm_options)
    if backend != "hf":
        raise ValueError(f"unknown rollout backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    from mm_gmpo.rollout.hf import HFEngine

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):
        dtype = torch_dtype(dtype, device)
    net = build_model(model, random_init=rand is not None, config=rand, dtype=dtype,
                      attn_implementation=attn_implementation, seed=seed, device=device).to(device)
    return HFEngine(net, getattr(processor, "tokenizer", processor), device=device, batch_size=batch_size,
                    progress=progress)
