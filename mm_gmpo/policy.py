"""The policy: a Qwen-VL model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL dense or MoE; or a text-only causal LM) wrapped so
one forward gives per-token response log-probs.

What differs between the families (vision tower outputs, DeepStack, RoPE) is asked of ``mm_gmpo.families``.
No distributed code here: ``mm_gmpo.distributed.parallelize`` shards a :class:`Policy` with FSDP2; building and
loading the model it wraps is ``mm_gmpo.models``.

Layout of a :class:`PolicyBatch` (verl-style): ``input_ids`` is ``[left-padded prompt (P) | right-padded
response (R)]``; ``response_mask`` is (B, R); log-probs come back as (B, R), aligned with the sampler's
log-probs and the loss mask. The language-model head is applied in chunks of ``chunk_size`` response tokens, each
under activation checkpointing, so (tokens x 152k vocab) fp32 logits never exist at once, in forward or backward.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mm_gmpo.families import VisionFeatures, family_of
from mm_gmpo.rollout.base import IMAGE_PAD_ID

# ---------------------------------------------------------------- batches


@dataclass
class PolicyBatch:
    """Token ids and vision inputs of B (prompt, response) pairs. See module docstring for the layout.

    Vision inputs hold each distinct picture once: ``image_grid_thw`` has a row per image of every sample (sample
    i owns images ``sum(images_per_sample[:i]) : sum(images_per_sample[:i+1])``), and ``image_keys[j]`` says which
    distinct picture image j is; ``pixel_values`` holds the patches of distinct pictures 0, 1, ... in that order
    (``patch_bounds``). The n samples of one prompt refer to one copy of its image, through ``select``,
    micro-batches and the transfer to the device, and the vision tower runs once per distinct picture in a
    forward. Empty ``image_keys``: every image is its own picture.
    """

    input_ids: torch.Tensor  # (B, P + R) long
    attention_mask: torch.Tensor  # (B, P + R) long
    response_mask: torch.Tensor  # (B, R) float/bool
    pixel_values: torch.Tensor | None = None  # (patches of the distinct pictures, C * T * p * p)
    image_grid_thw: torch.Tensor | None = None  # (n_images, 3)
    images_per_sample: list[int] = field(default_factory=list)
    image_keys: list[int] = field(default_factory=list)  # (n_images,) distinct picture of each image: 0, 1, ...

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_width(self) -> int:
        return self.response_mask.shape[1]

    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def keys(self) -> list[int]:
        """The distinct picture of each image (``image_keys``, or each image its own)."""
        n = 0 if self.image_grid_thw is None else int(self.image_grid_thw.shape[0])
        return self.image_keys or list(range(n))

    def distinct_images(self) -> list[int]:
        """For each distinct picture, the first image that shows it (its grid is that image's)."""
        first: dict[int, int] = {}
        for j, k in enumerate(self.keys()):
            first.setdefault(k, j)
        return [first[k] for k in range(len(first))]

    def patch_bounds(self) -> list[int]:
        """Distinct picture k's patches are rows ``bounds[k]:bounds[k+1]`` of pixel_values (host ints; [0] without
        images)."""
        bounds = [0]
        if self.image_grid_thw is not None:
            sizes = self.image_grid_thw.prod(-1).tolist()
            for j in self.distinct_images():
                bounds.append(bounds[-1] + sizes[j])
        return bounds

    def image_pixels(self) -> torch.Tensor | None:
        """pixel_values with a copy per image, in image order: the layout transformers' own forward and generate
        take (a reference to compare against; the policy never needs it)."""
        if self.pixel_values is None:
            return None
        b = self.patch_bounds()
        return torch.cat([self.pixel_values[b[k]:b[k + 1]] for k in self.keys()])

    def pixel_bytes(self) -> tuple[int, int]:
        """(bytes of pixel data this batch holds, bytes it would hold with a copy per sample's image)."""
        if self.pixel_values is None:
            return 0, 0
        row = self.pixel_values.shape[-1] * self.pixel_values.element_size()
        per_image = int(self.image_grid_thw.prod(-1).sum()) * row
        return self.pixel_values.numel() * self.pixel_values.element_size(), per_image

    def pin_memory(self) -> PolicyBatch:
        """Pixel values in page-locked host memory (CUDA only): the micro-batches ``select`` cuts from them stay
        page-locked, so their transfers run asynchronously (``to`` copies non-blocking)."""
        if self.pixel_values is None or self.pixel_values.is_pinned():
            return self
        return replace(self, pixel_values=self.pixel_values.pin_memory())

    def select(self, idx: list[int]) -> PolicyBatch:
        """The sub-batch of samples ``idx`` (vision inputs sliced to match, each picture once), trimmed of
        all-padding columns."""
        ids = torch.as_tensor(idx, dtype=torch.long)
        pv = grid = None
        per = [self.images_per_sample[i] for i in idx] if self.images_per_sample else []
        keys: list[int] = []
        if self.image_grid_thw is not None and self.images_per_sample:
            img_start = [0]
            for n in self.images_per_sample:
                img_start.append(img_start[-1] + n)
            img_idx = [j for i in idx for j in range(img_start[i], img_start[i + 1])]
            if img_idx:
                old_keys = self.keys()
                slot: dict[int, int] = {}  # the parent's distinct picture -> the sub-batch's
                keys = [slot.setdefault(old_keys[j], len(slot)) for j in img_idx]
                grid = self.image_grid_thw[img_idx]
                pv = _gather_rows(self.pixel_values, self.patch_bounds(), list(slot))
        sub = PolicyBatch(self.input_ids[ids], self.attention_mask[ids], self.response_mask[ids], pv, grid, per, keys)
        return sub.trim()

    def trim(self) -> PolicyBatch:
        """Drop prompt columns that are padding for every sample and response columns past the longest response."""
        P = self.input_ids.shape[1] - self.response_width
        prompt_used = self.attention_mask[:, :P].any(0).nonzero()
        first = int(prompt_used[0]) if len(prompt_used) else P
        resp_used = self.response_mask.bool().any(0).nonzero()
        r_len = int(resp_used[-1]) + 1 if len(resp_used) else 1
        keep = slice(first, P + r_len)
        return replace(self, input_ids=self.input_ids[:, keep], attention_mask=self.attention_mask[:, keep],
                       response_mask=self.response_mask[:, :r_len])

    def to(self, device: torch.device | str) -> PolicyBatch:
        def mv(t):
            return None if t is None else t.to(device, non_blocking=True)

        return replace(self, input_ids=mv(self.input_ids), attention_mask=mv(self.attention_mask),
                       response_mask=mv(self.response_mask), pixel_values=mv(self.pixel_values),
                       image_grid_thw=mv(self.image_grid_thw))


def _gather_rows(src: torch.Tensor, bounds: list[int], parts: list[int]) -> torch.Tensor:
    """Rows ``bounds[k]:bounds[k+1]`` of ``src`` for each k of ``parts``, in that order: a view when they are
    consecutive (a micro-batch of whole prompt groups), else one copy, page-locked when ``src`` is."""
    if parts == list(range(parts[0], parts[0] + len(parts))):
        return src[bounds[parts[0]]:bounds[parts[-1] + 1]]
    rows = sum(bounds[k + 1] - bounds[k] for k in parts)
    out = torch.empty((rows, *src.shape[1:]), dtype=src.dtype, device=src.device, pin_memory=src.is_pinned())
    at = 0
    for k in parts:
        n = bounds[k + 1] - bounds[k]
        out[at:at + n] = src[bounds[k]:bounds[k + 1]]
        at += n
    return out


def collate(
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    *,
    pad_id: int,
    pixel_values: list[torch.Tensor | None] | None = None,
    image_grid_thw: list[torch.Tensor | None] | None = None,
    image_ids: list[Sequence[Hashable]] | None = None,
) -> PolicyBatch:
    """Build a PolicyBatch: prompts left-padded, responses right-padded; each distinct picture's patches once.

    ``image_ids`` gives one id per image of each sample (``EncodedPrompt.image_keys``, content hashes: the same
    picture in two prompts, or twice in one, is held once and encoded once); without it, samples that pass the
    same ``pixel_values`` tensor object (the n samples of one prompt) share their pictures.
    """
    B = len(prompt_ids)
    if len(response_ids) != B:
        raise ValueError(f"{B} prompts but {len(response_ids)} responses")
    P = max(len(p) for p in prompt_ids)
    R = max(max((len(r) for r in response_ids), default=1), 1)
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + R), dtype=torch.long)
    resp_mask = torch.zeros((B, R), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        input_ids[i, P - len(p):P] = torch.as_tensor(p, dtype=torch.long)
        attn[i, P - len(p):P] = 1
        if r:
            input_ids[i, P:P + len(r)] = torch.as_tensor(r, dtype=torch.long)
            attn[i, P:P + len(r)] = 1
            resp_mask[i, :len(r)] = 1
    pv = grid = None
    per: list[int] = []
    keys: list[int] = []
    if pixel_values is not None and image_grid_thw is not None:
        per = [0 if g is None else int(g.shape[0]) for g in image_grid_thw]
        if image_ids is not None and [len(x) for x in image_ids] != per:
            raise ValueError(f"image_ids give {[len(x) for x in image_ids]} ids per sample, image_grid_thw "
                             f"{per} images")
        slot: dict[Hashable, int] = {}
        parts: list[torch.Tensor] = []
        for i, (x, g) in enumerate(zip(pixel_values, image_grid_thw, strict=True)):
            if x is None or g is None or per[i] == 0:
                continue
            sizes = g.prod(-1).tolist()
            starts = [sum(sizes[:m]) for m in range(len(sizes))]
            for m, n in enumerate(sizes):
                key = image_ids[i][m] if image_ids is not None else (id(x), m)
                if key not in slot:
                    slot[key] = len(slot)
                    parts.append(x[starts[m]:starts[m] + n])
                keys.append(slot[key])
        grids = [g for g in image_grid_thw if g is not None]
        pv = torch.cat(parts) if parts else None
        grid = torch.cat(grids) if grids else None
    return PolicyBatch(input_ids, attn, resp_mask, pv, grid, per, keys)


def split_by_token_budget(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Group sample indices into padded micro-batches that stay within max_tokens (count x longest): samples
    sorted by length, longest first, so similar lengths share a micro-batch; a sample longer than the budget gets
    one of its own. (Packed micro-batches cost the sum of their lengths: ``mm_gmpo.balance``.)
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for i in order:
        new_max = max(cur_max, lengths[i])
        if cur and new_max * (len(cur) + 1) > max_tokens:
            groups.append(cur)
            cur, new_max = [], lengths[i]
        cur.append(i)
        cur_max = new_max
    if cur:
        groups.append(cur)
    return groups


def use_packing(layout: str, attn_implementation: str) -> bool:
    """Whether micro-batches are packed: layout 'packed', or 'auto' with flash_attention_2 (varlen kernels) or sdpa
    (one causal SDPA call per sequence, ``mm_gmpo.attention``); eager would need a (T x T) mask, so it pads."""
    return layout == "packed" or (layout == "auto" and attn_implementation in ("flash_attention_2", "sdpa"))


def _chunk_logprobs(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                    temperature: float, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    logits = F.linear(h, weight, bias).float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    if with_entropy:
        probs = torch.softmax(logits, dim=-1)
        ent = lse - (probs * logits).sum(-1)
    else:
        ent = logp.new_zeros(())
    return logp, ent


def token_logprobs(
    hidden: torch.Tensor,
    head: nn.Linear,
    targets: torch.Tensor,
    *,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    with_entropy: bool = False,
    allowed_token_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(targets) for hidden states (N, H) under ``head``, in chunks; each chunk recomputed in backward.

    ``allowed_token_ids``: the distribution is the softmax over these vocabulary rows only, exactly what a
    sampler restricted to them (vLLM ``allowed_token_ids``) draws from; every target must be one of them.
    """
    weight, bias = head.weight, head.bias
    if allowed_token_ids is not None:
        allowed = allowed_token_ids.to(targets.device)
        pos = torch.searchsorted(allowed, targets)
        ok = (pos < allowed.numel()) & (allowed[pos.clamp(max=allowed.numel() - 1)] == targets)
        if not bool(ok.all()):
            bad = targets[~ok][:5].tolist()
            raise ValueError(f"response tokens {bad} are not in allowed_token_ids: the sampler and the trainer "
                             "must use the same restriction")
        weight = weight[allowed.to(weight.device)]
        bias = None if bias is None else bias[allowed.to(bias.device)]
        targets = pos
    outs, ents = [], []
    use_ckpt = torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
    for s in range(0, hidden.shape[0], chunk_size):
        args = (hidden[s:s + chunk_size], weight, bias, targets[s:s + chunk_size], temperature, with_entropy)
        if use_ckpt:
            lp, ent = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(*args)
        outs.append(lp)
        ents.append(ent)
    if not outs:
        return hidden.new_zeros(0, dtype=torch.float32), None
    return torch.cat(outs), (torch.cat(ents) if with_entropy else None)


def pack_rows(attention_mask: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the response tokens of a padded batch land when its rows are packed into one padding-free row.

    Returns ``(seq_positions (T,), at (n,))``: position within its own sequence of each of the T real tokens (the
    packed order is row by row), and for each selected response token (``response_mask`` order, row-major) the
    packed index of the hidden state that predicts it (the token itself sits at ``at + 1``).
    """
    keep = attention_mask.bool()
    lengths = keep.sum(-1)
    seq_positions = torch.cat([torch.arange(n, device=keep.device) for n in lengths.tolist()])  # one host read
    starts = lengths.cumsum(0) - lengths
    prompt_len = keep[:, :keep.shape[1] - response_mask.shape[1]].sum(-1)
    rows, cols = response_mask.bool().nonzero(as_tuple=True)
    return seq_positions, starts[rows] + prompt_len[rows] - 1 + cols


class Policy(nn.Module):
    """``forward(batch) -> (logprobs (B, R) fp32, entropy (B, R) or None)`` for a transformers causal (V)LM.

    Position ids are computed here, not left to the model: Qwen-VL's multimodal RoPE (temporal, height, width
    positions for image tokens; text positions that continue after an image from its largest side, not its token
    count) needs to know which tokens are image tokens, which the transformers forward only learns from
    ``mm_token_type_ids``. Without them it silently falls back to 1-D positions, unlike vLLM and the released model.

    ``packed=True``: the rows of a micro-batch are concatenated into one padding-free row, position ids restarting
    for each sequence, and each sequence attends only to itself: varlen kernels (cu_seqlens from the position ids)
    under flash_attention_2; under sdpa one causal SDPA call per sequence (``mm_gmpo.attention``, installed here);
    a block-diagonal mask under eager (correct, but slow; for tests).
    """

    def __init__(self, model: nn.Module, *, chunk_size: int = 1024, packed: bool = False):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.packed = packed
        self.family = family_of(model.config)  # None for a text-only model
        self.always_run_vision = False  # FSDP: run the vision tower even without images (set by parallelize)
        self.reset_counters()
        if packed:
            from mm_gmpo.attention import use_packed_text_attention

            use_packed_text_attention(model)

    def reset_counters(self) -> None:
        """Zero the running counts of what the forwards were given (for FLOP and pixel-traffic accounting)."""
        self.vision_patches = 0  # patches the vision tower has encoded
        self.pixel_bytes_in = 0  # bytes of pixel data its forwards were given ...
        self.pixel_bytes_saved = 0  # ... and the bytes more a copy per image (not per picture) would have been

    @property
    def is_vlm(self) -> bool:
        return hasattr(self.model.config, "vision_config")

    @property
    def image_token_id(self) -> int:
        """The ``<|image_pad|>`` placeholder that stands for one vision feature in the prompt ids."""
        return getattr(self.model.config, "image_token_id", None) or IMAGE_PAD_ID

    def position_ids(self, batch: PolicyBatch) -> torch.Tensor:
        """(3, B, L) multimodal RoPE positions for a VLM (as the processor + model compute them), (B, L) otherwise."""
        attn = batch.attention_mask
        if not self.is_vlm:
            return (attn.long().cumsum(-1) - 1).clamp(min=0)
        ids = batch.input_ids.cpu()  # a per-sample Python loop: on the CPU it costs no device syncs
        grid = None if batch.image_grid_thw is None else batch.image_grid_thw.cpu()
        pos, _ = self.model.model.get_rope_index(ids, mm_token_type_ids=(ids == self.image_token_id).int(),
                                                 image_grid_thw=grid, attention_mask=attn.cpu())
        return pos.to(batch.input_ids.device)

    def image_features(self, batch: PolicyBatch) -> VisionFeatures:
        """Vision features (image tokens, hidden) of every image in batch order: the vision tower runs once over
        the batch's distinct pictures (``pixel_values``), and the images that show the same picture (the n
        samples of a prompt) share its features (and DeepStack features), forward and backward."""
        distinct = batch.distinct_images()
        keys = batch.keys()
        grid = batch.image_grid_thw
        visual = self.model.model.visual
        pv = batch.pixel_values
        feats = self.family.encode(visual, pv, grid if len(distinct) == len(keys) else grid[distinct])
        self.vision_patches += int(pv.shape[0])
        row = pv.shape[-1] * pv.element_size()
        self.pixel_bytes_in += pv.shape[0] * row
        self.pixel_bytes_saved += (int(grid.prod(-1).sum()) - pv.shape[0]) * row  # vs a copy per image
        if keys == list(range(len(keys))):
            return feats
        merge = visual.spatial_merge_size ** 2
        return feats.regroup([int(grid[j].prod()) // merge for j in distinct], keys)

    def blank_vision_features(self) -> VisionFeatures:
        """The vision tower on one blank merged patch: text-only micro-batches under FSDP use it (weighted 0), so
        that every rank takes part in the vision shards' all-gather and gradient reduce-scatter."""
        visual = self.model.model.visual
        pe, merge = visual.patch_embed, visual.spatial_merge_size
        dim = pe.in_channels * pe.temporal_patch_size * pe.patch_size ** 2
        device = self.model.model.get_input_embeddings().weight.device
        grid = torch.tensor([[1, merge, merge]], device=device)
        return self.family.encode(visual, torch.zeros(merge * merge, dim, device=device), grid)

    def input_embeds(self, ids: torch.Tensor, batch: PolicyBatch) -> tuple[torch.Tensor, dict]:
        """Token embeddings of ``ids`` with each image's placeholder tokens replaced by its vision features, and
        what else the family's decoder takes (Qwen3-VL: DeepStack features and where the image tokens are)."""
        embeds = self.model.model.get_input_embeddings()(ids)
        if batch.pixel_values is None:
            if self.always_run_vision and self.is_vlm:
                embeds = embeds + 0.0 * self.blank_vision_features().total().to(embeds.dtype)
            return embeds, {}
        feats = self.image_features(batch)
        is_image = ids == self.image_token_id
        if int(is_image.sum()) != feats.embeds.shape[0]:
            raise ValueError(f"{int(is_image.sum())} image tokens in the batch but {feats.embeds.shape[0]} image "
                             "features: the prompts and image_grid_thw disagree (encode them with one processor)")
        mask = is_image[..., None].expand_as(embeds)
        embeds = embeds.masked_scatter(mask, feats.embeds.to(embeds.device, embeds.dtype))
        return embeds, self.family.decoder_kwargs(is_image, feats)

    def decoder(self) -> nn.Module:
        """The language model (decoder layers and final norm, no head)."""
        return getattr(self.model.model, "language_model", self.model.model)

    def forward(self, batch: PolicyBatch, *, temperature: float = 1.0, with_entropy: bool = False,
                allowed_token_ids: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``allowed_token_ids``: score under the same restricted distribution the sampler used (see token_logprobs)."""
        sel = batch.response_mask.bool()
        pos = self.position_ids(batch)
        if self.packed:
            keep = batch.attention_mask.bool()
            ids = batch.input_ids[keep][None]  # (1, T)
            seq_pos, at = pack_rows(batch.attention_mask, batch.response_mask)
            # a VLM takes [text positions; t; h; w] (4, 1, T): the text row tells it where sequences start
            pos = torch.cat([seq_pos[None], pos[:, keep]])[:, None] if self.is_vlm else seq_pos[None]
            embeds, extra = self.input_embeds(ids, batch)
            out = self.decoder()(inputs_embeds=embeds, attention_mask=None, position_ids=pos, use_cache=False, **extra)
            hidden, targets = out.last_hidden_state[0, at], ids[0, at + 1]
        else:
            embeds, extra = self.input_embeds(batch.input_ids, batch)
            out = self.decoder()(inputs_embeds=embeds, attention_mask=batch.attention_mask, position_ids=pos,
                                 use_cache=False, **extra)
            R = batch.response_width
            P = batch.input_ids.shape[1] - R
            hidden = out.last_hidden_state[:, P - 1:P - 1 + R][sel]  # position t predicts token t + 1
            targets = batch.input_ids[:, P:P + R][sel]
        lp_flat, ent_flat = token_logprobs(hidden, self.model.lm_head, targets, chunk_size=self.chunk_size,
                                           temperature=temperature, with_entropy=with_entropy,
                                           allowed_token_ids=None if allowed_token_ids is None else
                                           torch.tensor(sorted(set(allowed_token_ids)), dtype=torch.long))
        logprobs = torch.zeros(sel.shape, dtype=torch.float32, device=hidden.device).masked_scatter(sel, lp_flat)
        entropy = None
        if ent_flat is not None:
            entropy = torch.zeros(sel.shape, dtype=torch.float32, device=hidden.device).masked_scatter(sel, ent_flat)
        return logprobs, entropy
