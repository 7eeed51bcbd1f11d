"""GSPO, GSPO-token, CISPO and SAPO beside GMPO and GRPO: each against a float64 loop transcription of its paper's
formula (loss and gradient), on batches with an empty row, a zero advantage and lengths from 1 to 48; the shared
interface (micro-batch normalisers, TIS weights, KL and entropy terms) for all six; the trainer's settings."""

import pytest
import torch

from mm_gmpo.loss import POLICY_LOSSES, get_policy_loss, objective_defaults

OBJECTIVES = ["gmpo", "grpo", "gspo", "gspo_token", "cispo", "sapo"]


def _tokens(logp, mask, i):
    return [t for t in range(logp.shape[1]) if mask[i, t]]


def _aggregate(per_seq_tokens, agg):
    """The paper's aggregations over [[token losses of sequence i]]: token_mean = 1 / sum_i |y_i| sum_i sum_t;
    seq_mean_token_mean = 1 / G sum_i 1 / |y_i| sum_t (an empty sequence adds 0 and counts in G)."""
    if agg == "token_mean":
        flat = [x for toks in per_seq_tokens for x in toks]
        return sum(flat) / len(flat)
    return sum(sum(toks) / len(toks) for toks in per_seq_tokens if toks) / len(per_seq_tokens)


def ref_gspo(logp, old, adv, mask, lo=3e-4, hi=4e-4):
    """GSPO eq. 5-7: J = 1/G sum_i min(s_i A_i, clip(s_i, 1 - lo, 1 + hi) A_i), s_i = (pi/pi_old)^(1/|y_i|)."""
    total = torch.zeros((), dtype=logp.dtype)
    for i in range(logp.shape[0]):
        ts = _tokens(logp, mask, i)
        if not ts:
            continue
        s = torch.exp(sum(logp[i, t] - old[i, t] for t in ts) / len(ts))
        total = total + torch.maximum(-adv[i] * s, -adv[i] * torch.clamp(s, 1 - lo, 1 + hi))
    return total / logp.shape[0]


def ref_gspo_token(logp, old, adv, mask, lo=3e-4, hi=4e-4, agg="seq_mean_token_mean"):
    """GSPO eq. 13-14: s_i,t = sg[s_i] pi_t / sg[pi_t], PPO-clip per token, 1/G sum_i 1/|y_i| sum_t."""
    seqs = []
    for i in range(logp.shape[0]):
        ts = _tokens(logp, mask, i)
        toks = []
        if ts:
            log_s = (sum(logp[i, t] - old[i, t] for t in ts) / len(ts)).detach()
            for t in ts:
                s = torch.exp(log_s + logp[i, t] - logp[i, t].detach())
                toks.append(torch.maximum(-adv[i] * s, -adv[i] * torch.clamp(s, 1 - lo, 1 + hi)))
        seqs.append(toks)
    return _aggregate(seqs, agg)


def ref_cispo(logp, old, adv, mask, lo=1.0, hi=0.2, agg="token_mean"):
    """MiniMax-M1 eq. 4-5: J = 1/sum_i |o_i| sum_i sum_t sg(r^_i,t) A_i log pi_i,t, r^ = clip(r, 1 - lo, 1 + hi)."""
    seqs = []
    for i in range(logp.shape[0]):
        toks = []
        for t in _tokens(logp, mask, i):
            w = torch.clamp(torch.exp(logp[i, t] - old[i, t]), 1 - lo, 1 + hi).detach()
            toks.append(-w * adv[i] * logp[i, t])
        seqs.append(toks)
    return _aggregate(seqs, agg)


def ref_sapo(logp, old, adv, mask, tau_pos=1.0, tau_neg=1.05, agg="seq_mean_token_mean"):
    """SAPO eq. 7-9: J = 1/G sum_i 1/|y_i| sum_t f_i,t(r_i,t) A_i, f(r) = sigmoid(tau (r - 1)) 4 / tau."""
    seqs = []
    for i in range(logp.shape[0]):
        tau = tau_pos if adv[i] > 0 else tau_neg
        toks = [-adv[i] * torch.sigmoid(tau * (torch.exp(logp[i, t] - old[i, t]) - 1)) * 4 / tau
                for t in _tokens(logp, mask, i)]
        seqs.append(toks)
    return _aggregate(seqs, agg)


def batch(seed=0, scale=0.3, lengths=(0, 1, 3, 48, 17, 48, 2, 30), zero_adv=(1,)):
    """Log-probs around the old ones (float64), lengths 0 (an empty row) to 48, some advantages exactly 0."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = (old + torch.randn(B, T, generator=g, dtype=torch.float64) * scale).requires_grad_(True)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    adv[list(zero_adv)] = 0.0
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).double()
    return logp, old, adv, mask


def check(loss, ref, logp):
    (grad,) = torch.autograd.grad(loss, logp, retain_graph=True)
    (ref_grad,) = torch.autograd.grad(ref, logp)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-12)
    return grad


# GSPO's per-sequence ratio moves ~1/|y| as much as a token's: scale 0.3 with (3e-4, 4e-4) clips most sequences,
# scale 0.01 with (0.2, 0.28) almost none; both sides of every clip are exercised.
CASES = [(0.3, None), (0.01, (0.2, 0.28)), (0.3, (0.2, 0.28)), (0.001, None)]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("scale", "clips"), CASES)
def test_gspo_equals_its_float64_transcription(seed, scale, clips):
    logp, old, adv, mask = batch(seed, scale)
    kw = dict(zip(("clip_low", "clip_high"), clips or (), strict=False))
    loss, m = get_policy_loss("gspo")(logp, old, adv, mask, **kw)
    check(loss, ref_gspo(logp, old, adv, mask, *(clips or (3e-4, 4e-4))), logp)
    assert 0.0 <= m["ratio/clip_frac_upper"] + m["ratio/clip_frac_lower"] <= 1.0


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("scale", "clips"), CASES)
@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean"])
def test_gspo_token_equals_its_float64_transcription(seed, scale, clips, agg):
    logp, old, adv, mask = batch(seed, scale)
    kw = dict(zip(("clip_low", "clip_high"), clips or (), strict=False))
    loss, _ = get_policy_loss("gspo_token")(logp, old, adv, mask, loss_agg=agg, **kw)
    check(loss, ref_gspo_token(logp, old, adv, mask, *(clips or (3e-4, 4e-4)), agg=agg), logp)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("clips", [None, (0.2, 0.28), (0.1, 0.1)])
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
def test_cispo_equals_its_float64_transcription(seed, clips, agg):
    logp, old, adv, mask = batch(seed, scale=0.5)
    kw = dict(zip(("clip_low", "clip_high"), clips or (), strict=False))
    loss, m = get_policy_loss("cispo")(logp, old, adv, mask, loss_agg=agg, **kw)
    grad = check(loss, ref_cispo(logp, old, adv, mask, *(clips or (1.0, 0.2)), agg=agg), logp)
    assert m["ratio/clip_frac_upper"] > 0  # some weights were capped ...
    nonzero = (adv != 0)[:, None] & mask.bool()
    assert bool((grad[nonzero] != 0).all())  # ... and still every token with an advantage has a gradient


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("taus", [None, (0.5, 2.0)])
@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean"])
def test_sapo_equals_its_float64_transcription(seed, taus, agg):
    logp, old, adv, mask = batch(seed, scale=1.0)
    kw = dict(zip(("tau_pos", "tau_neg"), taus or (), strict=False))
    loss, m = get_policy_loss("sapo")(logp, old, adv, mask, loss_agg=agg, **kw)
    check(loss, ref_sapo(logp, old, adv, mask, *(taus or (1.0, 1.05)), agg=agg), logp)
    assert 0 < m["ratio/gate_weight_mean"] < 1


@pytest.mark.parametrize("name", OBJECTIVES)
def test_all_zero_advantages_give_zero_loss_and_gradient(name):
    logp, old, adv, mask = batch(4, zero_adv=range(8))
    loss, m = get_policy_loss(name)(logp, old, adv, mask)
    (grad,) = torch.autograd.grad(loss, logp)
    assert loss.item() == 0.0 and not grad.any() and m["adv/zero_frac"] == 1.0


@pytest.mark.parametrize("name", OBJECTIVES)
def test_empty_rows_and_garbage_padding_change_nothing(name):
    """A row without tokens adds 0 (and no NaN); padding holding -inf or huge values is never read."""
    logp, old, adv, mask = batch(5, lengths=(0, 4, 0, 7))
    fn = get_policy_loss(name)
    loss, m = fn(logp, old, adv, mask)
    dirty_old = torch.where(mask.bool(), old, torch.tensor(-1e30, dtype=old.dtype))
    dirty_logp = torch.where(mask.bool(), logp, torch.tensor(50.0, dtype=old.dtype))
    dirty, _ = fn(dirty_logp, dirty_old, adv, mask)
    (g,) = torch.autograd.grad(dirty, logp)
    assert torch.isfinite(loss) and all(v == v for v in m.values())
    assert dirty.item() == pytest.approx(loss.item(), rel=1e-12, abs=1e-15)
    assert not g[~mask.bool()].any() and torch.isfinite(g).all()


def test_gspo_weighs_each_sequence_once_whatever_its_length():
    """GSPO's point: a sequence's gradient mass (sum over its tokens) is -A_i s_i / G for 1 token and for 48, where
    a token-mean of its sequence ratio (EasyR1's gspo with loss_avg_mode=token) gives the 48-token one 48 times more."""
    lengths = (1, 48)
    logp, old, adv, mask = batch(6, scale=0.0, lengths=lengths, zero_adv=())
    adv = torch.tensor([1.0, 1.0], dtype=torch.float64)
    loss, _ = get_policy_loss("gspo")(logp, old, adv, mask)
    (g,) = torch.autograd.grad(loss, logp)
    mass = (g * mask).sum(-1)
    torch.testing.assert_close(mass, torch.tensor([-0.5, -0.5], dtype=torch.float64), rtol=1e-12, atol=0)
    token_mean, _ = get_policy_loss("gspo_token")(logp, old, adv, mask, loss_agg="token_mean")
    (g_tok,) = torch.autograd.grad(token_mean, logp)
    tok_mass = (g_tok * mask).sum(-1)
    assert tok_mass[1] / tok_mass[0] == pytest.approx(48.0, rel=1e-12)


@pytest.mark.parametrize("clips", [(3e-4, 4e-4), (0.2, 0.28)])
def test_gspo_token_has_gspo_gradient_with_sequence_advantages(clips):
    """The paper: with A_i,t = A_i, GSPO-token and GSPO are the same objective (value and gradient)."""
    logp, old, adv, mask = batch(8, scale=0.01)
    a, _ = get_policy_loss("gspo")(logp, old, adv, mask, clip_low=clips[0], clip_high=clips[1])
    b, _ = get_policy_loss("gspo_token")(logp, old, adv, mask, clip_low=clips[0], clip_high=clips[1])
    (ga,) = torch.autograd.grad(a, logp)
    (gb,) = torch.autograd.grad(b, logp)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-15)


def test_sapo_on_policy_is_the_plain_policy_gradient():
    """f'(1) = 1: at r = 1 SAPO's gradient is the unclipped policy gradient (GRPO's with the same aggregation)."""
    _, old, adv, mask = batch(9)
    on = old.clone().requires_grad_(True)
    s, _ = get_policy_loss("sapo")(on, old, adv, mask)
    g, _ = get_policy_loss("grpo")(on, old, adv, mask, loss_agg="seq_mean_token_mean", clip_ratio_c=None)
    (gs,) = torch.autograd.grad(s, on)
    (gg,) = torch.autograd.grad(g, on)
    torch.testing.assert_close(gs, gg, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_micro_batches_with_the_global_normaliser_sum_to_the_whole_batch(name):
    """What the trainer relies on: split over micro-batches (and ranks), each divided by the global count, the
    summed losses and gradients are the whole batch's."""
    logp, old, adv, mask = batch(10)
    fn = get_policy_loss(name)
    by_tokens = objective_defaults(name).get("loss_agg") == "token_mean"
    normalizer = float(mask.sum()) if by_tokens else float(mask.shape[0])
    whole, _ = fn(logp, old, adv, mask)
    (g_whole,) = torch.autograd.grad(whole, logp)
    parts = sum(fn(logp[s], old[s], adv[s], mask[s], normalizer=normalizer)[0]
                for s in (slice(0, 3), slice(3, 4), slice(4, 8)))
    (g_parts,) = torch.autograd.grad(parts, logp)
    assert parts.item() == pytest.approx(whole.item(), rel=1e-12, abs=1e-15)
    torch.testing.assert_close(g_parts, g_whole, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_kl_entropy_and_tis_weights_work_alike_for_every_objective(name):
    fn = get_policy_loss(name)
    logp, old, adv, mask = batch(11)
    ref, ent = old + 0.3, torch.rand_like(old)
    base, _ = fn(logp, old, adv, mask)
    same, m = fn(logp, old, adv, mask, ref_logprobs=ref, entropy=ent, is_weights=torch.ones_like(old))
    assert same.item() == pytest.approx(base.item(), rel=1e-12)  # coefficients 0, unit weights: nothing changes
    with_terms, _ = fn(logp, old, adv, mask, ref_logprobs=ref, kl_coef=0.1, entropy=ent, entropy_coef=0.01)
    # (metrics are reported in float32)
    assert with_terms.item() == pytest.approx(base.item() + 0.1 * m["loss/kl"] - 0.01 * m["actor/entropy"],
                                              rel=1e-6)
    halved, _ = fn(logp, old, adv, mask, is_weights=torch.full_like(old, 0.5))  # a uniform weight scales the loss
    assert halved.item() == pytest.approx(0.5 * base.item(), rel=1e-12)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_bf16_inputs_are_computed_in_fp32(name):
    logp, old, adv, mask = batch(12)
    fn = get_policy_loss(name)
    ref, _ = fn(logp.detach().float(), old.float(), adv.float(), mask)
    low, m = fn(logp.detach().bfloat16(), old.bfloat16(), adv.bfloat16(), mask)
    assert low.dtype == torch.float32 and all(v == v for v in m.values())
    assert abs(low.item() - ref.item()) < 3e-2 * max(1.0, abs(ref.item()))


def test_defaults_are_each_papers_and_every_objective_is_registered():
    assert sorted(POLICY_LOSSES) == sorted(OBJECTIVES)
    assert objective_defaults("gmpo") == {"clip_low": 0.4, "clip_high": 0.4}
    assert objective_defaults("grpo") == {"clip_low": 0.2, "clip_high": 0.2, "loss_agg": "token_mean",
                                          "clip_ratio_c": 3.0}
    assert objective_defaults("gspo") == {"clip_low": 3e-4, "clip_high": 4e-4}
    assert objective_defaults("gspo_token") == {"clip_low": 3e-4, "clip_high": 4e-4,
                                                "loss_agg": "seq_mean_token_mean"}
    assert objective_defaults("cispo") == {"clip_low": 1.0, "clip_high": 0.2, "loss_agg": "token_mean"}
    assert objective_defaults("sapo") == {"tau_pos": 1.0, "tau_neg": 1.05, "loss_agg": "seq_mean_token_mean"}


@pytest.mark.parametrize(("overrides", "fn", "kwargs", "by"), [
    ([], "gmpo_loss", {"clip_low": 0.4, "clip_high": 0.4}, "sequences"),
    (["algorithm.objective=grpo"], "grpo_loss",
     {"clip_low": 0.2, "clip_high": 0.2, "loss_agg": "token_mean", "clip_ratio_c": 3.0}, "tokens"),
    (["algorithm.objective=gspo"], "gspo_loss", {"clip_low": 3e-4, "clip_high": 4e-4}, "sequences"),
    (["algorithm.objective=gspo_token", "algorithm.loss_agg=token_mean", "algorithm.clip_high=0.001"],
     "gspo_token_loss", {"clip_low": 3e-4, "clip_high": 0.001, "loss_agg": "token_mean"}, "tokens"),
    (["algorithm.objective=cispo", "algorithm.clip_high=5"], "cispo_loss",
     {"clip_low": 1.0, "clip_high": 5.0, "loss_agg": "token_mean"}, "tokens"),
    (["algorithm.objective=sapo", "algorithm.sapo_tau_neg=2"], "sapo_loss",
     {"tau_pos": 1.0, "tau_neg": 2.0, "loss_agg": "seq_mean_token_mean"}, "sequences"),
])
def test_the_trainer_passes_each_objective_its_settings(overrides, fn, kwargs, by):
    from mm_gmpo.components import loss_settings
    from mm_gmpo.config import load_config, validate

    cfg = load_config(None, overrides)
    validate(cfg, world_size=1)
    s = loss_settings(cfg)
    assert s.fn.__name__ == fn and s.normalize_by == by
    assert {k: v for k, v in s.kwargs.items() if k not in ("entropy_coef", "kl_coef", "kl_penalty")} == kwargs


def test_the_console_line_shows_sapos_gate_where_the_others_show_clips():
    from mm_gmpo.logger import step_summary

    clipped = step_summary(3, 10, {"reward/mean": 0.5, "ratio/clip_frac_lower": 0.01, "ratio/clip_frac_upper": 0.02})
    gated = step_summary(3, 10, {"reward/mean": 0.5, "ratio/gate_weight_mean": 0.987})
    assert "clip 0.010/0.020" in clipped and "gate" not in clipped
    assert "gate 0.987" in gated and "clip" not in gated


def test_a_checkpoint_from_before_the_paper_defaults_resumes_without_a_change():
    """Checkpoints written when clip_low/clip_high were 0.4 and loss_agg token_mean (ignored by gmpo) compare equal
    to today's null / auto; a real change (another clip, another objective) is still one."""
    from mm_gmpo.config import config_changes, load_config, to_dict

    now = to_dict(load_config(None))
    before = {**now, "algorithm": {**now["algorithm"], "clip_low": 0.4, "clip_high": 0.4, "loss_agg": "token_mean"}}
    assert config_changes(before, now) == ([], [])
    wider = {**now, "algorithm": {**now["algorithm"], "clip_high": 0.5}}
    assert config_changes(now, wider)[0] == ["algorithm.clip_high: 0.4 -> 0.5"]
    gspo = to_dict(load_config(None, ["algorithm.objective=gspo"]))
    assert "algorithm.objective: 'gmpo' -> 'gspo'" in config_changes(now, gspo)[0]
    grpo_before = to_dict(load_config(None, ["algorithm.objective=grpo", "algorithm.clip_low=0.2",
                                             "algorithm.clip_high=0.2", "algorithm.loss_agg=token_mean"]))
    assert config_changes(grpo_before, to_dict(load_config(None, ["algorithm.objective=grpo"]))) == ([], [])
