"""Grouped vision attention: the same attention as transformers' per-window SDPA loop, in fewer calls."""

import pytest
import torch
import torch.nn.functional as F

from mm_gmpo.attention import NAME, grouped_varlen_sdpa, use_grouped_vision_attention
from mm_gmpo.policy import build_model, model_config, tiny_qwen2_5_vl_config


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


def test_vision_tower_same_output_and_gradients_in_fewer_calls(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    model = build_model("t", random_init=True, config=tiny_qwen2_5_vl_config(vision_depth=3), dtype=torch.float64,
                        attn_implementation="sdpa", seed=0)
    vis = model.model.visual
    # windows are 4 x 4 merged tokens = 64 patches. Three 16x16 grids: 4 full windows each; a 12x20 grid (6 x 10
    # merged): windows of 64, 64, 32, 32, 32 and 16 patches. Blocks 0, 1 are windowed, block 2 full attention.
    grid = torch.tensor([[1, 16, 16]] * 3 + [[1, 12, 20]])
    g = torch.Generator().manual_seed(1)
    pv = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, generator=g, dtype=torch.float64)

    def run():
        vis.zero_grad()
        calls.clear()
        out = torch.cat(list(vis(pv, grid_thw=grid).pooler_output))
        (out ** 2).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in vis.named_parameters()}, len(calls)

    ref_out, ref_grads, ref_calls = run()
    assert use_grouped_vision_attention(model) and vis.config._attn_implementation == NAME
    assert model.config.text_config._attn_implementation == "sdpa"  # the language model is untouched
    out, grads, n_calls = run()
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
    assert set(grads) == set(ref_grads) and len(grads) > 20
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-9, atol=1e-12)
    # per-window loop: 18 windows x 2 blocks + 4 images; grouped: one call per distinct length (3, 3 and 2)
    assert (ref_calls, n_calls) == (2 * 18 + 4, 3 + 3 + 2)


def test_text_only_model_is_left_alone():
    cfg = model_config({"model_type": "qwen2", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
                        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1})
    m = build_model("t", random_init=True, config=cfg, dtype=torch.float32)
    assert not use_grouped_vision_attention(m)
