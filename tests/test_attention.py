"""mm_gmpo/attention.py: grouped vision attention (the same attention as transformers' per-window SDPA loop, in
fewer calls) and per-sequence causal attention of packed rows (the same as a block-diagonal causal mask)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from mm_gmpo.attention import NAME, grouped_varlen_sdpa, use_grouped_vision_attention
from mm_gmpo.models import build_model, model_config, tiny_qwen2_5_vl_config


def per_segment_reference(q, k, v, cu, scale):
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        att = (q[0, :, a:b] @ k[0, :, a:b].transpose(-1, -2)) * scale
        outs.append(torch.softmax(att, -1) @ v[0, :, a:b])
    return torch.cat(outs, 1).transpose(0, 1)[None]  # (1, N, H, D)


@pytest.mark.parametrize("lengths", [[64, 64, 64], [64, 48, 64, 48, 16, 64], [5]])
def test_grouped_varlen_sdpa_equals_per_segment_attention(lengths):
    g = torch.Generator().manual_seed(0)
    n = sum(lengths)
    q, k, v = (torch.randn(1, 3, n, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    out, _ = grouped_varlen_sdpa(None, q, k, v, scaling=0.3, cu_seq_lens_q=cu)
    ref = per_segment_reference(q, k, v, cu, 0.3)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.fixture
def sdpa_calls(monkeypatch) -> list:
    """A list that grows by one at every call of torch's scaled_dot_product_attention."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


def vision_pass(vis, pv: torch.Tensor, grid: torch.Tensor, calls: list):
    """(output, DeepStack features included; gradients of its squared sum; SDPA calls) of one vision tower pass."""
    vis.zero_grad()
    calls.clear()
    res = vis(pv, grid_thw=grid)
    out = torch.cat([res.pooler_output, *(getattr(res, "deepstack_features", None) or [])])
    (out ** 2).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in vis.named_parameters()}, len(calls)


def test_vision_tower_same_output_and_gradients_in_fewer_calls(sdpa_calls):
    model = build_model("t", random_init=True, config=tiny_qwen2_5_vl_config(vision_depth=3), dtype=torch.float64,
                        attn_implementation="sdpa", seed=0)
    vis = model.model.visual
    # windows are 4 x 4 merged tokens = 64 patches. Three 16x16 grids: 4 full windows each; a 12x20 grid (6 x 10
    # merged): windows of 64, 64, 32, 32, 32 and 16 patches. Blocks 0, 1 are windowed, block 2 full attention.
    grid = torch.tensor([[1, 16, 16]] * 3 + [[1, 12, 20]])
    g = torch.Generator().manual_seed(1)
    pv = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, generator=g, dtype=torch.float64)

    ref_out, ref_grads, ref_calls = vision_pass(vis, pv, grid, sdpa_calls)
    assert use_grouped_vision_attention(model) and vis.config._attn_implementation == NAME
    assert model.config.text_config._attn_implementation == "sdpa"  # the language model is untouched
    out, grads, n_calls = vision_pass(vis, pv, grid, sdpa_calls)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
    assert set(grads) == set(ref_grads) and len(grads) > 20
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-9, atol=1e-12)
    # per-window loop: 18 windows x 2 blocks + 4 images; grouped: one call per distinct length (3, 3 and 2)
    assert (ref_calls, n_calls) == (2 * 18 + 4, 3 + 3 + 2)


@pytest.mark.parametrize("family", ["tiny-random-qwen2-vl", "tiny-random-qwen3-vl"])
def test_full_attention_vision_towers_group_equal_images(sdpa_calls, family):
    """Qwen2-VL's and Qwen3-VL's vision blocks attend over each whole image (no windows): grouped, images of equal
    patch counts share one call per block; output (DeepStack features included) and gradients unchanged."""
    from mm_gmpo.models import random_model_config

    model = build_model("t", random_init=True, config=random_model_config(family), dtype=torch.float64,
                        attn_implementation="sdpa", seed=0)
    vis = model.model.visual
    patch = vis.config.patch_size
    grid = torch.tensor([[1, 8, 8]] * 3 + [[1, 4, 12]])  # 64, 64, 64, 48 patches
    pv = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * patch * patch, generator=torch.Generator().manual_seed(1),
                     dtype=torch.float64)

    ref_out, ref_grads, ref_calls = vision_pass(vis, pv, grid, sdpa_calls)
    assert use_grouped_vision_attention(model)
    out, grads, n_calls = vision_pass(vis, pv, grid, sdpa_calls)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-9, atol=1e-12)
    assert (ref_calls, n_calls) == (2 * 4, 2 * 2)  # 2 blocks: one call per image, or per distinct length


def test_text_only_model_is_left_alone():
    cfg = model_config({"model_type": "qwen2", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
                        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1})
    m = build_model("t", random_init=True, config=cfg, dtype=torch.float32)
    assert not use_grouped_vision_attention(m)


# ---------------------------------------------------------------- the language model's packed rows


@pytest.fixture(scope="module")
def image_row_batch():
    """Three Geometry3K prompts (one diagram each) with random responses of 5, 12 and 9 tokens."""
    from mm_gmpo.data import geometry3k_prompts, load_geometry3k
    from mm_gmpo.data.processing import encode_prompt, load_processor
    from mm_gmpo.policy import collate

    proc = load_processor()
    encs = [encode_prompt(p, proc, min_pixels=3136, max_pixels=50_000)
            for p in geometry3k_prompts(load_geometry3k(split="test").select(range(3)))]
    g = torch.Generator().manual_seed(0)
    resp = [torch.randint(0, 151000, (n,), generator=g).tolist() for n in (5, 12, 9)]
    return collate([e.input_ids for e in encs], resp, pad_id=151643, pixel_values=[e.pixel_values for e in encs],
                   image_grid_thw=[e.image_grid_thw for e in encs])


def block_causal_reference(q, k, v, bounds, scale):
    """Masked attention over the whole row in float64: causal within each segment, nothing across segments."""
    n = q.shape[2]
    seg = torch.zeros(n, dtype=torch.long)
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        seg[a:b] = i
    allowed = (seg[:, None] == seg[None, :]) & (torch.arange(n)[:, None] >= torch.arange(n)[None, :])
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    att = (q @ k.transpose(-1, -2)) * scale
    att = att.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(att, -1) @ v).transpose(1, 2)  # (1, N, H, D)


@pytest.mark.parametrize("lengths", [[5, 9, 3], [4, 4, 4], [4, 7, 4, 2], [11]])
def test_packed_causal_sdpa_equals_block_causal_attention(lengths):
    """Per-sequence causal attention of a packed row (sequences where the position ids restart), grouped-query
    heads (4 query heads, 2 key/value heads): outputs and gradients equal the masked float64 reference."""
    from mm_gmpo.attention import packed_causal_sdpa, sequence_bounds

    g = torch.Generator().manual_seed(0)
    n = sum(lengths)
    q = torch.randn(1, 4, n, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    pos = torch.cat([torch.arange(m) for m in lengths])[None]
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert sequence_bounds(pos) == bounds
    out, _ = packed_causal_sdpa(None, q, k, v, None, scaling=0.3, position_ids=pos)
    ref = block_causal_reference(q, k, v, bounds, 0.3)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v)),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_segment_bounds_read_once_per_tensor(monkeypatch):
    """Every layer gets the same position-id tensor: its bounds cross to the host once, not once per layer."""
    import mm_gmpo.attention as A

    calls = []
    real = A.sequence_bounds
    monkeypatch.setattr(A, "sequence_bounds", lambda p: calls.append(1) or real(p))
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    q = torch.randn(1, 2, 5, 4)
    outs = [A.packed_causal_sdpa(None, q, q, q, None, position_ids=pos)[0] for _ in range(3)]
    assert len(calls) == 1 and all(torch.equal(o, outs[0]) for o in outs)
    A.packed_causal_sdpa(None, q, q, q, None, position_ids=pos.clone())  # a new tensor: read again
    assert len(calls) == 2


def test_packed_policy_attends_per_sequence_without_a_mask(monkeypatch, image_row_batch):
    """Policy(packed=True) under sdpa: one unmasked causal SDPA call per sequence in each language-model layer."""
    from mm_gmpo.attention import TEXT_NAME
    from mm_gmpo.policy import Policy

    model = build_model("t", random_init=True, config=tiny_qwen2_5_vl_config(layers=2), dtype=torch.float32,
                        attn_implementation="sdpa", seed=0)
    policy = Policy(model, packed=True)
    assert model.config.text_config._attn_implementation == TEXT_NAME
    assert model.config.vision_config._attn_implementation == "sdpa"  # the vision tower is untouched
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kw):
        calls.append((q.shape[-2], attn_mask is None, kw.get("is_causal", False)))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        policy(image_row_batch)
    lengths = image_row_batch.attention_mask.sum(-1).tolist()
    text_calls = [c for c in calls if c[2]]  # the vision tower's calls are not causal
    assert text_calls == [(n, True, True) for n in lengths] * 2


def test_generate_unchanged_by_packed_text_attention():
    """Padded batches and decoding with a KV cache still go through transformers' SDPA: greedy generation of a
    left-padded batch gives the same tokens and scores after the packed attention is installed."""
    from mm_gmpo.attention import use_packed_text_attention

    cfg = model_config({"model_type": "qwen2", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2})
    m = build_model("t", random_init=True, config=cfg, dtype=torch.float64, attn_implementation="sdpa", seed=0)
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])

    def greedy():
        out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True)
        one = m.generate(input_ids=ids[1:], max_new_tokens=6, do_sample=False, pad_token_id=0)
        return out.sequences, torch.stack(out.scores), one

    before = greedy()
    assert use_packed_text_attention(m)
    after = greedy()
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    torch.testing.assert_close(after[1], before[1], rtol=0, atol=1e-10)


def test_packed_text_attention_only_replaces_sdpa():
    from mm_gmpo.attention import use_packed_text_attention

    cfg = model_config({"model_type": "qwen2", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
                        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1})
    m = build_model("t", random_init=True, config=cfg, dtype=torch.float32, attn_implementation="eager")
    assert not use_packed_text_attention(m) and m.config._attn_implementation == "eager"
