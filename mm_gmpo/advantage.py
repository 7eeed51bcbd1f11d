"""Group-normalised advantages (GRPO/GMPO outcome supervision). Pure function, no distributed code."""

from __future__ import annotations

import torch

from mm_gmpo.loss import Metrics


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, Metrics]:
    """Advantages for rewards laid out as consecutive groups of ``group_size`` samples of one prompt.

    ``A = (r - mean_group) / (std_group + eps)`` with the unbiased (Bessel-corrected) group std, as in
    GRPO/EasyR1/verl; ``normalize_std=False`` gives ``A = r - mean_group`` (the Dr. GRPO variant).
    A group whose rewards are all equal gets advantage 0 for every sample (it carries no learning signal).
    With ``group_size == 1`` every advantage is 0.

    Args:
        rewards: (N,) rewards, N divisible by group_size; samples of one prompt are consecutive.
        group_size: samples per prompt (n).
        normalize_std: divide by the group std.
        eps: added to the std.

    Returns:
        (advantages (N,) float32, metrics) with reward mean/std/min/max, the fraction of groups whose rewards
        are all equal (``adv/degenerate_group_frac``), and the mean within-group reward std.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"{rewards.numel()} rewards are not a whole number of groups of {group_size}: "
            "the number of samples must be (number of prompts) x n"
        )
    r = rewards.detach().float().view(-1, group_size)
    mean = r.mean(dim=1, keepdim=True)
    centered = r - mean
    std = r.std(dim=1, unbiased=True, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    degenerate = (r == r[:, :1]).all(dim=1, keepdim=True)
    adv = centered / (std + eps) if normalize_std else centered
    adv = torch.where(degenerate, 0.0, adv).view(-1)
    metrics = torch.stack(
        [r.mean(), r.std() if r.numel() > 1 else r.new_zeros(()), r.min(), r.max(),
         degenerate.float().mean(), std.mean(), adv.abs().mean()]
    ).tolist()
    names = ["reward/mean", "reward/std", "reward/min", "reward/max",
             "adv/degenerate_group_frac", "reward/group_std_mean", "adv/abs_mean"]
    return adv, dict(zip(names, metrics, strict=True))


def groups_in_band(values: torch.Tensor, group_size: int, low: float, high: float) -> torch.Tensor:
    """Online filtering (DAPO): a (G,) bool mask of the groups whose mean of ``values`` (per-sample accuracy or
    reward, N = G x group_size, samples of a prompt consecutive) lies strictly between low and high, as EasyR1
    (``low < mean < high``): with (0, 1) exactly the all-wrong and all-right groups go, as DAPO's and verl's
    "std > 0". A group outside the band has advantage 0 everywhere: it costs an update pass and teaches nothing."""
    if values.dim() != 1 or values.numel() % group_size:
        raise ValueError(f"values must be (G x {group_size},), got shape {tuple(values.shape)}")
    means = values.float().view(-1, group_size).mean(-1)
    return (means > low) & (means < high)


def kl_shaped_rewards(rewards: torch.Tensor, token_kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
                      ) -> tuple[torch.Tensor, Metrics]:
    """``algorithm.kl_in_reward``: each response's reward minus ``kl_coef`` x its summed per-token KL to the
    reference (PPO-style shaping, as verl's apply_kl_penalty sums it for outcome advantages). (N,), (N, T), (N, T)."""
    kl_seq = torch.where(mask.bool(), token_kl.float(), 0.0).sum(-1)
    shaped = rewards.float() - kl_coef * kl_seq
    return shaped, {"actor/kl_in_reward_mean": kl_seq.mean().item()}


def step_advantages(scores: torch.Tensor, group_size: int, *, normalize_std: bool, eps: float,
                    token_kl: torch.Tensor | None = None, mask: torch.Tensor | None = None, kl_coef: float = 0.0
                    ) -> tuple[torch.Tensor, Metrics, Metrics]:
    """A step's advantages: of the rewards ``scores``, or with ``token_kl`` (``algorithm.kl_in_reward``) of the
    rewards less ``kl_coef`` x the summed KL. Returns (advantages, adv/* and reward/* metrics (those of the
    rewards, never of the shaped ones), the shaping's metrics)."""
    if token_kl is None:
        adv, metrics = group_advantages(scores, group_size, normalize_std=normalize_std, eps=eps)
        return adv, metrics, {}
    shaped, shaping = kl_shaped_rewards(scores, token_kl, mask, kl_coef)
    adv, metrics = group_advantages(shaped, group_size, normalize_std=normalize_std, eps=eps)
    plain = group_advantages(scores, group_size, normalize_std=normalize_std, eps=eps)[1]
    return adv, metrics | {k: v for k, v in plain.items() if k.startswith("reward/")}, shaping
