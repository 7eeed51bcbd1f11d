"""Policy-gradient objectives, one interface: GMPO (the geometric mean), and beside it GRPO, GSPO, GSPO-token,
CISPO and SAPO, the objectives GMPO is compared with.

Every function here is pure: tensors in, ``(loss, metrics)`` out. No ``torch.distributed``, no config objects.
Each function's keyword defaults are its paper's settings (:func:`objective_defaults` reads them).

Shapes
    logprobs, old_logprobs, mask : (B, T)  per-token log-probs of the sampled response tokens; mask is 1 on
                                           response tokens and 0 on padding (any dtype; nonzero = valid).
    advantages                   : (B,)    one advantage per sequence (GMPO is a sequence-level method).

GMPO (arXiv 2507.20673), per token t of sequence i::

    delta_t  = logprobs_t - old_logprobs_t
    delta'_t = min(delta_t, +clip_high)   if A_i > 0      (clip only from above)
               max(delta_t, -clip_low)    if A_i < 0      (clip only from below)
               0                          if A_i == 0     (no gradient, no overflow)
    w_i      = exp( sum_t m_t delta'_t / sum_t m_t )      (geometric mean of the clipped token ratios)
    loss     = sum_i ( -A_i * w_i ) / normalizer          (normalizer = B unless given)

``clip_low``/``clip_high`` are in log space for GMPO: 0.4 means the token ratio range [e^-0.4, e^0.4]. For the
others they are ratio-space epsilons, the bounds ``1 - clip_low`` and ``1 + clip_high`` (as verl and EasyR1):

    grpo        PPO-clip per token, with dual-clip                      (0.2, 0.2)      token_mean
    gspo        PPO-clip of the length-normalised sequence ratio       (3e-4, 4e-4)    per sequence
    gspo_token  GSPO's ratio as a value, each token's own gradient     (3e-4, 4e-4)    seq_mean_token_mean
    cispo       sg[clip(r_t)] * A * log pi_t: the weight clipped       (1.0 = none, 0.2) token_mean
    sapo        soft gate (4 / tau) sigmoid(tau (r_t - 1)), no clip     tau 1.0 / 1.05  seq_mean_token_mean

All accept ``normalizer``: when a global batch is split into micro-batches and ranks, pass the *global* count
(sequences for GMPO, GSPO and ``seq_mean_token_mean``, valid tokens for ``token_mean``) so that summing the
micro-batch gradients gives exactly the gradient of the global mean. Sequences without a single valid token
contribute 0.

Train/inference mismatch: all accept ``is_weights`` (B, T), per-token truncated importance weights
``min(pi_old / pi_sampler, cap)`` from :func:`truncated_is_weights` (off unless passed). The token-level
objectives multiply each token's loss by its weight; GMPO and GSPO multiply each sequence's loss by the geometric
mean of its tokens' weights, the same mean they take of the policy ratios.

Metrics are floats; all are computed under ``no_grad`` and moved to the host with a single synchronisation.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Literal

import torch

Metrics = dict[str, float]
LossAgg = Literal["token_mean", "seq_mean_token_mean"]


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32: bf16/fp16 inputs are computed in fp32, float64 inputs (the tests' references) stay."""
    return x if x.dtype == torch.float64 else x.float()


def _as_bool_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _check_shapes(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor):
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be (B, T), got shape {tuple(logprobs.shape)}")
    if old_logprobs.shape != logprobs.shape or mask.shape != logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)} and mask "
            f"{tuple(mask.shape)} must have the same (B, T) shape"
        )
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(
            f"advantages must be one value per sequence, shape ({logprobs.shape[0]},), got {tuple(advantages.shape)}"
        )


KL_PENALTIES = ("k1", "k2", "k3", "low_var_kl", "abs", "mse")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "low_var_kl") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) for tokens sampled from pi, with d = logprobs - ref_logprobs:

    k1: d.  abs: |d|.  k2 / mse: d^2 / 2.  k3 / low_var_kl: exp(-d) + d - 1 (>= 0, unbiased, low variance), with
    -d clamped to [-20, 20] and the result to [-10, 10], as verl and EasyR1 clamp it.
    """
    d = logprobs - ref_logprobs
    if kind == "k1":
        return d
    if kind == "abs":
        return d.abs()
    if kind in ("k2", "mse"):
        return 0.5 * d.square()
    if kind in ("k3", "low_var_kl"):
        log_ratio = (-d).clamp(-20.0, 20.0)
        return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(-10.0, 10.0)
    raise ValueError(f"unknown KL penalty {kind!r}; choose one of {', '.join(KL_PENALTIES)}")


def truncated_is_weights(
    old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor, cap: float
) -> tuple[torch.Tensor, Metrics]:
    """Per-token truncated importance weights ``min(exp(old - sampler), cap)`` (1 on padding), detached.

    ``old_logprobs``: the trainer's log-probs of the sampled tokens before the update; ``sampler_logprobs``: the
    rollout engine's (vLLM's) for the same tokens. They differ through kernels and precision; TIS corrects the
    gradient for sampling from the engine's distribution rather than the trainer's.
    """
    if cap <= 0:
        raise ValueError(f"the TIS cap must be > 0, got {cap}")
    mask = _as_bool_mask(mask)
    log_w = torch.where(mask, old_logprobs.detach().float() - sampler_logprobs.detach().float(), 0.0)
    w = torch.exp(log_w.clamp(max=20.0))
    n_tok = mask.sum().clamp(min=1)
    stats = {
        "rollout/tis_clip_frac": (mask & (w > cap)).sum() / n_tok,
        "rollout/tis_weight_mean": torch.where(mask, w.clamp(max=cap), 0.0).sum() / n_tok,
    }
    return w.clamp(max=cap), _finish(stats)


def _checked_is_weights(is_weights: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """The importance weights as a detached float tensor, after checking they are (B, T) like the log-probs."""
    if is_weights.shape != logprobs.shape:
        raise ValueError(f"is_weights must be (B, T) like logprobs, got {tuple(is_weights.shape)}")
    return _wide(is_weights.detach())


def _masked_seq_mean(x: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean of x over valid tokens; 0 for sequences with no valid token."""
    return torch.where(mask, x, 0.0).sum(-1) / lengths.clamp(min=1)


def _regularisers(
    per_token_logprobs: torch.Tensor,
    mask: torch.Tensor,
    lengths: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    kl_coef: float,
    kl_kind: str,
    entropy: torch.Tensor | None,
    entropy_coef: float,
    reduce: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL-to-reference penalty and entropy bonus, reduced with the objective's own aggregation."""
    extra = per_token_logprobs.new_zeros(())
    stats: dict[str, torch.Tensor] = {}
    if ref_logprobs is not None:
        kl = kl_penalty(per_token_logprobs, ref_logprobs.to(per_token_logprobs.dtype), kl_kind)
        kl_term = reduce(kl)
        if kl_coef:
            extra = extra + kl_coef * kl_term
        stats["loss/kl"] = kl_term.detach()  # the penalty's value before kl_coef (summed over micro-batches)
        stats["actor/kl_mean"] = torch.where(mask, kl, 0.0).sum().detach() / mask.sum().clamp(min=1)
    if entropy is not None:
        ent_term = reduce(_wide(entropy))
        if entropy_coef:
            extra = extra - entropy_coef * ent_term
        stats["actor/entropy"] = ent_term.detach()
    return extra, stats


@torch.no_grad()
def _ratio_metrics(delta: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
    """Token and sequence log-ratio ranges plus approx KL(old || new) (k3, token mean)."""
    big = torch.finfo(delta.dtype).max
    any_valid = mask.any()
    valid_seq = lengths > 0
    seq_log_ratio = _masked_seq_mean(delta, mask, lengths)
    zero = delta.new_zeros(())
    n_tok = mask.sum().clamp(min=1)
    approx_kl = torch.where(mask, torch.expm1(delta.clamp(max=20.0)) - delta, 0.0).sum() / n_tok
    return {
        "ratio/token_log_ratio_min": torch.where(any_valid, torch.where(mask, delta, big).min(), zero),
        "ratio/token_log_ratio_max": torch.where(any_valid, torch.where(mask, delta, -big).max(), zero),
        "ratio/seq_log_ratio_min": torch.where(any_valid, torch.where(valid_seq, seq_log_ratio, big).min(), zero),
        "ratio/seq_log_ratio_max": torch.where(any_valid, torch.where(valid_seq, seq_log_ratio, -big).max(), zero),
        "ratio/seq_log_ratio_mean": seq_log_ratio[valid_seq].sum() / valid_seq.sum().clamp(min=1),
        "ratio/approx_kl": approx_kl,
    }


def _finish(metrics: dict[str, torch.Tensor]) -> Metrics:
    keys = list(metrics)
    values = torch.stack([metrics[k].detach().float().reshape(()) for k in keys]).tolist()  # one host sync
    return dict(zip(keys, values, strict=True))


def _metrics(policy: torch.Tensor, own: dict[str, torch.Tensor], delta: torch.Tensor, mask: torch.Tensor,
             lengths: torch.Tensor, adv: torch.Tensor, reg_stats: dict[str, torch.Tensor]) -> Metrics:
    """What every objective reports around its own metrics (clip fractions, gate weight): the policy loss, the
    ratio ranges, the share of zero advantages and the KL / entropy terms; one host sync."""
    return _finish({"loss/policy": policy.detach(), **own, **_ratio_metrics(delta, mask, lengths),
                    "adv/zero_frac": (adv == 0).float().mean(), **reg_stats})


def _prepare(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor):
    """Checked shapes; (bool mask, log-probs, detached advantages (B,), lengths, masked log-ratio), the floats in at
    least fp32 (:func:`_wide`)."""
    _check_shapes(logprobs, old_logprobs, advantages, mask)
    mask = _as_bool_mask(mask)
    logprobs32 = _wide(logprobs)
    delta = torch.where(mask, logprobs32 - _wide(old_logprobs.detach()), 0.0)
    return mask, logprobs32, _wide(advantages.detach()), mask.sum(-1), delta


def gmpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.4,
    clip_high: float = 0.4,
    *,
    normalizer: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_penalty: str = "low_var_kl",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Geometric-Mean Policy Optimization loss (see module docstring for the exact formula).

    Args:
        logprobs: (B, T) log-probs of the response tokens under the policy being trained (carries grad).
        old_logprobs: (B, T) log-probs under the policy that sampled them (no grad needed).
        advantages: (B,) sequence advantages.
        mask: (B, T) 1 for response tokens, 0 for padding.
        clip_low: log-space clip for A < 0 (delta is clipped below at -clip_low).
        clip_high: log-space clip for A > 0 (delta is clipped above at +clip_high).
        normalizer: divide the summed sequence losses by this (the global number of sequences when the batch is
            split across micro-batches/ranks); default: B.
        ref_logprobs: (B, T) reference-policy log-probs; enables the KL metrics and, with kl_coef > 0, the
            penalty ``kl_coef * mean_i(masked token mean of kl_penalty)``. Paper setting: no KL.
        kl_coef: weight of the KL penalty.
        kl_penalty: the per-token estimator (:func:`kl_penalty`; default low_var_kl = clamped k3).
        entropy: (B, T) per-token entropy of the policy; reported, and with entropy_coef > 0 subtracted.
        entropy_coef: weight of the entropy bonus.
        is_weights: (B, T) truncated importance weights for the train/inference mismatch (see
            :func:`truncated_is_weights`); each sequence's loss is scaled by their geometric mean. Default: none.

    Returns:
        (loss, metrics): a scalar loss tensor and a dict of float metrics.
    """
    mask, logprobs32, adv, lengths, delta = _prepare(logprobs, old_logprobs, advantages, mask)
    n_seq = float(normalizer) if normalizer is not None else float(logprobs.shape[0])
    pos = (adv > 0)[:, None]
    neg = (adv < 0)[:, None]
    clipped = torch.where(pos, delta.clamp(max=clip_high), torch.where(neg, delta.clamp(min=-clip_low), 0.0))
    seq_log_w = _masked_seq_mean(clipped, mask, lengths)
    weight = torch.exp(seq_log_w)
    per_seq = torch.where(lengths > 0, -adv * weight, 0.0)
    if is_weights is not None:
        log_is = torch.where(mask, _checked_is_weights(is_weights, logprobs).clamp(min=1e-30).log(), 0.0)
        per_seq = per_seq * torch.exp(_masked_seq_mean(log_is, mask, lengths))
    loss = per_seq.sum() / n_seq

    def seq_reduce(x: torch.Tensor) -> torch.Tensor:
        return _masked_seq_mean(x, mask, lengths).sum() / n_seq

    extra, reg_stats = _regularisers(
        logprobs32, mask, lengths, ref_logprobs, kl_coef, kl_penalty, entropy, entropy_coef, seq_reduce
    )
    loss = loss + extra

    with torch.no_grad():
        n_tok = mask.sum().clamp(min=1)
        own = {
            "ratio/clip_frac_upper": (mask & pos & (delta > clip_high)).sum() / n_tok,
            "ratio/clip_frac_lower": (mask & neg & (delta < -clip_low)).sum() / n_tok,
            "ratio/seq_weight_mean": weight[lengths > 0].sum() / (lengths > 0).sum().clamp(min=1),
        }
    return loss, _metrics(per_seq.sum() / n_seq, own, delta, mask, lengths, adv, reg_stats)


def _token_reducer(loss_agg: LossAgg, mask: torch.Tensor, lengths: torch.Tensor, normalizer: float | None
                   ) -> Callable[[torch.Tensor], torch.Tensor]:
    """GRPO's aggregation of a (B, T) token quantity into the batch loss (see ``loss_agg`` in :func:`grpo_loss`)."""
    if loss_agg == "token_mean":
        denom = float(normalizer) if normalizer is not None else mask.sum().clamp(min=1)
        return lambda x: torch.where(mask, x, 0.0).sum() / denom
    n_seq = float(normalizer) if normalizer is not None else float(mask.shape[0])
    return lambda x: _masked_seq_mean(x, mask, lengths).sum() / n_seq


def _token_objective(per_token: torch.Tensor, logprobs32: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor,
                     loss_agg: LossAgg, normalizer: float | None, is_weights: torch.Tensor | None,
                     ref_logprobs: torch.Tensor | None, kl_coef: float, kl_kind: str, entropy: torch.Tensor | None,
                     entropy_coef: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """A token-level objective's (B, T) losses aggregated with ``loss_agg`` (TIS weights per token), plus the KL
    and entropy terms reduced the same way: (loss, policy part, regulariser metrics)."""
    if loss_agg not in ("token_mean", "seq_mean_token_mean"):
        raise ValueError(f"loss_agg must be 'token_mean' or 'seq_mean_token_mean', got {loss_agg!r}")
    if is_weights is not None:
        per_token = per_token * _checked_is_weights(is_weights, logprobs32)
    reduce = _token_reducer(loss_agg, mask, lengths, normalizer)
    policy = reduce(per_token)
    extra, reg_stats = _regularisers(logprobs32, mask, lengths, ref_logprobs, kl_coef, kl_kind, entropy,
                                     entropy_coef, reduce)
    return policy + extra, policy, reg_stats


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    *,
    loss_agg: LossAgg = "token_mean",
    clip_ratio_c: float | None = 3.0,
    normalizer: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_penalty: str = "low_var_kl",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """GRPO / PPO-clip token objective, same interface as :func:`gmpo_loss`.

    ``clip_low``/``clip_high`` are ratio-space epsilons: the token ratio is clipped to
    [1 - clip_low, 1 + clip_high] (defaults 0.2/0.2; DAPO's clip-higher uses clip_high=0.28).

    ``clip_ratio_c`` (dual-clip PPO, Ye et al. 2020; verl's default 3.0): for A < 0 the token loss is also capped
    at ``-A * clip_ratio_c``, so one token whose ratio exploded cannot dominate the batch; None turns it off.

    ``loss_agg``:
        ``token_mean`` (default, as verl/EasyR1/DAPO): sum over all valid tokens / number of valid tokens
            (``normalizer`` = global valid-token count when split into micro-batches).
        ``seq_mean_token_mean`` (the original GRPO paper): per-sequence token mean, then mean over sequences
            (``normalizer`` = global sequence count, empty responses included: they add 0 to the sum and count
            in the denominator, so one empty response does not raise the others' weight; verl divides by the
            non-empty rows of each micro-batch).
    """
    mask, logprobs32, adv, lengths, delta = _prepare(logprobs, old_logprobs, advantages, mask)
    adv = adv[:, None]
    ratio = torch.exp(delta.clamp(max=20.0))
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    if clip_ratio_c is not None:  # dual-clip: for A < 0 the loss is at most -A * c, however large the ratio
        if clip_ratio_c <= 1.0:
            raise ValueError(f"clip_ratio_c must be > 1 (verl's default is 3), got {clip_ratio_c}")
        dual = adv < 0
        per_token = torch.where(dual, torch.minimum(per_token, -adv * clip_ratio_c), per_token)
    loss, policy, reg_stats = _token_objective(per_token, logprobs32, mask, lengths, loss_agg, normalizer,
                                               is_weights, ref_logprobs, kl_coef, kl_penalty, entropy, entropy_coef)

    with torch.no_grad():
        n_tok = mask.sum().clamp(min=1)
        pos, neg = adv > 0, adv < 0
        own = {
            "ratio/clip_frac_upper": (mask & pos & (ratio > 1.0 + clip_high)).sum() / n_tok,
            "ratio/clip_frac_lower": (mask & neg & (ratio < 1.0 - clip_low)).sum() / n_tok,
            "ratio/dual_clip_frac": ((mask & neg & (ratio > clip_ratio_c)).sum() / n_tok if clip_ratio_c is not None
                                     else n_tok.new_zeros((), dtype=torch.float32)),
        }
    return loss, _metrics(policy, own, delta, mask, lengths, adv, reg_stats)


def gspo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    *,
    normalizer: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_penalty: str = "low_var_kl",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """GSPO, Group Sequence Policy Optimization (Zheng et al., arXiv 2507.18071, eq. 5-7), sequence level::

        s_i  = exp( sum_t m_t delta_t / sum_t m_t )              (the length-normalised sequence ratio)
        loss = sum_i max( -A_i s_i, -A_i clip(s_i, 1 - clip_low, 1 + clip_high) ) / normalizer

    One clip per sequence, in ratio space; the paper's (3e-4, 4e-4) are the defaults (the mean log-ratio moves
    far less than a token's). ``normalizer``: the global sequence count. KL and entropy: per-sequence token means.
    ``is_weights``: each sequence's loss is scaled by the geometric mean of its tokens' TIS weights (as GMPO).
    """
    mask, logprobs32, adv, lengths, delta = _prepare(logprobs, old_logprobs, advantages, mask)
    n_seq = float(normalizer) if normalizer is not None else float(logprobs.shape[0])
    seq_log_ratio = _masked_seq_mean(delta, mask, lengths)
    s = torch.exp(seq_log_ratio.clamp(-20.0, 20.0))
    per_seq = torch.maximum(-adv * s, -adv * s.clamp(1.0 - clip_low, 1.0 + clip_high))
    per_seq = torch.where(lengths > 0, per_seq, 0.0)
    if is_weights is not None:
        log_is = torch.where(mask, _checked_is_weights(is_weights, logprobs).clamp(min=1e-30).log(), 0.0)
        per_seq = per_seq * torch.exp(_masked_seq_mean(log_is, mask, lengths))
    policy = per_seq.sum() / n_seq

    def seq_reduce(x: torch.Tensor) -> torch.Tensor:
        return _masked_seq_mean(x, mask, lengths).sum() / n_seq

    extra, reg_stats = _regularisers(logprobs32, mask, lengths, ref_logprobs, kl_coef, kl_penalty, entropy,
                                     entropy_coef, seq_reduce)
    with torch.no_grad():
        valid = lengths > 0
        n_valid = valid.sum().clamp(min=1)
        own = {  # the fraction of sequences whose ratio is clipped on the side that takes their gradient away
            "ratio/clip_frac_upper": (valid & (adv > 0) & (s > 1.0 + clip_high)).sum() / n_valid,
            "ratio/clip_frac_lower": (valid & (adv < 0) & (s < 1.0 - clip_low)).sum() / n_valid,
        }
    return policy + extra, _metrics(policy, own, delta, mask, lengths, adv, reg_stats)


def gspo_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    *,
    loss_agg: LossAgg = "seq_mean_token_mean",
    normalizer: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_penalty: str = "low_var_kl",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """GSPO-token (arXiv 2507.18071, eq. 13-14): the token ratio ``s_i,t = sg[s_i] * pi_t / sg[pi_t]``, whose
    value is the sequence ratio s_i and whose gradient is that of the token's own log-prob; PPO-clip per token::

        loss = agg_t max( -A_i s_i,t, -A_i clip(s_i,t, 1 - clip_low, 1 + clip_high) )

    With one advantage per sequence (as here) its gradient equals GSPO's under ``seq_mean_token_mean`` (the
    paper's 1/G sum_i 1/|y_i| sum_t, the default); it exists for token-level advantages and for comparison with
    the peers, which ship it (verl's ``gspo`` is this form). ``loss_agg="token_mean"`` weighs sequences by length.
    """
    mask, logprobs32, adv, lengths, delta = _prepare(logprobs, old_logprobs, advantages, mask)
    seq_log_ratio = _masked_seq_mean(delta, mask, lengths).clamp(-20.0, 20.0)
    log_s = seq_log_ratio.detach()[:, None] + logprobs32 - logprobs32.detach()
    s = torch.exp(log_s)
    a = adv[:, None]
    per_token = torch.maximum(-a * s, -a * s.clamp(1.0 - clip_low, 1.0 + clip_high))
    loss, policy, reg_stats = _token_objective(per_token, logprobs32, mask, lengths, loss_agg, normalizer,
                                               is_weights, ref_logprobs, kl_coef, kl_penalty, entropy, entropy_coef)
    with torch.no_grad():
        n_tok = mask.sum().clamp(min=1)
        own = {
            "ratio/clip_frac_upper": (mask & (a > 0) & (s > 1.0 + clip_high)).sum() / n_tok,
            "ratio/clip_frac_lower": (mask & (a < 0) & (s < 1.0 - clip_low)).sum() / n_tok,
        }
    return loss, _metrics(policy, own, delta, mask, lengths, adv, reg_stats)


def cispo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 1.0,
    clip_high: float = 0.2,
    *,
    loss_agg: LossAgg = "token_mean",
    normalizer: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_penalty: str = "low_var_kl",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """CISPO, Clipped IS-weight Policy Optimization (MiniMax-M1, arXiv 2506.13585, eq. 4-5)::

        r_t  = exp(delta_t);   w_t = sg[ clip(r_t, 1 - clip_low, 1 + clip_high) ]
        loss = agg_t ( -w_t A_i log pi_t )         (default token_mean: 1 / sum_i |o_i| sum_i sum_t, the paper's)

    The clip bounds the weight, never the gradient: every token keeps a gradient (PPO-clip drops those outside
    the band). The paper sets no lower bound and tunes only the upper one without stating its value: the defaults
    are clip_low=1.0 (lower bound 0, i.e. none; verl's example writes 10) and clip_high=0.2 (verl's example).
    The loss's value is the paper's objective (it involves log pi itself, so it is not near 0 as the others are).
    """
    mask, logprobs32, adv, lengths, delta = _prepare(logprobs, old_logprobs, advantages, mask)
    ratio = torch.exp(delta.clamp(-20.0, 20.0))
    weight = ratio.clamp(1.0 - clip_low, 1.0 + clip_high).detach()
    a = adv[:, None]
    per_token = torch.where(mask, -weight * a * logprobs32, 0.0)
    loss, policy, reg_stats = _token_objective(per_token, logprobs32, mask, lengths, loss_agg, normalizer,
                                               is_weights, ref_logprobs, kl_coef, kl_penalty, entropy, entropy_coef)
    with torch.no_grad():
        n_tok = mask.sum().clamp(min=1)
        own = {  # tokens whose weight was capped (CISPO clips the weight whatever the advantage's sign)
            "ratio/clip_frac_upper": (mask & (a != 0) & (ratio > 1.0 + clip_high)).sum() / n_tok,
            "ratio/clip_frac_lower": (mask & (a != 0) & (ratio < 1.0 - clip_low)).sum() / n_tok,
        }
    return loss, _metrics(policy, own, delta, mask, lengths, adv, reg_stats)


def sapo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    loss_agg: LossAgg = "seq_mean_token_mean",
    normalizer: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_penalty: str = "low_var_kl",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """SAPO, Soft Adaptive Policy Optimization (Gao et al., arXiv 2511.20347, eq. 7-9): a smooth gate instead of
    a hard clip::

        r_t = exp(delta_t);   f(r) = (4 / tau) sigmoid(tau (r - 1))     tau = tau_pos if A_i > 0 else tau_neg
        loss = agg_t ( -A_i f(r_t) )               (default seq_mean_token_mean: the paper's 1/G sum_i 1/|y_i|)

    f'(1) = 1, so on-policy the gradient is the plain policy gradient; off-policy it fades as 4 s (1 - s) with
    s = sigmoid(tau (r - 1)) instead of dropping to 0 at a bound. Defaults: the paper's tau_pos = 1.0, tau_neg =
    1.05 (negative tokens fade faster). There is no clip: ``ratio/gate_weight_mean`` is the mean fade factor.
    """
    if tau_pos <= 0 or tau_neg <= 0:
        raise ValueError(f"tau_pos and tau_neg must be > 0, got {tau_pos} and {tau_neg}")
    mask, logprobs32, adv, lengths, delta = _prepare(logprobs, old_logprobs, advantages, mask)
    ratio = torch.exp(delta.clamp(-20.0, 20.0))
    a = adv[:, None]
    tau = torch.where(a > 0, a.new_tensor(tau_pos), a.new_tensor(tau_neg))  # in the inputs' precision
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    per_token = torch.where(mask, -a * gate, 0.0)
    loss, policy, reg_stats = _token_objective(per_token, logprobs32, mask, lengths, loss_agg, normalizer,
                                               is_weights, ref_logprobs, kl_coef, kl_penalty, entropy, entropy_coef)
    with torch.no_grad():
        sig = torch.sigmoid(tau * (ratio - 1.0))
        fade = torch.where(mask, 4.0 * sig * (1.0 - sig), 0.0)
        own = {"ratio/gate_weight_mean": fade.sum() / mask.sum().clamp(min=1)}
    return loss, _metrics(policy, own, delta, mask, lengths, adv, reg_stats)


PolicyLossFn = Callable[..., tuple[torch.Tensor, Metrics]]
POLICY_LOSSES: dict[str, PolicyLossFn] = {"gmpo": gmpo_loss, "grpo": grpo_loss, "gspo": gspo_loss,
                                          "gspo_token": gspo_token_loss, "cispo": cispo_loss, "sapo": sapo_loss}


def get_policy_loss(name: str) -> PolicyLossFn:
    """Look up an objective by name: gmpo, grpo, gspo, gspo_token, cispo or sapo."""
    try:
        return POLICY_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(POLICY_LOSSES)}") from None


def objective_defaults(name: str) -> dict[str, object]:
    """The keyword defaults of an objective's function (its paper's settings): clip_low, clip_high, loss_agg,
    tau_pos, tau_neg, clip_ratio_c where it takes them."""
    params = inspect.signature(get_policy_loss(name)).parameters
    return {k: p.default for k, p in params.items()
            if k in ("clip_low", "clip_high", "loss_agg", "clip_ratio_c", "tau_pos", "tau_neg")}


def objective_kwargs(name: str, settings: dict[str, object]) -> dict[str, object]:
    """The objective's own keyword arguments from ``settings`` (keyed by argument name), those it does not take
    left out: None (and loss_agg 'auto') give its paper's default, except clip_ratio_c, where None means off."""
    return {k: default if (settings.get(k) is None or settings.get(k) == "auto") and k != "clip_ratio_c"
            else settings.get(k) for k, default in objective_defaults(name).items()}
