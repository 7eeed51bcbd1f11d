"""Rollouts with transformers ``generate``: for CPU tests and machines without vLLM (slow on GPU)."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable

import torch
from torch import nn
from tqdm import tqdm

from mm_gmpo.data.processing import EncodedPrompt
from mm_gmpo.families import family_of
from mm_gmpo.policy import collate
from mm_gmpo.rollout.base import IMAGE_PAD_ID, VIDEO_PAD_ID, Rollout, SamplingParams
from mm_gmpo.rollout.batch import vision_inputs


class HFEngine:
    """Generates with a (non-sharded) transformers model; ``update_weights`` copies tensors into it."""

    def __init__(self, model: nn.Module, tokenizer, *, device: torch.device | str = "cpu", batch_size: int = 16,
                 progress: bool = False):
        """progress: a progress bar over the batches of a long generate (several batches, 256+ tokens each)."""
        self.model = model
        self.progress = progress
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.batch_size = batch_size
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.eos_ids |= {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")}
        self.eos_ids.discard(None)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 151643
        family = family_of(model.config)
        if family is not None:  # clips: the released models' M-RoPE rule, as the trainer and vLLM (Family.rope_index)
            model.model.get_rope_index = functools.partial(family.rope_index, model.model)

    @torch.no_grad()
    def generate(self, prompts: list[EncodedPrompt], sampling: SamplingParams) -> list[Rollout]:
        expanded = [(i, s) for i in range(len(prompts)) for s in range(sampling.n)]
        out: list[Rollout] = []
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        self.model.eval()
        starts = range(0, len(expanded), self.batch_size)
        long = self.progress and len(starts) > 1 and sampling.max_tokens >= 256
        for start in tqdm(starts, desc="generate", unit="batch", leave=False, disable=not long):
            chunk = expanded[start:start + self.batch_size]
            encs = [prompts[i] for i, _ in chunk]
            t0 = time.perf_counter()
            batch = collate([e.input_ids for e in encs], [[] for _ in encs], pad_id=self.pad_id,
                            **vision_inputs(encs))
            P = batch.input_ids.shape[1] - batch.response_width
            kwargs = {}
            if batch.has_vision:
                # mm_token_type_ids marks image (1) and video (2) tokens; without it transformers gives them 1-D RoPE
                prompt_ids = batch.input_ids[:, :P]
                kwargs = {"mm_token_type_ids": ((prompt_ids == IMAGE_PAD_ID).int()
                                                + 2 * (prompt_ids == VIDEO_PAD_ID).int()).to(self.device)}
            if batch.pixel_values is not None:  # transformers: a copy per image
                kwargs |= {"pixel_values": batch.image_pixels().to(self.device),
                           "image_grid_thw": batch.image_grid_thw.to(self.device)}
            if batch.pixel_values_videos is not None:
                kwargs |= {"pixel_values_videos": batch.video_pixels().to(self.device),
                           "video_grid_thw": batch.video_grid_thw.to(self.device)}
                if getattr(self.model.config, "model_type", "") == "qwen2_5_vl":
                    kwargs["second_per_grid_ts"] = batch.video_seconds.to(self.device)
            greedy = sampling.temperature <= 0
            if sampling.allowed_token_ids:
                allowed = sorted(set(sampling.allowed_token_ids))  # exactly these (as vLLM's allowed_token_ids)
                kwargs["prefix_allowed_tokens_fn"] = lambda batch_id, ids, allowed=allowed: allowed
            res = self.model.generate(
                input_ids=batch.input_ids[:, :P].to(self.device),
                attention_mask=batch.attention_mask[:, :P].to(self.device),
                do_sample=not greedy,
                temperature=None if greedy else sampling.temperature,
                top_p=None if greedy else sampling.top_p,
                top_k=None,
                max_new_tokens=sampling.max_tokens,
                eos_token_id=None if sampling.ignore_eos else sorted(self.eos_ids),
                pad_token_id=self.pad_id,
                suppress_tokens=[IMAGE_PAD_ID, VIDEO_PAD_ID],
                output_scores=True,
                return_dict_in_generate=True,
                **kwargs,
            )
            seqs = res.sequences[:, P:].cpu()
            scores = torch.stack(res.scores, 1).float().cpu() if res.scores else None  # (b, steps, V), processed
            dt = time.perf_counter() - t0
            for row, (i, s) in enumerate(chunk):
                ids = seqs[row].tolist()
                finish = "length"
                for k, tok in enumerate(ids):
                    if tok in self.eos_ids and not sampling.ignore_eos:
                        ids, finish = ids[:k + 1], "stop"
                        break
                lps = None
                if scores is not None and ids:
                    steps = torch.log_softmax(scores[row, :len(ids)], -1)
                    lps = steps.gather(-1, torch.tensor(ids)[:, None]).squeeze(-1).tolist()
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                out.append(Rollout(i, s, list(prompts[i].input_ids), ids, text, lps, finish, {"time_s": dt}))
        return out

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy tensors in by transformers name; an unknown or missing name is an error, never a silent skip."""
        params = dict(self.model.named_parameters())
        seen = set()
        with torch.no_grad():
            for name, t in named_tensors:
                if name not in params:
                    raise KeyError(f"weight sync: the engine's model has no parameter {name!r}")
                params[name].copy_(t.to(device=params[name].device, dtype=params[name].dtype))
                seen.add(name)
        missing = set(params) - seen
        if missing:
            raise KeyError(f"weight sync left {len(missing)} parameters stale, e.g. {sorted(missing)[:3]}")

    def sleep(self) -> None:  # nothing to free for an in-process HF model
        pass

    def wake_up(self) -> None:
        pass
