"""GMPO/GRPO loss: hand-computed cases, float64 references, gradients, padding and dtype behaviour."""

import math

import pytest
import torch

from mm_gmpo.loss import KL_PENALTIES, get_policy_loss, gmpo_loss, grpo_loss, kl_penalty, truncated_is_weights


def ref_gmpo(logp, old, adv, mask, c_low=0.4, c_high=0.4):
    """Direct loop implementation of the GMPO formula in float64 (from the paper / design doc)."""
    total = 0.0
    for i in range(logp.shape[0]):
        num, den = 0.0, 0.0
        for t in range(logp.shape[1]):
            if mask[i, t]:
                d = logp[i, t] - old[i, t]
                if adv[i] > 0:
                    d = torch.minimum(d, torch.tensor(c_high, dtype=d.dtype))
                elif adv[i] < 0:
                    d = torch.maximum(d, torch.tensor(-c_low, dtype=d.dtype))
                else:
                    d = d * 0
                num = num + d
                den += 1
        if den == 0:
            continue
        total = total + (-adv[i] * torch.exp(num / den))
    return total / logp.shape[0]


def ref_grpo(logp, old, adv, mask, eps_low=0.2, eps_high=0.2, agg="token_mean", c=3.0):
    per_seq, all_tok = [], []
    for i in range(logp.shape[0]):
        toks = []
        for t in range(logp.shape[1]):
            if mask[i, t]:
                r = torch.exp(logp[i, t] - old[i, t])
                tok = torch.maximum(-adv[i] * r, -adv[i] * torch.clamp(r, 1 - eps_low, 1 + eps_high))
                if c is not None and adv[i] < 0:  # dual-clip
                    tok = torch.minimum(tok, -adv[i] * c)
                toks.append(tok)
        all_tok += toks
        per_seq.append(sum(toks) / max(len(toks), 1) if toks else torch.zeros((), dtype=logp.dtype))
    if agg == "token_mean":
        return sum(all_tok) / len(all_tok)
    return sum(per_seq) / len(per_seq)


def random_batch(B=6, T=9, seed=0, dtype=torch.float64, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    logp = (old + torch.randn(B, T, generator=g, dtype=dtype) * scale).requires_grad_(True)
    adv = torch.randn(B, generator=g, dtype=dtype)
    adv[0] = 0.0
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(dtype)
    return logp, old, adv, mask


# ---------------------------------------------------------------- hand-computed GMPO cases


def test_gmpo_positive_advantage_unclipped():
    logp = torch.tensor([[0.1, -0.2]], requires_grad=True)
    old = torch.zeros(1, 2)
    loss, m = gmpo_loss(logp, old, torch.tensor([2.0]), torch.ones(1, 2))
    # w = exp((0.1 - 0.2)/2) ; loss = -2 w
    assert loss.item() == pytest.approx(-2 * math.exp(-0.05), rel=1e-6)
    assert m["ratio/clip_frac_upper"] == 0 and m["ratio/clip_frac_lower"] == 0


def test_gmpo_positive_advantage_clipped_above_only():
    logp = torch.tensor([[1.0, -1.0]], requires_grad=True)
    loss, m = gmpo_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2))
    # A>0: min(1.0, 0.4) = 0.4 ; -1.0 is NOT clipped from below -> mean = -0.3
    assert loss.item() == pytest.approx(-math.exp(-0.3), rel=1e-6)
    assert m["ratio/clip_frac_upper"] == pytest.approx(0.5)
    assert m["ratio/clip_frac_lower"] == 0.0
    loss.backward()
    assert logp.grad[0, 0].item() == 0.0  # clipped token: zero gradient
    assert logp.grad[0, 1].item() == pytest.approx(-math.exp(-0.3) * 0.5, rel=1e-6)


def test_gmpo_negative_advantage_clipped_below_only():
    logp = torch.tensor([[1.0, -1.0]], requires_grad=True)
    loss, m = gmpo_loss(logp, torch.zeros(1, 2), torch.tensor([-1.0]), torch.ones(1, 2))
    # A<0: max(1.0, -0.4) = 1.0 (NOT clipped from above), max(-1.0, -0.4) = -0.4 -> mean 0.3
    assert loss.item() == pytest.approx(math.exp(0.3), rel=1e-6)
    assert m["ratio/clip_frac_lower"] == pytest.approx(0.5)
    assert m["ratio/clip_frac_upper"] == 0.0
    loss.backward()
    assert logp.grad[0, 1].item() == 0.0
    assert logp.grad[0, 0].item() == pytest.approx(math.exp(0.3) * 0.5, rel=1e-6)


def test_gmpo_asymmetric_clip_values():
    logp = torch.tensor([[1.0], [-1.0]])
    loss, _ = gmpo_loss(logp, torch.zeros(2, 1), torch.tensor([1.0, -1.0]), torch.ones(2, 1), clip_low=0.1, clip_high=0.3)
    assert loss.item() == pytest.approx((-math.exp(0.3) + math.exp(-0.1)) / 2, rel=1e-6)


def test_gmpo_zero_advantage_contributes_nothing():
    logp = torch.tensor([[500.0, 300.0]], requires_grad=True)  # exp(400) overflows fp32 unless A=0 zeroes delta
    loss, m = gmpo_loss(logp, torch.zeros(1, 2), torch.tensor([0.0]), torch.ones(1, 2))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(logp.grad == 0)
    assert m["adv/zero_frac"] == 1.0


def test_gmpo_geometric_not_arithmetic_mean():
    logp = torch.tensor([[0.3, -0.3]])
    loss, _ = gmpo_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2))
    assert loss.item() == pytest.approx(-1.0, abs=1e-7)  # exp(mean(0.3, -0.3)) = 1, arithmetic would be cosh(0.3)
    loss_g, _ = grpo_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), clip_low=10, clip_high=10)
    assert loss_g.item() == pytest.approx(-math.cosh(0.3), rel=1e-6)


def test_gmpo_padding_ignored_even_if_garbage():
    logp = torch.tensor([[0.1, float("nan"), float("-inf")]], requires_grad=True)
    old = torch.tensor([[0.0, 5.0, float("-inf")]])
    loss, m = gmpo_loss(logp, old, torch.tensor([1.0]), torch.tensor([[1, 0, 0]]))
    assert loss.item() == pytest.approx(-math.exp(0.1), rel=1e-6)
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert all(math.isfinite(v) for v in m.values())


def test_gmpo_empty_sequence_no_nan():
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[0, 0, 0], [1, 1, 0]])
    loss, m = gmpo_loss(logp, torch.zeros(2, 3), torch.tensor([1.0, 1.0]), mask)
    assert loss.item() == pytest.approx(-0.5)  # only the second sequence counts, divided by B = 2
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert all(math.isfinite(v) for v in m.values())
    loss_all_empty, m2 = gmpo_loss(logp, torch.zeros(2, 3), torch.tensor([1.0, 1.0]), torch.zeros(2, 3))
    assert loss_all_empty.item() == 0.0 and all(math.isfinite(v) for v in m2.values())


def test_gmpo_metrics_values():
    logp = torch.tensor([[0.5, -0.2, 9.0], [-0.7, 0.1, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    _, m = gmpo_loss(logp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), mask)
    assert m["ratio/token_log_ratio_max"] == pytest.approx(0.5)  # the 9.0 is padding
    assert m["ratio/token_log_ratio_min"] == pytest.approx(-0.7)
    assert m["ratio/seq_log_ratio_max"] == pytest.approx(0.15)
    assert m["ratio/seq_log_ratio_min"] == pytest.approx(-0.2)
    assert m["ratio/seq_log_ratio_mean"] == pytest.approx((0.15 - 0.2) / 2)
    assert m["ratio/clip_frac_upper"] == pytest.approx(1 / 5)  # 0.5 > 0.4 with A > 0
    assert m["ratio/clip_frac_lower"] == pytest.approx(1 / 5)  # -0.7 < -0.4 with A < 0
    deltas = torch.tensor([0.5, -0.2, -0.7, 0.1, 0.0], dtype=torch.float64)
    assert m["ratio/approx_kl"] == pytest.approx((torch.exp(deltas) - 1 - deltas).mean().item(), rel=1e-5)


# ---------------------------------------------------------------- float64 references and gradients


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("clips", [(0.4, 0.4), (0.2, 0.3)])
def test_gmpo_matches_float64_reference_value_and_grad(seed, clips):
    logp, old, adv, mask = random_batch(seed=seed)
    loss, _ = gmpo_loss(logp, old, adv, mask, clip_low=clips[0], clip_high=clips[1])
    (grad,) = torch.autograd.grad(loss, logp)
    ref = ref_gmpo(logp, old, adv, mask, *clips)
    (ref_grad,) = torch.autograd.grad(ref, logp)
    # the implementation computes in fp32, the reference in fp64
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("c", [3.0, None])
def test_grpo_matches_float64_reference_value_and_grad(seed, agg, c):
    logp, old, adv, mask = random_batch(seed=seed, scale=1.2)  # wide enough that some ratios pass 3
    loss, _ = grpo_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, loss_agg=agg, clip_ratio_c=c)
    (grad,) = torch.autograd.grad(loss, logp)
    ref = ref_grpo(logp, old, adv, mask, 0.2, 0.28, agg, c=c)
    (ref_grad,) = torch.autograd.grad(ref, logp)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


def test_wrong_clip_side_would_be_detected():
    """Sanity of the reference itself: symmetric clipping gives a different answer on a tailored batch."""
    logp = torch.tensor([[1.0, -1.0], [1.0, -1.0]], dtype=torch.float64)
    old = torch.zeros(2, 2, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(2, 2)
    ours, _ = gmpo_loss(logp, old, adv, mask)
    symmetric = (-torch.exp(torch.tensor(0.0)) + torch.exp(torch.tensor(0.0))) / 2  # both sides clipped
    assert abs(ours.item() - symmetric.item()) > 0.1
    assert ours.item() == pytest.approx(ref_gmpo(logp, old, adv, mask).item(), rel=1e-6)


def test_gmpo_padding_length_invariance():
    logp, old, adv, mask = random_batch(seed=3, T=7)
    loss, m = gmpo_loss(logp, old, adv, mask)
    pad = 11
    logp_p = torch.cat([logp.detach(), torch.randn(logp.shape[0], pad, dtype=logp.dtype)], 1).requires_grad_(True)
    old_p = torch.cat([old, torch.randn(old.shape[0], pad, dtype=old.dtype)], 1)
    mask_p = torch.cat([mask, torch.zeros(mask.shape[0], pad)], 1)
    loss_p, m_p = gmpo_loss(logp_p, old_p, adv, mask_p)
    assert loss_p.item() == pytest.approx(loss.item(), rel=1e-6)
    assert m_p == pytest.approx(m, rel=1e-6)
    (g,) = torch.autograd.grad(loss, logp)
    (g_p,) = torch.autograd.grad(loss_p, logp_p)
    torch.testing.assert_close(g_p[:, :7], g)
    assert torch.all(g_p[:, 7:] == 0)


def test_grpo_padding_length_invariance():
    logp, old, adv, mask = random_batch(seed=4, T=5)
    for agg in ("token_mean", "seq_mean_token_mean"):
        loss, _ = grpo_loss(logp, old, adv, mask, loss_agg=agg)
        logp_p = torch.cat([logp, torch.full((logp.shape[0], 4), 7.0, dtype=logp.dtype)], 1)
        old_p = torch.cat([old, torch.zeros(old.shape[0], 4, dtype=old.dtype)], 1)
        mask_p = torch.cat([mask, torch.zeros(mask.shape[0], 4)], 1)
        loss_p, _ = grpo_loss(logp_p, old_p, adv, mask_p, loss_agg=agg)
        assert loss_p.item() == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize("fn", [gmpo_loss, grpo_loss])
def test_bf16_inputs_match_fp32_within_bf16_tolerance(fn):
    logp, old, adv, mask = random_batch(B=16, T=32, seed=7, dtype=torch.float32, scale=0.3)
    loss32, _ = fn(logp, old, adv, mask)
    loss16, m16 = fn(logp.detach().bfloat16(), old.bfloat16(), adv.bfloat16(), mask)
    # bf16 has 8 mantissa bits: inputs are rounded to ~0.4% relative; the loss is an average of O(1) terms
    scale = adv.abs().mean().item()
    assert abs(loss16.item() - loss32.item()) < 2e-2 * scale
    assert loss16.dtype == torch.float32 and all(math.isfinite(v) for v in m16.values())


def test_micro_batch_normalizer_sums_to_full_batch():
    logp, old, adv, mask = random_batch(B=8, T=6, seed=5)
    full, _ = gmpo_loss(logp, old, adv, mask)
    (g_full,) = torch.autograd.grad(full, logp)
    parts = [gmpo_loss(logp[s], old[s], adv[s], mask[s], normalizer=8)[0] for s in (slice(0, 3), slice(3, 8))]
    total = parts[0] + parts[1]
    (g_parts,) = torch.autograd.grad(total, logp)
    assert total.item() == pytest.approx(full.item(), rel=1e-6)
    torch.testing.assert_close(g_parts, g_full)

    n_tok = float(mask.sum())
    full_g, _ = grpo_loss(logp, old, adv, mask)
    parts_g = sum(grpo_loss(logp[s], old[s], adv[s], mask[s], normalizer=n_tok)[0] for s in (slice(0, 5), slice(5, 8)))
    assert parts_g.item() == pytest.approx(full_g.item(), rel=1e-6)


# ---------------------------------------------------------------- GRPO specifics


def test_grpo_clip_sides():
    logp = torch.tensor([[math.log(1.5), math.log(0.5)]], requires_grad=True)
    old = torch.zeros(1, 2)
    loss, m = grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2))
    # A>0: token 0 ratio 1.5 -> clipped to 1.2 (zero grad); token 1 ratio 0.5 -> min objective keeps 0.5
    assert loss.item() == pytest.approx(-(1.2 + 0.5) / 2, rel=1e-6)
    assert m["ratio/clip_frac_upper"] == pytest.approx(0.5) and m["ratio/clip_frac_lower"] == 0
    loss.backward()
    assert logp.grad[0, 0].item() == 0.0
    assert logp.grad[0, 1].item() == pytest.approx(-0.5 / 2, rel=1e-6)

    logp2 = torch.tensor([[math.log(1.5), math.log(0.5)]], requires_grad=True)
    loss2, m2 = grpo_loss(logp2, old, torch.tensor([-1.0]), torch.ones(1, 2))
    assert loss2.item() == pytest.approx((1.5 + 0.8) / 2, rel=1e-6)
    assert m2["ratio/clip_frac_lower"] == pytest.approx(0.5) and m2["ratio/clip_frac_upper"] == 0


def test_grpo_bad_agg():
    logp, old, adv, mask = random_batch()
    with pytest.raises(ValueError, match="loss_agg"):
        grpo_loss(logp, old, adv, mask, loss_agg="sum")


# ---------------------------------------------------------------- KL, entropy, interface


@pytest.mark.parametrize("kind", KL_PENALTIES)
def test_kl_penalties_equal_their_float64_formulas(kind):
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(200, generator=g, dtype=torch.float64) * 4
    ref = logp + torch.randn(200, generator=g, dtype=torch.float64) * 3  # far apart too: the clamps matter
    got = kl_penalty(logp, ref, kind)
    expected = []
    for lp, rf in zip(logp.tolist(), ref.tolist(), strict=True):
        d = lp - rf
        if kind == "k1":
            expected.append(d)
        elif kind == "abs":
            expected.append(abs(d))
        elif kind in ("k2", "mse"):
            expected.append(0.5 * d * d)
        else:  # k3 / low_var_kl: exp(ref - logp) - (ref - logp) - 1, clamped as verl / EasyR1
            x = min(max(rf - lp, -20.0), 20.0)
            expected.append(min(max(math.exp(x) - x - 1.0, -10.0), 10.0))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert torch.all(kl_penalty(logp, logp, kind) == 0)
    if kind in ("k3", "low_var_kl"):
        assert torch.all(got >= 0) and got.max() == 10.0  # clamped


def test_unknown_kl_penalty_is_named():
    with pytest.raises(ValueError, match="unknown KL penalty 'k4'"):
        kl_penalty(torch.zeros(2), torch.zeros(2), "k4")


def test_grpo_dual_clip_caps_negative_advantage_tokens_as_verl():
    """The issue's row: delta = +2 (ratio e^2 = 7.39), A = -1. Without dual-clip the token loss is 7.39 and its
    gradient 7.39; with verl's default clip_ratio_c = 3 it is 3 and carries no gradient."""
    old = torch.zeros(1, 1)
    for c, value, grad in ((None, math.exp(2.0), math.exp(2.0)), (3.0, 3.0, 0.0)):
        logp = torch.full((1, 1), 2.0, requires_grad=True)
        loss, m = grpo_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 1), clip_ratio_c=c)
        loss.backward()
        assert loss.item() == pytest.approx(value, rel=1e-6)
        assert logp.grad.item() == pytest.approx(grad, abs=1e-6)
        assert m["ratio/dual_clip_frac"] == (1.0 if c else 0.0)
    # a positive advantage is never dual-clipped
    logp = torch.full((1, 1), 2.0, requires_grad=True)
    loss, _ = grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 1), clip_ratio_c=3.0)
    assert loss.item() == pytest.approx(-1.2, rel=1e-6)
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1"):
        grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 1), clip_ratio_c=0.5)


@pytest.mark.parametrize("name", ["gmpo", "grpo"])
def test_kl_and_entropy_terms_off_by_default_and_add_when_on(name):
    fn = get_policy_loss(name)
    logp, old, adv, mask = random_batch(seed=2)
    ref = old + 0.3
    ent = torch.rand_like(old)
    base, _ = fn(logp, old, adv, mask)
    same, m = fn(logp, old, adv, mask, ref_logprobs=ref, entropy=ent)
    assert same.item() == pytest.approx(base.item())  # coefficients default to 0
    assert m["loss/kl"] > 0 and m["actor/kl_mean"] > 0 and m["actor/entropy"] > 0
    with_terms, _ = fn(logp, old, adv, mask, ref_logprobs=ref, kl_coef=0.1, entropy=ent, entropy_coef=0.01)
    expected = base.item() + 0.1 * m["loss/kl"] - 0.01 * m["actor/entropy"]
    assert with_terms.item() == pytest.approx(expected, rel=1e-5)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="advantages must be one value per sequence"):
        gmpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="same"):
        grpo_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="unknown objective"):
        get_policy_loss("ppo2")


# ---------------------------------------------------------------- truncated importance sampling (off by default)


def test_truncated_is_weights_values_and_metrics():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, 0.0]])
    sampler = torch.tensor([[-1.5, -1.0, -0.5], [-1.0, -3.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    w, m = truncated_is_weights(old, sampler, mask, cap=2.0)
    expected = torch.tensor([[math.exp(0.5), math.exp(-1.0), 1.0], [math.exp(-2.0), 2.0, 1.0]])
    torch.testing.assert_close(w, expected)
    assert m["rollout/tis_clip_frac"] == pytest.approx(1 / 5)  # exp(2) > 2 is the one truncated token
    assert m["rollout/tis_weight_mean"] == pytest.approx(float(expected[mask.bool()].sum()) / 5, rel=1e-6)
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_is_weights(old, sampler, mask, cap=0.0)


def ref_gmpo_tis(logp, old, adv, mask, w, c=0.4):
    """Float64 loop: each sequence's GMPO loss times the geometric mean of its tokens' IS weights."""
    total = 0.0
    for i in range(logp.shape[0]):
        idx = [t for t in range(logp.shape[1]) if mask[i, t]]
        if not idx:
            continue
        one = ref_gmpo(logp[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1], c, c)
        geo = torch.exp(sum(torch.log(w[i, t]) for t in idx) / len(idx))
        total = total + one * geo
    return total / logp.shape[0]


def test_gmpo_is_weights_scale_each_sequence_by_their_geometric_mean():
    logp, old, adv, mask = random_batch(seed=11)
    w = torch.rand(old.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2 + 0.1
    loss, _ = gmpo_loss(logp, old, adv, mask, is_weights=w)
    ref = ref_gmpo_tis(logp, old, adv, mask, w)
    torch.testing.assert_close(loss, ref.to(loss.dtype), rtol=1e-6, atol=1e-9)
    (g,) = torch.autograd.grad(loss, logp)
    (g_ref,) = torch.autograd.grad(ref, logp)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-5, atol=1e-9)
    # an arithmetic mean of the weights would give a different loss
    assert not torch.allclose(loss.double(), ref_gmpo(logp, old, adv, mask) * (w * mask).sum() / mask.sum())


def test_grpo_is_weights_scale_each_token():
    logp, old, adv, mask = random_batch(seed=12)
    w = torch.rand(old.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 2
    loss, _ = grpo_loss(logp, old, adv, mask, is_weights=w)
    tok = []
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[i, t]:
                r = torch.exp(logp[i, t] - old[i, t])
                tok.append(w[i, t] * torch.maximum(-adv[i] * r, -adv[i] * torch.clamp(r, 0.8, 1.2)))
    torch.testing.assert_close(loss.double(), sum(tok) / len(tok), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("fn", [gmpo_loss, grpo_loss])
def test_unit_is_weights_change_nothing(fn):
    logp, old, adv, mask = random_batch(seed=13)
    a, _ = fn(logp, old, adv, mask)
    b, _ = fn(logp, old, adv, mask, is_weights=torch.ones_like(old))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
