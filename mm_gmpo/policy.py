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
from mm_gmpo.rollout.base import IMAGE_PAD_ID, VIDEO_PAD_ID

# ---------------------------------------------------------------- batches


def _item_keys(grid: torch.Tensor | None, keys: list[int]) -> list[int]:
    """The distinct picture (clip) of each image (video): ``keys``, or each its own."""
    n = 0 if grid is None else int(grid.shape[0])
    return keys or list(range(n))


def _first_items(keys: list[int]) -> list[int]:
    """For each distinct item, the first entry that shows it."""
    first: dict[int, int] = {}
    for j, k in enumerate(keys):
        first.setdefault(k, j)
    return [first[k] for k in range(len(first))]


def _bounds(grid: torch.Tensor | None, keys: list[int]) -> list[int]:
    """Distinct item k's patches are rows ``bounds[k]:bounds[k+1]`` of its pixel tensor (host ints)."""
    bounds = [0]
    if grid is not None:
        sizes = grid.prod(-1).tolist()
        for j in _first_items(_item_keys(grid, keys)):
            bounds.append(bounds[-1] + sizes[j])
    return bounds


def _select_items(pixels, grid, per_sample: list[int], keys: list[int], idx: list[int]):
    """The pictures (clips) of samples ``idx``: (pixels, grid, per_sample, keys, entry indices), each item once."""
    per = [per_sample[i] for i in idx] if per_sample else []
    if grid is None or not per_sample:
        return None, None, per, [], []
    start = [0]
    for n in per_sample:
        start.append(start[-1] + n)
    entries = [j for i in idx for j in range(start[i], start[i + 1])]
    if not entries:
        return None, None, per, [], []
    old = _item_keys(grid, keys)
    slot: dict[int, int] = {}  # the parent's distinct item -> the sub-batch's
    new_keys = [slot.setdefault(old[j], len(slot)) for j in entries]
    return _gather_rows(pixels, _bounds(grid, keys), list(slot)), grid[entries], per, new_keys, entries


@dataclass
class PolicyBatch:
    """Token ids and vision inputs of B (prompt, response) pairs. See module docstring for the layout.

    Vision inputs hold each distinct picture once: ``image_grid_thw`` has a row per image of every sample (sample
    i owns images ``sum(images_per_sample[:i]) : sum(images_per_sample[:i+1])``), and ``image_keys[j]`` says which
    distinct picture image j is; ``pixel_values`` holds the patches of distinct pictures 0, 1, ... in that order
    (``patch_bounds``). The n samples of one prompt refer to one copy of its image, through ``select``,
    micro-batches and the transfer to the device, and the vision tower runs once per distinct picture in a
    forward. Empty ``image_keys``: every image is its own picture. Clips follow the same rules in the ``video``
    fields, with ``video_seconds`` (seconds per temporal patch of each video: Qwen2.5-VL's ``second_per_grid_ts``).
    """

    input_ids: torch.Tensor  # (B, P + R) long
    attention_mask: torch.Tensor  # (B, P + R) long
    response_mask: torch.Tensor  # (B, R) float/bool
    pixel_values: torch.Tensor | None = None  # (patches of the distinct pictures, C * T * p * p)
    image_grid_thw: torch.Tensor | None = None  # (n_images, 3)
    images_per_sample: list[int] = field(default_factory=list)
    image_keys: list[int] = field(default_factory=list)  # (n_images,) distinct picture of each image: 0, 1, ...
    pixel_values_videos: torch.Tensor | None = None  # (patches of the distinct clips, C * T * p * p)
    video_grid_thw: torch.Tensor | None = None  # (n_videos, 3)
    videos_per_sample: list[int] = field(default_factory=list)
    video_keys: list[int] = field(default_factory=list)
    video_seconds: torch.Tensor | None = None  # (n_videos,) float

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_width(self) -> int:
        return self.response_mask.shape[1]

    @property
    def has_vision(self) -> bool:
        return self.pixel_values is not None or self.pixel_values_videos is not None

    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def keys(self) -> list[int]:
        """The distinct picture of each image (``image_keys``, or each image its own)."""
        return _item_keys(self.image_grid_thw, self.image_keys)

    def distinct_images(self) -> list[int]:
        """For each distinct picture, the first image that shows it (its grid is that image's)."""
        return _first_items(self.keys())

    def patch_bounds(self) -> list[int]:
        """Distinct picture k's patches are rows ``bounds[k]:bounds[k+1]`` of pixel_values (host ints; [0] without
        images)."""
        return _bounds(self.image_grid_thw, self.image_keys)

    def image_pixels(self) -> torch.Tensor | None:
        """pixel_values with a copy per image, in image order: the layout transformers' own forward and generate
        take (a reference to compare against; the policy never needs it)."""
        return _per_entry(self.pixel_values, self.image_grid_thw, self.image_keys)

    def video_pixels(self) -> torch.Tensor | None:
        """pixel_values_videos with a copy per video, in video order (transformers' layout)."""
        return _per_entry(self.pixel_values_videos, self.video_grid_thw, self.video_keys)

    def pixel_bytes(self) -> tuple[int, int]:
        """(bytes of pixel data this batch holds, bytes it would hold with a copy per sample's image or clip)."""
        held = per_entry = 0
        for pv, grid in ((self.pixel_values, self.image_grid_thw), (self.pixel_values_videos, self.video_grid_thw)):
            if pv is not None:
                row = pv.shape[-1] * pv.element_size()
                held += pv.numel() * pv.element_size()
                per_entry += int(grid.prod(-1).sum()) * row
        return held, per_entry

    def pin_memory(self) -> PolicyBatch:
        """Pixel values in page-locked host memory (CUDA only): the micro-batches ``select`` cuts from them stay
        page-locked, so their transfers run asynchronously (``to`` copies non-blocking)."""
        def pin(t):
            return t if t is None or t.is_pinned() else t.pin_memory()

        return replace(self, pixel_values=pin(self.pixel_values), pixel_values_videos=pin(self.pixel_values_videos))

    def select(self, idx: list[int]) -> PolicyBatch:
        """The sub-batch of samples ``idx`` (vision inputs sliced to match, each picture and clip once), trimmed of
        all-padding columns."""
        ids = torch.as_tensor(idx, dtype=torch.long)
        pv, grid, per, keys, _ = _select_items(self.pixel_values, self.image_grid_thw, self.images_per_sample,
                                               self.image_keys, idx)
        vpv, vgrid, vper, vkeys, entries = _select_items(self.pixel_values_videos, self.video_grid_thw,
                                                         self.videos_per_sample, self.video_keys, idx)
        seconds = self.video_seconds[entries] if vgrid is not None and self.video_seconds is not None else None
        sub = PolicyBatch(self.input_ids[ids], self.attention_mask[ids], self.response_mask[ids], pv, grid, per, keys,
                          vpv, vgrid, vper, vkeys, seconds)
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
                       image_grid_thw=mv(self.image_grid_thw), pixel_values_videos=mv(self.pixel_values_videos),
                       video_grid_thw=mv(self.video_grid_thw), video_seconds=mv(self.video_seconds))


def _per_entry(pixels: torch.Tensor | None, grid: torch.Tensor | None, keys: list[int]) -> torch.Tensor | None:
    if pixels is None:
        return None
    b = _bounds(grid, keys)
    return torch.cat([pixels[b[k]:b[k + 1]] for k in _item_keys(grid, keys)])


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


def _collate_items(pixel_values: list[torch.Tensor | None], grids: list[torch.Tensor | None],
                   ids: list[Sequence[Hashable]] | None, what: str):
    """(pixels, grid, per_sample, keys) of the samples' pictures (clips), each distinct one's patches once."""
    per = [0 if g is None else int(g.shape[0]) for g in grids]
    if ids is not None and [len(x) for x in ids] != per:
        raise ValueError(f"{what} ids give {[len(x) for x in ids]} ids per sample, the grids {per}")
    slot: dict[Hashable, int] = {}
    parts: list[torch.Tensor] = []
    keys: list[int] = []
    for i, (x, g) in enumerate(zip(pixel_values, grids, strict=True)):
        if x is None or g is None or per[i] == 0:
            continue
        sizes = g.prod(-1).tolist()
        starts = [sum(sizes[:m]) for m in range(len(sizes))]
        for m, n in enumerate(sizes):
            key = ids[i][m] if ids is not None else (id(x), m)
            if key not in slot:
                slot[key] = len(slot)
                parts.append(x[starts[m]:starts[m] + n])
            keys.append(slot[key])
    present = [g for g in grids if g is not None]
    return (torch.cat(parts) if parts else None), (torch.cat(present) if present else None), per, keys


def collate(
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    *,
    pad_id: int,
    pixel_values: list[torch.Tensor | None] | None = None,
    image_grid_thw: list[torch.Tensor | None] | None = None,
    image_ids: list[Sequence[Hashable]] | None = None,
    pixel_values_videos: list[torch.Tensor | None] | None = None,
    video_grid_thw: list[torch.Tensor | None] | None = None,
    video_ids: list[Sequence[Hashable]] | None = None,
    video_seconds: list[Sequence[float]] | None = None,
) -> PolicyBatch:
    """Build a PolicyBatch: prompts left-padded, responses right-padded; each distinct picture's patches once.

    ``image_ids`` gives one id per image of each sample (``EncodedPrompt.image_keys``, content hashes: the same
    picture in two prompts, or twice in one, is held once and encoded once); without it, samples that pass the
    same ``pixel_values`` tensor object (the n samples of one prompt) share their pictures. Clips likewise
    (``video_ids``; ``video_seconds``: seconds per temporal patch of each clip).
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
        pv, grid, per, keys = _collate_items(pixel_values, image_grid_thw, image_ids, "image")
    vpv = vgrid = seconds = None
    vper: list[int] = []
    vkeys: list[int] = []
    if pixel_values_videos is not None and video_grid_thw is not None:
        vpv, vgrid, vper, vkeys = _collate_items(pixel_values_videos, video_grid_thw, video_ids, "video")
        if vgrid is not None:
            flat = [float(x) for s in (video_seconds or []) for x in s]
            if len(flat) != vgrid.shape[0]:
                raise ValueError(f"{len(flat)} video_seconds for {vgrid.shape[0]} videos")
            seconds = torch.tensor(flat, dtype=torch.float64)
    return PolicyBatch(input_ids, attn, resp_mask, pv, grid, per, keys, vpv, vgrid, vper, vkeys, seconds)


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

    @property
    def video_token_id(self) -> int:
        """The ``<|video_pad|>`` placeholder that stands for one clip feature in the prompt ids."""
        return getattr(self.model.config, "video_token_id", None) or VIDEO_PAD_ID

    def position_ids(self, batch: PolicyBatch) -> torch.Tensor:
        """(3, B, L) multimodal RoPE positions for a VLM (as the processor + model compute them), (B, L) otherwise."""
        attn = batch.attention_mask
        if not self.is_vlm:
            return (attn.long().cumsum(-1) - 1).clamp(min=0)
        ids = batch.input_ids.cpu()  # a per-sample Python loop: on the CPU it costs no device syncs
        types = (ids == self.image_token_id).int() + 2 * (ids == self.video_token_id).int()  # text 0, image 1, video 2

        def host(t):
            return None if t is None else t.cpu()

        pos, _ = self.family.rope_index(self.model.model, ids, types, image_grid_thw=host(batch.image_grid_thw),
                                        video_grid_thw=host(batch.video_grid_thw),
                                        second_per_grid_ts=host(batch.video_seconds), attention_mask=attn.cpu())
        return pos.to(batch.input_ids.device)

    def vision_features(self, batch: PolicyBatch) -> tuple[VisionFeatures | None, VisionFeatures | None]:
        """(pictures', clips') features, each in batch order. The vision tower runs once per forward, over the
        batch's distinct pictures and distinct clips together (one call: under FSDP every rank gathers the tower's
        shards the same number of times, whatever mix of pictures and clips it holds), and the images (videos)
        that show the same picture (clip), such as the n samples of a prompt, share its features (and DeepStack
        features), forward and backward."""
        visual = self.model.model.visual
        merge = visual.spatial_merge_size ** 2
        kinds = [(batch.pixel_values, batch.image_grid_thw, batch.image_keys),
                 (batch.pixel_values_videos, batch.video_grid_thw, batch.video_keys)]
        present = [(pv, grid, _item_keys(grid, keys)) for pv, grid, keys in kinds if pv is not None]
        firsts = [_first_items(keys) for _, _, keys in present]
        pixels = torch.cat([pv for pv, _, _ in present])
        grids = torch.cat([grid[first] for (_, grid, _), first in zip(present, firsts, strict=True)])
        feats = self.family.encode(visual, pixels, grids)
        row = pixels.shape[-1] * pixels.element_size()
        self.vision_patches += int(pixels.shape[0])
        self.pixel_bytes_in += pixels.shape[0] * row
        self.pixel_bytes_saved += sum(int(grid.prod(-1).sum()) for _, grid, _ in present) * row - pixels.shape[0] * row
        sizes = [[int(grid[j].prod()) // merge for j in first] for (_, grid, _), first in zip(present, firsts,
                                                                                             strict=True)]
        parts = feats.split([sum(x) for x in sizes])
        out = [part if keys == list(range(len(keys))) else part.regroup(size, keys)
               for part, size, (_, _, keys) in zip(parts, sizes, present, strict=True)]
        it = iter(out)
        return tuple(next(it) if pv is not None else None for pv, _, _ in kinds)  # type: ignore[return-value]

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
        """Token embeddings of ``ids`` with each image's and clip's placeholder tokens replaced by its vision
        features, and what else the family's decoder takes (Qwen3-VL: DeepStack features and where the vision
        tokens are)."""
        embeds = self.model.model.get_input_embeddings()(ids)
        if not batch.has_vision:
            if self.always_run_vision and self.is_vlm:
                embeds = embeds + 0.0 * self.blank_vision_features().total().to(embeds.dtype)
            return embeds, {}
        image_feats, video_feats = self.vision_features(batch)
        parts = [(ids == token, feats, kind) for token, feats, kind in
                 ((self.image_token_id, image_feats, "image"), (self.video_token_id, video_feats, "video"))
                 if feats is not None]
        for mask, feats, kind in parts:
            if int(mask.sum()) != feats.embeds.shape[0]:
                raise ValueError(f"{int(mask.sum())} {kind} tokens in the batch but {feats.embeds.shape[0]} {kind} "
                                 f"features: the prompts and {kind}_grid_thw disagree (encode them with one processor)")
            embeds = embeds.masked_scatter(mask[..., None].expand_as(embeds), feats.embeds.to(embeds.device, embeds.dtype))
        if len(parts) == 1:
            return embeds, self.family.decoder_kwargs(parts[0][0], parts[0][1])
        (img_mask, img, _), (vid_mask, vid, _) = parts
        visual_mask = img_mask | vid_mask
        return embeds, self.family.decoder_kwargs(visual_mask, VisionFeatures.interleave(
            img, img_mask[visual_mask], vid, vid_mask[visual_mask]))

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
